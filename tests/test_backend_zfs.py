"""zfs pools on loop devices, under zfs-fuse here (the kernel module elsewhere):
zpool create/import/export/destroy, datasets, snapshots and clones for real; zvols
only where the kernel module provides them."""

from __future__ import annotations

from pathlib import Path

import pytest

from block_fixtures import BlockLab, lab_fixture, sh, zfs_daemon_fixture  # noqa: F401
from virtstore.api import VolumeCreateArgs
from virtstore.api.embedded import EmbeddedConnection
from virtstore.backends import backend_for
from virtstore.backends.zfs import ZfsBackend
from virtstore.errors import AlreadyExists, Unsupported
from virtstore.host import zfs
from virtstore.xml import parse_pool_xml

KiB = 1 << 10
MiB = 1 << 20

IMPORT_SAMPLE = """  pool: tank
    id: 5501936407605855611
 state: ONLINE
action: The pool can be imported using its name or numeric identifier.
config:

\ttank        ONLINE
\t  mirror-0  ONLINE
\t    loop2   ONLINE
\t    loop3   ONLINE
"""


def test_parse_import_listing() -> None:
    pools = zfs.parse_import_listing(IMPORT_SAMPLE)
    assert [(p.name, p.state, p.devices) for p in pools] == [
        ("tank", "ONLINE", ["/dev/loop2", "/dev/loop3"])]


DATA = Path(__file__).resolve().parent / "data" / "block"


def test_parse_stream_dump_of_a_zvol() -> None:
    """``zstream dump -v`` of a 32 MiB zvol's streams, recorded in the kernel lab:
    64 KiB written at 0 and at 4 MiB, snapshot a; 8 KiB written at 12 MiB, the first
    64 KiB discarded, snapshot b. Object 2 (the zvol's properties) is left out."""
    full = (DATA / "zstream-dump-full.txt").read_text().splitlines()
    written, freed = zfs.parse_stream_dump(full)
    assert written == [(0, 64 * KiB), (4 * MiB, 64 * KiB)]
    assert sorted(freed) == [(64 * KiB, 4 * MiB - 64 * KiB),
                             (4 * MiB + 64 * KiB, zfs.TO_THE_END)]
    incr = (DATA / "zstream-dump-incremental.txt").read_text().splitlines()
    written, freed = zfs.parse_stream_dump(incr)
    assert written == [(12 * MiB, 8 * KiB)]
    # The discarded range, and holes b shares with a (reported all the same).
    assert sorted(freed) == [(0, 4 * MiB), (4 * MiB + 64 * KiB, 8 * MiB - 64 * KiB),
                             (12 * MiB + 8 * KiB, zfs.TO_THE_END)]


def zfs_xml(name: str, *devs: str) -> str:
    src = "".join(f"<device path='{d}'/>" for d in devs)
    return f"<pool type='zfs'><name>{name}</name><source>{src}</source></pool>"


@pytest.mark.usefixtures("zfs_daemon")
def test_zpool_lifecycle_and_datasets(lab: BlockLab, conn: EmbeddedConnection) -> None:
    dev = lab.loop(128 * MiB)
    name = lab.zpool()
    conn.pool_define_xml(zfs_xml(name, dev))
    conn.pool_build(name)
    assert zfs.pool_imported(name)
    conn.pool_start(name)
    info = conn.pool_info(name)
    assert info.state == "running" and 60 * MiB < info.capacity <= 128 * MiB
    assert conn.list_volumes(name) == []
    if not zfs.has_zvols():
        with pytest.raises(Unsupported, match="zfs-fuse"):
            conn.volume_create(name, VolumeCreateArgs(name="vol1", capacity=8 * MiB))
        assert conn.list_volumes(name) == []
    else:
        conn.volume_create(name, VolumeCreateArgs(name="vol1", capacity=8 * MiB))
        assert conn.volume_info(name, "vol1").path == f"/dev/zvol/{name}/vol1"
    # Snapshots and clones of a dataset, through the backend.
    sh("zfs", "create", f"{name}/ds")
    be = backend_for("zfs")
    assert isinstance(be, ZfsBackend)
    pool = parse_pool_xml(conn.pool_xml(name))
    assert be.snapshot_volume(pool, "ds", "s1") == f"{name}/ds@s1"
    with pytest.raises(AlreadyExists):
        be.snapshot_volume(pool, "ds", "s1")
    assert [s.name for s in be.list_snapshots(pool, "ds")] == [f"{name}/ds@s1"]
    target = be.clone_volume(pool, "ds", "ds-clone", snapshot="s1")
    clone = zfs.dataset(target)
    assert clone is not None and clone.origin == f"{name}/ds@s1"
    be.revert_snapshot(pool, "ds", "s1")
    be.clone_volume(pool, "ds", "ds-clone2")  # takes its own snapshot
    sh("zfs", "destroy", target)
    be.delete_snapshot(pool, "ds", "s1")
    assert [s.name for s in be.list_snapshots(pool, "ds")] == [
        f"{name}/ds@virtstore-clone-ds-clone2"]
    # stop exports, discovery finds it, start imports it again, delete destroys it.
    conn.pool_stop(name)
    assert not zfs.pool_imported(name)
    assert f"<name>{name}</name>" in conn.find_pool_sources("zfs")
    conn.pool_start(name)
    assert zfs.pool_imported(name)
    conn.pool_stop(name)
    conn.pool_delete(name)
    assert not zfs.pool_imported(name)
    assert f"<name>{name}</name>" not in conn.find_pool_sources("zfs")


def test_host_problem_is_honest() -> None:
    be = backend_for("zfs")
    problem = be.host_problem()
    if problem is None:
        assert zfs.flavour() is not None
    else:
        assert "zfs" in problem.lower() or "ZFS" in problem
