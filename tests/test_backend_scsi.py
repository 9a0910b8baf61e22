"""scsi and mpath pools from sysfs: recorded trees under tests/data/net/, and this host
(which has no SCSI host adapters and no device-mapper)."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from virtstore.api.embedded import EmbeddedConnection
from virtstore.backends import backend_for
from virtstore.backends.mpath import MpathBackend
from virtstore.backends.scsi import ScsiBackend
from virtstore.errors import OperationInvalid, Unsupported
from virtstore.host import sysfs_scsi as ss

DATA = Path(__file__).parent / "data" / "net"
HBA = DATA / "sysfs-hba"
MPATH = DATA / "sysfs-mpath"
GiB = 1 << 30


@pytest.fixture
def scsi_root() -> Iterator[ScsiBackend]:
    be = backend_for("scsi")
    assert isinstance(be, ScsiBackend)
    old = ScsiBackend.sysfs_root  # every instance, the engine's included
    ScsiBackend.sysfs_root = str(HBA)
    yield be
    ScsiBackend.sysfs_root = old


def pool_xml(name: str, adapter: str, target: str = "/dev/disk/by-path") -> str:
    return (f"<pool type='scsi'><name>{name}</name><source>{adapter}</source>"
            f"<target><path>{target}</path></target></pool>")


def test_sysfs_parsers() -> None:
    hosts = {h.name: h for h in ss.scsi_hosts(str(HBA))}
    assert sorted(hosts) == ["host0", "host5"]
    assert hosts["host0"].pci_addr == (0, 0, 0x1f, 2) and hosts["host0"].unique_id == 1
    fc = hosts["host5"]
    assert fc.fc and fc.wwnn == "20000024ff5a1b2c" and fc.wwpn == "21000024ff5a1b2c"
    assert fc.vport_capable and fc.port_state == "Online" and fc.pci_addr == (0, 4, 0, 0)
    luns = ss.luns(5, str(HBA))
    assert [(u.name, u.type, u.block) for u in luns] == [
        ("unit:0:0:0", 12, None), ("unit:0:1:3", 0, "sdc"), ("unit:0:1:4", 0, "sdd"),
        ("unit:0:1:5", 8, None)]
    assert luns[1].size == 10 * GiB and luns[1].vendor == "NETAPP"
    maps = ss.multipath_maps(str(MPATH))
    assert [(m.dm, m.name, m.size, m.slaves) for m in maps] == [
        ("dm-0", "mpatha", 10 * GiB, ["sdc", "sde"]), ("dm-2", "mpathb", 20 * GiB, [])]
    assert ss.device_mapper_present(str(MPATH))


@pytest.mark.parametrize("adapter", [
    "<adapter type='scsi_host' name='host5'/>",
    "<adapter name='host5'/>",
    "<adapter type='scsi_host'><parentaddr unique_id='5'><address domain='0x0000' "
    "bus='0x04' slot='0x00' function='0x0'/></parentaddr></adapter>",
    "<adapter type='fc_host' wwnn='20000024ff5a1b2c' wwpn='21000024ff5a1b2c'/>",
])
def test_scsi_pool_lists_disk_luns(conn: EmbeddedConnection, scsi_root: ScsiBackend,
                                   adapter: str) -> None:
    conn.pool_define_xml(pool_xml("s", adapter))
    conn.pool_start("s")
    vols = {v.name: v for v in conn.list_volumes("s")}
    assert sorted(vols) == ["unit:0:1:3", "unit:0:1:4"]
    assert vols["unit:0:1:3"].path == \
        "/dev/disk/by-path/pci-0000:04:00.0-fc-0x500a098188fb5a2c-lun-3"
    assert vols["unit:0:1:4"].path == "/dev/sdd"  # no stable link for it
    assert vols["unit:0:1:3"].key == "naa.600a098038303053453f463045727a67"
    assert vols["unit:0:1:3"].capacity == 10 * GiB and vols["unit:0:1:3"].type == "block"
    info = conn.pool_info("s")
    assert info.capacity == 30 * GiB and not info.shared
    with pytest.raises(Unsupported):
        conn.volume_create_xml("s", "<volume><name>x</name><capacity>1</capacity></volume>")
    conn.pool_stop("s")


def test_missing_adapter_is_named(conn: EmbeddedConnection, scsi_root: ScsiBackend) -> None:
    conn.pool_define_xml(pool_xml("s9", "<adapter type='scsi_host' name='host9'/>"))
    with pytest.raises(OperationInvalid, match="scsi_host 'host9' not found"):
        conn.pool_start("s9")
    conn.pool_define_xml(pool_xml("f9", "<adapter type='fc_host' wwnn='2000000000000001' "
                                        "wwpn='2100000000000001'/>"))
    with pytest.raises(OperationInvalid, match="fc_host wwnn='2000000000000001'"):
        conn.pool_start("f9")


def test_managed_vhba_is_created_through_vport_create(tmp_path: Path) -> None:
    tree = tmp_path / "sysfs"
    shutil.copytree(HBA, tree, symlinks=True)
    be = ScsiBackend()
    be.sysfs_root = str(tree)
    be.vport_wait = 0.3
    from virtstore.xml import parse_pool_xml

    pool = parse_pool_xml(pool_xml("v", "<adapter type='fc_host' parent='host5' "
                                        "managed='yes' wwnn='2001001a4a000001' "
                                        "wwpn='2101001a4a000001'/>"))
    with pytest.raises(OperationInvalid, match="did not appear after vport_create on 'host5'"):
        be.start(pool)
    written = (tree / "sys/devices/pci0000:00/0000:00:03.0/0000:04:00.0/host5/fc_host/host5/"
               "vport_create").read_text()
    assert written == "2101001a4a000001:2001001a4a000001"


@pytest.mark.skipif(ss.scsi_host_class_present("/"),
                    reason="this host has SCSI host adapters: the refusal cannot be seen")
def test_this_host_has_no_scsi_hosts(conn: EmbeddedConnection) -> None:
    conn.pool_define_xml(pool_xml("h0", "<adapter type='scsi_host' name='host0'/>"))
    with pytest.raises(OperationInvalid, match="this host has no SCSI host adapters"):
        conn.pool_start("h0")


def test_mpath_pool(conn: EmbeddedConnection) -> None:
    be = backend_for("mpath")
    assert isinstance(be, MpathBackend)
    if not ss.device_mapper_present("/"):
        conn.pool_define_xml("<pool type='mpath'><name>m</name><target><path>/dev/mapper"
                             "</path></target></pool>")
        with pytest.raises(Unsupported, match="no device-mapper"):
            conn.pool_start("m")
        assert "<pool type='mpath' supported='no'>" in conn.pool_capabilities_xml()
        conn.pool_undefine("m")
    old = MpathBackend.sysfs_root
    MpathBackend.sysfs_root = str(MPATH)
    try:
        conn.pool_define_xml("<pool type='mpath'><name>m2</name><target><path>/dev/mapper"
                             "</path></target></pool>")
        conn.pool_start("m2")
        vols = {v.name: v for v in conn.list_volumes("m2")}
        assert sorted(vols) == ["dm-0", "dm-2"]
        assert vols["dm-0"].path == "/dev/mapper/mpatha" and vols["dm-0"].capacity == 10 * GiB
        conn.pool_stop("m2")
    finally:
        MpathBackend.sysfs_root = old
