"""A guest disk made through virtstored over HTTPS, from another process, used by QEMU.

The client is examples/remote_guest.py run as a subprocess with the server's URL, a
token and the CA: it makes a base image and a linked qcow2 clone, gets the clone's
``<disk>`` element, validates a domain document holding it against libvirt's schema,
checks the backing chain with qemu-img and starts a paused TCG QEMU on the disk.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from lxml import etree

import virtstore
from conftest import REPO, dir_pool_xml
from server_fixtures import (
    RO_TOKEN,
    RW_TOKEN,
    Certs,
    Daemon,
    certs_fixture,  # noqa: F401
    tls_daemon_fixture,  # noqa: F401
)

EXAMPLE = REPO / "examples" / "remote_guest.py"
POOL = "guests"


def _example() -> ModuleType:
    spec = importlib.util.spec_from_file_location("remote_guest", EXAMPLE)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _run(d: Daemon, certs: Certs, *args: str, token: str = RW_TOKEN,
         timeout: float = 180) -> tuple[int, dict[str, Any], str]:
    """The example in a process of its own; its exit status, JSON report and stderr."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("VIRTSTORE_")}
    proc = subprocess.run([sys.executable, str(EXAMPLE), d.https_uri, "--token", token,
                           "--ca", str(certs.ca), *args],
                          capture_output=True, text=True, timeout=timeout, env=env)
    try:
        report = json.loads(proc.stdout) if proc.stdout.strip() else {}
    except ValueError:
        pytest.fail(f"the example printed no JSON report:\n{proc.stdout}\n{proc.stderr}")
    return proc.returncode, report, proc.stderr


@pytest.fixture(name="pool_dir")
def pool_dir_fixture(tls_daemon: Daemon, tmp_path: Path) -> Path:
    """A running dir pool, made over the daemon's own read-write unix socket."""
    target = tmp_path / "pool"
    with virtstore.connect(tls_daemon.rw_uri) as conn:
        conn.pool_define_xml(dir_pool_xml(POOL, target))
        conn.pool_start(POOL, build=True)
    return target


def test_remote_guest_end_to_end(tls_daemon: Daemon, certs: Certs, pool_dir: Path) -> None:
    if shutil.which("qemu-system-x86_64") is None:
        pytest.skip("qemu-system-x86_64 is not installed (Debian package qemu-system-x86)")
    rc, report, err = _run(tls_daemon, certs, "--pool", POOL, "--prefix", "vm1", "--keep")
    assert rc == 0, f"example failed: {err}\n{json.dumps(report, indent=2)}"
    base, clone = pool_dir / "vm1-base.img", pool_dir / "vm1-clone.qcow2"
    assert POOL in report["pools"]
    assert (report["base"], report["clone"]) == (str(base), str(clone))

    # The <disk> element, as the client got it over HTTPS.
    disk = etree.fromstring(report["disk"])
    assert (disk.tag, disk.get("type"), disk.get("device")) == ("disk", "file", "disk")
    assert disk.find("driver").attrib == {"name": "qemu", "type": "qcow2"}  # type: ignore[union-attr]
    assert disk.find("source").attrib == {"file": str(clone)}  # type: ignore[union-attr]
    assert disk.find("target").attrib == {"dev": "vda", "bus": "virtio"}  # type: ignore[union-attr]
    # ... inside the domain document the example validated.
    dom = etree.fromstring(report["domain"])
    assert dom.get("type") == "qemu"
    assert dom.find("os/type").attrib == {"arch": "x86_64", "machine": "pc"}  # type: ignore[union-attr]
    assert etree.tostring(dom.find("devices/disk")) == etree.tostring(disk)  # type: ignore[arg-type]

    # The backing chain, seen by qemu-img and by the running QEMU's drive.
    assert report["qemu_img"] == {"format": "qcow2", "backing": str(base)}
    guest = report["qemu"]
    assert guest["status"] == "prelaunch"
    assert (guest["image"], guest["format"], guest["backing"]) == (str(clone), "qcow2",
                                                                     str(base))
    assert guest["reads_base"] is True
    assert not os.path.exists(f"/proc/{guest['pid']}/exe"), "QEMU was left running"

    # The same facts from this side, and the requests were the token's, over TCP.
    with virtstore.connect(tls_daemon.rw_uri) as conn:
        xml = etree.fromstring(conn.volume_xml(POOL, "vm1-clone.qcow2"))
        assert xml.findtext("backingStore/path") == str(base)
        assert conn.volume_info(POOL, "vm1-base.img").format == "raw"
    log = tls_daemon.log()
    assert re.search(r"who=token:admin@127\.0\.0\.1:\d+ "
                     rf"op=POST /v1/pools/{POOL}/volumes/vm1-base\.img/clone result=202",
                     log), log


def test_remote_guest_cleans_up_and_reports_failures(tls_daemon: Daemon, certs: Certs,
                                                     pool_dir: Path) -> None:
    # No such pool: the failure is the example's exit status and message.
    rc, report, err = _run(tls_daemon, certs, "--pool", "nosuch", "--prefix", "vm2")
    assert rc == 1
    assert "no pool 'nosuch'" in err and "nosuch" in report["error"]
    # A read-only token may list pools but not make volumes: nothing is left behind.
    rc, report, err = _run(tls_daemon, certs, "--pool", POOL, "--prefix", "vm3",
                           token=RO_TOKEN)
    assert rc == 1
    assert "read-only" in report["error"], report
    # A full run without --keep deletes both volumes (QEMU or not: with it missing the
    # run fails, after the volumes were made).
    rc, report, err = _run(tls_daemon, certs, "--pool", POOL, "--prefix", "vm4")
    if shutil.which("qemu-system-x86_64") is not None:
        assert rc == 0, err
    with virtstore.connect(tls_daemon.rw_uri) as conn:
        assert conn.list_volumes(POOL) == []
    assert sorted(os.listdir(pool_dir)) == []


def test_domain_check_is_libvirts_schema() -> None:
    """The example's validation refuses what libvirt would: a disk on an unknown bus, a
    disk without a target, an unknown hypervisor."""
    ex = _example()
    disk = ("<disk type='file' device='disk'><driver name='qemu' type='qcow2'/>"
            "<source file='/var/lib/x.qcow2'/><target dev='vda' bus='virtio'/></disk>")
    ex.validate_domain(ex.domain_document("ok", disk))
    with pytest.raises(ex.CheckFailed, match="not valid"):
        ex.validate_domain(ex.domain_document("bad", disk.replace("virtio", "pcie")))
    dom = ex.domain_document("no-target", disk)
    dom.find("devices/disk").remove(dom.find("devices/disk/target"))
    with pytest.raises(ex.CheckFailed, match="not valid"):
        ex.validate_domain(dom)
    dom = ex.domain_document("bogus", disk)
    dom.set("type", "bogus")
    with pytest.raises(ex.CheckFailed, match="not valid"):
        ex.validate_domain(dom)
