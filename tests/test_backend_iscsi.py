"""iSCSI pools: iscsi-direct end to end against tgtd on 127.0.0.1 (two targets, one
behind CHAP), the kernel iscsi pool's refusal on a kernel without the iSCSI transport,
and the parsers on recorded tool output."""

from __future__ import annotations

import base64
import io
import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

import virtstore
from cli_fixtures import Cli, cli_fixture  # noqa: F401
from contract_walk import walk
from net_fixtures import ISCSI_CHAP, ISCSI_SECURE, ISCSI_STORAGE, Server, iscsi_fixture  # noqa: F401
from server_fixtures import start_daemon
from virtstore.api.embedded import EmbeddedConnection
from virtstore.backends import _iscsi_utils as iu
from virtstore.errors import AuthFailed, NoSuchVolume, Unsupported
from virtstore.host import devices, iscsi
from virtstore.xml import parse_pool_xml

DATA = Path(__file__).parent / "data" / "net"
MiB = 1 << 20
INITIATOR = "iqn.2024-01.test.local:virtstore-tests"


@pytest.fixture
def tgt(iscsi_fixture: Server) -> Server:  # noqa: F811
    return iscsi_fixture


def direct_xml(name: str, srv: Server, target: str, auth: str = "") -> str:
    return (f"<pool type='iscsi-direct'><name>{name}</name><source>"
            f"<host name='127.0.0.1' port='{srv.info['port']}'/>"
            f"<device path='{target}'/>{auth}"
            f"<initiator><iqn name='{INITIATOR}'/></initiator></source></pool>")


def chap(usage: str) -> str:
    return (f"<auth type='chap' username='{ISCSI_CHAP[0]}'><secret usage='{usage}'/>"
            "</auth>")


def _wait(conn: EmbeddedConnection, job_id: str) -> None:
    info = conn.job_wait(job_id, 120)
    assert info.state == "done", info.error


@pytest.fixture
def dpool(conn: EmbeddedConnection, tgt: Server) -> Iterator[str]:
    conn.pool_define_xml(direct_xml("d", tgt, ISCSI_STORAGE))
    conn.pool_start("d")
    yield "d"
    conn.pool_stop("d")


def test_iscsi_direct_lists_luns_as_libvirt(conn: EmbeddedConnection, dpool: str,
                                            tgt: Server) -> None:
    vols = {v.name: v for v in conn.list_volumes(dpool)}
    assert sorted(vols) == ["unit:0:0:1", "unit:0:0:2"]  # the controller LUN 0 is not one
    v = vols["unit:0:0:2"]
    assert v.capacity == 128 * MiB and v.type == "network" and v.format == "raw"
    assert v.path == f"ip-127.0.0.1:{tgt.info['port']}-iscsi-{ISCSI_STORAGE}-lun-2"
    assert v.key == v.path
    info = conn.pool_info(dpool)
    assert info.capacity == 192 * MiB and info.shared
    with pytest.raises(Unsupported):
        conn.volume_create_xml(dpool, "<volume><name>x</name><capacity>1</capacity></volume>")


