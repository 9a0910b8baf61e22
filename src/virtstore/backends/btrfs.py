"""The btrfs pool (libvirt has none): files on a btrfs filesystem, with instant clones
and snapshots.

The pool is an fs pool whose filesystem is btrfs (source device mounted on the
target), or, without a source device, a directory that is already on btrfs. Volumes
are files, as in a dir pool. On top of that:

* ``clone_volume`` copies a file by reflink (FICLONE): instant, sharing every extent;
* ``snapshot_volume`` keeps a read-only point-in-time copy: a reflink of a file, or a
  read-only ``btrfs subvolume snapshot`` of a subvolume volume;
  ``revert_snapshot`` puts a snapshot back atomically (reflink to a staging name,
  then rename over the volume).

Snapshots live in ``.virtstore-snapshots/VOLUME/SNAPSHOT`` under the target, which
listings skip.

Incremental backups of a raw file volume (``btrfs-extents`` tracking): each backup
takes a hidden reflink snapshot (``.virtstore-snapshots/VOLUME/.virtstore-backup-ID``)
and reads it; the next one compares where the two snapshots' extents lie on the disk
(FIEMAP) and reads only the ranges that differ. This is the comparison ``btrfs send
-p`` makes, done on the one file: send works on read-only subvolumes only, so it
would need a snapshot of the whole pool subvolume per backup, report the changes of
every file in it, and its stream would have to be parsed (``btrfs receive --dump``)
for this file's written ranges; a reflink snapshot of the one file costs nothing, and
FIEMAP of two reflinks answers for exactly that file.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import itertools
import os
import secrets
import shutil
import stat
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

from virtstore.backends.base import (
    Backend,
    BackendCaps,
    CloneOptions,
    ScanResult,
    Stamp,
    VolumeRecord,
)
from virtstore.backends.dir import FILE_FORMATS, STAGING_PREFIX
from virtstore.backends.fs import FsBackend
from virtstore.errors import (
    AlreadyExists,
    InvalidArgument,
    NoSuchVolume,
    OperationInvalid,
    Unsupported,
)
from virtstore.host.files import fsync_dir, remove_quietly
from virtstore.host.runner import run, which
from virtstore.xml import PoolDef

if TYPE_CHECKING:
    from virtstore.data.extents import PhysicalExtent
    from virtstore.data.monitor import Monitor
    from virtstore.host.nbd import QemuSource
    from virtstore.types import SnapshotInfo

FICLONE = 0x40049409
BTRFS_SUPER_MAGIC = 0x9123683E
SNAPSHOT_DIR = ".virtstore-snapshots"
TRACK_EXTENTS = "btrfs-extents"
BACKUP_SNAP_PREFIX = "virtstore-backup-"


@dataclass(frozen=True)
class BtrfsSnapshot:
    volume: str
    name: str
    path: str
    created: float
    size: int
    kind: str  # reflink (a file) or subvolume


def on_btrfs(path: str) -> bool:
    """Whether ``path`` is on a btrfs filesystem (statfs magic, via stat -f)."""
    try:
        res = run(["stat", "-f", "-c", "%t", path], timeout=30)
    except Exception:
        return False
    try:
        return int(res.stdout.strip(), 16) == BTRFS_SUPER_MAGIC
    except ValueError:
        return False


def reflink(src: str, dst: str) -> None:
    """Make ``dst`` (new) share all of ``src``'s extents: an instant copy."""
    sfd = os.open(src, os.O_RDONLY | os.O_CLOEXEC)
    try:
        st = os.fstat(sfd)
        dfd = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC,
                      stat.S_IMODE(st.st_mode))
        try:
            fcntl.ioctl(dfd, FICLONE, sfd)
            os.fsync(dfd)
        except OSError as exc:
            os.close(dfd)
            dfd = -1
            os.unlink(dst)
            if exc.errno in (errno.EOPNOTSUPP, errno.EXDEV, errno.EINVAL, errno.ENOTTY):
                raise Unsupported(f"cannot reflink '{src}': the filesystem does not share "
                                  "extents") from exc
            raise
        finally:
            if dfd >= 0:
                os.close(dfd)
    finally:
        os.close(sfd)


