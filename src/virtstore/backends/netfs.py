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
import json
import os
import secrets as pysecrets
import stat
import struct
import tempfile
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, BinaryIO

from virtstore.backends._net_utils import VolumeDataOps, fold_ino, read_exact
from virtstore.backends.base import (
    BackendCaps,
    CreateRequest,
    PoolSizes,
    ScanResult,
    Stamp,
    VolumeRecord,
)
from virtstore.backends.dir import FILE_FORMATS, PRIVATE_PREFIX, DirBackend
from virtstore.backends.fs import DEFAULT_MOUNT_OPTS, kernel_filesystems
from virtstore.errors import (
    AlreadyExists,
    InvalidArgument,
    NoSuchVolume,
    OperationInvalid,
    Unsupported,
)
from virtstore.host import mounts
from virtstore.host.runner import run, which
from virtstore.xml import PoolDef

if TYPE_CHECKING:
    from virtstore.data.monitor import Monitor
    from virtstore.engine.nbd import QemuSource
    from virtstore.host.nfs import NfsClient

USERSPACE_OPT = "x-virtstore-userspace"
STAGING_TAG = "nfs-staging:"
STAGING_PREFIX = PRIVATE_PREFIX + "staging-"
CHUNK = 4 << 20
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


def _client(server: str, export: str) -> NfsClient:
    from virtstore.host.nfs import NfsClient

    return NfsClient(server, export)


def _qcow2_size(header: bytes) -> int | None:
    if len(header) >= 32 and header[:4] == b"QFI\xfb":
        return int(struct.unpack(">Q", header[24:32])[0])
    return None


