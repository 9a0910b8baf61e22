"""Data operations as jobs: clone, create-from, resize, wipe, upload, download.

Each takes per-volume locks (source read, target write) and never the pool. New
volumes are staged and published by VolumeManager; an upload or a format-preserving
wipe builds the new content beside the volume and swaps it in, so a failure, a cancel
or a kill leaves the volume exactly as it was.
"""

from __future__ import annotations

import os
import secrets as pysecrets
import sqlite3
import stat
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, BinaryIO

from virtstore.api import JobInfo
from virtstore.backends._net_utils import VolumeDataOps
from virtstore.backends.base import Backend, VolumeRecord
from virtstore.engine import journal
from virtstore.engine.events import EventLog
from virtstore.engine.index import VolumeIndex
from virtstore.engine.jobs import JobManager
from virtstore.engine.locks import READ, WRITE
from virtstore.engine.volumes import MAX_SIZE, StagedTarget, VolumeManager
from virtstore.errors import InvalidArgument, NoSpace, Unsupported
from virtstore.host.files import open_volume, refuse_symlink
from virtstore.xml import PoolDef, parse_volume_xml

if TYPE_CHECKING:
    from virtstore.data.monitor import Monitor

# Formats whose bytes can be copied as they are when source and target agree.
_BYTE_COPYABLE = ("raw", "qcow2", "qed", "vmdk", "vdi", "vpc", "luks", "iso")


def _file_only(backend: Backend, what: str) -> None:
    if not backend.caps.file_based:
        raise backend.unsupported(what)


def _net(backend: Backend, pool: PoolDef) -> bool:
    """Whether the backend moves this pool's data itself (a network pool)."""
    return isinstance(backend, VolumeDataOps) and backend.handles_data(pool)


