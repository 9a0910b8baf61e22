"""Volumes as files on a server reached from userspace (libnfs, libgfapi), no mount.

``RemoteFiles`` is what a backend needs on top of a client that can stat, list, open,
read, write, truncate, link, rename and unlink by path: listing, staged creation (a new
name hard-linked into place, so nothing is ever replaced), deletion, sizes, and the data
operations (resize, wipe, upload, download, clone). The netfs pool's userspace NFS mode
and the gluster pool's libgfapi mode use it.
"""

from __future__ import annotations

import json
import posixpath
import secrets as pysecrets
import stat
import struct
import tempfile
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, BinaryIO, Protocol

from virtstore.backends._net_utils import fold_ino, read_exact
from virtstore.backends.base import (
    CloneOptions,
    CreateRequest,
    PoolSizes,
    ScanResult,
    Stamp,
    VolumeRecord,
)
from virtstore.backends.dir import PRIVATE_PREFIX
from virtstore.errors import (
    AlreadyExists,
    CommandFailed,
    InvalidArgument,
    NoSuchVolume,
    Unsupported,
    VirtstoreError,
)
from virtstore.formats.probe import probe_qcow2_head
from virtstore.xml import PoolDef

if TYPE_CHECKING:
    from types import TracebackType

    from virtstore.data.monitor import Monitor
    from virtstore.host.nbd import QemuSource
    from virtstore.host.nfs import NfsStat

STAGING_PREFIX = PRIVATE_PREFIX + "staging-"
CHUNK = 4 << 20
EEXIST = 17


class RemoteFile(Protocol):
    def pread(self, offset: int, count: int) -> bytes: ...

    def pwrite(self, data: bytes, offset: int) -> None: ...

    def truncate(self, size: int) -> None: ...

    def fsync(self) -> None: ...

    def __enter__(self) -> RemoteFile: ...

    def __exit__(self, t: type[BaseException] | None, e: BaseException | None,
                 tb: TracebackType | None) -> None: ...


class RemoteFS(Protocol):
    def stat(self, path: str) -> NfsStat | None: ...

    def listdir(self, path: str) -> list[str]: ...

    def open(self, path: str, *, write: bool = False, create: bool = False,
             mode: int = 0o600) -> RemoteFile: ...

    def link(self, old: str, new: str) -> None: ...

    def unlink(self, path: str) -> None: ...

    def rename(self, old: str, new: str) -> None: ...

    def statvfs(self, path: str = "/") -> tuple[int, int, int]: ...

    def __enter__(self) -> RemoteFS: ...

    def __exit__(self, t: type[BaseException] | None, e: BaseException | None,
                 tb: TracebackType | None) -> None: ...


def qcow2_size(header: bytes) -> int | None:
    if len(header) >= 32 and header[:4] == b"QFI\xfb":
        return int(struct.unpack(">Q", header[24:32])[0])
    return None


def qcow2_snapshots(f: RemoteFile) -> list[tuple[str, float, int]]:
    """(name, creation time, VM state size) of a qcow2 image's internal snapshots, read
    from its snapshot table (the layout qemu's docs/interop/qcow2.txt gives)."""
    header = f.pread(0, 72)
    if len(header) < 72 or header[:4] != b"QFI\xfb":
        return []
    count, offset = struct.unpack(">IQ", header[60:72])
    out: list[tuple[str, float, int]] = []
    pos = offset
    for _ in range(min(count, 65536)):
        fixed = f.pread(pos, 40)
        if len(fixed) < 40:
            break
        (_l1, _l1size, id_len, name_len, sec, nsec, _clock, vm_state,
         extra) = struct.unpack(">QIHHIIQII", fixed)
        name = f.pread(pos + 40 + extra + id_len, name_len).decode("utf-8", "replace")
        out.append((name, sec + nsec / 1e9, vm_state))
        size = 40 + extra + id_len + name_len
        pos += size + (-size % 8)
    return out


