"""Backups restored into pools that are not directories: a real one-node Ceph cluster
(rbd) and zfs (zvols where the kernel module makes them). Restores into logical pools
need device-mapper and run in the kernel lab (tests/kernel/test_logical.py)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from block_fixtures import BlockLab, lab_fixture, zfs_daemon_fixture  # noqa: F401
from net_fixtures import (  # noqa: F401
    Server,
    ceph_cmd,
    ceph_fixture,
    gluster_fixture,
    nfs_fixture,
)
from test_backend_disk import disk_xml
from test_backend_gluster import gl, gmode, gpool  # noqa: F401
from test_backend_netfs import nfs, upool  # noqa: F401
from test_backend_rbd import ceph, download, rconn, rpool, upload  # noqa: F401
from test_backend_zfs import zfs_xml
from test_backup_volumes import CHUNK, MiB, done, fill_chunks, qcow2
from virtstore.api import VolumeCreateArgs
from virtstore.api.embedded import EmbeddedConnection
from virtstore.host import zfs


def raw_bytes(img: Path) -> bytes:
    out = img.with_suffix(".raw-copy")
    subprocess.run(["qemu-img", "convert", "-U", "-O", "raw", str(img), str(out)],
                   check=True)
    try:
        return out.read_bytes()
    finally:
        out.unlink()


def test_qcow2_backup_restored_as_an_rbd_image(rconn: EmbeddedConnection,  # noqa: F811
                                               rpool: str,  # noqa: F811
                                               pool: str, pooldir: Path,
                                               tmp_path: Path) -> None:
    qcow2(rconn, pool, "g.qcow2", 32 * MiB)
    img = pooldir / "g.qcow2"
    fill_chunks(img, 1, 2, 7)  # chunks 1 and 2; 0 and 3-7 stay holes
    bdir = tmp_path / "bk"
    done(rconn, rconn.volume_backup(pool, "g.qcow2", str(bdir)).id)
    done(rconn, rconn.volume_restore(str(bdir), rpool, "restored").id)
    info = rconn.volume_info(rpool, "restored")
    assert (info.format, info.capacity) == ("raw", 32 * MiB)
    data = download(rconn, rpool, "restored")
    assert data == raw_bytes(img)
    assert data[CHUNK:CHUNK + 4] == bytes([7]) * 4 and data[:CHUNK] == bytes(CHUNK)
    # A format the pool cannot hold is refused before anything is made.
    with pytest.raises(Exception, match="format 'qcow2' is not supported"):
        rconn.volume_restore(str(bdir), rpool, "again", format="qcow2")
    assert [v.name for v in rconn.list_volumes(rpool)] == ["restored"]


@pytest.mark.usefixtures("zfs_daemon")
def test_restore_into_a_zfs_pool(lab: BlockLab, conn: EmbeddedConnection, pool: str,
                                 pooldir: Path, tmp_path: Path) -> None:
    name = lab.zpool()
    conn.pool_define_xml(zfs_xml(name, lab.loop(128 * MiB)))
    conn.pool_build(name)
    conn.pool_start(name)
    qcow2(conn, pool, "g.qcow2", 16 * MiB)
    fill_chunks(pooldir / "g.qcow2", 2, 1, 3)
    bdir = tmp_path / "bk"
    done(conn, conn.volume_backup(pool, "g.qcow2", str(bdir)).id)
    job = conn.job_wait(conn.volume_restore(str(bdir), name, "restored").id)
    if not zfs.has_zvols():
        assert job.state == "failed"
        assert "zvols need the ZFS kernel module" in (job.error or "")
        assert conn.list_volumes(name) == []
        assert not [d for d in zfs.datasets(name) if "staging" in d.name]
        return
    assert job.state == "done", job.error
    vol = conn.volume_info(name, "restored")
    with open(vol.path, "rb") as fh:
        assert fh.read() == raw_bytes(pooldir / "g.qcow2")


def test_rbd_incremental_reads_only_what_diff_iterate_reports(
        rconn: EmbeddedConnection, rpool: str, ceph: Server,  # noqa: F811
        pool: str, pooldir: Path, tmp_path: Path) -> None:
    rconn.volume_create(rpool, VolumeCreateArgs(name="disk", capacity=32 * MiB))
    v1 = b"".join(bytes([10 + k]) * CHUNK for k in range(4))  # chunks 0-3
    upload(rconn, rpool, "disk", v1)
    bdir = tmp_path / "bk"
    done(rconn, rconn.volume_backup(rpool, "disk", str(bdir)).id)
    (full,) = rconn.backup_list(str(bdir))
    assert (full["kind"], full["tracking"]) == ("full", "rbd-diff")
    assert full["snapshot"] == f"virtstore-backup-{full['id']}"
    assert full["stats"]["chunks_read"] == 4
    # The snapshot is the storage's, hidden from the volume's snapshot list.
    assert snaps(ceph, "disk") == [full["snapshot"]]
    assert rconn.volume_snapshot_list(rpool, "disk") == []

    upload(rconn, rpool, "disk", b"\x77" * MiB, offset=2 * CHUNK - 4096)  # chunks 1 and 2
    upload(rconn, rpool, "disk", b"\x88" * 4096, offset=6 * CHUNK)  # chunk 6
    done(rconn, rconn.volume_backup(rpool, "disk", str(bdir), incremental=True).id)
    inc = rconn.backup_list(str(bdir))[-1]
    assert (inc["kind"], inc["parent"], inc["tracking"]) == ("incremental", full["id"],
                                                            "rbd-diff")
    assert inc["stats"]["chunks_read"] == 3 and inc["stats"]["chunks_written"] == 3
    assert snaps(ceph, "disk") == [inc["snapshot"]]  # the older one went
    v2 = bytearray(v1 + bytes(4 * CHUNK))
    v2[2 * CHUNK - 4096:2 * CHUNK - 4096 + MiB] = b"\x77" * MiB
    v2[6 * CHUNK:6 * CHUNK + 4096] = b"\x88" * 4096
    assert download(rconn, rpool, "disk") == bytes(v2)

    # Each point of the chain restores its own bytes.
    done(rconn, rconn.volume_restore(str(bdir), pool, "p1.img", point=full["id"]).id)
    done(rconn, rconn.volume_restore(str(bdir), pool, "p2.img").id)
    assert (pooldir / "p1.img").read_bytes() == v1 + bytes(4 * CHUNK)
    assert (pooldir / "p2.img").read_bytes() == bytes(v2)
    job = rconn.job_wait(rconn.backup_verify(str(bdir)).id)
    assert job.state == "done", job.error

    # The snapshot removed behind virtstore's back: the next one is full, and says why.
    ceph_cmd(ceph, "rbd", "snap", "rm", f"rbd/{rconn.volume_info(rpool, 'disk').name}"
             f"@{inc['snapshot']}")
    done(rconn, rconn.volume_backup(rpool, "disk", str(bdir), incremental=True).id)
    last = rconn.backup_list(str(bdir))[-1]
    assert last["kind"] == "full" and last["stats"]["chunks_read"] == 5
    assert last["warnings"] == [f"snapshot '{inc['snapshot']}' is missing from the volume: "
                                "full backup"]


def snaps(srv: Server, image: str) -> list[str]:
    out = ceph_cmd(srv, "rbd", "snap", "ls", "--format", "json", f"rbd/{image}").stdout
    return [s["name"] for s in json.loads(out)]


def _restore_twice(conn: EmbeddedConnection, src_pool: str, src_dir: Path, into: str,
                   files: Path, tmp_path: Path) -> None:
    """A qcow2 volume's backup restored as raw and as qcow2; the files on the server's
    side hold the guest's bytes."""
    qcow2(conn, src_pool, "g.qcow2", 16 * MiB)
    img = src_dir / "g.qcow2"
    fill_chunks(img, 1, 3, 9)
    bdir = tmp_path / "bk"
    done(conn, conn.volume_backup(src_pool, "g.qcow2", str(bdir)).id)
    want = raw_bytes(img)
    done(conn, conn.volume_restore(str(bdir), into, "r.img", format="raw").id)
    assert (files / "r.img").read_bytes() == want
    done(conn, conn.volume_restore(str(bdir), into, "r.qcow2", format="qcow2").id)
    assert conn.volume_info(into, "r.qcow2").format == "qcow2"
    assert raw_bytes(files / "r.qcow2") == want
    assert sorted(v.name for v in conn.list_volumes(into)) == ["r.img", "r.qcow2"]


