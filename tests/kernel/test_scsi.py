"""scsi pools on the virtio-scsi HBA that scripts/test-kernel adds to the VM (two disks,
LUN 0 of 32 MiB and LUN 1 of 64 MiB, serials KLABSCSI0/1): the adapter found by name
and by its parent's PCI address, the LUNs as volumes keyed by their WWID, bytes
written through the Connection landing in the disk's image file on the host."""

from __future__ import annotations

import io
import os
import subprocess
import time
from pathlib import Path

import pytest

from virtstore.api.embedded import EmbeddedConnection
from virtstore.errors import OperationInvalid
from virtstore.host import sysfs_scsi

MiB = 1 << 20
IMAGES = Path(__file__).resolve().parent.parent.parent / ".kernel-lab"


def _sysfs(path: str) -> str:
    return Path(path).read_text().strip()


@pytest.fixture(scope="module")
def hba() -> sysfs_scsi.ScsiHost:
    for mod in ("virtio_scsi", "sd_mod"):
        subprocess.run(["modprobe", mod], capture_output=True, check=False)
    deadline = time.monotonic() + 60
    while True:
        host = next((h for h in sysfs_scsi.scsi_hosts() if h.proc_name == "virtio_scsi"),
                    None)
        if host is not None and sum(1 for lun in sysfs_scsi.luns(host.number)
                                    if lun.block) >= 2:
            return host
        if time.monotonic() > deadline:
            pytest.skip("no virtio-scsi HBA with two disks: scripts/test-kernel adds it")
        time.sleep(0.5)


def scsi_xml(name: str, adapter: str) -> str:
    return (f"<pool type='scsi'><name>{name}</name><source>{adapter}</source>"
            "<target><path>/dev</path></target></pool>")


def check_luns(conn: EmbeddedConnection, pool: str, host: sysfs_scsi.ScsiHost) -> None:
    vols = {v.name: v for v in conn.list_volumes(pool)}
    assert sorted(vols) == ["unit:0:0:0", "unit:0:0:1"]
    for lun in (0, 1):
        vol = vols[f"unit:0:0:{lun}"]
        assert vol.capacity == 32 * (lun + 1) * MiB
        sysdir = f"/sys/bus/scsi/devices/{host.number}:0:0:{lun}"
        assert vol.key == _sysfs(f"{sysdir}/wwid") == f"naa.50014050000000a{lun}"
        # The LUN is the disk qemu was given with this serial (VPD page 0x80).
        assert f"KLABSCSI{lun}".encode() in Path(f"{sysdir}/vpd_pg80").read_bytes()
        block = os.listdir(f"{sysdir}/block")[0]
        assert vol.path == f"/dev/{block}"
    assert conn.pool_info(pool).capacity == 96 * MiB


def test_adapter_by_name_luns_and_bytes(hba: sysfs_scsi.ScsiHost,
                                        conn: EmbeddedConnection) -> None:
    conn.pool_define_xml(scsi_xml("hba", f"<adapter type='scsi_host' name='{hba.name}'/>"))
    conn.pool_start("hba")
    check_luns(conn, "hba", hba)
    payload = os.urandom(MiB + 512)
    info = conn.job_wait(conn.volume_upload("hba", "unit:0:0:1", io.BytesIO(payload),
                                            offset=4 * MiB).id, 300)
    assert info.state == "done", info.error
    sink = io.BytesIO()
    info = conn.job_wait(conn.volume_download("hba", "unit:0:0:1", sink, offset=4 * MiB,
                                              length=len(payload)).id, 300)
    assert info.state == "done" and sink.getvalue() == payload
    # On the host, qemu wrote them into the disk's image file (the guest sees it as /).
    dev = conn.volume_info("hba", "unit:0:0:1").path
    with open(dev, "rb") as fh:
        os.fsync(fh.fileno())
    with open(IMAGES / "scsi-lun1.img", "rb") as fh:
        fh.seek(4 * MiB)
        assert fh.read(len(payload)) == payload
    # LUN 0 is untouched.
    with open(IMAGES / "scsi-lun0.img", "rb") as fh:
        assert fh.read(8 * MiB) == bytes(8 * MiB)
    conn.pool_stop("hba")


def test_adapter_by_parent_pci_address(hba: sysfs_scsi.ScsiHost,
                                       conn: EmbeddedConnection) -> None:
    assert hba.pci_addr is not None and hba.unique_id is not None
    domain, bus, slot, function = hba.pci_addr
    conn.pool_define_xml(scsi_xml(
        "hbapci", f"<adapter type='scsi_host'><parentaddr unique_id='{hba.unique_id}'>"
                  f"<address domain='0x{domain:04x}' bus='0x{bus:02x}' slot='0x{slot:02x}' "
                  f"function='0x{function:x}'/></parentaddr></adapter>"))
    conn.pool_start("hbapci")
    check_luns(conn, "hbapci", hba)
    # Another unique_id at the same address is another adapter: refused by name.
    conn.pool_define_xml(scsi_xml(
        "wrong", f"<adapter type='scsi_host'><parentaddr unique_id='{hba.unique_id + 7}'>"
                 f"<address domain='0x{domain:04x}' bus='0x{bus:02x}' slot='0x{slot:02x}' "
                 f"function='0x{function:x}'/></parentaddr></adapter>"))
    with pytest.raises(OperationInvalid, match="not found"):
        conn.pool_start("wrong")
