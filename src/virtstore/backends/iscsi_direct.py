"""The iscsi-direct pool: one iSCSI target reached from userspace (libiscsi), no kernel
initiator and no block devices.

As libvirt's: the source is the portal (``<host>``), the target IQN (``<device path>``),
the initiator IQN (``<initiator><iqn>``) and optionally CHAP (``<auth type='chap'>`` with
a secret); volumes are the target's disk LUNs, named ``unit:0:0:N``, with path and key
``ip-HOST:PORT-iscsi-IQN-lun-N``, type network, format raw. LUNs cannot be created or
deleted from here; their data can be uploaded, downloaded and wiped (zero, trim)
through qemu's iSCSI driver (qemu-nbd serving the LUN on a private socket). A wrong
CHAP secret fails the pool's start with an authentication error.
"""

from __future__ import annotations

import contextlib
import dataclasses
import zlib
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Any

from virtstore.backends import _iscsi_utils as iu
from virtstore.backends._nbd_utils import NbdDataOps, served
from virtstore.backends.base import Backend, BackendCaps, PoolSizes, ScanResult, Stamp, VolumeRecord
from virtstore.errors import NoSuchVolume, VirtstoreError
from virtstore.host import iscsi
from virtstore.host.nbd import NbdClient
from virtstore.host.runner import which
from virtstore.xml import PoolDef

if TYPE_CHECKING:
    from virtstore.host.nbd import QemuSource


class IscsiDirectBackend(NbdDataOps, Backend):
    caps = BackendCaps(pool_type="iscsi-direct", vol_formats=("raw",), default_vol_format="raw",
                       shared=True, file_based=False, volume_type="network")

    def host_problem(self) -> str | None:
        for tool, pkg in (("iscsi-inq", "libiscsi-bin"), ("iscsi-readcapacity16",
                                                          "libiscsi-bin")):
            if which(tool) is None:
                return f"iscsi-direct pools need '{tool}' (Debian {pkg}), not installed"
        try:
            iscsi._library()
        except VirtstoreError as exc:
            return str(exc)
        return None

    def _luns(self, pool: PoolDef, only: int | None = None) -> list[iscsi.Lun]:
        return iscsi.scan_luns(iu.portal(pool), iu.target(pool), iu.initiator(pool),
                               iu.credentials(pool, self.secrets()), only=only)

    def start(self, pool: PoolDef) -> None:
        iscsi.report_luns(iu.portal(pool), iu.target(pool), iu.initiator(pool),
                          iu.credentials(pool, self.secrets()))

    def sizes(self, pool: PoolDef) -> PoolSizes:
        try:
            total = sum(lun.capacity for lun in self._luns(pool))
        except VirtstoreError:
            return PoolSizes()
        return PoolSizes(capacity=total, allocation=total, available=0)

    def _record(self, pool: PoolDef, lun: iscsi.Lun) -> VolumeRecord:
        path = iu.volume_path(pool, lun.lun)
        ident = f"{lun.serial}/{lun.block_size}"  # what a scan and a lookup both read
        # No <physical>, as libvirt's iscsi-direct backend.
        return VolumeRecord(name=f"{iu.VOL_NAME_PREFIX}{lun.lun}", path=path, key=path,
                            type="network", format="raw", capacity=lun.capacity,
                            allocation=lun.capacity,
                            ino=zlib.crc32(ident.encode()), size=lun.capacity)

    def scan(self, pool: PoolDef, known: Mapping[str, Stamp]) -> ScanResult:
        res = ScanResult()
        for lun in self._luns(pool):
            rec = self._record(pool, lun)
            res.add(rec, known)
        return res

    def read_volume(self, pool: PoolDef, name: str) -> VolumeRecord | None:
        found = self._luns(pool, only=iu.lun_of(name))
        return self._record(pool, found[0]) if found else None

    def volume_path(self, pool: PoolDef, name: str) -> str:
        return iu.volume_path(pool, iu.lun_of(name))

    def device_identity(self, pool: PoolDef, name: str) -> dict[str, Any] | None:
        return dataclasses.asdict(self.lun_info(pool, name))

    def lun_info(self, pool: PoolDef, name: str) -> iscsi.Lun:
        """The SCSI identity of a LUN volume: vendor, product, revision, serial, size."""
        lun = iscsi.lun_details(iu.portal(pool), iu.target(pool), iu.lun_of(name),
                                iu.initiator(pool), iu.credentials(pool, self.secrets()))
        if lun.device_type != "DIRECT_ACCESS":
            raise NoSuchVolume(f"Storage volume not found: no storage vol with matching "
                               f"name '{name}'")
        return lun

    @contextlib.contextmanager
    def qemu_source(self, pool: PoolDef, rec: VolumeRecord) -> Iterator[QemuSource]:
        from virtstore.host.nbd import QemuSource

        with iu.qemu_image_opts(pool, iu.lun_of(rec.name), self.secrets()) as (opts, objects):
            yield QemuSource(image_opts=opts, objects=objects)

    @contextlib.contextmanager
    def nbd_open(self, pool: PoolDef, rec: VolumeRecord, *,
                 read_only: bool) -> Iterator[NbdClient]:
        with iu.qemu_image_opts(pool, iu.lun_of(rec.name), self.secrets()) as (opts, objects), \
                served(opts, objects, read_only=read_only) as c:
            yield c
