"""The backend contract: what each backend advertises is what its code does.

Every feature a pool type lists comes from the methods its backend overrides; a walk
over the pool types this machine can run calls every operation on real volumes and
checks that each advertised one works and each unadvertised one fails with the
"unsupported" error.
"""

from __future__ import annotations

import io
import os
from collections.abc import Callable
from pathlib import Path

import pytest

from block_fixtures import BlockLab, lab_fixture, lvm  # noqa: F401
from virtstore.api.embedded import EmbeddedConnection
from virtstore.backends import POOL_TYPES, backend_for
from virtstore.backends._file_volumes import reflink_capable
from virtstore.backends.base import FEATURES, Backend
from virtstore.errors import Unsupported, VirtstoreError
from virtstore.types import VolumeCreateArgs

MiB = 1 << 20


@pytest.mark.parametrize("ptype", POOL_TYPES)
def test_features_are_derived_from_the_code(ptype: str) -> None:
    be = backend_for(ptype)
    has = be.features()
    for feature, op in FEATURES.items():
        overridden = getattr(type(be), op) is not getattr(Backend, op)
        if feature != "export":
            assert has[feature] <= overridden, (ptype, feature)
    # What pool-capabilities --features shows is this very table.
    assert be.supports("build") == (type(be).build is not Backend.build)


def test_capabilities_list_what_the_backends_do(conn: EmbeddedConnection) -> None:
    rows = {r["type"]: r for r in conn.pool_type_features()}
    for ptype in ("rbd", "gluster"):
        r = rows[ptype]
        assert r["clone"] and r["upload"] and r["download"] and r["resize"], r
        assert r["snapshots"], r
    assert rows["logical"]["resize"] == backend_for("logical").supports("vol_resize")
    for ptype in ("zfs", "btrfs", "dir"):
        assert rows[ptype]["features"]["snapshot"] and rows[ptype]["snapshots"], ptype
    assert not rows["iscsi"]["clone"] and not rows["iscsi"]["snapshots"]
    for r in rows.values():
        assert bool(r["snapshots"]) == r["features"]["snapshot"], r["type"]


def _attempts(conn: EmbeddedConnection, pool: str, vol: str,
              tmp: Path) -> dict[str, Callable[[], object]]:
    """One call per feature; each returns when the operation worked and raises when not
    (a job that fails raises its error)."""
    cap = conn.volume_info(pool, vol).capacity

    def job(info: object) -> None:
        done = conn.job_wait(info.id)  # type: ignore[attr-defined]
        if done.state != "done":
            raise (Unsupported if done.error_code == "unsupported" else VirtstoreError)(
                done.error or "")

    def export() -> None:
        with conn.volume_export_nbd(pool, vol, socket_path=str(tmp / f"{vol}.sock"),
                                    read_only=True):
            pass

    return {
        "snapshot": lambda: conn.volume_snapshot_create(pool, vol, "s1"),
        "snapshot-external": lambda: conn.volume_snapshot_create(pool, vol, "s2",
                                                                 external=True),
        "clone-full": lambda: job(conn.volume_clone(pool, vol, vol + "-full")),
        "clone-linked": lambda: job(conn.volume_clone(pool, vol, vol + "-linked",
                                                      linked=True)),
        "copy": lambda: job(conn.volume_create_from(
            pool, f"<volume><name>{vol}-copy</name><capacity>{cap}</capacity></volume>",
            pool, vol)),
        "resize-grow": lambda: job(conn.volume_resize(pool, vol, cap + 4 * MiB)),
        "resize-shrink": lambda: job(conn.volume_resize(pool, vol, cap, shrink=True)),
        "upload": lambda: job(conn.volume_upload(pool, vol, io.BytesIO(b"u" * 4096))),
        "download": lambda: job(conn.volume_download(pool, vol, io.BytesIO())),
        "wipe": lambda: job(conn.volume_wipe(pool, vol)),
        "export": export,
    }


