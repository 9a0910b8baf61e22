"""The dir pool: volumes are files in one directory of the host."""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Mapping

from virtstore.backends._file_volumes import (
    PRIVATE_PREFIX,
    SNAPSHOT_PREFIX,
    STAGING_PREFIX,
    FileVolumes,
)
from virtstore.backends.base import (
    BackendCaps,
    CreateRequest,
    PoolSizes,
    ScanResult,
    Stamp,
    VolumeRecord,
)
from virtstore.errors import AlreadyExists, NoSpace, OperationInvalid, VirtstoreError
from virtstore.host.files import fsync_dir, open_volume

__all__ = ["PRIVATE_PREFIX", "SNAPSHOT_PREFIX", "STAGING_PREFIX", "DirBackend"]

TYPE_CHECKING = False
if TYPE_CHECKING:
    from virtstore.formats.probe import ImageInfo
    from virtstore.xml import PoolDef

# libvirt's default mode for a pool directory it builds, and for a volume it creates.
DEFAULT_POOL_MODE = 0o711
DEFAULT_VOL_MODE = 0o600

# Larger than any data a filesystem keeps inline in the inode (ext4 inline_data, btrfs
# max_inline are well under a page).
_INLINE_MAX = 4096
_MAX_SIZE = (1 << 63) - 1

FILE_FORMATS = ("raw", "qcow2", "qed", "vmdk", "vdi", "vpc", "luks", "iso")


def _os_message(exc: OSError) -> str:
    return exc.strerror or str(exc)


def _probe(path: str) -> ImageInfo:
    from virtstore.formats.probe import probe_fd

    # Read through our own no-follow open: a symbolic link swapped in since the lstat
    # is refused, not read.
    fd = open_volume(path, os.O_RDONLY)
    try:
        return probe_fd(fd, path)
    finally:
        os.close(fd)


def record_from_stat(name: str, path: str, st: os.stat_result) -> VolumeRecord:
    """Describe the file at ``path``: image header parsed in process, no qemu-img."""
    # Owner, mode and times are not indexed (they are read live for XML).
    rec = VolumeRecord(name=name, path=path, key=path, type="file", ino=st.st_ino,
                       size=st.st_size, mtime_ns=st.st_mtime_ns, ctime_ns=st.st_ctime_ns,
                       allocation=st.st_blocks * 512, physical=st.st_size)
    if stat.S_ISDIR(st.st_mode):
        rec.type = "dir"
        rec.format = "dir"
        rec.capacity = st.st_size
        return rec
    if st.st_blocks == 0 and st.st_size > _INLINE_MAX:
        # Nothing allocated: the file reads as zeros, so no header can be there. (Small
        # files are still read: filesystems keep tiny files' data inline, without blocks.)
        rec.format = "raw"
        rec.capacity = st.st_size
        return rec
    info = _probe(path)
    rec.format = info.format
    # A header claiming more than any file can hold is a damaged header.
    rec.capacity = info.virtual_size if info.virtual_size <= _MAX_SIZE else 0
    if info.backing_file:
        backing = info.backing_file
        if "://" not in backing and not os.path.isabs(backing):
            backing = os.path.join(os.path.dirname(path), backing)
        rec.backing_path = os.path.normpath(backing) if "://" not in backing else backing
        rec.backing_format = info.backing_format
    rec.compat = info.compat
    rec.cluster_size = info.cluster_size
    rec.lazy_refcounts = info.lazy_refcounts
    rec.encryption = info.encryption_format if info.encrypted else None
    return rec


