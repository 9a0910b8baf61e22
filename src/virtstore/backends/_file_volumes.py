"""Data operations and storage snapshots of volumes that are files on this host.

dir, fs, btrfs and kernel-mounted netfs and gluster pools hold their volumes as files of
one directory. ``FileVolumes`` implements the contract's data verbs for them: sparse
copy (or reflink) and conversion for clones, resize, wipe, upload and download, and
snapshots (qcow2 internal or external overlays, raw by reflink). Every step that changes
what a volume's name holds swaps a fully made file in with rename(), so a failure, a
cancel or a kill leaves the volume as it was; scratch files are journalled by the
engine (``EngineHooks.scratch``) and removed after a crash.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterator
from types import ModuleType

from virtstore.backends.base import Backend, CloneOptions, SnapshotRow, VolumeRecord
from virtstore.errors import InvalidArgument, NoSpace, OperationInvalid, Unsupported
from virtstore.host.files import (
    fsync_path,
    open_volume,
    refuse_symlink,
    regular_size,
    remove_quietly,
)
from virtstore.types import SnapshotInfo

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import BinaryIO, ClassVar

    from virtstore.data.monitor import Monitor
    from virtstore.host.nbd import QemuSource
    from virtstore.xml import PoolDef

# Our own files in a pool directory (staging files, snapshot files) are hidden and carry
# this prefix, so a refresh never lists them as volumes.
PRIVATE_PREFIX = ".virtstore-"
STAGING_PREFIX = PRIVATE_PREFIX + "staging-"
SNAPSHOT_PREFIX = PRIVATE_PREFIX + "snap-"

# Formats whose bytes can be copied as they are when source and target agree.
_BYTE_COPYABLE = ("raw", "qcow2", "qed", "vmdk", "vdi", "vpc", "luks", "iso")

INTERNAL = "internal"
EXTERNAL = "external"
REFLINK = "reflink"


def _create_overlay(path: str, capacity: int, backing: str, backing_format: str | None,
                    *, compat: str = "1.1", mode: int = 0o600) -> None:
    from virtstore.formats.qcow2 import create_qcow2

    fd = open_volume(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        create_qcow2(fd, capacity, compat=compat, backing_file=backing,
                     backing_format=backing_format)
        os.fsync(fd)
    finally:
        os.close(fd)


def _blocks_size(path: str) -> int:
    try:
        return os.stat(path).st_blocks * 512
    except OSError:
        return 0


class FileVolumes(Backend):
    """The contract's data verbs for pools whose volumes are local files."""

    linked_clones = True
    can_shrink = True
    copies = True
    snapshot_kinds: ClassVar[dict[str, tuple[str, ...]]] = {
        "qcow2": ("internal", "external"), "raw": ("reflink (on xfs or btrfs)",)}

    def file_of(self, pool: PoolDef, rec: VolumeRecord) -> str:
        """The local file of a volume (a backend whose volume paths are URLs maps them
        to its mount)."""
        return rec.path

    def backing_name(self, pool: PoolDef, src: VolumeRecord) -> str:
        """How a linked clone's overlay names its backing file."""
        return src.path

    def has_feature(self, feature: str, pool: PoolDef, rec: VolumeRecord,
                    snapshot: str | None = None) -> bool:
        if not super().has_feature(feature, pool, rec, snapshot):
            return False
        fmt = rec.format or "raw"
        if rec.type == "dir":
            return False  # a directory volume has no bytes to move
        if feature in ("resize-grow", "resize-shrink"):
            # Reached from userspace (libnfs, libgfapi) a volume is resized by truncation.
            return fmt == "raw" or (fmt == "qcow2" and self.local_files(pool)
                                    and not self._v2_with_snapshots(pool, rec))
        if feature == "snapshot-external":
            return fmt == "qcow2"
        if feature == "snapshot":
            return fmt == "qcow2" or (fmt == "raw" and reflink_capable(self.file_of(pool, rec)))
        return True

    def local_files(self, pool: PoolDef) -> bool:
        return True

    def data_size(self, pool: PoolDef, rec: VolumeRecord) -> int:
        # A file's bytes on this host; a volume reached from userspace (libnfs,
        # libgfapi) is indexed without them, by its capacity.
        return rec.physical if self.local_files(pool) else rec.capacity

    def backing_of(self, pool: PoolDef, fmt: str, path: str,
                   given_format: str | None) -> tuple[str | None, int | None]:
        if fmt in ("raw", "iso"):
            raise Unsupported("unsupported configuration: backing storage not supported "
                              "for raw volumes")
        if "://" in path:
            return given_format, None  # qemu reaches it; nothing to read here
        if not os.path.exists(path):
            raise InvalidArgument(f"backing storage '{path}' does not exist")
        from virtstore.formats.probe import probe_image

        info = probe_image(path)
        return given_format or info.format, info.virtual_size

    def name_taken(self, pool: PoolDef, name: str) -> bool:
        return self.local_files(pool) and os.path.lexists(self.volume_path(pool, name))

    def check_volume(self, pool: PoolDef, rec: VolumeRecord) -> None:
        # Said now, before a job starts; the job's own opens refuse one swapped in later.
        if self.local_files(pool):
            refuse_symlink(self.file_of(pool, rec))

    def _v2_with_snapshots(self, pool: PoolDef, rec: VolumeRecord) -> bool:
        """qemu-img cannot resize a compat 0.10 (version 2) qcow2 image that holds
        internal snapshots."""
        if rec.format != "qcow2" or rec.compat != "0.10":
            return False
        from virtstore.formats.qcow2 import internal_snapshot_count

        try:
            fd = open_volume(self.file_of(pool, rec), os.O_RDONLY)
        except OSError:
            return False
        try:
            return internal_snapshot_count(fd) > 0
        finally:
            os.close(fd)

    # -- clone and create-from -------------------------------------------------
    def check_clone(self, pool: PoolDef, src_pool: PoolDef, src_backend: Backend,
                    src: VolumeRecord, *, linked: bool, options: CloneOptions,
                    what: str) -> None:
        if not src_backend.local_files(src_pool):
            raise src_backend.unsupported(what)
        fmt = options.format or ("qcow2" if linked else src.format) or "raw"
        if fmt not in self.caps.vol_formats:
            raise Unsupported(f"unsupported configuration: format '{fmt}' is not supported by "
                              f"'{pool.type}' pools")
        if linked and fmt != "qcow2":
            raise InvalidArgument("a linked clone is a qcow2 overlay: format must be qcow2")
        if options.reflink and (fmt != src.format or src.backing_path):
            raise Unsupported("unsupported configuration: a reflink clone needs the same "
                              "format and a source without a backing file")

    def clone_total(self, src: VolumeRecord, options: CloneOptions, linked: bool) -> int:
        fmt = options.format or src.format
        return 0 if linked else (src.physical if fmt == src.format else src.capacity)

    def vol_clone(self, pool: PoolDef, src_pool: PoolDef, src: VolumeRecord, staging: str, *,
                  linked: bool, monitor: Monitor,
                  options: CloneOptions = CloneOptions()) -> None:  # noqa: B008 - frozen
        fmt = options.format or ("qcow2" if linked else src.format) or "raw"
        capacity = max(options.capacity or 0, src.capacity)
        if linked:
            _create_overlay(staging, capacity, self.backing_name(src_pool, src), src.format,
                            compat=options.compat or "1.1")
        else:
            self._fill(src_pool, src, staging, fmt, capacity, options, monitor)
        os.chmod(staging, options.mode if options.mode is not None else 0o600)
        fsync_path(staging)

    def _fill(self, src_pool: PoolDef, src: VolumeRecord, dst: str, fmt: str, capacity: int,
              o: CloneOptions, monitor: Monitor) -> None:
        plain = (fmt == src.format and fmt in _BYTE_COPYABLE and not src.backing_path
                 and not o.prealloc_metadata and o.compat is None and o.cluster_size is None
                 and not o.lazy_refcounts and o.dst_secret is None)
        if plain:
            from virtstore.data.copy import copy_file

            copy_file(self.file_of(src_pool, src), dst, reflink="always" if o.reflink else "auto",
                      monitor=monitor)
            if fmt == "raw" and capacity > src.capacity:
                os.truncate(dst, capacity)
            return
        from virtstore.data.convert import convert
        from virtstore.formats.qemuimg import Encryption, ImageOptions, resize

        opts = ImageOptions(format=fmt,
                            compat=(o.compat or "0.10") if fmt == "qcow2" else None,
                            cluster_size=o.cluster_size, lazy_refcounts=o.lazy_refcounts,
                            preallocation="metadata" if o.prealloc_metadata else None)
        if o.dst_secret is not None:
            opts.encryption = Encryption(format="luks", cipher=o.cipher, ivgen=o.ivgen)
        # qemu-img opens the source (and its backing chain) by path itself.
        refuse_symlink(self.file_of(src_pool, src))
        convert(self.file_of(src_pool, src), src.format or "raw", dst, fmt, opts, monitor=monitor,
                src_secret=o.src_secret, dst_secret=o.dst_secret)
        if capacity > src.capacity:
            resize(dst, capacity, fmt)

    # -- resize ----------------------------------------------------------------
    def check_resize(self, pool: PoolDef, rec: VolumeRecord, capacity: int, *,
                     shrink: bool, allocate: bool) -> None:
        fmt = rec.format or "raw"
        if capacity < rec.allocation and fmt == "raw":
            raise InvalidArgument("can't shrink capacity below existing allocation")
        if fmt not in ("raw", "qcow2"):
            raise Unsupported(f"unsupported configuration: resizing a '{fmt}' volume is not "
                              "supported")
        if self._v2_with_snapshots(pool, rec):
            raise Unsupported("unsupported configuration: a qcow2 image of compat 0.10 that "
                              "holds internal snapshots cannot be resized")
        if allocate and capacity > rec.capacity:
            if capacity - rec.capacity > self.sizes(pool).available:
                raise NoSpace("Not enough space left in storage pool")

    def vol_resize(self, pool: PoolDef, rec: VolumeRecord, capacity: int, *,
                   shrink: bool, allocate: bool) -> None:
        fmt = rec.format or "raw"
        if fmt == "raw":
            fd = open_volume(self.file_of(pool, rec), os.O_RDWR)
            try:
                os.ftruncate(fd, capacity)
                if allocate and capacity > rec.capacity:
                    try:
                        os.posix_fallocate(fd, rec.capacity, capacity - rec.capacity)
                    except OSError as exc:
                        os.ftruncate(fd, rec.capacity)
                        raise NoSpace("Not enough space left in storage pool") from exc
                os.fsync(fd)
            finally:
                os.close(fd)
        else:
            from virtstore.formats.qemuimg import resize

            refuse_symlink(self.file_of(pool, rec))

            resize(self.file_of(pool, rec), capacity, fmt, shrink=shrink,
                   preallocation="falloc" if allocate else None)

    # -- wipe ------------------------------------------------------------------
    def vol_wipe(self, pool: PoolDef, rec: VolumeRecord, algorithm: str,
                 monitor: Monitor) -> None:
        from virtstore.data.wipe import ALGORITHMS, wipe

        if algorithm not in ALGORITHMS:
            raise InvalidArgument(f"unknown wipe algorithm '{algorithm}': use one of "
                                  f"{', '.join(ALGORITHMS)}")
        if (rec.format or "raw") == "raw":
            wipe(self.file_of(pool, rec), algorithm, monitor=monitor)
        else:
            self._wipe_image(pool, rec, algorithm, monitor)

    def _wipe_image(self, pool: PoolDef, rec: VolumeRecord, algorithm: str,
                    mon: Monitor) -> None:
        """An image format keeps its format. A fresh empty image of the same format and
        capacity takes the volume's name first, in one rename; then the old image,
        kept under a hidden name, is wiped and removed. Until the rename the volume is
        as it was; after it, the volume is the empty image, whatever happens next."""
        from virtstore.data.wipe import wipe
        from virtstore.formats.qemuimg import ImageOptions, create

        hooks = self.engine()
        with hooks.scratch(self, pool, rec.name, "wipe") as fresh, \
                hooks.scratch(self, pool, rec.name, "wipe") as old:
            create(fresh, ImageOptions(format=rec.format or "raw", capacity=rec.capacity,
                                       compat=rec.compat if rec.format == "qcow2" else None,
                                       backing_file=rec.backing_path,
                                       backing_format=rec.backing_format))
            if rec.mode is not None:
                os.chmod(fresh, rec.mode)
            fsync_path(fresh)
            mon.check()
            os.link(self.file_of(pool, rec), old)
            os.replace(fresh, self.file_of(pool, rec))
            wipe(old, algorithm, monitor=mon)

    # -- upload and download ---------------------------------------------------
    def vol_upload(self, pool: PoolDef, rec: VolumeRecord, source: BinaryIO, *, offset: int,
                   length: int | None, sparse: bool, monitor: Monitor) -> None:
        from virtstore.data.copy import copy_file
        from virtstore.data.monitor import Monitor
        from virtstore.data.stream import upload

        src_size = regular_size(source)
        covers = (offset == 0 and src_size is not None
                  and (length if length is not None else src_size) >= rec.physical)
        with self.engine().scratch(self, pool, rec.name, "upload") as staging:
            if covers:
                # The upload replaces every byte: start from an empty file.
                fd = open_volume(staging, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
            else:
                # Partial upload: a copy of the volume (a reflink where the filesystem
                # can) takes the new bytes, so the volume is untouched until the swap.
                copy_file(self.file_of(pool, rec), staging, reflink="auto", monitor=Monitor())
                fd = open_volume(staging, os.O_RDWR)
            try:
                upload(source, fd, offset=offset, length=length, sparse=sparse,
                       monitor=monitor)
                if covers and os.fstat(fd).st_size < rec.physical:
                    os.ftruncate(fd, rec.physical)
                os.fchmod(fd, rec.mode if rec.mode is not None else 0o600)
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(staging, self.file_of(pool, rec))

    def vol_download(self, pool: PoolDef, rec: VolumeRecord, sink: BinaryIO, *, offset: int,
                     length: int | None, sparse: bool, monitor: Monitor) -> None:
        from virtstore.data.stream import download

        fd = open_volume(self.file_of(pool, rec), os.O_RDONLY)
        try:
            download(fd, sink, offset=offset, length=length, sparse=sparse, monitor=monitor)
        finally:
            os.close(fd)

    # -- storage snapshots -----------------------------------------------------
    def _rows(self, pool: PoolDef, rec: VolumeRecord) -> list[SnapshotRow]:
        return self.engine().snapshot_rows(pool, rec.name)

    def _row(self, pool: PoolDef, rec: VolumeRecord, snap: str) -> SnapshotRow | None:
        return next((r for r in self._rows(pool, rec) if r.name == snap), None)

    def _internal(self, pool: PoolDef, rec: VolumeRecord) -> list[SnapshotInfo]:
        if rec.format != "qcow2":
            return []
        from virtstore.formats.qemuimg import info

        out = []
        for s in info(self.file_of(pool, rec), "qcow2").get("snapshots", []) or []:
            created = float(s.get("date-sec", 0)) + float(s.get("date-nsec", 0)) / 1e9
            out.append(SnapshotInfo(pool="", volume=rec.name, name=str(s.get("name")),
                                    kind=INTERNAL, created=created,
                                    size=int(s.get("vm-state-size", 0))))
        return out

    def snap_list(self, pool: PoolDef, rec: VolumeRecord) -> list[SnapshotInfo]:
        found = [SnapshotInfo(pool=pool.name, volume=rec.name, name=r.name, kind=r.kind,
                              created=r.created, size=_blocks_size(r.path) if r.path else 0)
                 for r in self._rows(pool, rec)]
        return found + self._internal(pool, rec)

    def snap_create(self, pool: PoolDef, rec: VolumeRecord, snap: str) -> None:
        if rec.format == "qcow2":
            _runner().run(["qemu-img", "snapshot", "-c", snap, self.file_of(pool, rec)])
        elif rec.format == "raw":
            self._create_reflink(pool, rec, snap)
        else:
            raise Unsupported(f"unsupported configuration: snapshots of '{rec.format}' "
                              "volumes are not supported (qcow2: internal or external; "
                              "raw: on a reflink-capable filesystem)")

    @contextlib.contextmanager
    def frozen_source(self, pool: PoolDef, rec: VolumeRecord) -> Iterator[QemuSource]:
        """A reflink copy of a raw file, under a journalled scratch name (a crash leaves
        nothing: the next start removes it)."""
        from virtstore.data.copy import copy_file
        from virtstore.data.monitor import Monitor
        from virtstore.host.nbd import QemuSource

        path = self.file_of(pool, rec)
        if rec.format != "raw" or rec.backing_path or not reflink_capable(path):
            raise Unsupported("a frozen copy needs a raw file on xfs or btrfs")
        with self.engine().scratch(self, pool, rec.name, "frozen") as staging:
            copy_file(path, staging, reflink="always", monitor=Monitor())
            yield QemuSource(image=staging, fmt="raw")

    def _snap_path(self, pool: PoolDef, rec: VolumeRecord) -> str:
        return os.path.join(os.path.dirname(self.file_of(pool, rec)),
                            f"{SNAPSHOT_PREFIX}{os.urandom(8).hex()}")

    def _create_reflink(self, pool: PoolDef, rec: VolumeRecord, snap: str) -> None:
        from virtstore.data.copy import copy_file
        from virtstore.data.monitor import Monitor

        hooks = self.engine()
        with hooks.scratch(self, pool, rec.name, "snapshot") as staging:
            try:
                copy_file(self.file_of(pool, rec), staging, reflink="always", monitor=Monitor())
            except Unsupported as exc:
                raise Unsupported("unsupported configuration: a raw volume's snapshot needs a "
                                  "reflink-capable filesystem (xfs, btrfs)") from exc
            os.chmod(staging, 0o400)
            path = self._snap_path(pool, rec)
            os.rename(staging, path)
            try:
                hooks.add_snapshot_row(pool, SnapshotRow(rec.name, snap, REFLINK,
                                                         time.time(), path))
            except BaseException:
                os.unlink(path)
                raise

    def snap_create_external(self, pool: PoolDef, rec: VolumeRecord, snap: str) -> None:
        if rec.format != "qcow2":
            raise Unsupported(f"unsupported configuration: snapshots of '{rec.format}' "
                              "volumes are not supported (qcow2: internal or external; "
                              "raw: on a reflink-capable filesystem)")
        hooks = self.engine()
        snap_path = self._snap_path(pool, rec)
        with hooks.scratch(self, pool, rec.name, "snapshot") as staging:
            _create_overlay(staging, rec.capacity, snap_path, "qcow2",
                            mode=rec.mode if rec.mode is not None else 0o600)
            # The current image gets a second name (the snapshot), then the overlay takes
            # the volume's name in one rename: the volume is never missing.
            hooks.add_snapshot_row(pool, SnapshotRow(rec.name, snap, EXTERNAL, time.time(),
                                                     snap_path))
            try:
                os.link(self.file_of(pool, rec), snap_path)
                os.replace(staging, self.file_of(pool, rec))
                os.chmod(snap_path, 0o400)
            except BaseException:
                if os.path.exists(staging) and os.path.exists(snap_path) and \
                        os.path.samefile(snap_path, self.file_of(pool, rec)):
                    os.unlink(snap_path)
                hooks.drop_snapshot_row(pool, rec.name, snap)
                raise

    def _internal_did(self, pool: PoolDef, rec: VolumeRecord, snap: str, flag: str) -> bool:
        """``qemu-img snapshot FLAG`` when ``snap`` is an internal snapshot (False if not)."""
        if not any(s.name == snap for s in self._internal(pool, rec)):
            return False
        _runner().run(["qemu-img", "snapshot", flag, snap, self.file_of(pool, rec)])
        return True

    def snap_revert(self, pool: PoolDef, rec: VolumeRecord, snap: str) -> None:
        if self._internal_did(pool, rec, snap, "-a"):
            return
        row = self._known(pool, rec, snap)
        if row.kind == EXTERNAL:
            newest = self._rows(pool, rec)[-1]
            if newest.name != snap:
                raise OperationInvalid(f"Requested operation is not valid: only the "
                                       f"newest external snapshot ('{newest.name}') "
                                       "can be reverted to; delete newer ones first")
        with self.engine().scratch(self, pool, rec.name, "revert") as staging:
            if row.kind == REFLINK:
                from virtstore.data.copy import copy_file
                from virtstore.data.monitor import Monitor

                copy_file(row.path, staging, reflink="always", monitor=Monitor())
            else:
                _create_overlay(staging, rec.capacity, row.path, "qcow2")
            os.chmod(staging, rec.mode if rec.mode is not None else 0o600)
            os.replace(staging, self.file_of(pool, rec))

    def _known(self, pool: PoolDef, rec: VolumeRecord, snap: str) -> _PathRow:
        from virtstore.errors import NoSuchVolume

        row = self._row(pool, rec, snap)
        if row is None or row.path is None:
            raise NoSuchVolume(f"no snapshot '{snap}' of volume '{rec.name}'")
        return _PathRow(row.name, row.kind, row.path)

    def snap_delete(self, pool: PoolDef, rec: VolumeRecord, snap: str) -> None:
        if self._internal_did(pool, rec, snap, "-d"):
            return
        row = self._known(pool, rec, snap)
        if row.kind == EXTERNAL:
            self._delete_external(pool, rec, row)
        else:
            os.unlink(row.path)
        self.engine().drop_snapshot_row(pool, rec.name, snap)

    def _delete_external(self, pool: PoolDef, rec: VolumeRecord, row: _PathRow) -> None:
        """Drop one layer of the chain: its child is rebased onto its parent (qemu-img
        copies what the child needs), then the layer's file goes."""
        from virtstore.formats.probe import probe_image

        ext = [r for r in self._rows(pool, rec) if r.kind == EXTERNAL]
        idx = next(i for i, r in enumerate(ext) if r.name == row.name)
        child = self.file_of(pool, rec) if idx == len(ext) - 1 else ext[idx + 1].path
        assert child is not None
        parent = probe_image(row.path, fmt="qcow2")
        argv = ["qemu-img", "rebase", "-f", "qcow2"]
        if parent.backing_file:
            argv += ["-b", parent.backing_file, "-F", parent.backing_format or "raw"]
        else:
            argv += ["-b", ""]
        was = os.stat(child).st_mode
        os.chmod(child, 0o600)
        try:
            _runner().run([*argv, child], timeout=None)
        finally:
            os.chmod(child, was & 0o7777)
        os.unlink(row.path)

    def forget_snapshots(self, pool: PoolDef, rec: VolumeRecord) -> None:
        hooks = self.engine()
        for r in hooks.snapshot_rows(pool, rec.name):
            if r.path:
                remove_quietly(r.path)
            hooks.drop_snapshot_row(pool, rec.name, r.name)


class _PathRow:
    """A remembered snapshot that has a file."""

    def __init__(self, name: str, kind: str, path: str) -> None:
        self.name = name
        self.kind = kind
        self.path = path


def reflink_capable(path: str) -> bool:
    """Whether the filesystem holding ``path`` can share extents (xfs, btrfs)."""
    from virtstore.host.mounts import mounts

    best, fstype = "", ""
    for m in mounts():
        t = m.target.rstrip("/") + "/"
        if (path + "/").startswith(t) and len(t) > len(best):
            best, fstype = t, m.fstype
    return fstype in ("xfs", "btrfs")


def _runner() -> ModuleType:
    # qemu-img is forked only by snapshot operations: subprocess is not worth importing
    # for every command that merely reaches this backend.
    import virtstore.host.runner

    return virtstore.host.runner
