"""The zfs pool: a ZFS pool (or a dataset in one); volumes are zvols under it.

Build creates the zpool on the source devices (or the dataset, when the source name
is ``pool/dataset``); start imports the zpool if it is not imported, stop exports it
(a dataset source leaves its zpool alone); delete destroys. Volumes are zvols, block
devices at /dev/zvol/NAME/VOL — which only the kernel module (OpenZFS) can make:
under zfs-fuse creating one fails with a clear error, while listing, snapshots and
clones of datasets work.
"""

from __future__ import annotations

import os
import zlib
from collections.abc import Mapping
from contextlib import AbstractContextManager, nullcontext
from typing import TYPE_CHECKING, ClassVar

from virtstore.backends import _block_utils as bu
from virtstore.backends.base import (
    Backend,
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
from virtstore.xml import PoolDef

if TYPE_CHECKING:
    from virtstore.data.monitor import Monitor
    from virtstore.host.nbd import QemuSource
    from virtstore.types import SnapshotInfo

STAGING_PREFIX = "virtstore-staging-"
NO_ZVOLS = ("zvols need the ZFS kernel module: this host runs zfs-fuse, which cannot "
            "make block devices")


def _root(pool: PoolDef) -> str:
    return pool.source.name or pool.name


def _zpool(pool: PoolDef) -> str:
    return _root(pool).split("/", 1)[0]


class ZfsBackend(Backend):
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
        import time

        from virtstore.host.nbd import QemuSource

        if not zfsmod.has_zvols():
            raise Unsupported(NO_ZVOLS)
        # udev makes the zvol's node an instant after 'zfs create' returns.
        path = f"/dev/zvol/{staging}"
        deadline = time.monotonic() + 10
        while not os.path.exists(path) and time.monotonic() < deadline:
            time.sleep(0.05)
        return nullcontext(QemuSource(image=path, fmt="raw"))

    def delete_volume(self, pool: PoolDef, rec: VolumeRecord) -> None:
        ds = f"{_root(pool)}/{rec.name}"
        if zfsmod.dataset(ds) is None:
            return
        zfsmod.zfs(["destroy", "-r", ds])

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
        snap = snapshot or f"virtstore-clone-{new_name}"
        if snapshot is None:
            zfsmod.zfs(["snapshot", f"{src}@{snap}"])
        zfsmod.zfs(["clone", f"{src}@{snap}", target])
        return target

    # -- the contract's verbs, on the zvol's dataset ------------------------------
    linked_clones = True  # a clone of a snapshot shares its blocks
    snapshot_kinds: ClassVar[dict[str, tuple[str, ...]]] = {"raw": ("native",)}

    def snap_list(self, pool: PoolDef, rec: VolumeRecord) -> list[SnapshotInfo]:
        from virtstore.types import SnapshotInfo

        return [SnapshotInfo(pool=pool.name, volume=rec.name, name=d.name.split("@", 1)[1],
                             kind=self.snapshot_kind, created=0.0)
                for d in self.list_snapshots(pool, rec.name)]

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
        """A clone is a ZFS clone of a snapshot taken for it (the staging dataset is the
        clone; the engine renames it to the final name)."""
        if src_pool.name != pool.name:
            raise Unsupported("unsupported configuration: a zfs volume can be cloned only "
                              "within its pool")
        self.clone_volume(pool, src.name, staging.rsplit("/", 1)[-1])
