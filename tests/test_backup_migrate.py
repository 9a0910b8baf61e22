"""migrate-check: a guest's disks against another host, a real virtstored (over its
unix socket) with a small tmpfs pool, and a second engine that sees the same Ceph
cluster."""

from __future__ import annotations

import base64
import json
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from cli_fixtures import Cli, cli_fixture  # noqa: F401
from conftest import dir_pool_xml
from data_fixtures import tmpfs
from net_fixtures import Server, ceph_fixture  # noqa: F401
from server_fixtures import Daemon, daemon_fixture  # noqa: F401
from test_backend_rbd import ceph, pool_xml, rconn, rpool, secret_xml  # noqa: F401
from virtstore import connect
from virtstore.api import VolumeCreateArgs
from virtstore.api.embedded import EmbeddedConnection
from virtstore.api.guests import migrate_check

MiB = 1 << 20


def disk(dev: str, fmt: str, source: str) -> str:
    kind = "volume" if "pool=" in source else "file"
    return (f"<disk type='{kind}' device='disk'><driver name='qemu' type='{fmt}'/>"
            f"<source {source}/><target dev='{dev}' bus='virtio'/></disk>")


def domain(*disks: str) -> str:
    return (f"<domain type='kvm'><name>web</name><memory unit='MiB'>512</memory>"
            f"<devices>{''.join(disks)}</devices></domain>")


@pytest.fixture
def small_target(daemon: Daemon, tmp_path: Path) -> Iterator[str]:
    """The target host: virtstored with one dir pool 'small' on a 16 MiB tmpfs."""
    with tmpfs(tmp_path, "16M") as mnt:
        with connect(daemon.rw_uri) as target:
            target.pool_define_xml(dir_pool_xml("small", mnt))
            target.pool_start("small")
        yield daemon.rw_uri
        with connect(daemon.rw_uri) as target:
            target.pool_stop("small")


def test_room_is_counted_for_all_disks_together(conn: EmbeddedConnection, pool: str,
                                                pooldir: Path, small_target: str,
                                                cli: Cli, tmp_path: Path) -> None:
    conn.volume_create_xml(pool, "<volume><name>web.qcow2</name><capacity unit='M'>64"
                           "</capacity><target><format type='qcow2'/></target></volume>")
    subprocess.run(["qemu-io", "-f", "qcow2", "-c", "write -P 7 0 10M",
                    str(pooldir / "web.qcow2")], check=True, capture_output=True)
    conn.volume_create(pool, VolumeCreateArgs("logs.img", 64 * MiB, allocation=0))
    with open(pooldir / "logs.img", "r+b") as fh:
        fh.write(b"\x01" * (8 * MiB))
    xml = domain(disk("vda", "qcow2", f"file='{pooldir}/web.qcow2'"),
                 disk("vdb", "raw", f"pool='{pool}' volume='logs.img'"),
                 disk("vdc", "raw", "file='/nowhere/else.img'"))
    with connect(small_target) as target:
        # (virtstored made its default pool too, with all the room of /var.)
        overall, disks = migrate_check(conn, xml, target, pool="small")
    assert overall == "no"
    vda, vdb, vdc = disks
    assert (vda.verdict, vda.pool) == ("copy", "small")
    assert 10 * MiB < vda.required < 11 * MiB  # what qemu-img measure says, not 64 MiB
    assert vdb.verdict == "no" and 8 * MiB < vdb.required < 9 * MiB
    assert "with the disks placed there before this one" in vdb.reason
    assert (vdc.verdict, vdc.source) == ("unknown", "/nowhere/else.img")

    (tmp_path / "web.xml").write_text(xml)
    r = cli("migrate-check", str(tmp_path / "web.xml"), "--target", small_target, "--pool",
            "small", "--json", ok=False)
    assert json.loads(r.out)["verdict"] == "no"
    assert r.err.strip().splitlines()[-1] == (
        f"error: the guest cannot move to {small_target}: no place there for disk(s) vdb")
    # Alone, the raw disk fits: the verdict is yes.
    (tmp_path / "logs.xml").write_text(domain(disk("vdb", "raw",
                                                   f"pool='{pool}' volume='logs.img'")))
    r = cli("migrate-check", str(tmp_path / "logs.xml"), "--target", small_target, "--pool",
            "small")
    assert f"Migration to {small_target}: yes" in r.out
    # A pool the target does not have.
    r = cli("migrate-check", str(tmp_path / "logs.xml"), "--target", small_target, "--pool",
            "big", ok=False)
    assert "no running pool 'big' on the target" in r.out


def test_same_ceph_pool_is_shared_and_a_raw_only_pool_refuses_qcow2(
        conn: EmbeddedConnection, rpool: str, ceph: Server,  # noqa: F811
        pool: str, pooldir: Path, tmp_path: Path) -> None:
    conn.volume_create(rpool, VolumeCreateArgs("root", 64 * MiB))
    conn.volume_create_xml(pool, "<volume><name>d.qcow2</name><capacity unit='M'>8"
                           "</capacity><target><format type='qcow2'/></target></volume>")
    xml = domain(disk("vda", "raw", f"pool='{rpool}' volume='root'"),
                 disk("vdb", "qcow2", f"file='{pooldir}/d.qcow2'"))
    # The other host: its own engine, its own name for a pool on the same Ceph pool.
    with EmbeddedConnection(str(tmp_path / "other")) as other:
        u = other.secret_define_xml(secret_xml("client.admin secret"))
        other.secret_set_value(u, base64.b64decode(ceph.info["admin_key"]))
        other.pool_define_xml(pool_xml("theirs", ceph))
        other.pool_start("theirs")
        try:
            overall, (vda, vdb) = migrate_check(conn, xml, other)
        finally:
            other.pool_stop("theirs")
    assert overall == "no"
    assert (vda.verdict, vda.pool) == ("shared", "theirs")
    assert vdb.verdict == "no"
    assert vdb.reason == "pool 'theirs' holds no qcow2 volumes (only raw)"