def _whole_clusters(image: bytes) -> bytes:
    """A new qcow2 image padded to whole clusters, as qemu-img makes them: qemu's network
    drivers read metadata in aligned blocks and take a short read past the end as an
    I/O error."""
    if len(image) < 24 or image[:4] != b"QFI\xfb":
        return image
    cluster = 1 << int(struct.unpack(">I", image[20:24])[0])
    return image + bytes(-len(image) % cluster)


def _errno(exc: Exception) -> int:
    return int(getattr(exc, "errno", 0) or 0)


# What is read of a qcow2 image to find its backing file's name: qemu writes it in the
# first cluster, right after the header (64 KiB is qemu's default cluster size).
QCOW2_HEAD = 65536


class RemoteFiles:
    """Volume operations over a ``RemoteFS``; a backend supplies the hooks below."""

    staging_tag = "remote-staging:"
    # A qcow2 volume's backing file as its header names it (gluster, as libvirt's
    # backend shows it); off where libvirt would show a path on a mount (netfs).
    rf_backing = False

    # -- hooks -----------------------------------------------------------------
    def rf_connect(self, pool: PoolDef) -> RemoteFS:
        raise NotImplementedError

    def rf_where(self, pool: PoolDef) -> dict[str, Any]:
        """How to reach the pool's files again from a staging name (no secrets)."""
        raise NotImplementedError

    def rf_connect_where(self, where: Mapping[str, Any]) -> RemoteFS:
        raise NotImplementedError

    def rf_dir(self, pool: PoolDef) -> str:
        """The pool's directory on the server ("" for its top)."""
        return ""

    def rf_url(self, pool: PoolDef, name: str) -> str:
        raise NotImplementedError

    def rf_key(self, pool: PoolDef, name: str) -> str:
        return self.rf_url(pool, name)

    # -- names -----------------------------------------------------------------
    def _p(self, pool: PoolDef, name: str) -> str:
        if "/" in name or name in ("", ".", ".."):
            raise InvalidArgument(f"invalid volume name '{name}'")
        return posixpath.join("/", self.rf_dir(pool), name)

    def rf_staging_path(self, pool: PoolDef, token: str) -> str:
        where = dict(self.rf_where(pool))
        where["path"] = self._p(pool, STAGING_PREFIX + token)
        return self.staging_tag + json.dumps(where, sort_keys=True)

    def rf_staging_source(self, pool: PoolDef, staging: str, fmt: str) -> QemuSource:
        """How qemu opens a staging file at its URL (its own NFS or gluster client), to
        write a new volume's content (a restore, an import)."""
        from virtstore.backends.base import qemu_format
        from virtstore.host.nbd import QemuSource

        _, path = self.rf_staging(staging)
        return QemuSource(image=self.rf_url(pool, posixpath.basename(path)),
                          fmt=qemu_format(fmt))

    def rf_staging(self, staging: str) -> tuple[dict[str, Any], str]:
        if not staging.startswith(self.staging_tag):
            raise InvalidArgument(f"not a staging name of this pool type: {staging!r}")
        where = json.loads(staging[len(self.staging_tag):])
        return where, str(where.pop("path"))

    # -- listing ---------------------------------------------------------------
    def rf_record(self, pool: PoolDef, c: RemoteFS, name: str) -> VolumeRecord:
        path = self._p(pool, name)
        st = c.stat(path)
        if st is None:
            raise NoSuchVolume(f"Storage volume not found: no storage vol with matching "
                               f"name '{name}'")
        fmt, capacity, backing = "raw", st.size, None
        if stat.S_ISDIR(st.mode):
            fmt = "dir"
        elif st.size >= 32:
            with c.open(path) as f:
                size = qcow2_size(f.pread(0, 32))
                if size is not None and self.rf_backing:
                    backing = probe_qcow2_head(f.pread(0, min(st.size, QCOW2_HEAD)))
            if size is not None:
                fmt, capacity = "qcow2", size
        rec = VolumeRecord(name=name, path=self.rf_url(pool, name),
                           key=self.rf_key(pool, name),
                           type="netdir" if fmt == "dir" else "network", format=fmt,
                           capacity=capacity, allocation=st.blocks * 512, physical=st.size,
                           mode=st.mode & 0o7777, uid=st.uid, gid=st.gid,
                           ino=fold_ino(st.ino), size=st.size, mtime_ns=st.mtime_ns,
                           ctime_ns=st.ctime_ns, atime_ns=st.atime_ns)
        if backing is not None and backing.backing_file:
            rec.backing_path, rec.backing_format = backing.backing_file, backing.backing_format
        return rec

    def rf_scan(self, pool: PoolDef, known: Mapping[str, Stamp]) -> ScanResult:
        res = ScanResult()
        top = posixpath.join("/", self.rf_dir(pool))
        with self.rf_connect(pool) as c:
            for name in c.listdir(top):
                if name.startswith(PRIVATE_PREFIX) or name in (".", ".."):
                    continue
                st = c.stat(posixpath.join(top, name))
                if st is None:
                    continue
                if not (stat.S_ISREG(st.mode) or stat.S_ISDIR(st.mode)):
                    res.skipped.append((name, "not a regular file or directory"))
                    continue
                old = known.get(name)
                if old is not None and old == Stamp(fold_ino(st.ino), st.size, st.mtime_ns,
                                                    st.ctime_ns):
                    res.unchanged.append(name)
                    continue
                try:
                    res.changed.append(self.rf_record(pool, c, name))
                except (VirtstoreError, OSError) as exc:
                    res.skipped.append((name, str(exc)))
        return res

    def rf_read_volume(self, pool: PoolDef, name: str) -> VolumeRecord | None:
        with self.rf_connect(pool) as c:
            try:
                return self.rf_record(pool, c, name)
            except NoSuchVolume:
                return None

    def rf_sizes(self, pool: PoolDef) -> PoolSizes:
        try:
            with self.rf_connect(pool) as c:
                capacity, free, _ = c.statvfs(posixpath.join("/", self.rf_dir(pool)))
        except VirtstoreError:
            return PoolSizes()
        # As libvirt counts a mounted pool: free blocks including root's reserve.
        return PoolSizes(capacity=capacity, allocation=capacity - free, available=free)

    # -- create, commit, delete ------------------------------------------------
    def rf_create(self, pool: PoolDef, staging: str, req: CreateRequest) -> None:
        if req.format not in ("raw", "qcow2") or req.vol.target.encryption is not None:
            raise Unsupported(f"unsupported configuration: '{pool.type}' pools reached "
                              f"from userspace create plain raw and qcow2 volumes, not "
                              f"'{req.format}'"
                              + (" encrypted" if req.vol.target.encryption else ""))
        backing = req.backing_path
        if backing:
            prefix = self.rf_url(pool, "")
            if req.format != "qcow2" or not backing.startswith(prefix):
                raise Unsupported("unsupported configuration: a backing volume must be a "
                                  "volume of the same pool")
            backing = backing[len(prefix):]  # relative: qemu resolves it beside the overlay
        where, path = self.rf_staging(staging)
        mode = req.vol.target.permissions.mode or 0o600
        with self.rf_connect_where(where) as c, c.open(path, create=True, mode=mode) as f:
            if req.format == "qcow2":
                from virtstore.formats.qcow2 import create_qcow2

                with tempfile.TemporaryFile() as tmp:
                    create_qcow2(tmp.fileno(), req.capacity,
                                 compat=req.vol.target.compat or "0.10",
                                 cluster_size=req.vol.target.cluster_size or 65536,
                                 backing_file=backing, backing_format=req.backing_format)
                    tmp.seek(0)
                    f.pwrite(_whole_clusters(tmp.read()), 0)
            else:
                f.truncate(req.capacity)
            f.fsync()

    def rf_commit(self, pool: PoolDef, staging: str, final_name: str) -> None:
        where, path = self.rf_staging(staging)
        new = self._p(pool, final_name)
        with self.rf_connect_where(where) as c:
            try:
                c.link(path, new)  # a link never replaces an existing name
            except CommandFailed as exc:
                if _errno(exc) == EEXIST or c.stat(new) is not None:
                    raise AlreadyExists(f"storage volume '{final_name}' exists "
                                        "already") from exc
                raise
            c.unlink(path)

    def rf_discard(self, staging: str) -> None:
        where, path = self.rf_staging(staging)
        with self.rf_connect_where(where) as c:
            if c.stat(path) is not None:
                c.unlink(path)

    def rf_delete(self, pool: PoolDef, rec: VolumeRecord) -> None:
        with self.rf_connect(pool) as c:
            if c.stat(self._p(pool, rec.name)) is not None:
                c.unlink(self._p(pool, rec.name))

    # -- data operations (the contract's verbs) --------------------------------
    def vol_resize(self, pool: PoolDef, rec: VolumeRecord, capacity: int, *,
                   shrink: bool, allocate: bool) -> None:
        if rec.format != "raw" or allocate:
            raise Unsupported(f"unsupported configuration: '{pool.type}' pools reached from "
                              "userspace resize raw volumes, without allocation")
        with self.rf_connect(pool) as c, c.open(self._p(pool, rec.name), write=True) as f:
            f.truncate(capacity)

    def vol_wipe(self, pool: PoolDef, rec: VolumeRecord, algorithm: str,
                 monitor: Monitor) -> None:
        if algorithm != "zero":
            raise Unsupported(f"unsupported configuration: '{pool.type}' pools reached from "
                              f"userspace wipe with 'zero' only, not '{algorithm}'")
        zero = bytes(CHUNK)
        with self.rf_connect(pool) as c, c.open(self._p(pool, rec.name), write=True) as f:
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
                    f.pwrite(_whole_clusters(tmp.read()), 0)

    def vol_upload(self, pool: PoolDef, rec: VolumeRecord, source: BinaryIO, *, offset: int,
                   length: int | None, sparse: bool, monitor: Monitor) -> None:
        from virtstore.data.extents import is_zero

        covers = offset == 0 and length is None
        target = self._p(pool, rec.name)
        with self.rf_connect(pool) as c:
            # A whole upload goes to a new file that then takes the name (rename is atomic
            # on the server); a partial one writes in place.
            path = self._p(pool, STAGING_PREFIX + pysecrets.token_hex(8)) if covers \
                else target
            try:
                with c.open(path, write=not covers, create=covers,
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
                    c.rename(path, target)
            except BaseException:
                if covers and c.stat(path) is not None:
                    c.unlink(path)
                raise

    def vol_download(self, pool: PoolDef, rec: VolumeRecord, sink: BinaryIO, *, offset: int,
                     length: int | None, sparse: bool, monitor: Monitor) -> None:
        path = self._p(pool, rec.name)
        with self.rf_connect(pool) as c, c.open(path) as f:
            st = c.stat(path)
            size = st.size if st is not None else rec.physical
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
                  linked: bool, monitor: Monitor,
                  options: CloneOptions = CloneOptions()) -> None:  # noqa: B008 - frozen
        where, path = self.rf_staging(staging)
        if linked:
            if src_pool.uuid != pool.uuid:
                raise Unsupported("a linked clone must be in the pool of its source")
            from virtstore.formats.qcow2 import create_qcow2

            with self.rf_connect_where(where) as dc, dc.open(path, create=True) as df, \
                    tempfile.TemporaryFile() as tmp:
                create_qcow2(tmp.fileno(), src.capacity, compat="1.1", backing_file=src.name,
                             backing_format=src.format or "raw")
                tmp.seek(0)
                df.pwrite(_whole_clusters(tmp.read()), 0)
                df.fsync()
            return
        from virtstore.data.extents import is_zero

        with self.rf_connect(src_pool) as sc, sc.open(self._p(src_pool, src.name)) as sf, \
                self.rf_connect_where(where) as dc, \
                dc.open(path, create=True, mode=src.mode or 0o600) as df:
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