def test_restore_into_gluster(conn: EmbeddedConnection, gpool: str,  # noqa: F811
                              gl: Server, pool: str, pooldir: Path,  # noqa: F811
                              tmp_path: Path) -> None:
    _restore_twice(conn, pool, pooldir, gpool, Path(gl.info["brick"]), tmp_path)


def test_restore_into_userspace_nfs(conn: EmbeddedConnection, upool: str,  # noqa: F811
                                    nfs: Server, pool: str, pooldir: Path,  # noqa: F811
                                    tmp_path: Path) -> None:
    _restore_twice(conn, pool, pooldir, upool, Path(nfs.info["export"]), tmp_path)


def test_restore_into_a_disk_pool(lab: BlockLab, conn: EmbeddedConnection, pool: str,
                                  pooldir: Path, tmp_path: Path) -> None:
    """A backup restored as a new partition: its bytes at the partition's place on the
    disk, the gaps between chunks zeroed over what the disk held before."""
    dev = lab.loop(64 * MiB)
    with open(dev, "r+b") as fh:  # old bytes where the partition will go
        fh.write(b"\xee" * (64 * MiB))
    qcow2(conn, pool, "g.qcow2", 16 * MiB)
    img = pooldir / "g.qcow2"
    fill_chunks(img, 1, 3, 9)
    bdir = tmp_path / "bk"
    done(conn, conn.volume_backup(pool, "g.qcow2", str(bdir)).id)
    conn.pool_define_xml(disk_xml("d", dev))
    conn.pool_build("d")
    conn.pool_start("d")
    part = Path(dev).name + "p1"
    done(conn, conn.volume_restore(str(bdir), "d", part).id)
    info = conn.volume_info("d", part)
    assert info.capacity >= 16 * MiB
    with open(info.path, "rb") as fh:
        got = fh.read(16 * MiB)
    assert got == raw_bytes(img)
    assert [v.name for v in conn.list_volumes("d")] == [part]