class NetfsBackend(VolumeDataOps, DirBackend):
    caps = BackendCaps(pool_type="netfs", build=True, delete=True, vol_create=True,
                       vol_delete=True, vol_formats=FILE_FORMATS, default_vol_format="raw",
                       shared=True, file_based=True, volume_type="file")

    def host_problem(self) -> str | None:
        if which("mount") is None:
            return "'mount' is not installed (Debian util-linux / mount)"
        return None

    def handles_data(self, pool: PoolDef) -> bool:
        return userspace(pool)

    # -- pool lifecycle --------------------------------------------------------
    def build(self, pool: PoolDef, overwrite: bool | None) -> None:
        DirBackend.build(self, pool, overwrite)  # the mount point

    def start(self, pool: PoolDef) -> None:
        fmt = netfs_format(pool)
        if userspace(pool):
            if fmt not in ("nfs", "auto"):
                raise Unsupported(f"the userspace mode ('{USERSPACE_OPT}') is for NFS "
                                  f"pools, not '{fmt}'")
            with _client(*_server_export(pool)):
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
        if not userspace(pool):
            return DirBackend.sizes(self, pool)
        from virtstore.errors import VirtstoreError

        try:
            with _client(*_server_export(pool)) as c:
                capacity, free, _ = c.statvfs()
        except VirtstoreError:
            return PoolSizes()
        # As libvirt counts a mounted pool: free blocks including root's reserve.
        return PoolSizes(capacity=capacity, allocation=capacity - free, available=free)

    # -- volumes ---------------------------------------------------------------
    def scan(self, pool: PoolDef, known: Mapping[str, Stamp]) -> ScanResult:
        if not userspace(pool):
            # Network filesystems hand out 64-bit inode numbers: fold them for the index.
            folded = {n: Stamp(s.ino, s.size, s.mtime_ns, s.ctime_ns)
                      for n, s in known.items()}
            res = DirBackend.scan(self, pool, {})
            keep: list[VolumeRecord] = []
            for rec in res.changed:
                rec.ino = fold_ino(rec.ino)
                old = folded.get(rec.name)
                if old is not None and old == Stamp(rec.ino, rec.size, rec.mtime_ns,
                                                    rec.ctime_ns):
                    res.unchanged.append(rec.name)
                else:
                    keep.append(rec)
            res.changed = keep
            return res
        res = ScanResult()
        with _client(*_server_export(pool)) as c:
            for name in c.listdir("/"):
                if name.startswith(PRIVATE_PREFIX):
                    continue
                st = c.stat(name)
                if st is None:
                    continue
                if not stat.S_ISREG(st.mode):
                    res.skipped.append((name, "not a regular file"))
                    continue
                old = known.get(name)
                if old is not None and old == Stamp(fold_ino(st.ino), st.size, st.mtime_ns,
                                                    st.ctime_ns):
                    res.unchanged.append(name)
                    continue
                res.changed.append(self._nfs_record(pool, c, name))
        return res

    def _nfs_record(self, pool: PoolDef, c: NfsClient, name: str) -> VolumeRecord:
        st = c.stat(name)
        if st is None:
            raise NoSuchVolume(f"Storage volume not found: no storage vol with matching "
                               f"name '{name}'")
        fmt, capacity = "raw", st.size
        if st.size >= 32:
            with c.open(name) as f:
                size = _qcow2_size(f.pread(0, 32))
            if size is not None:
                fmt, capacity = "qcow2", size
        url = _url(pool, name)
        return VolumeRecord(name=name, path=url, key=url, type="network", format=fmt,
                            capacity=capacity, allocation=st.blocks * 512, physical=st.size,
                            mode=st.mode & 0o7777, uid=st.uid, gid=st.gid,
                            ino=fold_ino(st.ino),
                            size=st.size, mtime_ns=st.mtime_ns, ctime_ns=st.ctime_ns,
                            atime_ns=st.atime_ns)

    def read_volume(self, pool: PoolDef, name: str) -> VolumeRecord | None:
        if not userspace(pool):
            rec = DirBackend.read_volume(self, pool, name)
            if rec is not None:
                rec.ino = fold_ino(rec.ino)
            return rec
        with _client(*_server_export(pool)) as c:
            try:
                return self._nfs_record(pool, c, name)
            except NoSuchVolume:
                return None

    def volume_path(self, pool: PoolDef, name: str) -> str:
        return _url(pool, name) if userspace(pool) else DirBackend.volume_path(self, pool, name)

    def staging_path(self, pool: PoolDef, token: str) -> str:
        if not userspace(pool):
            return DirBackend.staging_path(self, pool, token)
        server, export = _server_export(pool)
        return STAGING_TAG + json.dumps({"server": server, "export": export,
                                         "name": STAGING_PREFIX + token})

    @staticmethod
    def _staging(staging: str) -> tuple[str, str, str]:
        data = json.loads(staging[len(STAGING_TAG):])
        return str(data["server"]), str(data["export"]), str(data["name"])

    def create_volume(self, pool: PoolDef, staging: str, req: CreateRequest) -> None:
        if not userspace(pool):
            DirBackend.create_volume(self, pool, staging, req)
            return
        if req.format not in ("raw", "qcow2") or req.vol.target.encryption is not None \
                or req.backing_path:
            raise Unsupported(f"unsupported configuration: the userspace NFS mode creates "
                              f"plain raw and qcow2 volumes, not '{req.format}'"
                              + (" with a backing file" if req.backing_path else "")
                              + (" encrypted" if req.vol.target.encryption else ""))
        server, export, name = self._staging(staging)
        mode = req.vol.target.permissions.mode or 0o600
        with _client(server, export) as c, c.open(name, create=True, mode=mode) as f:
            if req.format == "qcow2":
                from virtstore.formats.qcow2 import create_qcow2

                with tempfile.TemporaryFile() as tmp:
                    create_qcow2(tmp.fileno(), req.capacity, compat=req.vol.target.compat
                                 or "0.10", cluster_size=req.vol.target.cluster_size or 65536)
                    tmp.seek(0)
                    f.pwrite(tmp.read(), 0)
            else:
                f.truncate(req.capacity)
            f.fsync()

    def commit_volume(self, pool: PoolDef, staging: str, final: str) -> None:
        if not staging.startswith(STAGING_TAG):
            DirBackend.commit_volume(self, pool, staging, final)
            return
        server, export, name = self._staging(staging)
        new = final.rsplit("/", 1)[-1]
        from virtstore.host.nfs import NfsError

        with _client(server, export) as c:
            try:
                c.link(name, new)  # a link never replaces an existing name
            except NfsError as exc:
                if exc.errno == 17 or c.stat(new) is not None:
                    raise AlreadyExists(f"storage volume '{new}' exists already") from exc
                raise
            c.unlink(name)

    def discard_staging(self, staging: str) -> None:
        if not staging.startswith(STAGING_TAG):
            DirBackend.discard_staging(self, staging)
            return
        server, export, name = self._staging(staging)
        with _client(server, export) as c:
            if c.stat(name) is not None:
                c.unlink(name)

    def delete_volume(self, pool: PoolDef, rec: VolumeRecord) -> None:
        if not userspace(pool):
            DirBackend.delete_volume(self, pool, rec)
            return
        with _client(*_server_export(pool)) as c:
            if c.stat(rec.name) is not None:
                c.unlink(rec.name)

    @contextlib.contextmanager
    def qemu_source(self, pool: PoolDef, rec: VolumeRecord) -> Iterator[QemuSource]:
        """qemu opens a userspace-mode volume with its own NFS client, at its URL."""
        from virtstore.engine.nbd import QemuSource

        yield QemuSource(image=rec.path, fmt=rec.format or "raw")

    # -- data operations in userspace mode (VolumeDataOps) ---------------------
    def vol_resize(self, pool: PoolDef, rec: VolumeRecord, capacity: int, *,
                   shrink: bool, allocate: bool) -> None:
        if rec.format != "raw" or allocate:
            raise Unsupported("unsupported configuration: the userspace NFS mode resizes "
                              "raw volumes, without allocation")
        with _client(*_server_export(pool)) as c, c.open(rec.name, write=True) as f:
            f.truncate(capacity)

    def vol_wipe(self, pool: PoolDef, rec: VolumeRecord, algorithm: str,
                 monitor: Monitor) -> None:
        if algorithm != "zero":
            raise Unsupported(f"unsupported configuration: the userspace NFS mode wipes "
                              f"with 'zero' only, not '{algorithm}'")
        zero = bytes(CHUNK)
        with _client(*_server_export(pool)) as c, c.open(rec.name, write=True) as f:
            size = rec.physical
            monitor.set_total(size)
            pos = 0
            while pos < size:
                n = min(CHUNK, size - pos)
                f.pwrite(zero[:n], pos)
                pos += n
                monitor.advance(n)
            f.fsync()
            if rec.format == "qcow2":
                from virtstore.formats.qcow2 import create_qcow2

                with tempfile.TemporaryFile() as tmp:  # an empty image, as wipe leaves it
                    create_qcow2(tmp.fileno(), rec.capacity, compat=rec.compat or "0.10")
                    tmp.seek(0)
                    f.pwrite(tmp.read(), 0)

    def vol_upload(self, pool: PoolDef, rec: VolumeRecord, source: BinaryIO, *, offset: int,
                   length: int | None, sparse: bool, monitor: Monitor) -> None:
        from virtstore.data.extents import is_zero

        server, export = _server_export(pool)
        covers = offset == 0 and length is None
        with _client(server, export) as c:
            # A whole upload goes to a new file that then takes the name (rename is atomic
            # on the server); a partial one writes in place.
            name = STAGING_PREFIX + pysecrets.token_hex(8) if covers else rec.name
            try:
                with c.open(name, write=not covers, create=covers,
                            mode=rec.mode or 0o600) as f:
                    done = 0
                    while length is None or done < length:
                        want = CHUNK if length is None else min(CHUNK, length - done)
                        data = read_exact(source, want)
                        if not data:
                            break
                        if not (sparse and covers and is_zero(data)):
                            f.pwrite(data, offset + done)
                        done += len(data)
                        monitor.advance(len(data))
                    if length is not None and done < length:
                        raise InvalidArgument(f"the source ended after {done} of {length} "
                                              "bytes")
                    if covers:
                        f.truncate(max(done, rec.physical))
                    f.fsync()
                if covers:
                    c.rename(name, rec.name)
            except BaseException:
                if covers and c.stat(name) is not None:
                    c.unlink(name)
                raise

    def vol_download(self, pool: PoolDef, rec: VolumeRecord, sink: BinaryIO, *, offset: int,
                     length: int | None, sparse: bool, monitor: Monitor) -> None:
        with _client(*_server_export(pool)) as c, c.open(rec.name) as f:
            size = rec.physical
            st = c.stat(rec.name)
            if st is not None:
                size = st.size
            end = size if length is None else min(size, offset + length)
            monitor.set_total(max(0, end - offset))
            pos = offset
            while pos < end:
                data = f.pread(pos, min(CHUNK, end - pos))
                if not data:
                    break
                sink.write(data)
                pos += len(data)
                monitor.advance(len(data))
            sink.flush()

    def vol_clone(self, pool: PoolDef, src_pool: PoolDef, src: VolumeRecord, staging: str, *,
                  linked: bool, monitor: Monitor) -> None:
        if linked:
            raise Unsupported("unsupported configuration: linked clones are not supported "
                              "in the userspace NFS mode")
        from virtstore.data.extents import is_zero

        server, export, name = self._staging(staging)
        with _client(*_server_export(src_pool)) as sc, sc.open(src.name) as sf, \
                _client(server, export) as dc, \
                dc.open(name, create=True, mode=src.mode or 0o600) as df:
            size = src.physical
            monitor.set_total(size)
            pos = 0
            while pos < size:
                data = sf.pread(pos, min(CHUNK, size - pos))
                if not data:
                    break
                if is_zero(data):
                    monitor.skip(len(data))
                else:
                    df.pwrite(data, pos)
                    monitor.advance(len(data))
                pos += len(data)
            df.truncate(size)
            df.fsync()
