"""logical pools on real loop devices. Without device-mapper (this CI kernel) LVM works
on metadata only: the pool starts, LVs are created (linear, striped), resized and
deleted in the metadata; snapshots, sparse volumes and activation fail naming
device-mapper."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest

from block_fixtures import CONFORMANCE_DIR, BlockLab, lab_fixture, lvm  # noqa: F401
from virtstore.api import VolumeCreateArgs
from virtstore.api.embedded import EmbeddedConnection
from virtstore.backends import backend_for
from virtstore.backends.logical import LogicalBackend
from virtstore.cli.main import main
from virtstore.errors import InvalidArgument, OperationInvalid, Unsupported, XMLError
from virtstore.host import lvm as lvmmod
from virtstore.xml import parse_pool_xml

DATA = Path(__file__).parent / "data" / "block"
MiB = 1 << 20
no_dm = pytest.mark.skipif(lvmmod.device_mapper_available(),
                           reason="this kernel has device-mapper: the metadata-only "
                                  "behaviour does not apply")


def logical_xml(vg: str, *devs: str) -> str:
    src = "".join(f"<device path='{d}'/>" for d in devs)
    return (f"<pool type='logical'><name>{vg}</name><source>{src}</source>"
            f"<target><path>/dev/{vg}</path></target></pool>")


def test_parse_recorded_reports() -> None:
    vgs = lvmmod.parse_vgs((DATA / "vgs.json").read_text())
    assert len(vgs) == 1 and vgs[0].name == "vsrecvg"
    assert (vgs[0].size, vgs[0].free, vgs[0].extent_size) == (411041792, 306184192, 4194304)
    pvs = lvmmod.parse_pvs((DATA / "pvs.json").read_text())
    assert [(p.name, p.vg_name) for p in pvs] == [("/dev/loop0", "vsrecvg"),
                                                  ("/dev/loop1", "vsrecvg")]
    lvs = {lv.name: lv for lv in lvmmod.parse_lvs((DATA / "lvs-segments.json").read_text())}
    assert lvs["lin"].size == 62914560 and len(lvs["lin"].segments) == 2
    assert lvs["lin"].segments[1].pe_ranges == [("/dev/loop0", 10, 19)]
    st = lvs["striped"].segments[0]
    assert (st.stripes, st.stripe_size, st.segtype) == (2, 65536, "striped")
    assert st.pe_ranges == [("/dev/loop0", 5, 9), ("/dev/loop1", 0, 4)]


def test_parse_recorded_reports_with_device_mapper() -> None:
    """lvs/vgs from the kernel lab: active LVs, raid1 with its hidden legs, a snapshot,
    a thin pool and a thin LV; the pool shows the user's LVs only."""
    vg = lvmmod.parse_vgs((DATA / "vgs-dm.json").read_text())[0]
    assert (vg.name, vg.lv_count, vg.free) == ("vsrecdm", 6, 331350016)
    lvs = lvmmod.parse_lvs((DATA / "lvs-dm.json").read_text())
    be = LogicalBackend()
    pool = parse_pool_xml(logical_xml("vsrecdm", "/dev/loop0"))
    recs = {lv.name: be._record(pool, lv) for lv in lvs if be._visible(lv)}
    assert sorted(recs) == ["lin", "mirror", "snap", "striped", "thin1"]
    by_name = {lv.name: lv for lv in lvs}
    assert all(by_name[n].active == "active" for n in recs)
    assert by_name["mirror"].segments[0].segtype == "raid1"
    assert by_name["striped"].segments[0].pe_ranges == [("/dev/loop0", 2, 2),
                                                        ("/dev/loop1", 0, 0)]
    assert recs["snap"].backing_path == "/dev/vsrecdm/lin"
    assert (recs["thin1"].capacity, recs["thin1"].allocation) == (64 * MiB, 0)
    assert by_name["tpool"].is_thin_pool and by_name["thin1"].is_thin


