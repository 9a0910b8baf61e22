"""btrfs pools (a virtstore addition): files on a loop-mounted btrfs, instant clones by
reflink and snapshots by reflink or subvolume snapshot, tested on the backend."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from block_fixtures import BlockLab, lab_fixture, sh  # noqa: F401
from virtstore.api.embedded import EmbeddedConnection
from virtstore.backends import backend_for
from virtstore.backends.base import CreateRequest
from virtstore.backends.btrfs import SNAPSHOT_DIR, BtrfsBackend
from virtstore.errors import AlreadyExists, OperationInvalid
from virtstore.host import mounts
from virtstore.xml import PoolDef, PoolSource, PoolTarget, SourceDevice, VolDef

MiB = 1 << 20


@pytest.fixture
def btrfs_pool(lab: BlockLab, tmp_path: Path) -> tuple[BtrfsBackend, PoolDef]:
    be = backend_for("btrfs")
    assert isinstance(be, BtrfsBackend)
    if be.host_problem():
        pytest.skip(be.host_problem() or "")
    dev = lab.loop(256 * MiB)
    pool = PoolDef(type="btrfs", name="b", source=PoolSource(devices=[SourceDevice(dev)]),
                   target=PoolTarget(path=str(tmp_path / "mnt")))
    be.build(pool, None)
    be.start(pool)
    return be, pool


def _write(path: str, data: bytes) -> None:
    with open(path, "r+b") as fh:
        fh.write(data)


def _make(be: BtrfsBackend, pool: PoolDef, name: str, size: int) -> str:
    final = be.volume_path(pool, name)
    staging = be.staging_path(pool, "t" + name)
    be.create_volume(pool, staging, CreateRequest(vol=VolDef(name=name), capacity=size,
                                                  allocation=0, format="raw"))
    be.commit_volume(pool, staging, final)
    return final


def test_clone_and_snapshots(btrfs_pool: tuple[BtrfsBackend, PoolDef]) -> None:
    be, pool = btrfs_pool
    target = pool.target.path or ""
    m = mounts.mounted_at(target)
    assert m is not None and m.fstype == "btrfs"
    vol = _make(be, pool, "a.img", 32 * MiB)
    _write(vol, b"one" * 1000)
    rec = be.clone_volume(pool, "a.img", "b.img")
    assert rec.name == "b.img" and rec.capacity == 32 * MiB
    with open(be.volume_path(pool, "b.img"), "rb") as fh:
        assert fh.read(3000) == b"one" * 1000
    with pytest.raises(AlreadyExists):
        be.clone_volume(pool, "a.img", "b.img")
    # Shared extents: btrfs reports them as shared.
    du = sh("btrfs", "filesystem", "du", "--raw", "-s", vol, be.volume_path(pool, "b.img"))
    assert du.returncode == 0
    snap = be.snapshot_volume(pool, "a.img", "s1")
    assert snap.kind == "reflink" and snap.size == 32 * MiB
    _write(vol, b"two" * 1000)
    assert [s.name for s in be.list_snapshots(pool, "a.img")] == ["s1"]
    be.revert_snapshot(pool, "a.img", "s1")
    with open(vol, "rb") as fh:
        assert fh.read(3000) == b"one" * 1000
    # Listings skip the snapshot directory.
    res = be.scan(pool, {})
    assert {r.name for r in res.changed} == {"a.img", "b.img"}
    assert os.path.isdir(os.path.join(target, SNAPSHOT_DIR))
    be.delete_snapshot(pool, "a.img", "s1")
    assert be.list_snapshots(pool, "a.img") == []


def test_subvolume_volume_snapshot(btrfs_pool: tuple[BtrfsBackend, PoolDef]) -> None:
    be, pool = btrfs_pool
    sub = be.volume_path(pool, "tree")
    sh("btrfs", "-q", "subvolume", "create", sub)
    Path(sub, "f").write_text("v1")
    snap = be.snapshot_volume(pool, "tree", "s1")
    assert snap.kind == "subvolume"
    Path(sub, "f").write_text("v2")
    be.revert_snapshot(pool, "tree", "s1")
    assert Path(sub, "f").read_text() == "v1"
    clone = be.clone_volume(pool, "tree", "tree2")
    assert Path(clone.path, "f").read_text() == "v1"
    rec = be.read_volume(pool, "tree")
    assert rec is not None
    be.delete_volume(pool, rec)
    assert not os.path.exists(sub)


def test_stop_unmounts_and_start_checks_btrfs(btrfs_pool: tuple[BtrfsBackend, PoolDef],
                                              tmp_path: Path) -> None:
    be, pool = btrfs_pool
    be.stop(pool)
    assert mounts.mounted_at(pool.target.path or "") is None
    plain = PoolDef(type="btrfs", name="p", target=PoolTarget(path=str(tmp_path)))
    assert be.scan(pool, {}).changed == []  # the unmounted directory is empty
    with pytest.raises(OperationInvalid, match="not on a btrfs filesystem"):
        be.start(plain)


def test_subvolume_clone_through_the_connection(conn: EmbeddedConnection, lab: BlockLab,
                                                tmp_path: Path) -> None:
    """vol-clone of a subvolume volume is a writable subvolume snapshot, published under
    its new name like any clone."""
    if backend_for("btrfs").host_problem():
        pytest.skip(backend_for("btrfs").host_problem() or "")
    dev = lab.loop(256 * MiB)
    mnt = tmp_path / "mnt"
    conn.pool_define_xml(f"<pool type='btrfs'><name>b</name><source><device path='{dev}'/>"
                         f"</source><target><path>{mnt}</path></target></pool>")
    conn.pool_start("b", build=True)
    try:
        sh("btrfs", "-q", "subvolume", "create", str(mnt / "tree"))
        (mnt / "tree" / "f").write_text("v1")
        conn.pool_refresh("b")
        assert conn.volume_features("b", "tree")["clone-full"]
        job = conn.volume_clone("b", "tree", "tree2")
        assert conn.job_wait(job.id).state == "done"
        assert (mnt / "tree2" / "f").read_text() == "v1"
        assert sh("btrfs", "subvolume", "show", str(mnt / "tree2")).returncode == 0
        assert conn.volume_info("b", "tree2").type == "dir"
        assert not [p for p in os.listdir(mnt) if p.startswith(".virtstore-staging")]
    finally:
        conn.pool_stop("b")
