"""The zfs pool: a ZFS pool (or a dataset in one); volumes are zvols under it.

Build creates the zpool on the source devices (or the dataset, when the source name
is ``pool/dataset``); start imports the zpool if it is not imported, stop exports it
(a dataset source leaves its zpool alone); delete destroys. Volumes are zvols, block
devices at /dev/zvol/NAME/VOL — which only the kernel module (OpenZFS) can make:
under zfs-fuse creating one fails with a clear error, while listing, snapshots and
clones of datasets work.

With the kernel module (tested in the kernel lab, tests/kernel/test_zfs.py, with
Debian's OpenZFS 2.1): upload, download and wipe write the zvol's device node in
place; resize sets ``volsize`` (rounded up to the ``volblocksize``); storage
snapshots, revert and clones are ZFS snapshots and clones; backups are tracked with
``zfs send`` (``zfs-send``: a hidden snapshot per backup, the next one reads only the
blocks ``zfs send -i`` carries).
"""

from __future__ import annotations

import os
import zlib
from collections.abc import Mapping
from contextlib import AbstractContextManager, contextmanager, nullcontext
from typing import TYPE_CHECKING, ClassVar

from virtstore.backends import _block_utils as bu
from virtstore.backends._block_data import BlockDataOps
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
    CommandFailed,
    InvalidArgument,
    NoSuchVolume,
    OperationInvalid,
    Unsupported,
)
from virtstore.host import zfs as zfsmod
from virtstore.host.files import wait_for_path
from virtstore.xml import PoolDef

if TYPE_CHECKING:
    from collections.abc import Iterator

    from virtstore.data.monitor import Monitor
    from virtstore.host.nbd import QemuSource
    from virtstore.types import SnapshotInfo

STAGING_PREFIX = "virtstore-staging-"
BACKUP_SNAP_PREFIX = "virtstore-backup-"
CLONE_SNAP_PREFIX = "virtstore-clone-"  # the origin of a linked clone
COPY_SNAP_PREFIX = "virtstore-copy-"  # the source of a full clone, while it is copied
TRACK_SEND = "zfs-send"
NO_ZVOLS = ("zvols need the ZFS kernel module: this host runs zfs-fuse, which cannot "
            "make block devices")


def _root(pool: PoolDef) -> str:
    return pool.source.name or pool.name


def _zpool(pool: PoolDef) -> str:
    return _root(pool).split("/", 1)[0]


