"""The scsi pool: the LUNs of one SCSI host adapter (a local HBA, or an FC port or vHBA),
read from sysfs; libvirt's scsi backend.

The adapter is named as libvirt's XML names it: ``<adapter type='scsi_host'
name='hostN'/>``, or by the PCI address of its parent and its ``unique_id``
(``<parentaddr unique_id=...><address .../></parentaddr>``), or ``<adapter
type='fc_host' wwnn=... wwpn=...>`` for an FC port; a managed (or parent-given) FC
adapter that does not exist yet is created as an NPIV vHBA through its parent's
``vport_create`` and deleted again at stop. Volumes are the disk LUNs with a block
device, named ``unit:BUS:TARGET:LUN``, keyed by their WWID, with the stable path from
the pool's target directory (``/dev/disk/by-path`` ...) when there is one. A host
without the adapter (or without SCSI hosts at all) makes start fail naming it.

A LUN's bytes are uploaded, downloaded and wiped in place on its device node, as
libvirt's scsi backend does (``_block_data``).
"""

from __future__ import annotations

import os
import time
import zlib
from collections.abc import Mapping

from virtstore.backends._block_data import BlockDataOps
from virtstore.backends.base import BackendCaps, PoolSizes, ScanResult, Stamp, VolumeRecord
from virtstore.errors import InvalidArgument, OperationInvalid
from virtstore.host import devices
from virtstore.host import sysfs_scsi as ss
from virtstore.xml import PoolDef

SCSI_TYPE_DISK = 0