def is_subvolume(path: str) -> bool:
    try:
        st = os.stat(path)
    except OSError:
        return False
    return stat.S_ISDIR(st.st_mode) and st.st_ino == 256


def changed_extents(old: list[PhysicalExtent], new: list[PhysicalExtent],
                    size: int) -> list[tuple[int, int]]:
    """The ranges of [0, ``size``) where ``new`` may read differently from ``old``, two
    reflink snapshots of one file taken one after the other. A range is unchanged
    where both are holes, or where both map it onto the same place on the disk the
    same way: while the older snapshot holds an extent, btrfs writes the file's new
    data elsewhere (copy on write, even for a nodatacow file, since the extent is
    shared), so the same place means the same bytes. Anything else counts as changed:
    data now a hole, a compressed extent (FIEMAP does not say where in it a range
    starts), inline data, or an extent the filesystem has not placed yet."""
    from bisect import bisect_right

    from virtstore.data import extents as ex

    unsure = (ex.FIEMAP_EXTENT_UNKNOWN | ex.FIEMAP_EXTENT_DELALLOC | ex.FIEMAP_EXTENT_ENCODED
              | ex.FIEMAP_EXTENT_DATA_INLINE | ex.FIEMAP_EXTENT_NOT_ALIGNED)
    cuts = {0, size}
    for e in (*old, *new):
        cuts.update(p for p in (e.logical, e.logical + e.length) if 0 < p < size)
    points = sorted(cuts)

    def at(extents: list[PhysicalExtent], starts: list[int], pos: int) -> PhysicalExtent | None:
        i = bisect_right(starts, pos) - 1
        if i >= 0 and pos < extents[i].logical + extents[i].length:
            return extents[i]
        return None

    old_starts = [e.logical for e in old]
    new_starts = [e.logical for e in new]
    out: list[tuple[int, int]] = []
    for a, b in itertools.pairwise(points):
        o, n = at(old, old_starts, a), at(new, new_starts, a)
        same = (o is None and n is None) or (
            o is not None and n is not None and not (o.flags | n.flags) & unsure
            and o.physical - o.logical == n.physical - n.logical
            and (o.flags ^ n.flags) & ex.FIEMAP_EXTENT_UNWRITTEN == 0)
        if same:
            continue
        if out and out[-1][0] + out[-1][1] == a:
            out[-1] = (out[-1][0], b - out[-1][0])
        else:
            out.append((a, b - a))
    return out