def test_parse_recorded_shared_vg_reports() -> None:
    """From the kernel lab's shared VG (lvmlockd + sanlock): its lock type in vgs, the
    lockspace and LV locks in ``lvmlockctl -i``, and the LVs another host holds in a
    failed ``vgchange -aey``."""
    vg = lvmmod.parse_vgs((DATA / "vgs-shared.json").read_text())[0]
    assert (vg.name, vg.lock_type, vg.attr[5], vg.shared) == ("vgs1", "sanlock", "s", True)
    assert not lvmmod.parse_vgs((DATA / "vgs-dm.json").read_text())[0].shared
    spaces = lvmmod.parse_lockctl_info((DATA / "lvmlockctl-info.txt").read_text())
    assert list(spaces) == ["vgs1"] and spaces["vgs1"].lock_type == "sanlock"
    assert spaces["vgs1"].lv_locks == {"Zw2IsZ-4uIa-255R-NBlj-lLEN-fXz0-pPhBtw": "ex",
                                       "TKWh6V-ReEu-VNLQ-39pq-DaJ9-zpK2-JreDHI": "un"}
    assert lvmmod.parse_lockctl_info("") == {}
    stderr = (DATA / "vgchange-aey-locked.txt").read_text()
    assert lvmmod.locked_elsewhere(stderr) == ["lv1"]
    assert lvmmod.locked_elsewhere("  Logical volume vgs1/lv1 in use.") == []


def test_build_start_volumes_delete(lab: BlockLab, conn: EmbeddedConnection) -> None:
    d1, d2 = lab.loop(128 * MiB), lab.loop(128 * MiB)
    vg = lab.vg()
    conn.pool_define_xml(logical_xml(vg, d1, d2))
    conn.pool_build(vg)
    report = json.loads(lvm("vgs", "--reportformat", "json", "-o", "vg_name,pv_count",
                            vg).stdout)
    assert report["report"][0]["vg"][0]["pv_count"] == "2"
    conn.pool_start(vg)
    info = conn.pool_info(vg)
    assert info.state == "running" and info.capacity > 240 * MiB
    conn.volume_create(vg, VolumeCreateArgs(name="lv1", capacity=20 * MiB))
    conn.volume_create_xml(vg, "<volume><name>lv2</name><capacity unit='M'>10</capacity>"
                               "</volume>")
    vols = {v.name: v for v in conn.list_volumes(vg)}
    assert set(vols) == {"lv1", "lv2"}
    assert vols["lv1"].path == f"/dev/{vg}/lv1" and vols["lv1"].capacity == 20 * MiB
    assert vols["lv1"].type == "block"
    assert conn.pool_info(vg).allocation == 32 * MiB  # lv2 rounded up to 4 MiB extents
    xml = conn.volume_xml(vg, "lv1")
    assert f"<path>/dev/{vg}/lv1</path>" in xml
    # Striped over both PVs: made with the backend, seen by a refresh.
    be = backend_for("logical")
    assert isinstance(be, LogicalBackend)
    be.create_lv(vg, "striped", 16 * MiB, stripes=2, stripe_size=64 * 1024)
    conn.pool_refresh(vg)
    assert conn.volume_info(vg, "striped").capacity == 16 * MiB
    pool = parse_pool_xml(conn.pool_xml(vg))
    srcs = be.volume_source(pool, "striped")
    assert sorted(s.device_path or "" for s in srcs) == sorted([d1, d2])
    assert all(e.end - e.start == 8 * MiB for s in srcs for e in s.extents)
    # Resize: grow, refuse to shrink without the flag, shrink with it.
    rec = conn.index.get(vg, "lv1")
    assert be.resize_volume(pool, rec, 30 * MiB) == 32 * MiB
    with pytest.raises(InvalidArgument, match="shrink"):
        be.resize_volume(pool, rec, 8 * MiB)
    assert be.resize_volume(pool, rec, 8 * MiB, shrink=True) == 8 * MiB
    conn.volume_delete(vg, "lv2")
    assert "lv2" not in {v.name for v in conn.list_volumes(vg)}
    conn.pool_stop(vg)
    conn.pool_delete(vg)
    assert lvmmod.vg(vg) is None
    assert lvmmod.pv_of(d1) is None and lvmmod.pv_of(d2) is None