def test_iscsi_direct_lun_identity(conn: EmbeddedConnection, dpool: str, cli: Cli,
                                   pooldir: Path, root: Path) -> None:
    dev = conn.volume_device(dpool, "unit:0:0:2")
    assert (dev["vendor"], dev["product"], dev["lun"]) == ("IET", "VIRTUAL-DISK", 2)
    assert dev["serial"] and dev["capacity"] == 128 * MiB and dev["block_size"] == 512
    d = start_daemon(root)
    try:
        with virtstore.connect(d.rw_uri) as remote:
            assert remote.volume_device(dpool, "unit:0:0:2") == dev
    finally:
        d.stop()
    # vol-info: virsh's lines, then the LUN's identity
    lines = cli("vol-info", "unit:0:0:2", "--pool", dpool).out.splitlines()
    assert lines[:2] == ["Name:           unit:0:0:2", "Type:           network"]
    assert lines[4:6] == ["Vendor:         IET", "Product:        VIRTUAL-DISK"]
    assert lines[7] == f"Serial:         {dev['serial']}"
    assert json.loads(cli("vol-info", "unit:0:0:1", "--pool", dpool, "--json").out)[
        "device"]["lun"] == 1
    with pytest.raises(NoSuchVolume):
        conn.volume_device(dpool, "unit:0:0:9")
    # a volume that is not a LUN has no identity, and vol-info stays virsh's
    conn.pool_define_xml(f"<pool type='dir'><name>files</name><target><path>{pooldir}"
                         "</path></target></pool>")
    conn.pool_start("files")
    conn.volume_create_xml("files", "<volume><name>f</name><capacity>1</capacity></volume>")
    with pytest.raises(Unsupported, match="not a SCSI LUN"):
        conn.volume_device("files", "f")
    lines = cli("vol-info", "f", "--pool", "files").out.split("\n")
    assert lines[3].startswith("Allocation:") and lines[4:] == ["", ""]


def test_one_session_scan_reads_what_the_tools_read(tgt: Server) -> None:
    # The refresh reads LUNs through libiscsi in one session; the libiscsi tools are the
    # reference for what each LUN says.
    portal = iscsi.Portal("127.0.0.1", tgt.info["port"])
    scanned = iscsi.scan_luns(portal, ISCSI_STORAGE, INITIATOR)
    assert [lun.lun for lun in scanned] == [1, 2]  # LUN 0, the controller, is no disk
    for lun in scanned:
        tools = iscsi.lun_details(portal, ISCSI_STORAGE, lun.lun, INITIATOR)
        assert (lun.capacity, lun.block_size, lun.serial) == (
            tools.capacity, tools.block_size, tools.serial)
        assert lun.serial and lun.device_type == tools.device_type == "DIRECT_ACCESS"
    assert [lun.capacity for lun in scanned] == [64 * MiB, 128 * MiB]
    creds = iscsi.Credentials(ISCSI_CHAP[0], ISCSI_CHAP[1].encode())
    [secure] = iscsi.scan_luns(portal, ISCSI_SECURE, INITIATOR, creds)
    assert secure.capacity == 32 * MiB


def test_iscsi_direct_data(conn: EmbeddedConnection, dpool: str, tgt: Server,
                           tmp_path: Path) -> None:
    backing = Path(tgt.info["luns"][0])
    payload = os.urandom(MiB) + bytes(MiB) + b"lun"
    _wait(conn, conn.volume_upload(dpool, "unit:0:0:1", io.BytesIO(payload)).id)
    with open(backing, "rb") as fh:
        assert fh.read(len(payload)) == payload
    sink = io.BytesIO()
    _wait(conn, conn.volume_download(dpool, "unit:0:0:1", sink, offset=100, length=MiB).id)
    assert sink.getvalue() == payload[100:100 + MiB]
    # qemu reads the same bytes at the LUN's iscsi:// URL
    url = f"iscsi://127.0.0.1:{tgt.info['port']}/{ISCSI_STORAGE}/1"
    out = subprocess.run(["qemu-io", "-f", "raw", "-r", "-c", "read -P 0 1048576 1048576",
                          url], capture_output=True, text=True, check=False)
    assert out.returncode == 0, out.stderr
    assert "read 1048576/1048576 bytes" in out.stdout
    whole = tmp_path / "lun1.raw"
    with open(whole, "wb") as fh:
        _wait(conn, conn.volume_download(dpool, "unit:0:0:1", fh).id)
    assert whole.stat().st_size == 64 * MiB and whole.stat().st_blocks * 512 < 8 * MiB
    assert whole.read_bytes()[:len(payload)] == payload
    _wait(conn, conn.volume_wipe(dpool, "unit:0:0:1", "zero").id)
    with open(backing, "rb") as fh:
        assert fh.read(4 * MiB) == bytes(4 * MiB)
    job = conn.volume_wipe(dpool, "unit:0:0:1", "gutmann")
    assert conn.job_wait(job.id, 30).state == "failed"


