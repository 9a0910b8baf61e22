"""The netfs pool: a network filesystem (NFS, CIFS, GlusterFS) mounted on the target.

Kernel mode (libvirt's): start mounts the export with libvirt's command line (see
``mount_argv``: ``nodev,nosuid,noexec``, ``nfsvers=`` from ``<protocol ver>``,
``direct-io-mode=1`` for glusterfs, ``guest`` for cifs, then the pool's
``fs:mount_opts``); volumes are files in the mounted directory, as in a dir pool. A
kernel without the filesystem's client makes start fail with an error naming it.

Userspace mode (beyond libvirt), for NFS on hosts without a kernel client: the mount
option ``x-virtstore-userspace`` (an ``x-`` option, which mount helpers ignore) makes
start talk to the server through libnfs instead of mounting. Volumes are then files
on the server addressed as ``nfs://host/export/name`` (the URL qemu takes); list,
create (raw, qcow2), delete, resize (raw), wipe (zero), upload, download and clone
(a copy) work through libnfs.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Any, BinaryIO

from virtstore.backends._net_utils import fold_ino
from virtstore.backends._remotefs_utils import RemoteFiles, RemoteFS
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
from virtstore.backends.dir import FILE_FORMATS, DirBackend
from virtstore.backends.fs import DEFAULT_MOUNT_OPTS, kernel_filesystems
from virtstore.errors import InvalidArgument, OperationInvalid, Unsupported
from virtstore.host import mounts
from virtstore.host.runner import run, which
from virtstore.xml import PoolDef

if TYPE_CHECKING:
    from virtstore.data.monitor import Monitor
    from virtstore.host.nbd import QemuSource
    from virtstore.types import SnapshotInfo

USERSPACE_OPT = "x-virtstore-userspace"
# The kernel filesystem each netfs format needs, and the Debian package of its helper.
KERNEL_FS = {"nfs": ("nfs", "nfs-common"), "cifs": ("cifs", "cifs-utils"),
             "glusterfs": ("fuse", "glusterfs-client")}


# -- libvirt's mount command -------------------------------------------------------------
def netfs_format(pool: PoolDef) -> str:
    return pool.source.format or "auto"


def mount_source(pool: PoolDef) -> str:
    if not pool.source.hosts:
        raise InvalidArgument("missing source host for netfs pool")
    host = pool.source.hosts[0].name
    path = pool.source.dir or ""
    if netfs_format(pool) == "cifs":
        return f"//{host}/{path}"
    if netfs_format(pool) == "glusterfs" and not path.startswith("/"):
        path = "/" + path
    return f"{host}:{path}"


def mount_options(pool: PoolDef) -> list[str]:
    opts = list(DEFAULT_MOUNT_OPTS)
    fmt = netfs_format(pool)
    if fmt in ("nfs", "auto") and pool.source.protocol_ver:
        opts.append(f"nfsvers={pool.source.protocol_ver}")
    elif fmt == "glusterfs":
        opts.append("direct-io-mode=1")
    elif fmt == "cifs":
        opts.append("guest")
    for opt in pool.mount_opts:
        if opt not in opts and opt != USERSPACE_OPT:
            opts.append(opt)
    return opts


def mount_argv(pool: PoolDef) -> list[str]:
    """The mount command libvirt runs to start this pool (its pool-xml2argv output)."""
    argv = ["mount", "-o", ",".join(mount_options(pool))]
    fmt = netfs_format(pool)
    if fmt != "auto":
        argv += ["-t", fmt]
    return [*argv, mount_source(pool), pool.target.path or ""]


def kernel_problem(fmt: str) -> str | None:
    """Why this kernel cannot mount ``fmt``, or None."""
    need = KERNEL_FS.get(fmt)
    if need is None:
        return None
    fs, package = need
    have = kernel_filesystems()
    if fmt == "nfs" and ("nfs" in have or "nfs4" in have):
        fs_ok = True
    else:
        fs_ok = fs in have
    if not fs_ok and which("modprobe") is not None:
        fs_ok = run(["modprobe", "-n", "-q", fs], check=False).returncode == 0 and \
            os.path.isdir(f"/sys/module/{fs}")
    if not fs_ok:
        what = {"nfs": "NFS client", "cifs": "CIFS/SMB client",
                "glusterfs": "FUSE support"}[fmt]
        hint = (f" (for NFS without it, add the mount option '{USERSPACE_OPT}' to use the "
                "userspace client)") if fmt == "nfs" else ""
        return (f"this kernel has no {what}: '{fs}' is not in /proc/filesystems and no "
                f"module provides it; cannot mount '{fmt}' pools{hint}")
    helper = {"nfs": "mount.nfs", "cifs": "mount.cifs", "glusterfs": "mount.glusterfs"}[fmt]
    if which(helper) is None and not os.path.exists(f"/sbin/{helper}"):
        return f"'{helper}' is not installed (Debian {package})"
    return None


def userspace(pool: PoolDef) -> bool:
    return USERSPACE_OPT in pool.mount_opts


# -- the userspace NFS side ----------------------------------------------------------------
def _server_export(pool: PoolDef) -> tuple[str, str]:
    if not pool.source.hosts:
        raise InvalidArgument("missing source host for netfs pool")
    export = pool.source.dir or "/"
    return pool.source.hosts[0].name, export if export.startswith("/") else "/" + export


def _url(pool: PoolDef, name: str) -> str:
    host, export = _server_export(pool)
    return f"nfs://{host}{export.rstrip('/')}/{name}"


def _client(server: str, export: str) -> RemoteFS:
    from virtstore.host.nfs import NfsClient

    return NfsClient(server, export)


class NetfsBackend(RemoteFiles, DirBackend):
    caps = BackendCaps(pool_type="netfs", vol_formats=FILE_FORMATS, default_vol_format="raw",
                       shared=True, file_based=True, volume_type="file")
    staging_tag = "nfs-staging:"

    def host_problem(self) -> str | None:
        if which("mount") is None:
            return "'mount' is not installed (Debian util-linux / mount)"
        return None

    # -- data verbs: files on the kernel's mount, or RemoteFiles in userspace ----
    def _verbs(self, pool: PoolDef) -> type[RemoteFiles] | type[DirBackend]:
        return RemoteFiles if userspace(pool) else DirBackend

    def vol_resize(self, pool: PoolDef, rec: VolumeRecord, capacity: int, *,
                   shrink: bool, allocate: bool) -> None:
        self._verbs(pool).vol_resize(self, pool, rec, capacity, shrink=shrink,
                                     allocate=allocate)

    def vol_wipe(self, pool: PoolDef, rec: VolumeRecord, algorithm: str,
                 monitor: Monitor) -> None:
        self._verbs(pool).vol_wipe(self, pool, rec, algorithm, monitor)

    def vol_upload(self, pool: PoolDef, rec: VolumeRecord, source: BinaryIO, *, offset: int,
                   length: int | None, sparse: bool, monitor: Monitor) -> None:
        self._verbs(pool).vol_upload(self, pool, rec, source, offset=offset, length=length,
                                     sparse=sparse, monitor=monitor)

    def vol_download(self, pool: PoolDef, rec: VolumeRecord, sink: BinaryIO, *, offset: int,
                     length: int | None, sparse: bool, monitor: Monitor) -> None:
        self._verbs(pool).vol_download(self, pool, rec, sink, offset=offset, length=length,
                                       sparse=sparse, monitor=monitor)

    def vol_clone(self, pool: PoolDef, src_pool: PoolDef, src: VolumeRecord, staging: str, *,
                  linked: bool, monitor: Monitor,
                  options: CloneOptions = CloneOptions()) -> None:  # noqa: B008 - frozen
        self._verbs(pool).vol_clone(self, pool, src_pool, src, staging, linked=linked,
                                    monitor=monitor, options=options)

    def check_clone(self, pool: PoolDef, src_pool: PoolDef, src_backend: Backend,
                    src: VolumeRecord, *, linked: bool, options: CloneOptions,
                    what: str) -> None:
        check = Backend.check_clone if userspace(pool) else DirBackend.check_clone
        check(self, pool, src_pool, src_backend, src, linked=linked, options=options,
              what=what)

    def check_resize(self, pool: PoolDef, rec: VolumeRecord, capacity: int, *,
                     shrink: bool, allocate: bool) -> None:
        if not userspace(pool):
            DirBackend.check_resize(self, pool, rec, capacity, shrink=shrink,
                                    allocate=allocate)

    def local_files(self, pool: PoolDef) -> bool:
        return not userspace(pool)

    def pool_has(self, feature: str, pool: PoolDef) -> bool:
        # In userspace the volumes are files on the server: no snapshots, no export by
        # path (qemu opens the URL), data verbs through the NFS client.
        return not (userspace(pool) and feature.startswith("snapshot"))

    def snap_list(self, pool: PoolDef, rec: VolumeRecord) -> list[SnapshotInfo]:
        self._files_only(pool, "storage snapshots")
        return DirBackend.snap_list(self, pool, rec)

    def snap_create(self, pool: PoolDef, rec: VolumeRecord, snap: str) -> None:
        self._files_only(pool, "storage snapshots")
        DirBackend.snap_create(self, pool, rec, snap)

    def snap_create_external(self, pool: PoolDef, rec: VolumeRecord, snap: str) -> None:
        self._files_only(pool, "storage snapshots")
        DirBackend.snap_create_external(self, pool, rec, snap)

    def snap_revert(self, pool: PoolDef, rec: VolumeRecord, snap: str) -> None:
        self._files_only(pool, "storage snapshots")
        DirBackend.snap_revert(self, pool, rec, snap)

    def snap_delete(self, pool: PoolDef, rec: VolumeRecord, snap: str) -> None:
        self._files_only(pool, "storage snapshots")
        DirBackend.snap_delete(self, pool, rec, snap)

    def _files_only(self, pool: PoolDef, what: str) -> None:
        if userspace(pool):
            raise self.unsupported(what)

    # -- RemoteFiles hooks (userspace mode) ------------------------------------
    def rf_connect(self, pool: PoolDef) -> RemoteFS:
        return _client(*_server_export(pool))

    def rf_where(self, pool: PoolDef) -> dict[str, Any]:
        server, export = _server_export(pool)
        return {"server": server, "export": export}

    def rf_connect_where(self, where: Mapping[str, Any]) -> RemoteFS:
        return _client(str(where["server"]), str(where["export"]))

    def rf_url(self, pool: PoolDef, name: str) -> str:
        return _url(pool, name)

    # -- pool lifecycle --------------------------------------------------------
    def build(self, pool: PoolDef, overwrite: bool | None) -> None:
        DirBackend.build(self, pool, overwrite)  # the mount point

    def start(self, pool: PoolDef) -> None:
        fmt = netfs_format(pool)
        if userspace(pool):
            if fmt not in ("nfs", "auto"):
                raise Unsupported(f"the userspace mode ('{USERSPACE_OPT}') is for NFS "
                                  f"pools, not '{fmt}'")
            with self.rf_connect(pool):
                return
        target = self._target(pool)
        if not os.path.isdir(target):
            raise OperationInvalid(f"cannot open directory '{target}': "
                                   "No such file or directory")
        current = mounts.mounted_at(target)
        if current is not None:
            if current.source == mount_source(pool):
                return  # already mounted by someone: libvirt accepts it too
            raise OperationInvalid(f"target '{target}' is already mounted with "
                                   f"'{current.source}'")
        problem = kernel_problem(fmt)
        if problem:
            raise Unsupported(problem)
        run(mount_argv(pool), timeout=120)

    def stop(self, pool: PoolDef) -> None:
        if userspace(pool):
            return
        target = self._target(pool)
        current = mounts.mounted_at(target)
        if current is not None and current.source == mount_source(pool):
            mounts.umount(target)

    def delete(self, pool: PoolDef) -> None:
        DirBackend.delete(self, pool)

    def sizes(self, pool: PoolDef) -> PoolSizes:
        return self.rf_sizes(pool) if userspace(pool) else DirBackend.sizes(self, pool)

    # -- volumes ---------------------------------------------------------------
    def scan(self, pool: PoolDef, known: Mapping[str, Stamp]) -> ScanResult:
        if userspace(pool):
            return self.rf_scan(pool, known)
        # Network filesystems hand out 64-bit inode numbers: fold them for the index.
        read = DirBackend.scan(self, pool, {})
        res = ScanResult(skipped=read.skipped)
        for rec in read.changed:
            rec.ino = fold_ino(rec.ino)
            res.add(rec, known)
        return res

    def still_there(self, pool: PoolDef, rec: VolumeRecord) -> bool:
        # A userspace pool's files are on the server: asking is not cheap.
        return True if userspace(pool) else DirBackend.still_there(self, pool, rec)

    def read_volume(self, pool: PoolDef, name: str) -> VolumeRecord | None:
        if userspace(pool):
            return self.rf_read_volume(pool, name)
        rec = DirBackend.read_volume(self, pool, name)
        if rec is not None:
            rec.ino = fold_ino(rec.ino)
        return rec

    def volume_path(self, pool: PoolDef, name: str) -> str:
        return _url(pool, name) if userspace(pool) else DirBackend.volume_path(self, pool, name)

    def staging_path(self, pool: PoolDef, token: str) -> str:
        if userspace(pool):
            return self.rf_staging_path(pool, token)
        return DirBackend.staging_path(self, pool, token)

    def create_volume(self, pool: PoolDef, staging: str, req: CreateRequest) -> None:
        if userspace(pool):
            self.rf_create(pool, staging, req)
        else:
            DirBackend.create_volume(self, pool, staging, req)

    def commit_volume(self, pool: PoolDef, staging: str, final: str) -> None:
        if staging.startswith(self.staging_tag):
            self.rf_commit(pool, staging, final.rsplit("/", 1)[-1])
        else:
            DirBackend.commit_volume(self, pool, staging, final)

    def staging_source(self, pool: PoolDef, staging: str,
                       fmt: str) -> contextlib.AbstractContextManager[QemuSource]:
        if staging.startswith(self.staging_tag):
            return contextlib.nullcontext(self.rf_staging_source(pool, staging, fmt))
        return super().staging_source(pool, staging, fmt)

    def discard_staging(self, staging: str) -> None:
        if staging.startswith(self.staging_tag):
            self.rf_discard(staging)
        else:
            DirBackend.discard_staging(self, staging)

    def delete_volume(self, pool: PoolDef, rec: VolumeRecord) -> None:
        if userspace(pool):
            self.rf_delete(pool, rec)
        else:
            DirBackend.delete_volume(self, pool, rec)

    @contextlib.contextmanager
    def qemu_source(self, pool: PoolDef, rec: VolumeRecord) -> Iterator[QemuSource]:
        """qemu opens a userspace-mode volume with its own NFS client, at its URL."""
        from virtstore.host.nbd import QemuSource

        yield QemuSource(image=rec.path, fmt=rec.format or "raw")
