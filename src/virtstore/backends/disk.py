"""The disk pool: a block device with a partition table; volumes are its partitions.

As in libvirt, a volume is named after the partition's device node (``sdb1``,
``loop3p2``): creating a volume whose name is not the node the new partition will get
fails with libvirt's "invalid partition name" error. A dos table gets primary
partitions until four entries exist, then logical ones inside the extended partition
(volume format ``extended`` makes that). Partition nodes are kept in line with the
table after every change: where the kernel's view (sysfs) already matches the new
table (it parsed it, or parted told it) nothing runs, else ``partx -u``, so they
exist also where the kernel does not scan partition tables of loop devices.

Upload, download and wipe of a partition write its device node in place
(``_block_data``); clone is not supported, as in libvirt. Resize (libvirt has none)
grows a partition into the free space right after it (``parted resizepart``; the
kernel is told the new size); shrinking is refused, as a partition's data ends where
its filesystem says, which the pool does not know.

Staging: the partition is made under its final number (partitions have no other
name); on GPT its partition name is the staging label until the commit names it
after the volume, so a leftover from a killed process is found and removed by that
label. A dos table has no partition names: a dos leftover is removed only by the
process that made it.
"""

from __future__ import annotations

import os
import stat
import threading
import time
import zlib
from collections.abc import Mapping
from contextlib import AbstractContextManager, nullcontext
from typing import TYPE_CHECKING

from virtstore.backends import _block_utils as bu
from virtstore.backends._block_data import BlockDataOps
from virtstore.backends.base import (
    BackendCaps,
    CreateRequest,
    PoolSizes,
    ScanResult,
    Stamp,
    VolumeRecord,
)
from virtstore.errors import Busy, InvalidArgument, OperationInvalid, Unsupported
from virtstore.host import devices, partitions
from virtstore.host.loop import partition_node
from virtstore.xml import Extent, FreeExtent, PoolDef, VolSource

if TYPE_CHECKING:
    from virtstore.host.nbd import QemuSource

DISK_VOL_FORMATS = ("none", "linux", "fat16", "fat32", "linux-swap", "linux-lvm",
                    "linux-raid", "extended")
STAGING_PREFIX = "virtstore-staging-"
_STAGING_TAG = "disk-staging:"
SECTOR = 512


def _pool_format(pool: PoolDef) -> str:
    fmt = pool.source.format or "unknown"
    return "dos" if fmt == "unknown" else fmt