def test_iscsi_direct_chap(conn: EmbeddedConnection, tgt: Server) -> None:
    good = conn.secret_define_xml("<secret ephemeral='no' private='yes'><usage type='iscsi'>"
                                  "<target>good</target></usage></secret>")
    conn.secret_set_value(good, ISCSI_CHAP[1].encode())
    bad = conn.secret_define_xml("<secret ephemeral='no' private='yes'><usage type='iscsi'>"
                                 "<target>bad</target></usage></secret>")
    conn.secret_set_value(bad, b"not-the-secret")
    conn.pool_define_xml(direct_xml("noauth", tgt, ISCSI_SECURE))
    with pytest.raises(AuthFailed, match="authentication failure"):
        conn.pool_start("noauth")
    conn.pool_define_xml(direct_xml("wrong", tgt, ISCSI_SECURE, chap("bad")))
    with pytest.raises(AuthFailed, match="authentication failure"):
        conn.pool_start("wrong")
    assert conn.pool_info("wrong").state == "inactive"
    conn.pool_define_xml(direct_xml("right", tgt, ISCSI_SECURE, chap("good")))
    conn.pool_start("right")
    try:
        assert [v.name for v in conn.list_volumes("right")] == ["unit:0:0:1"]
        assert conn.volume_info("right", "unit:0:0:1").capacity == 32 * MiB
        data = b"chap" * 1024
        _wait(conn, conn.volume_upload("right", "unit:0:0:1", io.BytesIO(data),
                                       length=len(data)).id)
        with open(tgt.info["luns"][2], "rb") as fh:
            assert fh.read(len(data)) == data
        assert base64.b64encode(ISCSI_CHAP[1].encode()).decode() not in \
            conn.pool_xml("right")
    finally:
        conn.pool_stop("right")


@pytest.mark.skipif(iscsi.kernel_transport_problem() is None,
                    reason="this kernel has the iSCSI TCP transport: the refusal cannot be seen")
def test_kernel_iscsi_pool_names_missing_transport(conn: EmbeddedConnection,
                                                   tgt: Server) -> None:
    conn.pool_define_xml(f"<pool type='iscsi'><name>k</name><source>"
                         f"<host name='127.0.0.1' port='{tgt.info['port']}'/>"
                         f"<device path='{ISCSI_STORAGE}'/></source>"
                         "<target><path>/dev/disk/by-path</path></target></pool>")
    with pytest.raises(Unsupported, match="no iSCSI initiator: the 'tcp' iSCSI transport"):
        conn.pool_start("k")
    caps = conn.pool_capabilities_xml()
    assert "<pool type='iscsi' supported='no'>" in caps
    assert "<pool type='iscsi-direct' supported='yes'>" in caps