@no_dm
def test_what_needs_device_mapper_says_so(lab: BlockLab, conn: EmbeddedConnection) -> None:
    dev = lab.loop(64 * MiB)
    vg = lab.vg()
    conn.pool_define_xml(logical_xml(vg, dev))
    conn.pool_start(vg, build=True)  # metadata-only mode: the VG is there
    conn.volume_create(vg, VolumeCreateArgs(name="base", capacity=8 * MiB))
    with pytest.raises(Unsupported, match="device-mapper"):
        conn.volume_create(vg, VolumeCreateArgs(name="sparse", capacity=16 * MiB,
                                                allocation=4 * MiB))
    be = backend_for("logical")
    assert isinstance(be, LogicalBackend)
    pool = parse_pool_xml(conn.pool_xml(vg))
    with pytest.raises(Unsupported, match="device-mapper"):
        be.create_snapshot(vg, "snap", f"/dev/{vg}/base", 4 * MiB)
    # The same through the Connection: a volume with a backing store is a snapshot.
    with pytest.raises(Unsupported, match="device-mapper"):
        conn.volume_create_xml(vg, "<volume><name>snap</name><capacity unit='M'>4</capacity>"
                                   f"<target><format type='none'/></target><backingStore>"
                                   f"<path>/dev/{vg}/base</path></backingStore></volume>")
    with pytest.raises(Unsupported, match="device-mapper"):
        be.create_thin_pool(vg, "thin", 8 * MiB)
    with pytest.raises(Unsupported, match="device-mapper"):
        be.activate(pool)
    # The bytes of an LV need its device node: each data operation says why it fails.
    for start in (lambda: conn.volume_upload(vg, "base", io.BytesIO(b"x" * 4096)),
                  lambda: conn.volume_download(vg, "base", io.BytesIO()),
                  lambda: conn.volume_wipe(vg, "base", "zero"),
                  lambda: conn.volume_clone(vg, "base", "copy")):
        info = conn.job_wait(start().id, 60)
        assert info.state == "failed" and "needs device-mapper" in (info.error or ""), info
    # Nothing half-made is left behind.
    assert {v.name for v in conn.list_volumes(vg)} == {"base"}
    names = [r["lv_name"] for r in json.loads(
        lvm("lvs", "--reportformat", "json", "-o", "lv_name", vg).stdout)["report"][0]["lv"]]
    assert names == ["base"]


@no_dm
def test_resize_in_metadata_only_mode(lab: BlockLab, conn: EmbeddedConnection) -> None:
    dev = lab.loop(64 * MiB)
    vg = lab.vg()
    conn.pool_define_xml(logical_xml(vg, dev))
    conn.pool_start(vg, build=True)
    conn.volume_create(vg, VolumeCreateArgs(name="lv", capacity=8 * MiB))
    assert conn.job_wait(conn.volume_resize(vg, "lv", 13 * MiB).id, 60).state == "done"
    # Whole 4 MiB extents, in the index and in LVM's metadata.
    assert conn.volume_info(vg, "lv").capacity == 16 * MiB
    sizes = {r["lv_name"]: r["lv_size"] for r in json.loads(
        lvm("lvs", "--reportformat", "json", "--units", "b", "--nosuffix", "-o",
            "lv_name,lv_size", vg).stdout)["report"][0]["lv"]}
    assert sizes["lv"] == str(16 * MiB)
    with pytest.raises(InvalidArgument, match="shrink flag"):
        conn.volume_resize(vg, "lv", 4 * MiB)
    info = conn.job_wait(conn.volume_resize(vg, "lv", 200 * MiB).id, 60)
    assert info.state == "failed" and "Not enough space" in (info.error or "")


def test_start_needs_the_vg_and_a_matching_device(lab: BlockLab,
                                                  conn: EmbeddedConnection) -> None:
    d1, d2 = lab.loop(64 * MiB), lab.loop(64 * MiB)
    vg = lab.vg()
    conn.pool_define_xml(logical_xml(vg, d1))
    with pytest.raises(OperationInvalid, match="cannot find logical volume group"):
        conn.pool_start(vg)
    conn.pool_build(vg)
    with pytest.raises(OperationInvalid, match="already built"):
        conn.pool_build(vg)
    conn.pool_undefine(vg)
    conn.pool_define_xml(logical_xml(vg, d2))
    with pytest.raises(OperationInvalid, match="matching source devices"):
        conn.pool_start(vg)


def test_build_refuses_a_device_with_data(lab: BlockLab, conn: EmbeddedConnection) -> None:
    from block_fixtures import sh

    dev = lab.loop(64 * MiB)
    sh("mkfs.ext4", "-q", "-F", dev)
    vg = lab.vg()
    conn.pool_define_xml(logical_xml(vg, dev))
    with pytest.raises(OperationInvalid, match="forced overwrite is necessary"):
        conn.pool_build(vg)
    assert lvmmod.vg(vg) is None
    conn.pool_build(vg, overwrite=True)
    assert lvmmod.vg(vg) is not None


