"""The virtstore command against a running virtstored: ``-c unix:///...``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from conftest import dir_pool_xml, qemu_info, requires_qemu_img
from server_fixtures import Daemon, daemon_fixture  # noqa: F401


def virtstore(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    full_env = {k: v for k, v in os.environ.items()
                if k not in ("VIRTSTORE_DEFAULT_URI", "VIRTSTORE_ROOT")}
    full_env.update(env or {})
    return subprocess.run([sys.executable, "-m", "virtstore.cli.main", *args],
                          capture_output=True, text=True, timeout=120, env=full_env)


@requires_qemu_img
def test_cli_through_the_daemon(daemon: Daemon, tmp_path: Path) -> None:
    uri = daemon.rw_uri
    xml = tmp_path / "pool.xml"
    target = tmp_path / "cli-pool"
    xml.write_text(dir_pool_xml("clipool", target))
    r = virtstore("-c", uri, "pool-define", str(xml))
    assert r.returncode == 0, r
    assert "Pool clipool defined from" in r.stdout
    r = virtstore("-c", uri, "pool-start", "clipool", "--build")
    assert r.returncode == 0, r
    r = virtstore("-c", uri, "vol-create-as", "clipool", "d.qcow2", "16M", "--format", "qcow2")
    assert r.returncode == 0, r
    assert qemu_info(target / "d.qcow2")["virtual-size"] == 16 << 20
    r = virtstore("-c", uri, "vol-list", "clipool")
    assert r.returncode == 0 and "d.qcow2" in r.stdout and str(target) in r.stdout
    r = virtstore("-c", uri, "pool-list", "--all", "--json")
    names = [p["name"] for p in json.loads(r.stdout)]
    assert names == ["clipool", "default"]
    r = virtstore("-c", uri, "vol-path", "d.qcow2", "--pool", "clipool")
    assert r.stdout.strip() == str(target / "d.qcow2")
    # the default URI from the environment, and the read-only socket
    r = virtstore("pool-info", "clipool", env={"VIRTSTORE_DEFAULT_URI": daemon.ro_uri})
    assert r.returncode == 0 and "running" in r.stdout
    r = virtstore("vol-delete", "d.qcow2", "--pool", "clipool",
                  env={"VIRTSTORE_DEFAULT_URI": daemon.ro_uri})
    assert r.returncode == 1
    assert r.stderr.startswith("error: Failed to delete vol d.qcow2\nerror: read-only access")
    assert r.stderr.count("\n") == 2
    assert (target / "d.qcow2").exists()
    r = virtstore("-c", uri, "vol-delete", "d.qcow2", "--pool", "clipool")
    assert r.returncode == 0, r
    assert not (target / "d.qcow2").exists()
    r = virtstore("-c", uri, "pool-info", "nope")
    assert r.returncode == 1
    assert r.stderr == ("error: failed to get pool 'nope'\n"
                        "error: Storage pool not found: no storage pool with matching name "
                        "'nope'\n")


def test_cli_without_a_daemon(tmp_path: Path) -> None:
    r = virtstore("-c", f"unix://{tmp_path}/absent.sock", "pool-list")
    assert r.returncode == 1
    assert r.stderr.startswith("error: cannot connect to virtstored at unix://")
    assert r.stderr.count("\n") == 1
