"""Incremental backups of raw volumes in a btrfs pool (a loop-mounted btrfs): each
backup reads a reflink snapshot of the volume, and the next one only the ranges whose
extents moved since the last backup's snapshot (``btrfs-extents`` tracking)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from block_fixtures import BlockLab, lab_fixture  # noqa: F401
from test_backup_volumes import CHUNK, MiB, chunk_files, done, manifests
from virtstore.api import VolumeCreateArgs
from virtstore.api.embedded import EmbeddedConnection
from virtstore.backends import backend_for
from virtstore.backends.btrfs import SNAPSHOT_DIR, changed_extents
from virtstore.data.extents import (
    FIEMAP_EXTENT_ENCODED,
    FIEMAP_EXTENT_LAST,
    PhysicalExtent,
    data_extents,
    punch_hole,
)


@pytest.fixture
def bpool(conn: EmbeddedConnection, lab: BlockLab,
          tmp_path: Path) -> Iterator[Path]:
    problem = backend_for("btrfs").host_problem()
    if problem:
        pytest.skip(problem)
    mnt = tmp_path / "mnt"
    conn.pool_define_xml(f"<pool type='btrfs'><name>b</name><source><device "
                         f"path='{lab.loop(256 * MiB)}'/></source><target><path>{mnt}"
                         "</path></target></pool>")
    conn.pool_start("b", build=True)
    yield mnt
    conn.pool_stop("b")


def write(path: Path, offset: int, data: bytes) -> None:
    with open(path, "r+b") as fh:
        fh.seek(offset)
        fh.write(data)


def hidden_snapshots(mnt: Path, vol: str) -> list[str]:
    d = mnt / SNAPSHOT_DIR / vol
    return sorted(os.listdir(d)) if d.is_dir() else []


def test_incremental_reads_only_the_extents_that_moved(conn: EmbeddedConnection, bpool: Path,
                                                       tmp_path: Path) -> None:
    conn.volume_create("b", VolumeCreateArgs("d.img", 64 * MiB, allocation=0))
    img = bpool / "d.img"
    for k in range(6):  # chunks 0-5 hold data, 6-15 are holes
        write(img, k * CHUNK, os.urandom(CHUNK))
    bdir = tmp_path / "bk"
    done(conn, conn.volume_backup("b", "d.img", str(bdir)).id)
    (full,) = manifests(conn, bdir)
    assert (full["kind"], full["tracking"]) == ("full", "btrfs-extents")
    assert full["stats"]["chunks_read"] == 6 and full["stats"]["chunks_written"] == 6
    assert full["snapshot"] == f"virtstore-backup-{full['id']}"
    assert hidden_snapshots(bpool, "d.img") == [f".{full['snapshot']}"]
    assert conn.volume_snapshot_list("b", "d.img") == []  # the storage's, not the user's
    point1 = img.read_bytes()

    write(img, 2 * CHUNK - 4096, os.urandom(MiB))  # chunks 1 and 2
    write(img, 9 * CHUNK + 8192, os.urandom(4096))  # chunk 9, a hole until now
    fd = os.open(img, os.O_RDWR)
    try:
        punch_hole(fd, 4 * CHUNK, CHUNK)  # chunk 4 now reads as zeros
    finally:
        os.close(fd)
    done(conn, conn.volume_backup("b", "d.img", str(bdir), incremental=True).id)
    inc = manifests(conn, bdir)[-1]
    assert (inc["kind"], inc["parent"], inc["tracking"]) == ("incremental", full["id"],
                                                            "btrfs-extents")
    assert inc["warnings"] == []
    stats = inc["stats"]
    assert (stats["chunks_read"], stats["chunks_zero"], stats["chunks_written"]) == (4, 1, 3)
    assert len(chunk_files(bdir)) == 9
    # One snapshot per chain: the previous backup's went.
    assert hidden_snapshots(bpool, "d.img") == [f".{inc['snapshot']}"]
    point2 = img.read_bytes()

    done(conn, conn.volume_restore(str(bdir), "b", "p1.img", point=full["id"]).id)
    done(conn, conn.volume_restore(str(bdir), "b", "p2.img").id)
    assert (bpool / "p1.img").read_bytes() == point1
    assert (bpool / "p2.img").read_bytes() == point2
    assert point1 != point2
    job = conn.job_wait(conn.backup_verify(str(bdir)).id)
    assert job.state == "done", job.error

    # The previous snapshot removed behind virtstore's back: a full backup, saying why.
    (bpool / SNAPSHOT_DIR / "d.img" / f".{inc['snapshot']}").unlink()
    done(conn, conn.volume_backup("b", "d.img", str(bdir), incremental=True).id)
    last = manifests(conn, bdir)[-1]
    assert last["kind"] == "full" and last["parent"] is None
    assert last["warnings"] == [f"snapshot '{inc['snapshot']}' is missing from the volume: "
                                "full backup"]
    with open(img, "rb") as fh:
        data = sum(n for _, n in data_extents(fh.fileno(), 0, 64 * MiB))
    assert last["stats"]["chunks_read"] * CHUNK >= data
    done(conn, conn.volume_restore(str(bdir), "b", "p3.img").id)
    assert (bpool / "p3.img").read_bytes() == point2
    # The volume's deletion takes its backup snapshot with it.
    conn.volume_delete("b", "d.img")
    assert not (bpool / SNAPSHOT_DIR / "d.img").exists()


def test_a_qcow2_volume_keeps_its_own_tracking(conn: EmbeddedConnection, bpool: Path,
                                               tmp_path: Path) -> None:
    """The changed ranges of a qcow2 file are not the guest's: a compat 0.10 image (no
    bitmaps) is compared by block hashes, and takes no snapshot."""
    conn.volume_create_xml("b", "<volume><name>q.qcow2</name><capacity>16777216</capacity>"
                           "<target><format type='qcow2'/><compat>0.10</compat></target>"
                           "</volume>")
    done(conn, conn.volume_backup("b", "q.qcow2", str(tmp_path / "bk")).id)
    (m,) = manifests(conn, tmp_path / "bk")
    assert m["tracking"] == "block-hash"
    assert hidden_snapshots(bpool, "q.qcow2") == []


def ext(logical: int, physical: int, length: int, flags: int = 0) -> PhysicalExtent:
    return PhysicalExtent(logical, physical, length, flags)


def test_changed_extents_compares_where_the_data_lies() -> None:
    K = 4096
    old = [ext(0, 100 * K, 8 * K), ext(8 * K, 500 * K, 8 * K),
           ext(32 * K, 900 * K, 4 * K, FIEMAP_EXTENT_ENCODED | FIEMAP_EXTENT_LAST)]
    new = [ext(0, 100 * K, 2 * K),  # the same place: unchanged
           ext(2 * K, 700 * K, 2 * K),  # rewritten
           ext(4 * K, 104 * K, 4 * K),  # the old extent's tail, in place
           ext(8 * K, 501 * K, 8 * K),  # the same disk range, shifted by one block
           ext(20 * K, 800 * K, 4 * K),  # data where there was a hole
           ext(32 * K, 900 * K, 4 * K, FIEMAP_EXTENT_ENCODED | FIEMAP_EXTENT_LAST)]
    assert changed_extents(old, new, 40 * K) == [(2 * K, 2 * K), (8 * K, 8 * K),
                                                 (20 * K, 4 * K), (32 * K, 4 * K)]
    # Data that became a hole changed too; holes in both did not.
    assert changed_extents(old[:1], [], 40 * K) == [(0, 8 * K)]
    assert changed_extents([], [], 40 * K) == []