def _walk(conn: EmbeddedConnection, pool: str, vol: str, tmp: Path) -> dict[str, bool]:
    features = conn.volume_features(pool, vol)
    assert set(features) == set(FEATURES)
    seen = {}
    for feature, attempt in _attempts(conn, pool, vol, tmp).items():
        # Asked afresh: a volume's features follow its state (a snapshot may change it).
        advertised = conn.volume_features(pool, vol)[feature]
        try:
            attempt()
        except Unsupported as exc:
            assert not advertised, f"{pool}/{vol}: {feature} advertised but: {exc}"
            seen[feature] = False
            continue
        assert advertised, f"{pool}/{vol}: {feature} works but is not advertised"
        seen[feature] = True
    return seen


def test_walk_dir_pool(conn: EmbeddedConnection, tmp_path: Path) -> None:
    target = tmp_path / "pool"
    conn.pool_define_xml(f"<pool type='dir'><name>d</name><target><path>{target}</path>"
                         "</target></pool>")
    conn.pool_start("d", build=True)
    conn.volume_create("d", VolumeCreateArgs(name="r.img", capacity=8 * MiB))
    conn.volume_create("d", VolumeCreateArgs(name="q.qcow2", capacity=8 * MiB,
                                             format="qcow2"))
    conn.volume_create("d", VolumeCreateArgs(name="v.vmdk", capacity=8 * MiB,
                                             format="vmdk"))
    raw = _walk(conn, "d", "r.img", tmp_path)
    # A raw volume's snapshot is a reflink: only where the filesystem shares extents.
    assert raw["snapshot"] == reflink_capable(str(target)) and not raw["snapshot-external"]
    assert raw["clone-full"] and raw["clone-linked"] and raw["upload"] and raw["wipe"]
    qcow = _walk(conn, "d", "q.qcow2", tmp_path)
    assert all(qcow.values()), qcow
    vmdk = _walk(conn, "d", "v.vmdk", tmp_path)
    assert not vmdk["resize-grow"] and not vmdk["snapshot"] and vmdk["clone-full"]


def test_walk_btrfs_pool(conn: EmbeddedConnection, lab: BlockLab, tmp_path: Path) -> None:
    if backend_for("btrfs").host_problem():
        pytest.skip(backend_for("btrfs").host_problem() or "")
    dev = lab.loop(256 * MiB)
    conn.pool_define_xml(f"<pool type='btrfs'><name>b</name><source><device path='{dev}'/>"
                         f"</source><target><path>{tmp_path / 'mnt'}</path></target></pool>")
    conn.pool_start("b", build=True)
    try:
        conn.volume_create("b", VolumeCreateArgs(name="r.img", capacity=8 * MiB))
        raw = _walk(conn, "b", "r.img", tmp_path)
        # On btrfs a raw volume has snapshots (reflinks), not external ones.
        assert raw["snapshot"] and not raw["snapshot-external"], raw
        assert [s.name for s in conn.volume_snapshot_list("b", "r.img")] == ["s1"]
    finally:
        conn.pool_stop("b")


def test_walk_logical_pool(conn: EmbeddedConnection, lab: BlockLab, tmp_path: Path) -> None:
    if os.path.exists("/dev/mapper/control"):
        pytest.skip("device-mapper is here: the kernel lab walks logical pools for real")
    dev = lab.loop(64 * MiB)
    vg = lab.vg()
    conn.pool_define_xml(f"<pool type='logical'><name>{vg}</name><source><device "
                         f"path='{dev}'/><name>{vg}</name><format type='lvm2'/></source>"
                         f"<target><path>/dev/{vg}</path></target></pool>")
    conn.pool_start(vg, build=True)
    conn.volume_create(vg, VolumeCreateArgs(name="lv", capacity=8 * MiB))
    # Without device-mapper an LV has no device: every data verb must say unsupported
    # or fail for the missing device, never claim success.
    features = conn.volume_features(vg, "lv")
    for feature in ("snapshot", "snapshot-external", "copy"):
        assert not features[feature], feature
    with pytest.raises(Unsupported):
        conn.volume_snapshot_create(vg, "lv", "s")
    conn.pool_stop(vg)
    conn.pool_delete(vg)