class BtrfsBackend(FsBackend):
    caps = BackendCaps(pool_type="btrfs", vol_formats=FILE_FORMATS, default_vol_format="raw",
                       shared=False, file_based=True, volume_type="file")

    def host_problem(self) -> str | None:
        if which("btrfs") is None:
            return "'btrfs' is not installed (Debian btrfs-progs)"
        from virtstore.backends.fs import kernel_filesystems

        if "btrfs" not in kernel_filesystems():
            return "this kernel has no btrfs filesystem"
        return super().host_problem()

    # -- lifecycle: an fs pool of btrfs, or a btrfs directory ------------------
    @staticmethod
    def _as_btrfs(pool: PoolDef) -> PoolDef:
        from virtstore.types import replace

        src = replace(pool.source, format="btrfs")
        return replace(pool, source=src)

    def build(self, pool: PoolDef, overwrite: bool | None) -> None:
        if pool.source.devices:
            super().build(self._as_btrfs(pool), overwrite)
        else:
            super(FsBackend, self).build(pool, overwrite)

    def start(self, pool: PoolDef) -> None:
        if pool.source.devices:
            super().start(self._as_btrfs(pool))
        else:
            super(FsBackend, self).start(pool)
        if not on_btrfs(self._target(pool)):
            if pool.source.devices:
                super().stop(self._as_btrfs(pool))
            raise OperationInvalid(f"'{self._target(pool)}' is not on a btrfs filesystem")

    def stop(self, pool: PoolDef) -> None:
        if pool.source.devices:
            super().stop(self._as_btrfs(pool))

    def scan(self, pool: PoolDef, known: Mapping[str, Stamp]) -> ScanResult:
        res = super().scan(pool, known)
        res.changed = [r for r in res.changed if r.name != SNAPSHOT_DIR]
        res.unchanged = [n for n in res.unchanged if n != SNAPSHOT_DIR]
        res.skipped = [s for s in res.skipped if s[0] != SNAPSHOT_DIR]
        return res

    # -- clones ----------------------------------------------------------------
    def _volume(self, pool: PoolDef, name: str) -> str:
        if not name or "/" in name or name in (".", "..", SNAPSHOT_DIR):
            raise InvalidArgument(f"invalid volume name '{name}'")
        path = self.volume_path(pool, name)
        if not os.path.lexists(path):
            raise NoSuchVolume(f"Storage volume not found: no storage vol with matching name "
                               f"'{name}'")
        return path

    def clone_volume(self, pool: PoolDef, name: str, new_name: str) -> VolumeRecord:
        """An instant copy of volume ``name`` as ``new_name`` (reflink or subvolume
        snapshot), published without replacing anything: ``vol_clone`` and
        ``commit_volume``, as the engine runs them, without the engine."""
        from virtstore.data.monitor import Monitor

        src = self.read_volume(pool, name)
        if src is None:
            self._volume(pool, name)  # says why
            raise NoSuchVolume(f"no volume '{name}'")
        if not new_name or "/" in new_name or new_name.startswith("."):
            raise InvalidArgument(f"invalid volume name '{new_name}'")
        staging = self.staging_path(pool, secrets.token_hex(8))
        try:
            self.vol_clone(pool, pool, src, staging, linked=False, monitor=Monitor(),
                           options=CloneOptions(reflink=True))
            self.commit_volume(pool, staging, self.volume_path(pool, new_name))
        except BaseException:
            self._remove(staging)
            raise
        rec = self.read_volume(pool, new_name)
        assert rec is not None
        return rec

    def check_clone(self, pool: PoolDef, src_pool: PoolDef, src_backend: Backend,
                    src: VolumeRecord, *, linked: bool, options: CloneOptions,
                    what: str) -> None:
        if src.type != "dir":
            super().check_clone(pool, src_pool, src_backend, src, linked=linked,
                                options=options, what=what)
        elif src_pool.name != pool.name or not is_subvolume(src.path) \
                or what != "volume clone" or options.format not in (None, "dir"):
            raise Unsupported("unsupported configuration: a subvolume is cloned as a "
                              "subvolume snapshot, within its pool")

    def vol_clone(self, pool: PoolDef, src_pool: PoolDef, src: VolumeRecord, staging: str, *,
                  linked: bool, monitor: Monitor,
                  options: CloneOptions = CloneOptions()) -> None:  # noqa: B008 - frozen
        if src.type == "dir":
            # A directory volume that is a subvolume: a writable snapshot shares its data.
            run(["btrfs", "-q", "subvolume", "snapshot", src.path, staging], timeout=120)
        else:
            super().vol_clone(pool, src_pool, src, staging, linked=linked, monitor=monitor,
                              options=options)

    def commit_volume(self, pool: PoolDef, staging: str, final: str) -> None:
        if not is_subvolume(staging):
            super().commit_volume(pool, staging, final)
            return
        # A directory cannot be hard-linked into place: rename, after a look (the engine
        # holds the name reserved, so only an outside writer could race it).
        if os.path.lexists(final):
            raise AlreadyExists(f"storage volume '{os.path.basename(final)}' exists already")
        os.rename(staging, final)
        fsync_dir(os.path.dirname(final))

    def discard_staging(self, staging: str) -> None:
        if is_subvolume(staging):
            self._remove(staging)
        else:
            super().discard_staging(staging)

    def has_feature(self, feature: str, pool: PoolDef, rec: VolumeRecord,
                    snapshot: str | None = None) -> bool:
        if feature == "snapshot":  # a reflink or a subvolume snapshot, of any volume
            return True
        if rec.type == "dir" and feature == "clone-full":
            return is_subvolume(rec.path)
        return super().has_feature(feature, pool, rec, snapshot)

    # -- snapshots -------------------------------------------------------------
    def _snapdir(self, pool: PoolDef, name: str) -> str:
        return os.path.join(self._target(pool), SNAPSHOT_DIR, name)

    @staticmethod
    def _check_snap_name(snapshot: str) -> None:
        if not snapshot or "/" in snapshot or snapshot.startswith("."):
            raise InvalidArgument(f"invalid snapshot name '{snapshot}'")

    def snapshot_volume(self, pool: PoolDef, name: str, snapshot: str) -> BtrfsSnapshot:
        src = self._volume(pool, name)
        self._check_snap_name(snapshot)
        sdir = self._snapdir(pool, name)
        os.makedirs(sdir, mode=0o700, exist_ok=True)
        dst = os.path.join(sdir, snapshot)
        if os.path.lexists(dst):
            raise AlreadyExists(f"snapshot '{snapshot}' of volume '{name}' exists already")
        if is_subvolume(src):
            run(["btrfs", "-q", "subvolume", "snapshot", "-r", src, dst], timeout=120)
        else:
            reflink(src, dst)
            os.chmod(dst, 0o400)
        fsync_dir(sdir)
        return self._snap_info(name, snapshot, dst)

    @staticmethod
    def _snap_info(volume: str, snapshot: str, path: str) -> BtrfsSnapshot:
        st = os.stat(path)
        sub = is_subvolume(path)
        return BtrfsSnapshot(volume=volume, name=snapshot, path=path, created=st.st_mtime,
                             size=0 if sub else st.st_size,
                             kind="subvolume" if sub else "reflink")

    def list_snapshots(self, pool: PoolDef, name: str) -> list[BtrfsSnapshot]:
        self._volume(pool, name)
        sdir = self._snapdir(pool, name)
        try:
            names = sorted(os.listdir(sdir))
        except FileNotFoundError:
            return []
        return [self._snap_info(name, s, os.path.join(sdir, s)) for s in names
                if not s.startswith(".")]

    def _snapshot_path(self, pool: PoolDef, name: str, snapshot: str) -> str:
        self._check_snap_name(snapshot)
        path = os.path.join(self._snapdir(pool, name), snapshot)
        if not os.path.lexists(path):
            raise NoSuchVolume(f"no snapshot '{snapshot}' of volume '{name}'")
        return path

    def revert_snapshot(self, pool: PoolDef, name: str, snapshot: str) -> None:
        """Put the volume back as it was at ``snapshot`` (the snapshot stays)."""
        vol = self._volume(pool, name)
        snap = self._snapshot_path(pool, name, snapshot)
        staging = self.staging_path(pool, secrets.token_hex(8))
        if is_subvolume(snap):
            run(["btrfs", "-q", "subvolume", "snapshot", snap, staging], timeout=120)
            old = self.staging_path(pool, secrets.token_hex(8))
            os.rename(vol, old)
            os.rename(staging, vol)
            run(["btrfs", "-q", "subvolume", "delete", old], timeout=120)
        else:
            mode = stat.S_IMODE(os.stat(vol).st_mode)
            try:
                reflink(snap, staging)
                os.chmod(staging, mode)
                os.rename(staging, vol)  # atomic: readers see old or new, never half
            except BaseException:
                self._remove(staging)
                raise
        fsync_dir(os.path.dirname(vol))

    def delete_snapshot(self, pool: PoolDef, name: str, snapshot: str) -> None:
        path = self._snapshot_path(pool, name, snapshot)
        self._remove(path)
        with contextlib.suppress(OSError):
            os.rmdir(self._snapdir(pool, name))

    def delete_volume(self, pool: PoolDef, rec: VolumeRecord) -> None:
        if rec.type == "dir" and is_subvolume(rec.path):
            run(["btrfs", "-q", "subvolume", "delete", rec.path], timeout=120)
        else:
            super().delete_volume(pool, rec)
        sdir = self._snapdir(pool, rec.name)
        if os.path.isdir(sdir):
            for snap in os.listdir(sdir):
                self._remove(os.path.join(sdir, snap))
            os.rmdir(sdir)

    # -- the contract's snapshot verbs: btrfs snapshots first, then the file ones ----
    snapshot_kinds: ClassVar[dict[str, tuple[str, ...]]] = {
        "any": ("reflink", "subvolume"), "qcow2": ("internal", "external")}

    def snap_list(self, pool: PoolDef, rec: VolumeRecord) -> list[SnapshotInfo]:
        from virtstore.types import SnapshotInfo

        own = [SnapshotInfo(pool=pool.name, volume=rec.name, name=s.name, kind=s.kind,
                            created=s.created, size=s.size)
               for s in self.list_snapshots(pool, rec.name)]
        return own + ([] if rec.type == "dir" else super().snap_list(pool, rec))

    def snap_create(self, pool: PoolDef, rec: VolumeRecord, snap: str) -> None:
        self.snapshot_volume(pool, rec.name, snap)

    def _own(self, pool: PoolDef, rec: VolumeRecord, snap: str) -> bool:
        return os.path.lexists(os.path.join(self._snapdir(pool, rec.name), snap))

    def snap_revert(self, pool: PoolDef, rec: VolumeRecord, snap: str) -> None:
        if self._own(pool, rec, snap):
            self.revert_snapshot(pool, rec.name, snap)
        else:
            super().snap_revert(pool, rec, snap)

    def snap_delete(self, pool: PoolDef, rec: VolumeRecord, snap: str) -> None:
        if self._own(pool, rec, snap):
            self.delete_snapshot(pool, rec.name, snap)
        else:
            super().snap_delete(pool, rec, snap)

    # -- change tracking for incremental backups (module docstring) --------------
    backup_tracking = TRACK_EXTENTS

    def backup_tracking_for(self, pool: PoolDef, rec: VolumeRecord) -> str:
        # Only a raw file's offsets are the guest's: the changed ranges of a qcow2 file
        # say nothing of which guest chunks changed.
        if rec.type == "file" and (rec.format or "raw") == "raw" and not rec.encryption:
            return TRACK_EXTENTS
        return ""

    def _backup_snap(self, pool: PoolDef, rec: VolumeRecord, snap: str) -> str:
        if not snap.startswith(BACKUP_SNAP_PREFIX) or "/" in snap:
            raise InvalidArgument(f"'{snap}' is not a backup snapshot")
        # A leading dot: hidden from the snapshot verbs, which refuse such names.
        return os.path.join(self._snapdir(pool, rec.name), "." + snap)

    def backup_snapshot(self, pool: PoolDef, rec: VolumeRecord, backup_id: str) -> str:
        snap = BACKUP_SNAP_PREFIX + backup_id
        path = self._backup_snap(pool, rec, snap)
        os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
        reflink(rec.path, path)
        os.chmod(path, 0o400)
        fsync_dir(os.path.dirname(path))
        return snap

    def backup_snapshot_exists(self, pool: PoolDef, rec: VolumeRecord, snap: str) -> bool:
        return os.path.isfile(self._backup_snap(pool, rec, snap))

    def backup_snapshot_drop(self, pool: PoolDef, rec: VolumeRecord, snap: str) -> None:
        path = self._backup_snap(pool, rec, snap)
        remove_quietly(path)
        with contextlib.suppress(OSError):
            os.rmdir(os.path.dirname(path))  # only when no other snapshot is left

    def backup_extents(self, pool: PoolDef, rec: VolumeRecord, snap: str,
                       since: str | None) -> list[tuple[int, int]]:
        from virtstore.data.extents import data_extents, physical_extents

        fd = os.open(self._backup_snap(pool, rec, snap), os.O_RDONLY | os.O_CLOEXEC)
        try:
            if since is None:
                return list(data_extents(fd, 0, rec.capacity))
            ofd = os.open(self._backup_snap(pool, rec, since), os.O_RDONLY | os.O_CLOEXEC)
            try:
                return changed_extents(physical_extents(ofd), physical_extents(fd),
                                       rec.capacity)
            finally:
                os.close(ofd)
        finally:
            os.close(fd)

    @contextlib.contextmanager
    def snapshot_source(self, pool: PoolDef, rec: VolumeRecord,
                        snap: str) -> Iterator[QemuSource]:
        from virtstore.host.nbd import QemuSource

        yield QemuSource(image=self._backup_snap(pool, rec, snap), fmt="raw")

    @staticmethod
    def _remove(path: str) -> None:
        if not os.path.lexists(path):
            return
        if is_subvolume(path):
            run(["btrfs", "-q", "subvolume", "delete", path], timeout=120)
        elif os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path)
        else:
            os.unlink(path)


__all__ = ["STAGING_PREFIX", "BtrfsBackend", "BtrfsSnapshot", "reflink"]
