"""The backend contract: what each backend advertises is what its code does.

Every feature a pool type lists comes from the methods its backend overrides; a walk
over the pool types this machine can run calls every operation on real volumes and
checks that each advertised one works and each unadvertised one fails with the
"unsupported" error.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from block_fixtures import BlockLab, lab_fixture, lvm  # noqa: F401
from contract_walk import walk
from virtstore.api.embedded import EmbeddedConnection
from virtstore.backends import POOL_TYPES, backend_for
from virtstore.backends._file_volumes import reflink_capable
from virtstore.backends.base import FEATURES, Backend
from virtstore.errors import Unsupported
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
    raw = walk(conn, "d", "r.img", tmp_path)
    # A raw volume's snapshot is a reflink: only where the filesystem shares extents.
    assert raw["snapshot"] == reflink_capable(str(target)) and not raw["snapshot-external"]
    assert raw["clone-full"] and raw["clone-linked"] and raw["upload"] and raw["wipe"]
    qcow = walk(conn, "d", "q.qcow2", tmp_path)
    assert all(qcow.values()), qcow
    vmdk = walk(conn, "d", "v.vmdk", tmp_path)
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
        raw = walk(conn, "b", "r.img", tmp_path)
        # On btrfs a raw volume has snapshots (reflinks), not external ones.
        assert raw["snapshot"] and not raw["snapshot-external"], raw
        assert [s.name for s in conn.volume_snapshot_list("b", "r.img")] == ["s1"]
    finally:
        conn.pool_stop("b")


def test_walk_logical_pool(conn: EmbeddedConnection, lab: BlockLab, tmp_path: Path) -> None:
    from virtstore.host import lvm as lvmmod

    if lvmmod.device_mapper_available():
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


def test_pool_type_doc_is_current() -> None:
    from virtstore.backends.table import markdown

    doc = Path(__file__).resolve().parent.parent / "docs" / "pool-types.md"
    assert doc.read_text() == markdown(), \
        "docs/pool-types.md is stale: python -m virtstore.backends.table > docs/pool-types.md"


def test_xml_table_agrees_with_the_backends() -> None:
    """The XML layer knows libvirt's pool types; every one the backends run is there with
    the same volume type and default format, and accepts every format the backend makes."""
    from virtstore.xml import POOL_TYPES as XML_TYPES

    assert set(POOL_TYPES) <= set(XML_TYPES)
    assert set(XML_TYPES) - set(POOL_TYPES) == {"vstorage"}  # XML only: no backend yet
    for ptype in POOL_TYPES:
        caps, xt = backend_for(ptype).caps, XML_TYPES[ptype]
        assert caps.volume_type == xt.default_vol_type, ptype
        assert caps.default_vol_format == (xt.default_vol_format or caps.default_vol_format)
        if xt.vol_formats:
            made = [f for f in caps.vol_formats if f not in ("none", "luks")]
            assert all(xt.accepts_vol_format(f) or f == "luks" for f in made), ptype