@pytest.mark.parametrize("case", ["pool-logical", "pool-logical-nopath",
                                  "pool-logical-create"])
def test_conformance_pool_xml2argv_by_effect(case: str, lab: BlockLab,
                                             conn: EmbeddedConnection) -> None:
    """libvirt runs vgcreate (build) and vgchange -aly VG (start): the VG exists with
    the listed devices as PVs and the pool runs on it."""
    from lxml import etree

    doc = etree.fromstring((CONFORMANCE_DIR / "storagepoolxml2xmlin" / f"{case}.xml")
                           .read_bytes())
    vg = lab.vg()
    doc.find("name").text = vg  # type: ignore[union-attr]
    src = doc.find("source")
    assert src is not None
    for d in src.findall("device"):
        src.remove(d)
    for old in src.findall("name"):
        old.text = vg
    devs = [lab.loop(32 * MiB), lab.loop(32 * MiB)]
    for dev in devs:
        etree.SubElement(src, "device", path=dev)
    conn.pool_define_xml(etree.tostring(doc, encoding="unicode"))
    conn.pool_start(vg, build=True)
    found = lvmmod.vg(vg)
    assert found is not None and found.pv_count == 2
    members = {p.name for p in lvmmod.pvs() if p.vg_name == vg}
    assert members == set(devs)
    assert conn.pool_info(vg).state == "running"
    assert f"<path>/dev/{vg}</path>" in conn.pool_xml(vg)


