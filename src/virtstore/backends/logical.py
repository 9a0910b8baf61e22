"""The logical pool: an LVM volume group; volumes are its logical volumes.

On a kernel with device-mapper this is libvirt's logical backend: start activates the
VG (``vgchange -aly``), stop deactivates it, volumes are block devices /dev/VG/LV.

On a kernel without device-mapper LVM can still read and write its metadata (every
command runs with ``--driverloaded n``), but nothing can be activated. Decision: such
a pool still starts when its VG is there, in metadata-only mode: volumes are listed,
created (linear and striped), resized and deleted in the metadata, and their paths
are where the nodes would be; no /dev/VG/LV node exists. What needs device-mapper
at creation time (snapshots, sparse/thin volumes) fails with an error naming it, and
``activate()`` does too.

Volume data (upload, download, wipe, clone) goes through the active LV's node
(``_block_data.BlockDataOps``): in place, as libvirt; a clone is a new LV under the
staging name filled from the source; resize is lvresize, also in metadata-only mode.

Thin provisioning (ours; libvirt has none): a pool with ``<lvm:thin_pool name=.../>``
makes that thin pool at build (or at start, in a VG that lacks it) and creates every new
volume as a thin LV in it; its allocation is what ``lvs`` reports written (data
percent). A thin volume has storage snapshots: thin snapshots named ``VOL+SNAP``, tagged
``virtstore_snapshot`` so listings leave them out and left inactive (LVM's default for
them). Revert puts a new thin snapshot of the snapshot in the volume's place (not
``lvconvert --merge``: that needs the snapshot's origin to be the volume, which a
previous revert has replaced); a linked clone of a thin volume is an active thin
snapshot of it. Backups of a thin volume are tracked with ``thin_delta``
(``thin-delta``): each takes a hidden, inactive, read-only thin snapshot
``virtstore-backup-ID`` (tagged ``virtstore_backup``), read for the backup; the next
backup reads only the blocks the pool's metadata maps differently in its own snapshot
(docs/backup.md). Thick LVs are read whole (``block-hash``).
"""

from __future__ import annotations

import logging
import os
import zlib
from collections.abc import Mapping
from contextlib import AbstractContextManager, nullcontext
from typing import TYPE_CHECKING, ClassVar

from virtstore.backends import _block_utils as bu
from virtstore.backends import _lvm_shared as shared
from virtstore.backends._lvm_thin import (
    BACKUP_TAG,
    SNAPSHOT_TAG,
    ThinSnapshots,
)
from virtstore.backends.base import (
    BackendCaps,
    CloneOptions,
    CreateRequest,
    PoolSizes,
    ScanResult,
    Stamp,
    VolumeRecord,
)
from virtstore.errors import (
    AlreadyExists,
    Busy,
    CommandFailed,
    InvalidArgument,
    NoSpace,
    OperationInvalid,
    Unsupported,
)
from virtstore.host import devices, lvm
from virtstore.xml import Extent, PoolDef, VolSource

if TYPE_CHECKING:

    from virtstore.data.monitor import Monitor
    from virtstore.host.nbd import QemuSource

log = logging.getLogger("virtstore")

STAGING_PREFIX = "virtstore-staging-"


_vg_name = shared.vg_name