class ZfsBackend(BlockDataOps):
    caps = BackendCaps(pool_type="zfs", vol_formats=("none", "raw"),
                       default_vol_format="none", shared=False, file_based=False,
                       volume_type="block")

    def host_problem(self) -> str | None:
        return zfsmod.tool_problem()

    # -- pool lifecycle --------------------------------------------------------
    def build(self, pool: PoolDef, overwrite: bool | None) -> None:
        root = _root(pool)
        name = _zpool(pool)
        if not zfsmod.pool_imported(name):
            if not pool.source.devices:
                raise InvalidArgument(f"zpool '{name}' does not exist and the pool lists no "
                                      "source devices to create it on")
            devs: list[str] = []
            for source in bu.source_paths(pool):
                if not os.path.exists(source):
                    raise InvalidArgument(f"device path '{source}' doesn't exist")
                device = bu.resolve_device(source) if bu.is_regular_file(source) else source
                bu.check_overwrite(device, "zfs", overwrite or False)
                devs.append(device)
            argv = ["create"]
            if overwrite:
                argv.append("-f")
            zfsmod.zpool([*argv, "-m", "none", name, *devs])
        elif pool.source.devices and root == name:
            raise OperationInvalid(f"Storage pool already built: zpool '{name}' exists")
        if root != name and zfsmod.dataset(root) is None:
            zfsmod.zfs(["create", "-p", root])

    def start(self, pool: PoolDef) -> None:
        name = _zpool(pool)
        if not zfsmod.pool_imported(name):
            args = ["import"]
            for d in sorted({os.path.dirname(bu.resolve_device(s))
                             for s in bu.source_paths(pool)} | {"/dev"}):
                args += ["-d", d]
            try:
                zfsmod.zpool([*args, name])
            except CommandFailed as exc:
                raise OperationInvalid(f"cannot import zpool '{name}': {exc}") from exc
        if zfsmod.dataset(_root(pool)) is None:
            raise OperationInvalid(f"zfs dataset '{_root(pool)}' does not exist")

    def stop(self, pool: PoolDef) -> None:
        name = _zpool(pool)
        if _root(pool) == name and zfsmod.pool_imported(name):
            zfsmod.zpool(["export", name])

    def delete(self, pool: PoolDef) -> None:
        root = _root(pool)
        name = _zpool(pool)
        if root != name:
            if zfsmod.dataset(root) is not None:
                zfsmod.zfs(["destroy", "-r", root])
            return
        if not zfsmod.pool_imported(name):
            try:
                self.start(pool)
            except OperationInvalid:
                return  # nothing to destroy
        zfsmod.zpool(["destroy", name])

    def sizes(self, pool: PoolDef) -> PoolSizes:
        try:
            ds = zfsmod.dataset(_root(pool))
        except CommandFailed:
            return PoolSizes()
        if ds is None:
            return PoolSizes()
        return PoolSizes(capacity=ds.used + ds.available, allocation=ds.used,
                         available=ds.available)

    # -- volumes ---------------------------------------------------------------
    def _record(self, ds: zfsmod.Dataset, root: str) -> VolumeRecord:
        name = ds.name[len(root) + 1:]
        rec = VolumeRecord(name=name, path=f"/dev/zvol/{ds.name}", key=f"/dev/zvol/{ds.name}",
                           type="block", format=None, capacity=ds.volsize,
                           allocation=ds.referenced, physical=ds.volsize,
                           ino=zlib.crc32(f"{ds.referenced}/{ds.origin}".encode()),
                           size=ds.volsize)
        return rec

    def scan(self, pool: PoolDef, known: Mapping[str, Stamp]) -> ScanResult:
        root = _root(pool)
        res = ScanResult()
        for ds in zfsmod.datasets(root, types="volume", depth=1):
            if ds.name == root or ds.type != "volume":
                continue
            rec = self._record(ds, root)
            if rec.name.startswith(STAGING_PREFIX):
                continue
            res.add(rec, known)
        return res

    def volume_path(self, pool: PoolDef, name: str) -> str:
        return f"/dev/zvol/{_root(pool)}/{name}"

    def staging_path(self, pool: PoolDef, token: str) -> str:
        return f"{_root(pool)}/{STAGING_PREFIX}{token}"

    def create_volume(self, pool: PoolDef, staging: str, req: CreateRequest) -> None:
        if req.vol.target.encryption is not None:
            raise Unsupported("storage pool does not support encrypted volumes")
        if req.backing_path:
            raise Unsupported("unsupported configuration: backing storage is not supported "
                              "by 'zfs' pools (use a clone)")
        if not zfsmod.has_zvols():
            raise Unsupported(NO_ZVOLS)
        argv = ["create", "-V", str(req.capacity)]
        if req.allocation < req.capacity:
            argv.append("-s")  # sparse, as libvirt does for allocation below capacity
        zfsmod.zfs([*argv, staging])

    def commit_volume(self, pool: PoolDef, staging: str, final: str) -> None:
        target = f"{_root(pool)}/{os.path.basename(final)}"
        if zfsmod.dataset(target) is not None:
            raise AlreadyExists(f"storage volume '{os.path.basename(final)}' exists already")
        zfsmod.zfs(["rename", staging, target])

    def discard_staging(self, staging: str) -> None:
        zfsmod.zfs(["destroy", "-r", staging], check=False)

    def staging_source(self, pool: PoolDef, staging: str,
                       fmt: str) -> AbstractContextManager[QemuSource]:
        from virtstore.host.nbd import QemuSource

        if not zfsmod.has_zvols():
            raise Unsupported(NO_ZVOLS)
        path = f"/dev/zvol/{staging}"
        wait_for_path(path)
        return nullcontext(QemuSource(image=path, fmt="raw"))

    def block_device(self, pool: PoolDef, rec: VolumeRecord) -> str:
        if not zfsmod.has_zvols():
            raise Unsupported(NO_ZVOLS)
        wait_for_path(rec.path)
        return rec.path

    def vol_resize(self, pool: PoolDef, rec: VolumeRecord, capacity: int, *,
                   shrink: bool, allocate: bool) -> None:
        """``volsize``, rounded up to whole ``volblocksize`` blocks (zfs refuses others);
        ``allocate`` reserves the whole size (``refreservation=auto``), as a volume
        created fully allocated has."""
        ds = self._dataset(pool, rec.name)
        block = int(zfsmod.zfs(["get", "-H", "-p", "-o", "value", "volblocksize", ds]
                               ).stdout.strip() or 8192)
        wanted = -(-capacity // block) * block
        if wanted != rec.capacity:
            zfsmod.zfs(["set", f"volsize={wanted}", ds])
        if allocate:
            zfsmod.zfs(["set", "refreservation=auto", ds])

    def delete_volume(self, pool: PoolDef, rec: VolumeRecord) -> None:
        ds = f"{_root(pool)}/{rec.name}"
        found = zfsmod.dataset(ds)
        if found is None:
            return
        clones = []
        for c in zfsmod.dependent_clones(ds):
            if c.startswith(f"{_root(pool)}/{STAGING_PREFIX}"):
                # A backup's read of a snapshot, or a clone, killed before it cleaned up
                # (the engine's locks keep a running one from meeting a delete).
                zfsmod.zfs(["destroy", c])
            else:
                clones.append(c)
        if clones:
            names = ", ".join(c[len(_root(pool)) + 1:] for c in clones)
            raise OperationInvalid(f"volume '{rec.name}' has linked clones ({names}): "
                                   "delete them first")
        zfsmod.zfs(["destroy", "-r", ds])
        # The snapshot a linked clone was made from goes with the clone.
        if found.origin.split("@", 1)[-1].startswith(CLONE_SNAP_PREFIX):
            zfsmod.zfs(["destroy", found.origin], check=False)

    def read_volume(self, pool: PoolDef, name: str) -> VolumeRecord | None:
        ds = zfsmod.dataset(f"{_root(pool)}/{name}")
        if ds is None or ds.type != "volume":
            return None
        return self._record(ds, _root(pool))

    # -- snapshots and clones (datasets and zvols alike) -----------------------
    def _dataset(self, pool: PoolDef, name: str) -> str:
        ds = f"{_root(pool)}/{name}"
        if zfsmod.dataset(ds) is None:
            raise NoSuchVolume(f"Storage volume not found: no storage vol with matching name "
                               f"'{name}'")
        return ds

    def snapshot_volume(self, pool: PoolDef, name: str, snapshot: str) -> str:
        """Take snapshot ``snapshot`` of volume (or dataset) ``name``; its full name."""
        if not snapshot or "@" in snapshot or "/" in snapshot:
            raise InvalidArgument(f"invalid snapshot name '{snapshot}'")
        full = f"{self._dataset(pool, name)}@{snapshot}"
        try:
            zfsmod.zfs(["snapshot", full])
        except CommandFailed as exc:
            if "exists" in str(exc):
                raise AlreadyExists(f"snapshot '{snapshot}' of '{name}' exists already") \
                    from exc
            raise
        return full

    def list_snapshots(self, pool: PoolDef, name: str) -> list[zfsmod.Dataset]:
        ds = self._dataset(pool, name)
        return [d for d in zfsmod.datasets(ds, types="snapshot", depth=1)
                if d.name.startswith(ds + "@")]

    def revert_snapshot(self, pool: PoolDef, name: str, snapshot: str) -> None:
        zfsmod.zfs(["rollback", "-r", f"{self._dataset(pool, name)}@{snapshot}"])

    def delete_snapshot(self, pool: PoolDef, name: str, snapshot: str) -> None:
        zfsmod.zfs(["destroy", f"{self._dataset(pool, name)}@{snapshot}"])

    def clone_volume(self, pool: PoolDef, name: str, new_name: str,
                     snapshot: str | None = None) -> str:
        """A copy-on-write clone of ``name`` (from ``snapshot``, or a new one)."""
        src = self._dataset(pool, name)
        target = f"{_root(pool)}/{new_name}"
        if zfsmod.dataset(target) is not None:
            raise AlreadyExists(f"storage volume '{new_name}' exists already")
        snap = snapshot or f"{CLONE_SNAP_PREFIX}{new_name}"
        if snapshot is None:
            zfsmod.zfs(["snapshot", f"{src}@{snap}"])
        zfsmod.zfs(["clone", f"{src}@{snap}", target])
        return target

    # -- the contract's verbs, on the zvol's dataset ------------------------------
    linked_clones = True  # a clone of a snapshot shares its blocks
    can_shrink = True  # a smaller volsize frees the blocks past the new end
    snapshot_kinds: ClassVar[dict[str, tuple[str, ...]]] = {"raw": ("native",)}

    def snap_list(self, pool: PoolDef, rec: VolumeRecord) -> list[SnapshotInfo]:
        from virtstore.types import SnapshotInfo

        names = [d.name.split("@", 1)[1] for d in self.list_snapshots(pool, rec.name)]
        return [SnapshotInfo(pool=pool.name, volume=rec.name, name=n,
                             kind=self.snapshot_kind, created=0.0)
                for n in names if not n.startswith(BACKUP_SNAP_PREFIX)]

    def snap_create(self, pool: PoolDef, rec: VolumeRecord, snap: str) -> None:
        self.snapshot_volume(pool, rec.name, snap)

    def _need_snap(self, pool: PoolDef, rec: VolumeRecord, snap: str) -> None:
        if not any(s.name == snap for s in self.snap_list(pool, rec)):
            raise NoSuchVolume(f"no snapshot '{snap}' of volume '{rec.name}'")

    def snap_revert(self, pool: PoolDef, rec: VolumeRecord, snap: str) -> None:
        self._need_snap(pool, rec, snap)
        self.revert_snapshot(pool, rec.name, snap)

    def snap_delete(self, pool: PoolDef, rec: VolumeRecord, snap: str) -> None:
        self._need_snap(pool, rec, snap)
        self.delete_snapshot(pool, rec.name, snap)

    def vol_clone(self, pool: PoolDef, src_pool: PoolDef, src: VolumeRecord, staging: str, *,
                  linked: bool, monitor: Monitor,
                  options: CloneOptions = CloneOptions()) -> None:  # noqa: B008 - frozen
        """A linked clone is a ZFS clone of a snapshot taken for it; a full one a copy
        of the source's blocks (``zfs send | zfs receive`` from a snapshot taken for it
        and destroyed after), a volume of its own that the source can be deleted
        before. The staging dataset is the new volume; the engine renames it."""
        if src_pool.name != pool.name:
            raise Unsupported("unsupported configuration: a zfs volume can be cloned only "
                              "within its pool")
        if linked:
            self.clone_volume(pool, src.name, staging.rsplit("/", 1)[-1])
            return
        snap = f"{self._dataset(pool, src.name)}@{COPY_SNAP_PREFIX}{staging.rsplit('/', 1)[-1]}"
        zfsmod.zfs(["snapshot", snap])
        try:
            zfsmod.copy(snap, staging, should_stop=monitor.cancelled)
        finally:
            zfsmod.zfs(["destroy", snap], check=False)

    # -- change tracking for backups: zfs send -----------------------------------------
    backup_tracking = TRACK_SEND

    def backup_tracking_for(self, pool: PoolDef, rec: VolumeRecord) -> str:
        return TRACK_SEND if zfsmod.has_zvols() else ""

    def backup_snapshot(self, pool: PoolDef, rec: VolumeRecord, backup_id: str) -> str:
        snap = BACKUP_SNAP_PREFIX + backup_id
        zfsmod.zfs(["snapshot", f"{self._dataset(pool, rec.name)}@{snap}"])
        return snap

    def backup_snapshot_exists(self, pool: PoolDef, rec: VolumeRecord, snap: str) -> bool:
        return zfsmod.dataset(f"{_root(pool)}/{rec.name}@{snap}") is not None

    def backup_snapshot_drop(self, pool: PoolDef, rec: VolumeRecord, snap: str) -> None:
        full = f"{_root(pool)}/{rec.name}@{snap}"
        if zfsmod.dataset(full) is not None:
            zfsmod.zfs(["destroy", full])

    def backup_extents(self, pool: PoolDef, rec: VolumeRecord, snap: str,
                       since: str | None) -> list[tuple[int, int]]:
        changed, holes = self.backup_changes(pool, rec, snap, since)
        return changed + holes

    def backup_changes(self, pool: PoolDef, rec: VolumeRecord, snap: str, since: str | None
                       ) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
        """The blocks ``zfs send`` carries, and in an incremental stream its FREE
        ranges as holes: ZFS sends those also for ranges that were holes already."""
        ds = self._dataset(pool, rec.name)
        written, freed = zfsmod.send_ranges(f"{ds}@{snap}",
                                            f"{ds}@{since}" if since else None)
        return written, (freed if since else [])

    @contextmanager
    def snapshot_source(self, pool: PoolDef, rec: VolumeRecord,
                        snap: str) -> Iterator[QemuSource]:
        """A zvol snapshot has no device node (``snapdev=hidden``, the default, which a
        backup should not change for the user): qemu reads a clone of it, made for the
        read under a staging name (hidden from the pool's volumes) and destroyed after."""
        from virtstore.host.nbd import QemuSource

        token = snap[len(BACKUP_SNAP_PREFIX):] if snap.startswith(BACKUP_SNAP_PREFIX) \
            else snap
        clone = f"{_root(pool)}/{STAGING_PREFIX}read-{token}"
        zfsmod.zfs(["clone", "-o", "readonly=on",
                    f"{self._dataset(pool, rec.name)}@{snap}", clone])
        try:
            path = f"/dev/zvol/{clone}"
            wait_for_path(path)
            yield QemuSource(image=path, fmt="raw")
        finally:
            zfsmod.zfs(["destroy", clone], check=False)