class ScsiBackend(BlockDataOps):
    caps = BackendCaps(pool_type="scsi", vol_formats=("raw",), default_vol_format="raw",
                       shared=False, file_based=False, volume_type="block")

    sysfs_root = "/"  # where sysfs and /dev are looked up (tests point it at a recorded tree)
    vport_wait = 10.0  # seconds to wait for a created vHBA to appear

    # -- the adapter -----------------------------------------------------------
    def find_host(self, pool: PoolDef) -> ss.ScsiHost | None:
        a = pool.source.adapter
        if a is None:
            raise InvalidArgument("missing storage pool source adapter")
        hosts = ss.scsi_hosts(self.sysfs_root)
        if a.type == "fc_host":
            wwnn, wwpn = (a.wwnn or "").lower(), (a.wwpn or "").lower()
            return next((h for h in hosts if h.fc and h.wwnn == wwnn and h.wwpn == wwpn), None)
        if a.name:
            return next((h for h in hosts if h.name == a.name), None)
        if a.parent_addr is not None:
            return next((h for h in hosts if h.pci_addr == a.parent_addr
                         and (a.parent_addr_unique_id is None
                              or h.unique_id == a.parent_addr_unique_id)), None)
        raise InvalidArgument("storage pool source adapter needs a name or a parent address")

    def _describe(self, pool: PoolDef) -> str:
        a = pool.source.adapter
        if a is None:
            return "(none)"
        if a.type == "fc_host":
            return f"fc_host wwnn='{a.wwnn}' wwpn='{a.wwpn}'"
        if a.name:
            return f"scsi_host '{a.name}'"
        addr = a.parent_addr
        where = "{:04x}:{:02x}:{:02x}.{:x}".format(*addr) if addr else "?"
        return f"scsi_host at PCI {where} unique_id {a.parent_addr_unique_id}"

    def _host(self, pool: PoolDef) -> ss.ScsiHost:
        h = self.find_host(pool)
        if h is None:
            if not ss.scsi_host_class_present(self.sysfs_root):
                raise OperationInvalid(f"SCSI adapter {self._describe(pool)} not found: this "
                                       "host has no SCSI host adapters (/sys/class/scsi_host "
                                       "is missing)")
            raise OperationInvalid(f"SCSI adapter {self._describe(pool)} not found in "
                                   "/sys/class/scsi_host")
        return h

    def start(self, pool: PoolDef) -> None:
        a = pool.source.adapter
        if a is not None and a.type == "fc_host" and self.find_host(pool) is None and \
                (a.parent or a.managed):
            self._create_vport(pool)
        self._host(pool)

    def _create_vport(self, pool: PoolDef) -> None:
        a = pool.source.adapter
        assert a is not None
        hosts = ss.scsi_hosts(self.sysfs_root)
        parent = next((h for h in hosts if h.name == a.parent), None) if a.parent else \
            next((h for h in hosts if h.fc and h.vport_capable and h.port_state == "Online"),
                 None)
        if parent is None or not parent.vport_capable:
            raise OperationInvalid(f"cannot create vHBA {self._describe(pool)}: no "
                                   f"vport-capable parent FC host"
                                   + (f" '{a.parent}'" if a.parent else ""))
        path = os.path.join(self.sysfs_root, "sys", "class", "fc_host", parent.name,
                            "vport_create")
        with open(path, "w", encoding="ascii") as fh:
            fh.write(f"{(a.wwpn or '').lower()}:{(a.wwnn or '').lower()}")
        deadline = time.monotonic() + self.vport_wait
        while time.monotonic() < deadline:
            if self.find_host(pool) is not None:
                return
            time.sleep(0.2)
        raise OperationInvalid(f"vHBA {self._describe(pool)} did not appear after "
                               f"vport_create on '{parent.name}'")

    def stop(self, pool: PoolDef) -> None:
        a = pool.source.adapter
        if a is None or a.type != "fc_host" or not a.managed:
            return
        h = self.find_host(pool)
        if h is None:
            return
        parent = a.parent
        if parent:
            path = os.path.join(self.sysfs_root, "sys", "class", "fc_host", parent,
                                "vport_delete")
            if os.path.exists(path):
                with open(path, "w", encoding="ascii") as fh:
                    fh.write(f"{h.wwpn}:{h.wwnn}")

    # -- volumes ---------------------------------------------------------------
    def _stable_path(self, pool: PoolDef, block: str) -> str:
        target = pool.target.path
        if not target or target in ("/dev", "/dev/"):
            return f"/dev/{block}"
        return devices.stable_link(target, block, self.sysfs_root) or f"/dev/{block}"

    def _records(self, pool: PoolDef) -> list[VolumeRecord]:
        h = self._host(pool)
        out = []
        for lun in ss.luns(h.number, self.sysfs_root):
            if lun.type != SCSI_TYPE_DISK or lun.block is None:
                continue
            path = self._stable_path(pool, lun.block)
            ident = f"{lun.wwid}/{lun.block}/{lun.vendor}/{lun.model}"
            out.append(VolumeRecord(name=lun.name, path=path, key=lun.wwid or path,
                                    type="block", format="raw", capacity=lun.size,
                                    allocation=lun.size, physical=lun.size,
                                    ino=zlib.crc32(ident.encode()), size=lun.size))
        return out

    def sizes(self, pool: PoolDef) -> PoolSizes:
        try:
            total = sum(r.capacity for r in self._records(pool))
        except OperationInvalid:
            return PoolSizes()
        return PoolSizes(capacity=total, allocation=total, available=0)

    def scan(self, pool: PoolDef, known: Mapping[str, Stamp]) -> ScanResult:
        res = ScanResult()
        for rec in self._records(pool):
            old = known.get(rec.name)
            if old is not None and old == Stamp(rec.ino, rec.size, 0, 0):
                res.unchanged.append(rec.name)
            else:
                res.changed.append(rec)
        return res

    def read_volume(self, pool: PoolDef, name: str) -> VolumeRecord | None:
        return next((r for r in self._records(pool) if r.name == name), None)

    def block_device(self, pool: PoolDef, rec: VolumeRecord) -> str:
        if not os.path.exists(rec.path):
            raise OperationInvalid(f"the device of LUN '{rec.name}' is gone: {rec.path} "
                                   "does not exist")
        return rec.path
