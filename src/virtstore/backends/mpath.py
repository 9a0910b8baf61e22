"""The mpath pool: the host's device-mapper multipath maps, read from sysfs; libvirt's
mpath backend. Volumes are ``dm-N`` with path ``/dev/mapper/NAME``. A kernel without
device-mapper (this host's) makes start fail naming it."""

from __future__ import annotations

import zlib
from collections.abc import Mapping

from virtstore.backends.base import Backend, BackendCaps, PoolSizes, ScanResult, Stamp, VolumeRecord
from virtstore.errors import Unsupported
from virtstore.host import sysfs_scsi as ss
from virtstore.xml import PoolDef


class MpathBackend(Backend):
    caps = BackendCaps(pool_type="mpath", vol_formats=("raw",), default_vol_format="raw",
                       shared=False, file_based=False, volume_type="block")

    sysfs_root = "/"

    def host_problem(self) -> str | None:
        if not ss.device_mapper_present(self.sysfs_root):
            return ("mpath pools need device-mapper multipath, and this kernel has no "
                    "device-mapper (/sys/class/misc/device-mapper is missing)")
        return None

    def start(self, pool: PoolDef) -> None:
        problem = self.host_problem()
        if problem:
            raise Unsupported(problem)

    def _records(self) -> list[VolumeRecord]:
        out = []
        for m in ss.multipath_maps(self.sysfs_root):
            path = f"/dev/mapper/{m.name}"
            out.append(VolumeRecord(name=m.dm, path=path, key=path, type="block",
                                    format="raw", capacity=m.size, allocation=m.size,
                                    physical=m.size, size=m.size,
                                    ino=zlib.crc32(f"{m.uuid}/{','.join(m.slaves)}".encode())))
        return out

    def sizes(self, pool: PoolDef) -> PoolSizes:
        total = sum(r.capacity for r in self._records())
        return PoolSizes(capacity=total, allocation=total, available=0)

    def scan(self, pool: PoolDef, known: Mapping[str, Stamp]) -> ScanResult:
        res = ScanResult()
        for rec in self._records():
            res.add(rec, known)
        return res

    def read_volume(self, pool: PoolDef, name: str) -> VolumeRecord | None:
        return next((r for r in self._records() if r.name == name), None)