def _fsync_path(path: str) -> None:
    fd = open_volume(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@dataclass(frozen=True)
class _Crypt:
    """LUKS passphrases (and the target's cipher) for a conversion."""

    src_secret: bytes | None = None
    dst_secret: bytes | None = None
    cipher: Mapping[str, str] | None = None
    ivgen: Mapping[str, str] | None = None


class DataOps:
    def __init__(self, volumes: VolumeManager, index: VolumeIndex, jobs: JobManager,
                 events: EventLog) -> None:
        self.volumes = volumes
        self.index = index
        self.jobs = jobs
        self.events = events
        self.store = volumes.state.store

    def _source(self, pool_name: str, name: str) -> tuple[PoolDef, Backend, VolumeRecord]:
        pool, backend = self.volumes._active_pool(pool_name)
        rec = self.index.get(pool_name, name)
        if backend.caps.file_based and not _net(backend, pool):
            # Said now, before a job starts; the job's own opens refuse one swapped in later.
            refuse_symlink(rec.path)
        return pool, backend, rec

    # -- clone and create-from -------------------------------------------------
    def clone(self, pool_name: str, name: str, new_name: str, *, target_pool: str | None,
              format: str | None, reflink: bool, linked: bool, prealloc_metadata: bool,
              bandwidth: int | None) -> JobInfo:
        src_pool, src_be, src = self._source(pool_name, name)
        if isinstance(src_be, VolumeDataOps) and src_be.handles_data(src_pool):
            return self._net_clone(pool_name, src_be, src, new_name, target_pool=target_pool,
                                   format=format, linked=linked or reflink,
                                   bandwidth=bandwidth)
        _file_only(src_be, "volume clone")
        tpool_name = target_pool or pool_name
        tpool, tbe = self.volumes._active_pool(tpool_name)
        _file_only(tbe, "volume clone")
        fmt = format or ("qcow2" if linked else src.format) or "raw"
        if fmt not in tbe.caps.vol_formats:
            raise Unsupported(f"unsupported configuration: format '{fmt}' is not supported by "
                              f"'{tpool.type}' pools")
        if linked and fmt != "qcow2":
            raise InvalidArgument("a linked clone is a qcow2 overlay: format must be qcow2")
        if reflink and (fmt != src.format or src.backing_path):
            raise Unsupported("unsupported configuration: a reflink clone needs the same "
                              "format and a source without a backing file")
        return self._copy_job("clone", src, pool_name, tpool_name, tpool, tbe, new_name, fmt,
                              capacity=src.capacity, reflink=reflink, linked=linked,
                              prealloc_metadata=prealloc_metadata, bandwidth=bandwidth,
                              mode=src.mode)

    def create_from(self, pool_name: str, xml: str, src_pool: str, src_name: str, *,
                    reflink: bool, prealloc_metadata: bool, bandwidth: int | None) -> JobInfo:
        _, src_be, src = self._source(src_pool, src_name)
        _file_only(src_be, "volume create-from")
        tpool, tbe = self.volumes._active_pool(pool_name)
        _file_only(tbe, "volume create-from")
        vol = parse_volume_xml(xml, tpool, capacity_optional=True)
        if not vol.capacity_given:
            vol.capacity = src.capacity
            vol.capacity_given = True
        req = self.volumes._request(tpool, tbe, vol, prealloc_metadata)
        enc = vol.target.encryption
        crypt = _Crypt(src_secret=self._source_secret(src),
                       dst_secret=req.encryption_secret,
                       cipher=enc.cipher if enc is not None else None,
                       ivgen=enc.ivgen if enc is not None else None)
        return self._copy_job("create-from", src, src_pool, pool_name, tpool, tbe, vol.name,
                              req.format, capacity=max(req.capacity, src.capacity),
                              reflink=reflink, linked=False,
                              prealloc_metadata=prealloc_metadata, bandwidth=bandwidth,
                              mode=vol.target.permissions.mode, compat=vol.target.compat,
                              cluster_size=vol.target.cluster_size,
                              lazy_refcounts=vol.target.lazy_refcounts, crypt=crypt)

    def _source_secret(self, src: VolumeRecord) -> bytes | None:
        """An encrypted source is opened with the secret whose usage is its path, as
        libvirt finds a volume's secret."""
        if not src.encryption:
            return None
        uuid = self.volumes.secrets.lookup_by_usage("volume", src.path)
        return self.volumes.secrets.get_value(uuid, internal=True)

    def _copy_job(self, kind: str, src: VolumeRecord, src_pool: str, tpool_name: str,
                  tpool: PoolDef, tbe: Backend, new_name: str, fmt: str, *, capacity: int,
                  reflink: bool, linked: bool, prealloc_metadata: bool, bandwidth: int | None,
                  mode: int | None, compat: str | None = None, cluster_size: int | None = None,
                  lazy_refcounts: bool = False, crypt: _Crypt | None = None) -> JobInfo:
        if not linked:
            self.volumes.check_chain(src)  # again in the job, just before qemu-img reads
        holder: list[StagedTarget] = []

        def prepare(db: sqlite3.Connection, job_id: str) -> None:
            holder.append(self.volumes.reserve_target(db, tpool_name, tpool, tbe, new_name,
                                                      op=kind))

        def work(mon: Monitor) -> None:
            target = holder[0]
            try:
                self._fill(src, target.staging, fmt, capacity=capacity, reflink=reflink,
                           linked=linked, prealloc_metadata=prealloc_metadata, monitor=mon,
                           compat=compat, cluster_size=cluster_size,
                           lazy_refcounts=lazy_refcounts, crypt=crypt or _Crypt())
                os.chmod(target.staging, mode if mode is not None else 0o600)
                _fsync_path(target.staging)
            except BaseException:
                self.volumes.abort_target(target)
                raise
            self.volumes.finish_target(target)

        # Progress counts holes too (they are skipped, not copied): the total is the size.
        total = 0 if linked else (src.physical if fmt == src.format else src.capacity)
        return self.jobs.start(kind, work, pool=src_pool, volume=src.name,
                               target_pool=tpool_name, target_volume=new_name, total=total,
                               bandwidth=bandwidth,
                               lock=[(src_pool, src.name, READ), (tpool_name, new_name, WRITE)],
                               prepare=prepare, must_exist=[(src_pool, src.name)])

    def _fill(self, src: VolumeRecord, dst: str, fmt: str, *, capacity: int, reflink: bool,
              linked: bool, prealloc_metadata: bool, monitor: Monitor, compat: str | None,
              cluster_size: int | None, lazy_refcounts: bool, crypt: _Crypt) -> None:
        if linked:
            from virtstore.formats.qcow2 import create_qcow2

            fd = open_volume(dst, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            try:
                create_qcow2(fd, capacity, compat=compat or "1.1", backing_file=src.path,
                             backing_format=src.format)
            finally:
                os.close(fd)
            return
        plain = (fmt == src.format and fmt in _BYTE_COPYABLE and not src.backing_path
                 and not prealloc_metadata and compat is None and cluster_size is None
                 and not lazy_refcounts and crypt.dst_secret is None)
        if plain:
            from virtstore.data.copy import copy_file

            copy_file(src.path, dst, reflink="always" if reflink else "auto", monitor=monitor)
            if fmt == "raw" and capacity > src.capacity:
                os.truncate(dst, capacity)
            return
        from virtstore.data.convert import convert
        from virtstore.formats.qemuimg import Encryption, ImageOptions

        opts = ImageOptions(format=fmt,
                            compat=(compat or "0.10") if fmt == "qcow2" else None,
                            cluster_size=cluster_size, lazy_refcounts=lazy_refcounts,
                            preallocation="metadata" if prealloc_metadata else None)
        if crypt.dst_secret is not None:
            opts.encryption = Encryption(format="luks", cipher=crypt.cipher, ivgen=crypt.ivgen)
        src_fmt = src.format or "raw"
        # qemu-img opens the source (and its backing chain) by path itself.
        refuse_symlink(src.path)
        self.volumes.check_chain(src)
        convert(src.path, src_fmt, dst, fmt, opts, monitor=monitor,
                src_secret=crypt.src_secret, dst_secret=crypt.dst_secret)
        if capacity > src.capacity:
            from virtstore.formats.qemuimg import resize

            resize(dst, capacity, fmt)

    # -- resize ----------------------------------------------------------------
    def resize(self, pool_name: str, name: str, capacity: int, *, delta: bool, shrink: bool,
               allocate: bool) -> JobInfo:
        pool, backend, rec = self._source(pool_name, name)
        if _net(backend, pool):
            return self._net_resize(pool_name, pool, backend, rec, capacity, delta=delta,
                                    shrink=shrink, allocate=allocate)
        _file_only(backend, "volume resize")
        new = _new_capacity(rec, capacity, delta=delta, shrink=shrink)
        if new < rec.allocation and (rec.format or "raw") == "raw":
            raise InvalidArgument("can't shrink capacity below existing allocation")
        fmt = rec.format or "raw"
        if fmt not in ("raw", "qcow2"):
            raise Unsupported(f"unsupported configuration: resizing a '{fmt}' volume is not "
                              "supported")
        if allocate and new > rec.capacity:
            free = backend.sizes(pool).available
            if new - rec.capacity > free:
                raise NoSpace("Not enough space left in storage pool")

        def work(mon: Monitor) -> None:
            if fmt == "raw":
                fd = open_volume(rec.path, os.O_RDWR)
                try:
                    os.ftruncate(fd, new)
                    if allocate and new > rec.capacity:
                        try:
                            os.posix_fallocate(fd, rec.capacity, new - rec.capacity)
                        except OSError as exc:
                            os.ftruncate(fd, rec.capacity)
                            raise NoSpace("Not enough space left in storage pool") from exc
                    os.fsync(fd)
                finally:
                    os.close(fd)
            else:
                from virtstore.formats.qemuimg import resize

                refuse_symlink(rec.path)
                resize(rec.path, new, fmt, shrink=shrink,
                       preallocation="falloc" if allocate else None)
            self._reread(pool_name, pool, backend, name)

        return self.jobs.start("resize", work, pool=pool_name, volume=name,
                               lock=[(pool_name, name, WRITE)],
                               must_exist=[(pool_name, name)])

    def _reread(self, pool_name: str, pool: PoolDef, backend: Backend, name: str) -> None:
        rec = backend.read_volume(pool, name)
        if rec is not None:
            self.index.publish(pool_name, rec)

    # -- wipe ------------------------------------------------------------------
    def wipe(self, pool_name: str, name: str, algorithm: str, *,
             bandwidth: int | None) -> JobInfo:
        pool, backend, rec = self._source(pool_name, name)
        if _net(backend, pool):
            return self._net_wipe(pool_name, pool, backend, rec, algorithm,
                                  bandwidth=bandwidth)
        _file_only(backend, "volume wipe")
        from virtstore.data.wipe import ALGORITHMS

        if algorithm not in ALGORITHMS:
            raise InvalidArgument(f"unknown wipe algorithm '{algorithm}': use one of "
                                  f"{', '.join(ALGORITHMS)}")
        fmt = rec.format or "raw"

        def work(mon: Monitor) -> None:
            from virtstore.data.wipe import wipe

            if fmt == "raw":
                wipe(rec.path, algorithm, monitor=mon)
            else:
                self._wipe_image(pool_name, pool, backend, rec, algorithm, mon)
            self._reread(pool_name, pool, backend, name)

        return self.jobs.start("wipe", work, pool=pool_name, volume=name,
                               total=rec.physical, bandwidth=bandwidth,
                               lock=[(pool_name, name, WRITE)],
                               must_exist=[(pool_name, name)])

    def _wipe_image(self, pool_name: str, pool: PoolDef, backend: Backend, rec: VolumeRecord,
                    algorithm: str, mon: Monitor) -> None:
        """An image format keeps its format. A fresh empty image of the same format and
        capacity takes the volume's name first, in one rename; then the old image,
        kept under a hidden name, is wiped and removed. Until the rename the volume is
        as it was; after it, the volume is the empty image, whatever happens next."""
        from virtstore.data.wipe import wipe
        from virtstore.formats.qemuimg import ImageOptions, create

        fresh, fresh_entry = self._staging(pool_name, pool, backend, rec.name, "wipe")
        old, old_entry = self._staging(pool_name, pool, backend, rec.name, "wipe")
        try:
            try:
                create(fresh, ImageOptions(format=rec.format or "raw", capacity=rec.capacity,
                                           compat=rec.compat if rec.format == "qcow2" else None,
                                           backing_file=rec.backing_path,
                                           backing_format=rec.backing_format))
                if rec.mode is not None:
                    os.chmod(fresh, rec.mode)
                _fsync_path(fresh)
                mon.check()
                os.link(rec.path, old)
                os.replace(fresh, rec.path)
            except BaseException:
                backend.discard_staging(fresh)
                backend.discard_staging(old)
                raise
            try:
                wipe(old, algorithm, monitor=mon)
            finally:
                backend.discard_staging(old)
        finally:
            journal.end(self.store, fresh_entry)
            journal.end(self.store, old_entry)

    def _staging(self, pool_name: str, pool: PoolDef, backend: Backend, name: str,
                 op: str) -> tuple[str, int]:
        staging = backend.staging_path(pool, pysecrets.token_hex(8))
        with self.store.write() as db:
            entry = journal.begin(db, op, pool_name, name, staging, None)
        return staging, entry

    # -- upload and download ---------------------------------------------------
    def upload(self, pool_name: str, name: str, source: BinaryIO, *, offset: int,
               length: int | None, sparse: bool, bandwidth: int | None) -> JobInfo:
        pool, backend, rec = self._source(pool_name, name)
        if _net(backend, pool):
            return self._net_upload(pool_name, pool, backend, rec, source, offset=offset,
                                    length=length, sparse=sparse, bandwidth=bandwidth)
        _file_only(backend, "volume upload")
        if offset < 0 or (length is not None and length < 0):
            raise InvalidArgument("offset and length must not be negative")
        src_size = _regular_size(source)
        covers = (offset == 0 and src_size is not None
                  and (length if length is not None else src_size) >= rec.physical)
        total = length if length is not None else (src_size - offset if src_size is not None
                                                   else 0)

        def work(mon: Monitor) -> None:
            from virtstore.data.copy import copy_file
            from virtstore.data.stream import upload

            staging, entry = self._staging(pool_name, pool, backend, name, "upload")
            try:
                if covers:
                    # The upload replaces every byte: start from an empty file.
                    fd = open_volume(staging, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
                else:
                    # Partial upload: a copy of the volume (a reflink where the filesystem
                    # can) takes the new bytes, so the volume is untouched until the swap.
                    from virtstore.data.monitor import Monitor

                    copy_file(rec.path, staging, reflink="auto", monitor=Monitor())
                    fd = open_volume(staging, os.O_RDWR)
                try:
                    upload(source, fd, offset=offset, length=length, sparse=sparse, monitor=mon)
                    if covers and os.fstat(fd).st_size < rec.physical:
                        os.ftruncate(fd, rec.physical)
                    os.fchmod(fd, rec.mode if rec.mode is not None else 0o600)
                    os.fsync(fd)
                finally:
                    os.close(fd)
                os.replace(staging, rec.path)
            except BaseException:
                backend.discard_staging(staging)
                raise
            finally:
                journal.end(self.store, entry)
            self._reread(pool_name, pool, backend, name)

        return self.jobs.start("upload", work, pool=pool_name, volume=name, total=total,
                               bandwidth=bandwidth, lock=[(pool_name, name, WRITE)],
                               must_exist=[(pool_name, name)])

    def download(self, pool_name: str, name: str, sink: BinaryIO, *, offset: int,
                 length: int | None, sparse: bool, bandwidth: int | None) -> JobInfo:
        pool, backend, rec = self._source(pool_name, name)
        if _net(backend, pool):
            return self._net_download(pool_name, pool, backend, rec, sink, offset=offset,
                                      length=length, sparse=sparse, bandwidth=bandwidth)
        _file_only(backend, "volume download")
        if offset < 0 or (length is not None and length < 0):
            raise InvalidArgument("offset and length must not be negative")
        total = length if length is not None else max(0, rec.physical - offset)

        def work(mon: Monitor) -> None:
            from virtstore.data.stream import download

            fd = open_volume(rec.path, os.O_RDONLY)
            try:
                download(fd, sink, offset=offset, length=length, sparse=sparse, monitor=mon)
            finally:
                os.close(fd)

        return self.jobs.start("download", work, pool=pool_name, volume=name, total=total,
                               bandwidth=bandwidth, lock=[(pool_name, name, READ)],
                               must_exist=[(pool_name, name)])

    # -- network backends: the backend moves the data (see backends/_net_utils) --
    def _net_clone(self, pool_name: str, src_be: VolumeDataOps, src: VolumeRecord,
                   new_name: str, *, target_pool: str | None, format: str | None,
                   linked: bool, bandwidth: int | None) -> JobInfo:
        src_pool, _ = self.volumes._active_pool(pool_name)
        tpool_name = target_pool or pool_name
        tpool, tbe = self.volumes._active_pool(tpool_name)
        if tpool.type != src_pool.type:
            raise Unsupported(f"unsupported configuration: a '{src_pool.type}' volume can be "
                              f"cloned only into a '{src_pool.type}' pool")
        fmt = format or src.format or "raw"
        if fmt != (src.format or "raw") or fmt not in tbe.caps.vol_formats:
            raise Unsupported(f"unsupported configuration: format '{fmt}' is not supported "
                              f"for clones in '{tpool.type}' pools")
        holder: list[StagedTarget] = []

        def prepare(db: sqlite3.Connection, job_id: str) -> None:
            holder.append(self.volumes.reserve_target(db, tpool_name, tpool, tbe, new_name,
                                                      op="clone"))

        def work(mon: Monitor) -> None:
            target = holder[0]
            try:
                src_be.vol_clone(tpool, src_pool, src, target.staging, linked=linked,
                                 monitor=mon)
            except BaseException:
                self.volumes.abort_target(target)
                raise
            self.volumes.finish_target(target)

        return self.jobs.start("clone", work, pool=pool_name, volume=src.name,
                               target_pool=tpool_name, target_volume=new_name,
                               total=0 if linked else src.capacity, bandwidth=bandwidth,
                               lock=[(pool_name, src.name, READ), (tpool_name, new_name, WRITE)],
                               prepare=prepare)

    def _net_resize(self, pool_name: str, pool: PoolDef, backend: Backend,
                    rec: VolumeRecord, capacity: int, *, delta: bool, shrink: bool,
                    allocate: bool) -> JobInfo:
        assert isinstance(backend, VolumeDataOps)
        new = _new_capacity(rec, capacity, delta=delta, shrink=shrink)

        def work(mon: Monitor) -> None:
            backend.vol_resize(pool, rec, new, shrink=shrink, allocate=allocate)
            self._reread(pool_name, pool, backend, rec.name)

        return self.jobs.start("resize", work, pool=pool_name, volume=rec.name,
                               lock=[(pool_name, rec.name, WRITE)])

    def _net_wipe(self, pool_name: str, pool: PoolDef, backend: Backend,
                  rec: VolumeRecord, algorithm: str, *, bandwidth: int | None) -> JobInfo:
        assert isinstance(backend, VolumeDataOps)
        def work(mon: Monitor) -> None:
            backend.vol_wipe(pool, rec, algorithm, mon)
            self._reread(pool_name, pool, backend, rec.name)

        return self.jobs.start("wipe", work, pool=pool_name, volume=rec.name,
                               total=rec.capacity, bandwidth=bandwidth,
                               lock=[(pool_name, rec.name, WRITE)])

    def _net_upload(self, pool_name: str, pool: PoolDef, backend: Backend,
                    rec: VolumeRecord, source: BinaryIO, *, offset: int, length: int | None,
                    sparse: bool, bandwidth: int | None) -> JobInfo:
        assert isinstance(backend, VolumeDataOps)
        if offset < 0 or (length is not None and length < 0):
            raise InvalidArgument("offset and length must not be negative")
        src_size = _regular_size(source)
        total = length if length is not None else (src_size - offset if src_size is not None
                                                   else 0)

        def work(mon: Monitor) -> None:
            backend.vol_upload(pool, rec, source, offset=offset, length=length, sparse=sparse,
                               monitor=mon)
            self._reread(pool_name, pool, backend, rec.name)

        return self.jobs.start("upload", work, pool=pool_name, volume=rec.name,
                               total=max(0, total), bandwidth=bandwidth,
                               lock=[(pool_name, rec.name, WRITE)])

    def _net_download(self, pool_name: str, pool: PoolDef, backend: Backend,
                      rec: VolumeRecord, sink: BinaryIO, *, offset: int, length: int | None,
                      sparse: bool, bandwidth: int | None) -> JobInfo:
        assert isinstance(backend, VolumeDataOps)
        if offset < 0 or (length is not None and length < 0):
            raise InvalidArgument("offset and length must not be negative")
        total = length if length is not None else max(0, rec.capacity - offset)

        def work(mon: Monitor) -> None:
            backend.vol_download(pool, rec, sink, offset=offset, length=length, sparse=sparse,
                                 monitor=mon)

        return self.jobs.start("download", work, pool=pool_name, volume=rec.name,
                               total=total, bandwidth=bandwidth,
                               lock=[(pool_name, rec.name, READ)])


def _new_capacity(rec: VolumeRecord, capacity: int, *, delta: bool, shrink: bool) -> int:
    """The size a resize asks for, checked with libvirt's rules and messages."""
    if capacity < 0:
        raise InvalidArgument("capacity must not be negative")
    if delta:
        # As libvirt: a delta shrink past zero stops at zero.
        new = max(0, rec.capacity - capacity) if shrink else rec.capacity + capacity
    else:
        new = capacity
    if new > MAX_SIZE:
        raise InvalidArgument(f"invalid capacity {new}: must be 0 to {MAX_SIZE} bytes")
    if new < rec.capacity and not shrink:
        raise InvalidArgument("Can't shrink capacity below current capacity unless shrink "
                              "flag explicitly specified")
    return new


def _regular_size(f: BinaryIO) -> int | None:
    try:
        st = os.fstat(f.fileno())
    except (OSError, ValueError, AttributeError):
        return None
    return st.st_size if stat.S_ISREG(st.st_mode) else None