def test_parsers_on_recorded_output() -> None:
    # Recorded in the kernel lab: tgtd on port 33273, both targets logged in, the
    # secure one with CHAP.
    found = iscsi.parse_sendtargets((DATA / "iscsiadm-discovery-sendtargets.txt").read_text())
    assert [(t.portal, t.tpgt, t.iqn) for t in found] == [
        ("127.0.0.1:33273", 1, ISCSI_STORAGE), ("127.0.0.1:33273", 1, ISCSI_SECURE)]
    [v6] = iscsi.parse_sendtargets("[fd00::10]:3260,1 iqn.2024-01.test.local:storage1\n")
    assert (v6.portal, v6.tpgt) == ("[fd00::10]:3260", 1)
    sessions = iscsi.parse_sessions((DATA / "iscsiadm-session.txt").read_text())
    assert [(s.id, s.portal, s.tpgt, s.iqn) for s in sessions] == [
        (2, "127.0.0.1:33273", 1, ISCSI_STORAGE), (3, "127.0.0.1:33273", 1, ISCSI_SECURE)]
    assert iscsi.parse_sessions((DATA / "iscsiadm-session-none.txt").read_text()) == []
    detail = iscsi.parse_session_disks((DATA / "iscsiadm-session-P3.txt").read_text())
    assert sorted(detail) == [ISCSI_SECURE, ISCSI_STORAGE]
    storage, secure = detail[ISCSI_STORAGE], detail[ISCSI_SECURE]
    assert (storage.id, storage.portal, storage.tpgt) == (2, "127.0.0.1:33273", 1)
    assert storage.disks == {1: "sdc", 2: "sdd"}  # LUN 0, the controller, has no disk
    assert (secure.id, secure.disks) == (3, {1: "sde"})
    inq = iscsi.parse_inquiry((DATA / "iscsi-inq-standard.txt").read_text())
    assert inq["Vendor"] == "IET" and inq["Product"] == "VIRTUAL-DISK"
    assert inq["Peripheral Device Type"] == "DIRECT_ACCESS"
    ctl = iscsi.parse_inquiry((DATA / "iscsi-inq-controller.txt").read_text())
    assert ctl["Peripheral Device Type"] == "STORAGE_ARRAY_CONTROLLER"
    assert iscsi.parse_serial((DATA / "iscsi-inq-serial.txt").read_text()) == "beaf11"
    assert iscsi.parse_readcapacity16(
        (DATA / "iscsi-readcapacity16-128M.txt").read_text()) == (128 * MiB, 512)
    assert "iSCSI driver not found" in (DATA / "iscsiadm-discovery-no-transport.stderr") \
        .read_text()


def test_udev_names_a_lun_as_its_volume() -> None:
    """udev's record of a LUN's disk (kernel lab, udev 252, udevd running): its by-path
    link, the volume's path in a pool targeting /dev/disk/by-path, is the name the
    backend gives the LUN as its key."""
    props, links = devices.parse_udev_db((DATA / "udev-data-iscsi-lun.txt").read_text())
    pool = parse_pool_xml("<pool type='iscsi'><name>k</name><source><host name='127.0.0.1' "
                          f"port='33273'/><device path='{ISCSI_STORAGE}'/></source><target>"
                          "<path>/dev/disk/by-path</path></target></pool>")
    key = iu.volume_path(pool, 1)
    assert props["ID_PATH"] == key == f"ip-127.0.0.1:33273-iscsi-{ISCSI_STORAGE}-lun-1"
    assert f"/dev/disk/by-path/{key}" in links
    assert (props["ID_VENDOR"], props["ID_MODEL"], props["ID_SCSI_SERIAL"]) == (
        "IET", "VIRTUAL-DISK", "beaf11")
    assert "/dev/disk/by-id/wwn-0x60000000000000000e00000000010001" in links


def test_nbd_export_of_a_lun(conn: EmbeddedConnection, dpool: str, tgt: Server,
                             tmp_path: Path) -> None:
    from virtstore.engine.nbd import export_volume

    with open(tgt.info["luns"][1], "r+b") as fh:
        fh.write(b"LUN2" * 256)
    with export_volume(conn, dpool, "unit:0:0:2", host="127.0.0.1", read_only=True) as exp:
        out = tmp_path / "lun2.raw"
        subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "raw", exp.url, str(out)],
                       check=True, capture_output=True)
        assert out.stat().st_size == 128 * MiB
        with open(out, "rb") as fh:
            assert fh.read(1024) == b"LUN2" * 256


def test_walk_every_operation(conn: EmbeddedConnection, dpool: str, tmp_path: Path) -> None:
    """A LUN reached through libiscsi: its data moves (upload, download, wipe, export),
    nothing else is claimed."""
    seen = walk(conn, dpool, "unit:0:0:1", tmp_path)
    assert seen["upload"] and seen["download"] and seen["wipe"] and seen["export"], seen
    assert not any(seen[f] for f in ("snapshot", "clone-full", "resize-grow", "copy")), seen