class DirBackend(FileVolumes):
    def __init__(self) -> None:
        # Staging files that hold no data yet (no fsync needed to publish them); set
        # operations are atomic across threads.
        self._metadata_only: set[str] = set()

    caps = BackendCaps(pool_type="dir", vol_formats=FILE_FORMATS, default_vol_format="raw",
                       shared=False, file_based=True, volume_type="file")

    # -- pool lifecycle --------------------------------------------------------
    def build(self, pool: PoolDef, overwrite: bool | None) -> None:
        path = self._target(pool)
        perms = pool.target.permissions
        mode = perms.mode if perms.mode is not None else DEFAULT_POOL_MODE
        try:
            os.makedirs(os.path.dirname(path) or "/", exist_ok=True)
            try:
                os.mkdir(path, mode)
            except FileExistsError:
                if not os.path.isdir(path):
                    raise OperationInvalid(f"cannot create path '{path}': "
                                           "exists and is not a directory") from None
            os.chmod(path, mode)
            uid = perms.owner if perms.owner is not None and perms.owner >= 0 else -1
            gid = perms.group if perms.group is not None and perms.group >= 0 else -1
            if uid != -1 or gid != -1:
                os.chown(path, uid, gid)
        except OSError as exc:
            raise OperationInvalid(f"cannot create path '{path}': {_os_message(exc)}") from exc

    def start(self, pool: PoolDef) -> None:
        path = self._target(pool)
        if not os.path.isdir(path):
            why = "Not a directory" if os.path.exists(path) else "No such file or directory"
            raise OperationInvalid(f"cannot open directory '{path}': {why}")

    def delete(self, pool: PoolDef) -> None:
        path = self._target(pool)
        try:
            os.rmdir(path)
        except FileNotFoundError:
            return
        except OSError as exc:
            raise OperationInvalid(f"failed to remove pool '{path}': "
                                   f"{_os_message(exc)}") from exc

    def sizes(self, pool: PoolDef) -> PoolSizes:
        return _statvfs_sizes(self._target(pool))

    def sizes_at(self, target_path: str) -> PoolSizes | None:
        # Only where sizes is this class's own: a subclass that reads them otherwise
        # (netfs through libnfs) needs its definition.
        if type(self).sizes is not DirBackend.sizes:
            return None
        return _statvfs_sizes(target_path)

    def scan(self, pool: PoolDef, known: Mapping[str, Stamp]) -> ScanResult:
        target = self._target(pool)
        res = ScanResult()
        try:
            entries = os.scandir(target)
        except OSError as exc:
            raise OperationInvalid(f"cannot open directory '{target}': "
                                   f"{_os_message(exc)}") from exc
        with entries:
            for de in entries:
                name = de.name
                if name.startswith(PRIVATE_PREFIX):
                    continue
                path = de.path
                try:
                    st = os.lstat(path)
                except OSError as exc:
                    res.skipped.append((name, _os_message(exc)))
                    continue
                if stat.S_ISLNK(st.st_mode):
                    # A link may lead anywhere on the host: never a volume (libvirt lists
                    # the file it leads to).
                    res.skipped.append((name, "a symbolic link"))
                    continue
                if not (stat.S_ISREG(st.st_mode) or stat.S_ISDIR(st.st_mode)):
                    res.skipped.append((name, "not a regular file or directory"))
                    continue
                old = known.get(name)
                if old is not None and old == Stamp(st.st_ino, st.st_size, st.st_mtime_ns,
                                                    st.st_ctime_ns):
                    res.unchanged.append(name)
                    continue
                try:
                    res.changed.append(record_from_stat(name, path, st))
                except (OSError, VirtstoreError) as exc:
                    res.skipped.append((name, str(exc)))
        return res

    def still_there(self, pool: PoolDef, rec: VolumeRecord) -> bool:
        return os.path.lexists(rec.path)

    # -- volumes ---------------------------------------------------------------
    def volume_path(self, pool: PoolDef, name: str) -> str:
        return os.path.join(self._target(pool), name)

    def staging_path(self, pool: PoolDef, token: str) -> str:
        return os.path.join(self._target(pool), STAGING_PREFIX + token)

    def create_volume(self, pool: PoolDef, staging: str, req: CreateRequest) -> None:
        try:
            self._make_image(staging, req)
            self._apply_permissions(staging, req)
        except OSError as exc:
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                raise NoSpace(f"cannot create volume '{req.vol.name}': "
                              "No space left on device") from exc
            raise OperationInvalid(f"cannot create volume '{req.vol.name}': "
                                   f"{_os_message(exc)}") from exc

    def _make_image(self, path: str, req: CreateRequest) -> None:
        t = req.vol.target
        fmt = req.format
        in_process = t.encryption is None and (
            fmt in ("raw", "iso")
            or (fmt == "qcow2" and not req.prealloc_metadata and not t.nocow
                and not t.extended_l2))
        if in_process:
            # Read-write: where the filesystem has no fallocate (NFSv3), glibc's
            # posix_fallocate reads each block before writing it.
            fd = open_volume(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
            try:
                if fmt == "qcow2":
                    # Writing the empty qcow2 ourselves saves a fork and several syncs
                    # per volume; qemu-img does the cases this writer does not cover.
                    from virtstore.formats.qcow2 import create_qcow2

                    create_qcow2(fd, req.capacity, cluster_size=t.cluster_size or 65536,
                                 compat=t.compat or "0.10", lazy_refcounts=t.lazy_refcounts,
                                 backing_file=req.backing_path,
                                 backing_format=req.backing_format)
                    os.fsync(fd)
                else:
                    from virtstore.formats.raw import create_raw

                    create_raw(fd, req.capacity, req.allocation, nocow=t.nocow)
                    # No data written, only size and allocation: metadata, which the
                    # filesystem's journal keeps in order with the link that publishes
                    # it. After a crash the volume is there whole or not at all, so no
                    # fsync is needed (libvirt makes raw volumes without one too).
                    self._metadata_only.add(path)
            finally:
                os.close(fd)
            return
        from virtstore.formats.qemuimg import Encryption, ImageOptions, create

        enc = t.encryption
        create(path, ImageOptions(
            format=fmt, capacity=req.capacity,
            compat=(t.compat or "0.10") if fmt == "qcow2" else None,
            cluster_size=t.cluster_size, lazy_refcounts=t.lazy_refcounts,
            extended_l2=t.extended_l2, nocow=t.nocow,
            preallocation="metadata" if req.prealloc_metadata else None,
            backing_file=req.backing_path, backing_format=req.backing_format,
            encryption=None if enc is None else Encryption(
                format=enc.format, secret=req.encryption_secret, cipher=enc.cipher,
                ivgen=enc.ivgen)))

    def _apply_permissions(self, path: str, req: CreateRequest) -> None:
        perms = req.vol.target.permissions
        os.chmod(path, perms.mode if perms.mode is not None else DEFAULT_VOL_MODE)
        uid = perms.owner if perms.owner is not None and perms.owner >= 0 else -1
        gid = perms.group if perms.group is not None and perms.group >= 0 else -1
        if uid != -1 or gid != -1:
            os.chown(path, uid, gid)

    def commit_volume(self, pool: PoolDef, staging: str, final: str) -> None:
        # link() never replaces an existing name, unlike rename(): a file someone else
        # put there meanwhile stays and we report the clash.
        try:
            os.link(staging, final)
        except FileExistsError:
            raise AlreadyExists(f"storage volume '{os.path.basename(final)}' "
                                "exists already") from None
        os.unlink(staging)
        if staging in self._metadata_only:
            self._metadata_only.discard(staging)
        else:
            fsync_dir(os.path.dirname(final))

    def discard_staging(self, staging: str) -> None:
        self._metadata_only.discard(staging)
        if not os.path.lexists(staging):
            return  # never made (a read-only filesystem reports EROFS, not ENOENT)
        try:
            os.unlink(staging)
        except FileNotFoundError:
            pass
        except IsADirectoryError:
            os.rmdir(staging)
        except OSError as exc:
            raise OperationInvalid(f"cannot remove '{staging}': {_os_message(exc)}") from exc

    def delete_volume(self, pool: PoolDef, rec: VolumeRecord) -> None:
        try:
            if rec.type == "dir":
                os.rmdir(rec.path)
            else:
                os.unlink(rec.path)
        except FileNotFoundError:
            pass
        except OSError as exc:
            raise OperationInvalid(f"cannot unlink file '{rec.path}': "
                                   f"{_os_message(exc)}") from exc

    def read_volume(self, pool: PoolDef, name: str) -> VolumeRecord | None:
        path = self.volume_path(pool, name)
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            return None
        if stat.S_ISLNK(st.st_mode):
            return None  # not a volume, as a refresh has it
        return record_from_stat(name, path, st)

    @staticmethod
    def _target(pool: PoolDef) -> str:
        path = pool.target.path
        if not path:
            raise OperationInvalid(f"storage pool '{pool.name}' has no target path")
        return path


def _statvfs_sizes(path: str) -> PoolSizes:
    try:
        sv = os.statvfs(path)
    except OSError:
        return PoolSizes()
    # As libvirt counts it: free blocks including root's reserve (we run as root).
    capacity = sv.f_frsize * sv.f_blocks
    available = sv.f_frsize * sv.f_bfree
    return PoolSizes(capacity=capacity, allocation=capacity - available,
                     available=available)