class DiskBackend(BlockDataOps):
    caps = BackendCaps(pool_type="disk", vol_formats=DISK_VOL_FORMATS,
                       default_vol_format="none", shared=False, file_based=False,
                       volume_type="block")
    new_volumes_read_zeros = False  # a new partition holds what the disk held there

    def __init__(self) -> None:
        # staging string -> (device, partition number), for tables without names
        self._made: dict[str, tuple[str, int]] = {}
        self._lock = threading.Lock()

    def host_problem(self) -> str | None:
        return partitions.tool_problem()

    # -- helpers ---------------------------------------------------------------
    @staticmethod
    def _device(pool: PoolDef) -> str:
        return bu.resolve_device(bu.first_device(pool))

    @staticmethod
    def _separator(pool: PoolDef) -> bool | None:
        return pool.source.devices[0].part_separator if pool.source.devices else None

    def _table(self, pool: PoolDef) -> partitions.Table:
        return partitions.read_table(self._device(pool), self._separator(pool))

    # -- pool lifecycle --------------------------------------------------------
    def build(self, pool: PoolDef, overwrite: bool | None) -> None:
        source = bu.first_device(pool)
        if not os.path.exists(source):
            raise InvalidArgument(f"device path '{source}' doesn't exist")
        fmt = _pool_format(pool)
        if fmt == "lvm2":
            raise Unsupported("unsupported configuration: a disk pool of format 'lvm2' "
                              "cannot be built, only detected")
        device, attached = bu.build_device(source)
        try:
            if devices.users(device):
                raise OperationInvalid(f"device '{device}' is in use: "
                                       f"{'; '.join(devices.users(device))}")
            if bu.check_overwrite(device, fmt, overwrite):
                partitions.make_label(device, fmt)
        finally:
            if attached:
                from virtstore.host import loop

                loop.detach(attached)

    def start(self, pool: PoolDef) -> None:
        source = bu.first_device(pool)
        if not os.path.exists(source):
            raise InvalidArgument(f"device path '{source}' doesn't exist")
        device = self._device(pool)
        table = partitions.read_table(device, self._separator(pool))
        wanted = pool.source.format or "unknown"
        if table.label == "unknown":
            raise OperationInvalid(f"Device '{source}' is unrecognized, requires build")
        if wanted != "unknown" and table.label != wanted:
            raise OperationInvalid(f"Format of device '{source}' does not match the "
                                   f"expected format '{wanted}'")
        # Partition nodes of a loop device exist only once someone adds them (the
        # kernel itself, where it scans the device's table).
        from virtstore.host import loop

        loop.sync_partitions(device, partitions.kernel_view(table))

    def delete(self, pool: PoolDef) -> None:
        """Erase the partition table (the partitions' data becomes unreachable)."""
        source = bu.first_device(pool)
        if not os.path.exists(source):
            return
        device, attached = bu.build_device(source)
        try:
            table = partitions.read_table(device, self._separator(pool))
            for part in table.partitions:
                why = devices.users(part.node) if os.path.exists(part.node) else []
                if why:
                    raise Busy(f"partition '{part.node}' is in use: {'; '.join(why)}")
            for part in sorted(table.partitions, key=lambda p: -p.number):
                partitions.delete_partition(device, part.number)
            partitions.zero_ends(device)
        finally:
            if attached:
                from virtstore.host import loop

                loop.detach(attached)

    def sizes(self, pool: PoolDef) -> PoolSizes:
        try:
            table = self._table(pool)
        except Exception:  # a vanished device: nothing to report, as for a dir pool
            return PoolSizes()
        allocation = sum(p.size for p in table.partitions if p.kind != "extended")
        available = sum(r.size for r in table.free)
        return PoolSizes(capacity=table.size, allocation=allocation, available=available)

    def live_source(self, pool: PoolDef) -> None:
        """Fill the pool's <freeExtent> list, as a running libvirt disk pool shows it."""
        if not pool.source.devices:
            return
        try:
            table = self._table(pool)
        except Exception:
            return
        pool.source.devices[0].free_extents = [
            FreeExtent(start=max(r.start, SECTOR), end=r.end + 1) for r in table.free]

    def scan(self, pool: PoolDef, known: Mapping[str, Stamp]) -> ScanResult:
        table = self._table(pool)
        res = ScanResult()
        for part in table.partitions:
            if part.name.startswith(STAGING_PREFIX):
                continue
            rec = self._record(part)
            res.add(rec, known)
        return res

    @staticmethod
    def _record(part: partitions.Partition) -> VolumeRecord:
        name = os.path.basename(part.node)
        extended = part.kind == "extended"
        rec = VolumeRecord(name=name, path=part.node, key=part.node, type="block",
                           format=part.format, capacity=part.size,
                           allocation=0 if extended else part.size, physical=part.size,
                           # The stamp is the whole entry; there are no timestamps to show.
                           ino=zlib.crc32(f"{part.number}/{part.start}/{part.type_code}/"
                                          f"{part.kind}".encode()), size=part.size)
        try:
            st = os.stat(part.node)
            if stat.S_ISBLK(st.st_mode):
                rec.mode, rec.uid, rec.gid = stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid
        except OSError:
            pass
        return rec

    # -- volumes ---------------------------------------------------------------
    def volume_path(self, pool: PoolDef, name: str) -> str:
        return "/dev/" + name

    def staging_path(self, pool: PoolDef, token: str) -> str:
        return f"{_STAGING_TAG}{bu.first_device(pool)}:{STAGING_PREFIX}{token}"

    @staticmethod
    def _parse_staging(staging: str) -> tuple[str, str]:
        if not staging.startswith(_STAGING_TAG):
            raise InvalidArgument(f"not a disk staging name: '{staging}'")
        source, _, label = staging[len(_STAGING_TAG):].rpartition(":")
        return source, label

    def create_volume(self, pool: PoolDef, staging: str, req: CreateRequest) -> None:
        if req.vol.target.encryption is not None:
            raise Unsupported("storage pool does not support encrypted volumes")
        if req.backing_path:
            raise Unsupported("unsupported configuration: backing storage is not supported "
                              "by 'disk' pools")
        device = self._device(pool)
        sep = self._separator(pool)
        table = partitions.read_table(device, sep)
        number = partitions.next_partition_number(table, req.capacity, req.format)
        expected = os.path.basename(partition_node(device, number, sep))
        if req.vol.name != expected:
            raise InvalidArgument(f"invalid partition name '{req.vol.name}', expected "
                                  f"'{expected}'")
        _, label = self._parse_staging(staging)
        made = partitions.create_partition(table, req.capacity, req.format, name=label)
        with self._lock:
            self._made[staging] = (device, made)
        if made != number:
            raise OperationInvalid(f"the new partition got number {made}, not {number}")

    def commit_volume(self, pool: PoolDef, staging: str, final: str) -> None:
        device = self._device(pool)
        with self._lock:
            made = self._made.pop(staging, None)
        if made is None:
            raise OperationInvalid(f"no partition was made for '{os.path.basename(final)}'")
        _, number = made
        self._node(pool, device, number)
        table = partitions.read_table(device)
        if table.label == "gpt":
            partitions.set_name(device, number, os.path.basename(final))

    def _node(self, pool: PoolDef, device: str, number: int) -> str:
        node = partition_node(device, number, self._separator(pool))
        for _ in range(50):  # the node appears when the kernel has the partition
            if os.path.exists(node):
                break
            time.sleep(0.1)
        return node

    def staging_source(self, pool: PoolDef, staging: str,
                       fmt: str) -> AbstractContextManager[QemuSource]:
        """The new partition's node, before it has its final name (a restore, an
        import): its content is raw bytes whatever its partition type."""
        with self._lock:
            made = self._made.get(staging)
        if made is None:
            return super().staging_source(pool, staging, fmt)
        from virtstore.host.nbd import QemuSource

        return nullcontext(QemuSource(image=self._node(pool, *made), fmt="raw"))

    def discard_staging(self, staging: str) -> None:
        with self._lock:
            made = self._made.pop(staging, None)
        if made is not None:
            device, number = made
            partitions.delete_partition(device, number)
            return
        # A leftover of another process: only a GPT partition name identifies it.
        try:
            source, label = self._parse_staging(staging)
            device = bu.resolve_device(source)
            table = partitions.read_table(device)
        except Exception:
            return
        for part in table.partitions:
            if part.name == label:
                partitions.delete_partition(device, part.number)

    def delete_volume(self, pool: PoolDef, rec: VolumeRecord) -> None:
        table = self._table(pool)
        part = next((p for p in table.partitions if p.node == rec.path), None)
        if part is None:
            return
        if part.kind == "extended" and any(p.kind == "logical" for p in table.partitions):
            raise OperationInvalid(f"extended partition '{rec.name}' still holds logical "
                                   "partitions: delete them first")
        why = devices.users(part.node) if os.path.exists(part.node) else []
        if why:
            raise Busy(f"volume '{rec.name}' is in use: {'; '.join(why)}")
        partitions.delete_partition(table.device, part.number)

    def _partition(self, pool: PoolDef,
                   rec: VolumeRecord) -> tuple[partitions.Table, partitions.Partition]:
        table = self._table(pool)
        part = next((p for p in table.partitions if p.node == rec.path), None)
        if part is None:
            raise OperationInvalid(f"partition '{rec.name}' does not exist")
        return table, part

    def check_resize(self, pool: PoolDef, rec: VolumeRecord, capacity: int, *,
                     shrink: bool, allocate: bool) -> None:
        table, part = self._partition(pool, rec)
        if capacity < part.size:
            raise InvalidArgument(f"partition '{rec.name}' is not shrunk: a partition's "
                                  "data would be cut off")
        partitions.grow_partition(table, part.number, capacity, dry_run=True)

    def vol_resize(self, pool: PoolDef, rec: VolumeRecord, capacity: int, *,
                   shrink: bool, allocate: bool) -> None:
        table, part = self._partition(pool, rec)
        partitions.grow_partition(table, part.number, capacity)

    def read_volume(self, pool: PoolDef, name: str) -> VolumeRecord | None:
        for part in self._table(pool).partitions:
            if os.path.basename(part.node) == name:
                return self._record(part)
        return None

    def volume_source(self, pool: PoolDef, name: str) -> VolSource | None:
        """The <source> of a partition volume: its disk and exact byte extent."""
        for part in self._table(pool).partitions:
            if os.path.basename(part.node) == name:
                return VolSource(device_path=bu.first_device(pool),
                                 extents=[Extent(start=part.start, end=part.end + 1)])
        return None