def test_logical_pool_through_the_cli(lab: BlockLab, tmp_path: Path,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    dev = lab.loop(64 * MiB)
    vg = lab.vg()
    root = str(tmp_path / "state")

    def cli(*args: str) -> str:
        assert main(["--root", root, *args]) == 0, capsys.readouterr().err
        return capsys.readouterr().out

    cli("pool-define-as", vg, "logical", "--source-dev", dev, "--source-name", vg)
    cli("pool-build", vg)
    cli("pool-start", vg)
    cli("vol-create-as", vg, "lv1", "12M")
    assert "lv1" in cli("vol-list", vg)
    out = cli("find-storage-pool-sources", "logical")
    assert f"<name>{vg}</name>" in out and f"<device path='{dev}'/>" in out
    cli("vol-delete", "--pool", vg, "lv1")
    cli("pool-destroy", vg)
    cli("pool-delete", vg)
    assert lvmmod.vg(vg) is None


def test_create_killed_after_its_rename_is_listed_at_next_start(lab: BlockLab,
                                                                 conn: EmbeddedConnection,
                                                                 root: Path) -> None:
    """A logical volume publishes by lvrename: a process that died after the rename and
    before indexing the LV leaves it, and the next start lists it as a refresh would."""
    from virtstore.errors import AlreadyExists
    from virtstore.xml import VolDef

    dev = lab.loop(64 * MiB)
    vg = lab.vg()
    conn.pool_define_xml(logical_xml(vg, dev))
    conn.pool_start(vg, build=True)
    vm = conn.volumes
    pool, be = vm._active_pool(vg)
    req = vm._request(pool, be, VolDef(name="half", capacity=8 * MiB, capacity_given=True),
                      False)
    with conn.state.store.write() as db:
        target = vm.reserve_target(db, vg, pool, be, "half")
        # Journalled by a process that has since died (no such PID).
        db.execute("UPDATE journal SET pid=?, pid_start='0' WHERE id=?",
                   (2 ** 22 + 12345, target.entry))
    be.create_volume(pool, target.staging, req)
    be.commit_volume(pool, target.staging, target.final)
    conn.close()
    with EmbeddedConnection(str(root)) as c:
        before = c.list_volumes(vg)
        assert [v.name for v in before] == ["half"]
        assert c.volume_info(vg, "half").capacity == 8 * MiB
        with pytest.raises(AlreadyExists):
            c.volume_create(vg, VolumeCreateArgs(name="half", capacity=8 * MiB))
        c.pool_refresh(vg)
        assert c.list_volumes(vg) == before
        c.volume_delete(vg, "half")
        c.pool_stop(vg)


THIN_NS = "http://virtstore.org/schemas/storagepool/logical/1.0"


def thin_xml(element: str) -> str:
    return (f"<pool type='logical' xmlns:lvm='{THIN_NS}'><name>vg</name><source>"
            f"<device path='/dev/sdb'/></source><target><path>/dev/vg</path></target>"
            f"{element}</pool>")


def test_thin_pool_option_in_the_pool_xml() -> None:
    from virtstore.xml import format_pool_xml

    pool = parse_pool_xml(thin_xml("<lvm:thin_pool name='tp' size='2' unit='GiB'/>"))
    assert (pool.thin_pool, pool.thin_pool_size) == ("tp", 2 << 30)
    text = format_pool_xml(pool)
    assert f"<pool type='logical' xmlns:lvm='{THIN_NS}'>" in text
    assert "<lvm:thin_pool name='tp' size='2147483648' unit='bytes'/>" in text
    assert parse_pool_xml(text) == pool
    bare = parse_pool_xml(thin_xml("<lvm:thin_pool name='tp'/>"))
    assert bare.thin_pool_size is None and "size=" not in format_pool_xml(bare)
    # Without the option the document is libvirt's, namespace declaration included.
    plain = format_pool_xml(parse_pool_xml(logical_xml("vg", "/dev/sdb")))
    assert "xmlns" not in plain and "thin_pool" not in plain
    for bad, why in (("<lvm:thin_pool/>", "invalid lvm:thin_pool name"),
                     ("<lvm:thin_pool name='a b'/>", "invalid lvm:thin_pool name"),
                     ("<lvm:thin_pool name='tp' size='0'/>", "above 0"),
                     ("<lvm:thin_pool name='tp' size='x'/>", "malformed"),
                     ("<lvm:thin_pool name='a'/><lvm:thin_pool name='b'/>", "at most one")):
        with pytest.raises(XMLError, match=why):
            parse_pool_xml(thin_xml(bad))


def test_parse_recorded_thin_report() -> None:
    """lvs from the kernel lab: a thin pool with 8 MiB written to a 256 MiB thin volume,
    a storage snapshot of it (tagged, inactive) and a linked clone."""
    lvs = {lv.name: lv for lv in lvmmod.parse_lvs((DATA / "lvs-thin.json").read_text())}
    be = LogicalBackend()
    pool = parse_pool_xml(thin_xml("<lvm:thin_pool name='tp'/>").replace(
        "<name>vg</name>", "<name>vsrecthin</name>"))
    assert sorted(n for n, lv in lvs.items() if be._visible(lv)) == ["clone", "vol"]
    assert lvs["vol+s1"].tags == ("virtstore_created=1764763200", "virtstore_snapshot")
    assert lvs["vol+s1"].skips_activation and not lvs["vol"].skips_activation
    assert be._created(lvs["vol+s1"]) == 1764763200
    vol = be._record(pool, lvs["vol"])
    # 3.12 % of 256 MiB: the 8 MiB written, to lvs' two decimals.
    assert (vol.capacity, vol.allocation) == (256 * MiB, round(256 * MiB * 0.0312))
    assert lvs["tp"].used == round(120 * MiB * 0.0667)
    assert be._record(pool, lvs["clone"]).backing_path == "/dev/vsrecthin/vol"


def test_parse_recorded_thin_delta_and_thin_dump() -> None:
    """thin_delta and thin_dump from the kernel lab (a 32 MiB thin volume in a pool of
    64 KiB blocks: 4 MiB written, a snapshot; then 1 MiB overwritten at 1 MiB, 1 MiB
    written at 8 MiB, 1 MiB at 3 MiB discarded, a second snapshot), plain and --verbose:
    the changed ranges, and apart from them the ranges unmapped since (holes)."""
    want = ([(1 * MiB, MiB), (8 * MiB, MiB)], [(3 * MiB, MiB)])
    assert lvmmod.parse_thin_delta((DATA / "thin-delta.xml").read_text()) == want
    assert lvmmod.parse_thin_delta((DATA / "thin-delta-verbose.xml").read_text()) == want
    # The first snapshot's mappings: the 4 MiB written, in one range.
    assert lvmmod.parse_thin_dump((DATA / "thin-dump.xml").read_text()) == [(0, 4 * MiB)]
    single = ("<superblock data_block_size='128'><device dev_id='1'>"
              "<single_mapping origin_block='3' data_block='9' time='0'/></device>"
              "</superblock>")
    assert lvmmod.parse_thin_dump(single) == [(3 * 64 * 1024, 64 * 1024)]
    with pytest.raises(ValueError, match="data block size"):
        lvmmod.parse_thin_delta("<superblock><diff/></superblock>")

