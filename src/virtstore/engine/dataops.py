"""Data operations as jobs: clone, create-from, resize, wipe, upload, download.

Each takes per-volume locks (source read, target write) and never the pool, checks
what it can before the job starts (so a bad request fails at once), and hands the bytes
to the pool's backend (the contract's ``vol_*`` verbs). New volumes are staged and
published by VolumeManager, so a failure, a cancel or a kill leaves nothing under the
final name; the backends' in-place verbs swap fully made content in.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable
from typing import TYPE_CHECKING, BinaryIO

from virtstore.backends.base import Backend, CloneOptions, VolumeRecord
from virtstore.engine.events import EventLog
from virtstore.engine.index import VolumeIndex
from virtstore.engine.jobs import JobManager
from virtstore.engine.locks import READ, WRITE
from virtstore.engine.volumes import MAX_SIZE, StagedTarget, VolumeManager
from virtstore.errors import InvalidArgument
from virtstore.host.files import regular_size
from virtstore.types import JobInfo
from virtstore.xml import PoolDef, parse_volume_xml

if TYPE_CHECKING:
    from virtstore.data.monitor import Monitor
    from virtstore.engine.cluster import Lease


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
        backend.check_volume(pool, rec)
        return pool, backend, rec

    @staticmethod
    def _need(backend: Backend, op: str, what: str) -> None:
        if not backend.supports(op):
            raise backend.unsupported(what)

    # -- clone and create-from -------------------------------------------------
    def clone(self, pool_name: str, name: str, new_name: str, *, target_pool: str | None,
              format: str | None, reflink: bool, linked: bool, prealloc_metadata: bool,
              bandwidth: int | None) -> JobInfo:
        src_pool, src_be, src = self._source(pool_name, name)
        tpool_name = target_pool or pool_name
        tpool, tbe = self.volumes._active_pool(tpool_name)
        opts = CloneOptions(format=format, reflink=reflink,
                            prealloc_metadata=prealloc_metadata, mode=src.mode)
        self._need(tbe, "vol_clone", "volume clone")
        tbe.check_clone(tpool, src_pool, src_be, src, linked=linked, options=opts,
                        what="volume clone")
        return self._copy_job("clone", src_pool, src, pool_name, tpool_name, tpool, tbe,
                              new_name, linked=linked, options=opts, bandwidth=bandwidth)

    def create_from(self, pool_name: str, xml: str, src_pool: str, src_name: str, *,
                    reflink: bool, prealloc_metadata: bool, bandwidth: int | None) -> JobInfo:
        spool, src_be, src = self._source(src_pool, src_name)
        tpool, tbe = self.volumes._active_pool(pool_name)
        self._need(tbe, "vol_clone", "volume create-from")
        vol = parse_volume_xml(xml, tpool, capacity_optional=True)
        if not vol.capacity_given:
            vol.capacity = src.capacity
            vol.capacity_given = True
        req = self.volumes._request(tpool, tbe, vol, prealloc_metadata)
        enc = vol.target.encryption
        opts = CloneOptions(format=req.format, capacity=max(req.capacity, src.capacity),
                            reflink=reflink, prealloc_metadata=prealloc_metadata,
                            compat=vol.target.compat, cluster_size=vol.target.cluster_size,
                            lazy_refcounts=vol.target.lazy_refcounts,
                            mode=vol.target.permissions.mode,
                            src_secret=self._source_secret(src),
                            dst_secret=req.encryption_secret,
                            cipher=enc.cipher if enc is not None else None,
                            ivgen=enc.ivgen if enc is not None else None)
        tbe.check_clone(tpool, spool, src_be, src, linked=False, options=opts,
                        what="volume create-from")
        return self._copy_job("create-from", spool, src, src_pool, pool_name, tpool, tbe,
                              vol.name, linked=False, options=opts, bandwidth=bandwidth)

    def _source_secret(self, src: VolumeRecord) -> bytes | None:
        """An encrypted source is opened with the secret whose usage is its path, as
        libvirt finds a volume's secret."""
        if not src.encryption:
            return None
        uuid = self.volumes.secrets.lookup_by_usage("volume", src.path)
        return self.volumes.secrets.get_value(uuid, internal=True)

    def _copy_job(self, kind: str, spool: PoolDef, src: VolumeRecord, src_pool: str,
                  tpool_name: str, tpool: PoolDef, tbe: Backend, new_name: str, *,
                  linked: bool, options: CloneOptions, bandwidth: int | None) -> JobInfo:
        if not linked and tbe.local_files(tpool):
            self.volumes.check_chain(src)  # a copy reads through the backing chain
        holder: list[StagedTarget] = []
        lease = self.volumes.write_lease(tpool_name, tpool, tbe, new_name, kind)

        def prepare(db: sqlite3.Connection, job_id: str) -> None:
            holder.append(self.volumes.reserve_target(db, tpool_name, tpool, tbe, new_name,
                                                      op=kind))

        def work(mon: Monitor) -> None:
            target = holder[0]
            try:
                try:
                    tbe.vol_clone(tpool, spool, src, target.staging, linked=linked,
                                  monitor=mon, options=options)
                    if lease is not None:
                        lease.check()  # a name whose lease is gone is not published
                except BaseException:
                    self.volumes.abort_target(target)
                    raise
                self.volumes.finish_target(target)
            finally:
                self.volumes.end_lease(lease)

        return self._leased_job(lease, lambda: self.jobs.start(
            kind, work, pool=src_pool, volume=src.name, target_pool=tpool_name,
            target_volume=new_name, total=tbe.clone_total(src, options, linked),
            bandwidth=bandwidth,
            lock=[(src_pool, src.name, READ), (tpool_name, new_name, WRITE)],
            prepare=prepare, must_exist=[(src_pool, src.name)]))

    def _leased_job(self, lease: Lease | None, start: Callable[[], JobInfo]) -> JobInfo:
        """Start a job whose work ends ``lease``; a job whose lease is lost is
        cancelled and fenced, so it stops writing, undo included."""
        try:
            job = start()
        except BaseException:
            self.volumes.end_lease(lease)
            raise
        if lease is not None:
            lease.on_lost(lambda: self.jobs.cancel(job.id, fence=True))
        return job

    # -- in-place verbs --------------------------------------------------------
    def _in_place(self, kind: str, pool_name: str, pool: PoolDef, backend: Backend,
                  rec: VolumeRecord, run: Callable[[Monitor], None], *, total: int = 0,
                  bandwidth: int | None = None, write: bool = True) -> JobInfo:
        lease = self.volumes.write_lease(pool_name, pool, backend, rec.name, kind) \
            if write else None

        def work(mon: Monitor) -> None:
            try:
                if lease is not None:
                    lease.check()
                run(mon)
                if write:
                    self._reread(pool_name, pool, backend, rec.name)
            finally:
                self.volumes.end_lease(lease)

        return self._leased_job(lease, lambda: self.jobs.start(
            kind, work, pool=pool_name, volume=rec.name, total=total, bandwidth=bandwidth,
            lock=[(pool_name, rec.name, WRITE if write else READ)],
            must_exist=[(pool_name, rec.name)]))

    def _reread(self, pool_name: str, pool: PoolDef, backend: Backend, name: str) -> None:
        rec = backend.read_volume(pool, name)
        if rec is not None:
            self.index.publish(pool_name, rec)

    def resize(self, pool_name: str, name: str, capacity: int, *, delta: bool, shrink: bool,
               allocate: bool) -> JobInfo:
        pool, backend, rec = self._source(pool_name, name)
        self._need(backend, "vol_resize", "volume resize")
        new = _new_capacity(rec, capacity, delta=delta, shrink=shrink)
        backend.check_resize(pool, rec, new, shrink=shrink, allocate=allocate)
        return self._in_place(
            "resize", pool_name, pool, backend, rec,
            lambda mon: backend.vol_resize(pool, rec, new, shrink=shrink, allocate=allocate))

    def wipe(self, pool_name: str, name: str, algorithm: str, *,
             bandwidth: int | None) -> JobInfo:
        pool, backend, rec = self._source(pool_name, name)
        self._need(backend, "vol_wipe", "volume wipe")
        from virtstore.data.wipe import ALGORITHMS

        if algorithm not in ALGORITHMS:
            raise InvalidArgument(f"unknown wipe algorithm '{algorithm}': use one of "
                                  f"{', '.join(ALGORITHMS)}")
        return self._in_place("wipe", pool_name, pool, backend, rec,
                              lambda mon: backend.vol_wipe(pool, rec, algorithm, mon),
                              total=backend.data_size(pool, rec), bandwidth=bandwidth)

    def upload(self, pool_name: str, name: str, source: BinaryIO, *, offset: int,
               length: int | None, sparse: bool, bandwidth: int | None) -> JobInfo:
        pool, backend, rec = self._source(pool_name, name)
        self._need(backend, "vol_upload", "volume upload")
        _check_range(offset, length)
        src_size = regular_size(source)
        total = length if length is not None else (src_size - offset if src_size is not None
                                                   else 0)
        return self._in_place(
            "upload", pool_name, pool, backend, rec,
            lambda mon: backend.vol_upload(pool, rec, source, offset=offset, length=length,
                                           sparse=sparse, monitor=mon),
            total=max(0, total), bandwidth=bandwidth)

    def download(self, pool_name: str, name: str, sink: BinaryIO, *, offset: int,
                 length: int | None, sparse: bool, bandwidth: int | None) -> JobInfo:
        pool, backend, rec = self._source(pool_name, name)
        self._need(backend, "vol_download", "volume download")
        _check_range(offset, length)
        total = length if length is not None else max(0, backend.data_size(pool, rec) - offset)
        return self._in_place(
            "download", pool_name, pool, backend, rec,
            lambda mon: backend.vol_download(pool, rec, sink, offset=offset, length=length,
                                             sparse=sparse, monitor=mon),
            total=total, bandwidth=bandwidth, write=False)


def _check_range(offset: int, length: int | None) -> None:
    if offset < 0 or (length is not None and length < 0):
        raise InvalidArgument("offset and length must not be negative")


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