class LogicalBackend(ThinSnapshots):
    caps = BackendCaps(pool_type="logical", vol_formats=("none", "raw"),
                       default_vol_format="none", shared=False, file_based=False,
                       volume_type="block")
    linked_clones = True  # an LVM snapshot of the source
    new_volumes_read_zeros = False  # a new LV holds what its extents held
    can_shrink = True
    snapshot_kinds: ClassVar[dict[str, tuple[str, ...]]] = {"none": ("native",),
                                                             "raw": ("native",)}

    def pool_has(self, feature: str, pool: PoolDef) -> bool:
        # Without device-mapper no LV is active: there is no device to move bytes of.
        return lvm.device_mapper_available()

    def host_problem(self) -> str | None:
        # Without device-mapper the metadata can still be managed: not a reason to
        # refuse the pool type (see the module's notes and docs/backends-block.md).
        return lvm.tool_problem()

    # -- pool lifecycle --------------------------------------------------------
    def build(self, pool: PoolDef, overwrite: bool | None) -> None:
        vg = _vg_name(pool)
        if not pool.source.devices:
            raise InvalidArgument("missing storage pool source device name: a volume "
                                  "group is built from devices")
        if lvm.vg(vg) is not None:
            raise OperationInvalid(f"Storage pool already built: volume group '{vg}' "
                                   "exists")
        attached: list[str] = []
        try:
            pvs: list[str] = []
            for source in bu.source_paths(pool):
                if not os.path.exists(source):
                    raise InvalidArgument(f"device path '{source}' doesn't exist")
                device, loopdev = bu.build_device(source)
                if loopdev:
                    attached.append(loopdev)
                pv = lvm.pv_of(device)
                if pv is not None and pv.vg_name:
                    raise OperationInvalid(f"device '{source}' is already a physical volume "
                                           f"of volume group '{pv.vg_name}'")
                if bu.check_overwrite(device, "lvm2", overwrite):
                    if overwrite:
                        # As libvirt: clear the old label sector before pvcreate.
                        with open(device, "r+b") as fh:
                            fh.write(bytes(512))
                        lvm.lvm(["pvcreate", "-ff", "-y", device])
                    else:
                        lvm.lvm(["pvcreate", device])
                pvs.append(device)
            lvm.lvm(["vgcreate", vg, *pvs])
            if pool.thin_pool:
                self.create_thin_pool(vg, pool.thin_pool, pool.thin_pool_size)
        finally:
            for dev in attached:
                from virtstore.host import loop

                loop.detach(dev)

    def start(self, pool: PoolDef) -> None:
        vg = _vg_name(pool)
        found = shared.find_vg(pool)
        if found is None:
            raise OperationInvalid(f"cannot find logical volume group name '{vg}'")
        self._match_sources(pool, vg)
        if found.shared:
            self._start_shared(pool, found)
            return
        self._ensure_thin_pool(pool)
        if lvm.device_mapper_available():
            lvm.lvm(["vgchange", "-aly", vg])
        else:
            log.warning("pool '%s': %s; volume group '%s' is managed in metadata only",
                        pool.name, lvm.NO_DM_MESSAGE, vg)

    def _ensure_thin_pool(self, pool: PoolDef) -> None:
        """Make the pool's thin pool in a VG that lacks it."""
        if pool.thin_pool and self._lv(pool, pool.thin_pool) is None:
            vg = _vg_name(pool)
            log.info("pool '%s': making thin pool '%s' in volume group '%s'", pool.name,
                     pool.thin_pool, vg)
            self.create_thin_pool(vg, pool.thin_pool, pool.thin_pool_size)

    def _match_sources(self, pool: PoolDef, vg: str) -> None:
        """As libvirt: at least one listed source device must be a PV of the VG."""
        if not pool.source.devices:
            return
        members = {os.path.realpath(pv.name) for pv in lvm.pvs() if pv.vg_name == vg}
        for source in bu.source_paths(pool):
            try:
                device = bu.resolve_device(source)
            except OperationInvalid:
                continue
            if os.path.realpath(device) in members:
                return
        raise OperationInvalid(f"cannot find any matching source devices for logical "
                               f"volume group '{vg}'")

    def activate(self, pool: PoolDef) -> None:
        """Activate every LV of the pool's VG (libvirt's start)."""
        if not lvm.device_mapper_available():
            raise self.dm_problem(f"activating volume group '{_vg_name(pool)}'")
        found = shared.find_vg(pool)
        if found is not None and found.shared:
            shared.activate_exclusive(pool, _vg_name(pool))
            return
        lvm.lvm(["vgchange", "-aly", _vg_name(pool)])

    def stop(self, pool: PoolDef) -> None:
        vg = _vg_name(pool)
        found = shared.find_vg(pool)
        if lvm.device_mapper_available():
            lvm.lvm(["vgchange", "-aln", vg])
        if found is not None and found.shared and vg in shared.lockspaces(pool, found):
            # Every LV is inactive now, which lvmlockd requires before it lets go.
            lvm.lvm(["vgchange", "--lockstop", vg])

    # -- shared VGs (lvmlockd) -------------------------------------------------
    def _start_shared(self, pool: PoolDef, vg: lvm.VolumeGroup) -> None:
        """Join the VG's lockspace (``vgchange --lockstart``, which waits until the lock
        manager has it: sanlock takes seconds to a minute; LVM changes the VG only
        then), then activate every LV exclusively. An LV another host holds fails the
        start, and undoes it: the LVs activated here go inactive again and a lockspace
        joined here is left again."""
        if not lvm.device_mapper_available():
            raise self.dm_problem(f"starting shared volume group '{vg.name}'")
        started_here = vg.name not in shared.lockspaces(pool, vg)
        if started_here:
            shared.lockstart(pool, vg)
        before = {lv.name for lv in lvm.lvs(vg.name) if lv.active == "active"}
        try:
            self._ensure_thin_pool(pool)
            shared.activate_exclusive(pool, vg.name)
        except Exception:
            now = {lv.name for lv in lvm.lvs(vg.name) if lv.active == "active"}
            for name in sorted(now - before):
                lvm.lvm(["lvchange", "-an", f"{vg.name}/{name}"], check=False)
            if started_here:
                lvm.lvm(["vgchange", "--lockstop", vg.name], check=False)
            raise

    def delete(self, pool: PoolDef) -> None:
        vg = _vg_name(pool)
        if lvm.vg(vg) is not None:
            lvm.lvm(["vgremove", "-f", vg])
        for source in bu.source_paths(pool):
            try:
                device = bu.resolve_device(source)
            except OperationInvalid:
                continue
            if lvm.pv_of(device) is not None:
                lvm.lvm(["pvremove", device])

    def sizes(self, pool: PoolDef) -> PoolSizes:
        try:
            vg = lvm.vg(_vg_name(pool))
        except CommandFailed:
            return PoolSizes()
        if vg is None:
            return PoolSizes()
        thin = self._lv(pool, pool.thin_pool) if pool.thin_pool else None
        if thin is not None:
            # Volumes take their space from the thin pool, not from the VG.
            used = thin.used or 0
            return PoolSizes(capacity=thin.size, allocation=used,
                             available=thin.size - used, shared=vg.shared)
        return PoolSizes(capacity=vg.size, allocation=vg.size - vg.free, available=vg.free,
                         shared=vg.shared)

    # -- volumes: listing ------------------------------------------------------
    def _record(self, pool: PoolDef, lv: lvm.LogicalVolume) -> VolumeRecord:
        path = lv.path or f"/dev/{lv.vg_name}/{lv.name}"
        segs = ";".join(f"{s.start}+{s.size}:{s.pe_ranges}" for s in lv.segments)
        rec = VolumeRecord(name=lv.name, path=path, key=lv.uuid, type="block", format=None,
                           capacity=lv.size, allocation=lv.size, physical=lv.size,
                           ino=zlib.crc32(f"{segs}/{lv.attr}/{lv.origin}".encode()),
                           size=lv.size)
        if lv.origin:
            rec.backing_path = f"/dev/{lv.vg_name}/{lv.origin}"
        if lv.is_thin:
            rec.allocation = lv.used or 0
        return rec

    def _visible(self, lv: lvm.LogicalVolume) -> bool:
        return not (lv.hidden or lv.is_thin_pool or lv.name.startswith(STAGING_PREFIX)
                    or SNAPSHOT_TAG in lv.tags or BACKUP_TAG in lv.tags)

    def scan(self, pool: PoolDef, known: Mapping[str, Stamp]) -> ScanResult:
        res = ScanResult()
        for lv in lvm.lvs(_vg_name(pool)):
            if not self._visible(lv):
                continue
            rec = self._record(pool, lv)
            res.add(rec, known)
        return res

    def read_volume(self, pool: PoolDef, name: str) -> VolumeRecord | None:
        lv = self._lv(pool, name)
        return None if lv is None else self._record(pool, lv)

    def volume_source(self, pool: PoolDef, name: str) -> list[VolSource]:
        """Where an LV lies: per physical volume, its byte extents (as libvirt shows)."""
        lv = self._lv(pool, name)
        vg = lvm.vg(_vg_name(pool))
        if lv is None or vg is None:
            return []
        by_dev: dict[str, VolSource] = {}
        for seg in lv.segments:
            for dev, first, last in seg.pe_ranges:
                src = by_dev.setdefault(dev, VolSource(device_path=dev))
                src.extents.append(Extent(start=first * vg.extent_size,
                                          end=(last + 1) * vg.extent_size))
        return list(by_dev.values())

    # -- volumes: changes ------------------------------------------------------
    def volume_path(self, pool: PoolDef, name: str) -> str:
        return f"/dev/{_vg_name(pool)}/{name}"

    def staging_path(self, pool: PoolDef, token: str) -> str:
        return f"{_vg_name(pool)}/{STAGING_PREFIX}{token}"

    def create_volume(self, pool: PoolDef, staging: str, req: CreateRequest) -> None:
        if req.vol.target.encryption is not None:
            raise Unsupported("storage pool does not support encrypted volumes")
        vg, name = staging.split("/", 1)
        if req.backing_path:
            origin = self._lv(pool, os.path.basename(req.backing_path))
            if origin is not None and origin.is_thin:
                self.thin_snapshot(vg, name, origin.name, active=True)
            else:
                self.create_snapshot(vg, name, req.backing_path,
                                     req.allocation or req.capacity)
            return
        if pool.thin_pool:
            self.create_thin(vg, name, pool.thin_pool, req.capacity)
            return
        if req.allocation < req.capacity:
            self.create_sparse(vg, name, req.capacity, req.allocation)
            return
        self.create_lv(vg, name, req.capacity)

    def create_lv(self, vg: str, name: str, capacity: int, *, stripes: int = 1,
                  stripe_size: int | None = None, mirrors: int = 0,
                  devices_: list[str] | None = None) -> None:
        """A linear LV of ``capacity`` bytes, or striped over ``stripes`` PVs, or a raid1
        with ``mirrors`` extra copies (each on another PV)."""
        if capacity <= 0:
            raise InvalidArgument("a logical volume needs a capacity above 0")
        argv = ["lvcreate", "-y", "--name", name, "-L", lvm.size_arg(capacity)]
        if mirrors > 0:
            argv += ["--type", "raid1", "-m", str(mirrors)]
        if stripes > 1:
            argv += ["--stripes", str(stripes)]
            if stripe_size:
                argv += ["--stripesize", f"{stripe_size // 1024}k"]
        if not lvm.device_mapper_available():
            # Metadata only: nothing to activate, so nothing to zero or wipe either.
            argv += ["-an", "--zero", "n", "--wipesignatures", "n"]
        argv.append(vg)
        argv += devices_ or []
        try:
            lvm.lvm(argv)
        except CommandFailed as exc:
            if "Insufficient free space" in f"{exc} {exc.stderr}":
                raise NoSpace(f"Not enough space left in storage pool: volume group '{vg}' "
                              f"cannot hold {capacity} more bytes") from exc
            raise

    def create_snapshot(self, vg: str, name: str, origin_path: str, size: int) -> None:
        if not lvm.device_mapper_available():
            raise self.dm_problem("an LVM snapshot volume")
        lvm.lvm(["lvcreate", "-y", "--name", name, "-L", lvm.size_arg(size), "--snapshot",
                 origin_path])

    def create_sparse(self, vg: str, name: str, capacity: int, allocation: int) -> None:
        """A thin-provisioned volume: allocation below capacity (libvirt's sparse LV)."""
        if not lvm.device_mapper_available():
            raise self.dm_problem("a sparse (thin) logical volume")
        lvm.lvm(["lvcreate", "-y", "--name", name, "-L", lvm.size_arg(max(allocation, 1)),
                 "--virtualsize", lvm.size_arg(capacity), vg])

    def create_thin_pool(self, vg: str, name: str, size: int | None) -> None:
        """A thin pool of ``size`` bytes, or of the VG's free space when None."""
        if not lvm.device_mapper_available():
            raise self.dm_problem("a thin pool")
        amount = ["-l", "100%FREE"] if size is None else ["-L", lvm.size_arg(size)]
        lvm.lvm(["lvcreate", "-y", "--type", "thin-pool", "--name", name, *amount, vg])

    def create_thin(self, vg: str, name: str, thin_pool: str, capacity: int) -> None:
        if not lvm.device_mapper_available():
            raise self.dm_problem("a thin logical volume")
        if capacity <= 0:
            raise InvalidArgument("a logical volume needs a capacity above 0")
        lvm.lvm(["lvcreate", "-y", "--name", name, "-V", lvm.size_arg(capacity),
                 "--thinpool", thin_pool, vg])

    def commit_volume(self, pool: PoolDef, staging: str, final: str) -> None:
        vg, name = staging.split("/", 1)
        new = os.path.basename(final)
        if self._lv(pool, new) is not None:
            raise AlreadyExists(f"storage volume '{new}' exists already")
        try:
            lvm.lvm(["lvrename", vg, name, new])
        except CommandFailed as exc:
            if "already exists" in str(exc):
                raise AlreadyExists(f"storage volume '{new}' exists already") from exc
            raise

    def discard_staging(self, staging: str) -> None:
        lvm.lvm(["lvremove", "-f", staging], check=False)

    def delete_volume(self, pool: PoolDef, rec: VolumeRecord) -> None:
        if lvm.device_mapper_available() and os.path.exists(rec.path):
            why = devices.users(rec.path)
            if why:
                raise Busy(f"volume '{rec.name}' is in use: {'; '.join(why)}")
        try:
            lvm.lvm(["lvremove", "-f", f"{_vg_name(pool)}/{rec.name}"])
        except CommandFailed as exc:
            if "not found" in str(exc) or "Failed to find" in str(exc):
                return
            raise

    def resize_volume(self, pool: PoolDef, rec: VolumeRecord, capacity: int,
                      shrink: bool = False) -> int:
        """Grow (or with ``shrink``, shrink) an LV to ``capacity`` bytes, rounded up to
        whole extents. Returns the new size."""
        lv = self._lv(pool, rec.name)
        if lv is None:
            raise OperationInvalid(f"logical volume '{rec.name}' does not exist")
        vg = lvm.vg(_vg_name(pool))
        extent = vg.extent_size if vg is not None and vg.extent_size else 4 * 1024 * 1024
        wanted = (capacity + extent - 1) // extent * extent
        if wanted < lv.size and not shrink:
            raise InvalidArgument("can't shrink capacity below current capacity unless "
                                  "shrink flag explicitly specified")
        if wanted == lv.size:
            return lv.size
        if vg is not None and not lv.is_thin and wanted - lv.size > vg.free:
            raise NoSpace(f"Not enough space left in storage pool: {wanted - lv.size} bytes "
                          f"needed, {vg.free} available")
        lvm.lvm(["lvresize", "-f", "-L", lvm.size_arg(wanted), f"{_vg_name(pool)}/{rec.name}"])
        after = self._lv(pool, rec.name)
        return after.size if after is not None else wanted

    # -- data operations (BlockDataOps): on the active LV's device node ----------
    def block_device(self, pool: PoolDef, rec: VolumeRecord) -> str:
        if not lvm.device_mapper_available():
            raise self.dm_problem(f"reading or writing the data of volume '{rec.name}'")
        path = self.volume_path(pool, rec.name)
        if not os.path.exists(path):
            found = shared.find_vg(pool)
            if found is not None and found.shared:
                # Made by another host while this one had the pool running, or
                # released by it since: take its lock now.
                shared.activate_exclusive(pool, found.name, rec.name)
        if not os.path.exists(path):
            raise OperationInvalid(f"logical volume '{rec.name}' is not active: {path} "
                                   "does not exist")
        return path

    def create_block_target(self, pool: PoolDef, staging: str, capacity: int) -> None:
        vg, name = staging.split("/", 1)
        self.create_lv(vg, name, capacity)

    def staging_device(self, pool: PoolDef, staging: str) -> str:
        return f"/dev/{staging}"

    def staging_source(self, pool: PoolDef, staging: str,
                       fmt: str) -> AbstractContextManager[QemuSource]:
        from virtstore.host.nbd import QemuSource

        if not lvm.device_mapper_available():
            raise self.dm_problem("writing the data of a new volume")
        return nullcontext(QemuSource(image=self.staging_device(pool, staging), fmt="raw"))

    def vol_clone(self, pool: PoolDef, src_pool: PoolDef, src: VolumeRecord, staging: str, *,
                  linked: bool, monitor: Monitor,
                  options: CloneOptions = CloneOptions()) -> None:  # noqa: B008 - frozen
        if not linked:
            super().vol_clone(pool, src_pool, src, staging, linked=False, monitor=monitor,
                              options=options)
            return
        # A linked clone is an LVM snapshot of the source: copy-on-write, sized to hold a
        # full rewrite of it, and it has to live in the source's VG.
        vg, name = staging.split("/", 1)
        if vg != _vg_name(src_pool):
            raise Unsupported("unsupported configuration: a linked clone of a logical "
                              "volume is a snapshot in the same volume group")
        origin = self._lv(src_pool, src.name)
        if origin is not None and origin.is_thin:
            self.thin_snapshot(vg, name, src.name, active=True)
            return
        self.create_snapshot(vg, name, self.block_device(src_pool, src), src.capacity)

    def vol_resize(self, pool: PoolDef, rec: VolumeRecord, capacity: int, *,
                   shrink: bool, allocate: bool) -> None:
        # A (non-thin) LV is always fully allocated: ``allocate`` asks for nothing more.
        self.resize_volume(pool, rec, capacity, shrink)
