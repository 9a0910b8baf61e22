"""vol-backup, vol-restore and backup-verify as jobs on the engine.

A backup holds its volume for reading (other readers go on; writers through virtstore
wait), reads the chunks that may have changed, stores those not stored yet, and writes
the manifest last. A restore makes its volume through the engine's staged creation:
the new volume takes its name only when all of it is written, so a failed, cancelled
or killed restore leaves nothing under that name (the crash journal removes the
staging object at the next start).
"""

from __future__ import annotations

import contextlib
import logging
import os
import sqlite3
from collections import deque
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

from virtstore.backends.base import Backend, VolumeRecord
from virtstore.backup.access import open_new_volume, open_reader, reads_directly, write_data
from virtstore.backup.repo import (
    TRACK_BITMAP,
    TRACK_HASH,
    Manifest,
    Repository,
    Unreadable,
    new_backup_id,
    sha256,
)
from virtstore.backup.repo import chunks_of as _chunks_of
from virtstore.backup.repo import now as _now
from virtstore.engine.index import VolumeIndex
from virtstore.engine.jobs import JobManager
from virtstore.engine.locks import READ, WRITE
from virtstore.engine.volumes import StagedTarget, VolumeManager
from virtstore.errors import AlreadyExists, InvalidArgument, NoSpace, Unsupported
from virtstore.types import JobInfo, PoolInfo
from virtstore.xml import PoolDef, VolDef, VolTarget

if TYPE_CHECKING:
    from virtstore.backup.access import Reader, Writer
    from virtstore.backup.move import Target
    from virtstore.data.monitor import Monitor

log = logging.getLogger("virtstore")

BITMAP_PREFIX = "virtstore-backup-"
# Chunk writers beside the reader, and chunks read ahead of the writes (memory: this
# many chunks).
_WRITERS = 3
_IN_FLIGHT = 6


def tracking_for(backend: Backend, pool: PoolDef, rec: VolumeRecord) -> str:
    """How changes between backups are found: a qcow2 file that qemu-img can mark
    keeps a persistent dirty bitmap; storage that diffs its own snapshots (RBD, a raw
    file on btrfs) says what changed since the last backup's snapshot; anything else is
    read whole and compared by hash."""
    if (backend.local_files(pool) and rec.type == "file" and rec.format == "qcow2"
            and rec.compat not in (None, "0.10") and not rec.encryption):
        return TRACK_BITMAP
    return backend.backup_tracking_for(pool, rec) or TRACK_HASH


class BackupOps:
    def __init__(self, volumes: VolumeManager, index: VolumeIndex, jobs: JobManager) -> None:
        self.volumes = volumes
        self.index = index
        self.jobs = jobs

    # -- backup ----------------------------------------------------------------
    def readable(self, pool_name: str, name: str,
                 what: str) -> tuple[PoolDef, Backend, VolumeRecord]:
        """The volume, checked for being read whole by ``open_reader`` (for ``what``)."""
        pool, backend = self.volumes._active_pool(pool_name)
        rec = self.index.get(pool_name, name)
        backend.check_volume(pool, rec)
        if not reads_directly(backend, pool, rec) and not backend.has_feature("export", pool,
                                                                             rec):
            raise backend.unsupported(what)
        if backend.local_files(pool) and rec.type == "file":
            # qemu-nbd and qemu-img open the path and read its backing chain themselves:
            # the same checks as an NBD export of the volume.
            from virtstore.host.files import refuse_symlink

            refuse_symlink(rec.path)
            self.volumes.check_chain(rec)
        return pool, backend, rec

    def backup(self, pool_name: str, name: str, directory: str, *, incremental: bool,
               bandwidth: int | None = None) -> JobInfo:
        pool, backend, rec = self.readable(pool_name, name, "volume backup")
        repo = Repository(directory)
        repo.init({"pool": pool_name, "name": name, "key": rec.key})
        tracking = tracking_for(backend, pool, rec)
        job_ids: list[str] = []

        def prepare(db: sqlite3.Connection, job_id: str) -> None:
            job_ids.append(job_id)

        def work(mon: Monitor) -> None:
            _Backup(repo, backend, pool, pool_name, rec, tracking, incremental, mon,
                    job_ids[0]).run()

        return self.jobs.start("backup", work, pool=pool_name, volume=name,
                               total=rec.capacity, bandwidth=bandwidth,
                               lock=[(pool_name, name, READ)], must_exist=[(pool_name, name)],
                               prepare=prepare)

    # -- restore ---------------------------------------------------------------
    def restore(self, directory: str, pool_name: str, new_name: str, *,
                format: str | None = None, point: str | None = None,
                bandwidth: int | None = None) -> JobInfo:
        repo = Repository.open_existing(directory)
        m = repo.manifest(point) if point else repo.latest()
        if m is None:
            raise InvalidArgument(f"'{repo.path}' holds no backup yet")
        tpool, tbe = self.volumes._active_pool(pool_name)
        if not tbe.supports("create_volume"):
            raise tbe.unsupported("volume restore")
        fmt = format or (m.format if m.format in tbe.caps.vol_formats
                         else tbe.caps.default_vol_format or "raw")

        def fill(out: Writer, mon: Monitor) -> None:
            # The next chunks are read and checked (file reads and SHA-256, both outside
            # the GIL) while this one is written.
            order = iter(sorted(m.chunks))
            ahead: deque[tuple[int, Future[bytes]]] = deque()
            with ThreadPoolExecutor(max_workers=_WRITERS, thread_name_prefix="restore") as pool:
                def more() -> None:
                    index = next(order, None)
                    if index is not None:
                        ahead.append((index, pool.submit(repo.read_chunk, m.chunks[index],
                                                         m.chunk_length(index))))

                for _ in range(_IN_FLIGHT):
                    more()
                while ahead:
                    index, fut = ahead.popleft()
                    more()
                    mon.check()
                    data = fut.result()
                    write_data(out, index * m.chunk_size, data)
                    mon.advance(len(data))

        return self._fill_new(pool_name, tpool, tbe, new_name, m.capacity, fmt, fill,
                              kind="restore", bandwidth=bandwidth,
                              total=sum(m.chunk_length(i) for i in m.chunks))

    def _fill_new(self, pool_name: str, tpool: PoolDef, tbe: Backend, new_name: str,
                  capacity: int, fmt: str, fill: Callable[[Writer, Monitor], None], *,
                  kind: str, bandwidth: int | None, total: int = 0,
                  source: tuple[str, str] | None = None,
                  after: Callable[[str, Monitor], None] | None = None,
                  fill_file: Callable[[str, str, Monitor], None] | None = None) -> JobInfo:
        """A job that makes volume ``new_name`` through staged creation and has ``fill``
        write its content: it takes the name only when all of it is written. ``source``:
        a volume the job holds for writing too; ``after(job_id, monitor)`` runs once the
        new volume has its name. ``fill_file(path, format, monitor)``: fills a new
        volume that is a plain local file (an unencrypted image in a file pool) by its
        path instead, with the data layer's own copy or qemu-img."""
        # Allocation 0: only what ``fill`` writes is allocated, the rest stays a hole.
        # A pool whose new volumes hold old bytes (LVs) gets a whole volume, zeroed
        # where nothing is written: its sparse volumes are snapshots that fill up.
        allocation = 0 if tbe.new_volumes_read_zeros else capacity
        vol = VolDef(name=new_name, capacity=capacity, capacity_given=True,
                     allocation=allocation, allocation_given=True,
                     target=VolTarget(format=fmt))
        req = self.volumes._request(tpool, tbe, vol, False)
        holder: list[StagedTarget] = []
        job_ids: list[str] = []

        def prepare(db: sqlite3.Connection, job_id: str) -> None:
            job_ids.append(job_id)
            holder.append(self.volumes.reserve_target(db, pool_name, tpool, tbe, new_name,
                                                      op=kind))

        def work(mon: Monitor) -> None:
            target = holder[0]
            try:
                tbe.create_volume(tpool, target.staging, req)
                if (fill_file is not None and tbe.local_files(tpool)
                        and target.staging.startswith("/") and req.encryption_secret is None):
                    fill_file(target.staging, req.format, mon)
                else:
                    with open_new_volume(tbe, tpool, target.staging, req.format) as out:
                        fill(out, mon)
            except BaseException:
                self.volumes.abort_target(target)
                raise
            self.volumes.finish_target(target)
            if after is not None:
                after(job_ids[0], mon)

        lock = [(pool_name, new_name, WRITE)]
        if source is not None:
            lock.append((*source, WRITE))
        return self.jobs.start(kind, work, pool=source[0] if source else None,
                               volume=source[1] if source else None,
                               target_pool=pool_name, target_volume=new_name, total=total,
                               bandwidth=bandwidth, lock=lock, prepare=prepare,
                               must_exist=[source] if source else [])

    # -- import ----------------------------------------------------------------
    def import_file(self, source: str, pool_name: str, new_name: str, *,
                    format: str | None = None, bandwidth: int | None = None) -> JobInfo:
        from virtstore.backup.importer import start_import

        return start_import(self, source, pool_name, new_name, format=format,
                            bandwidth=bandwidth)

    # -- move ------------------------------------------------------------------
    def move(self, pool_name: str, name: str, to_pool: str, *, new_name: str | None = None,
             format: str | None = None, bandwidth: int | None = None,
             target: Target | None = None) -> JobInfo:
        """``target``: the other host's engine (closed by the move), None for this one."""
        from virtstore.backup.move import start_move, start_move_to_host

        if target is not None:
            return start_move_to_host(self, pool_name, name, target, to_pool,
                                      new_name=new_name, format=format, bandwidth=bandwidth)
        return start_move(self, pool_name, name, to_pool, new_name=new_name, format=format,
                          bandwidth=bandwidth)

    def receive_check(self, pool_name: str, name: str, capacity: int, format: str | None,
                      like: str | None, required: int,
                      pool_info: Callable[[str], PoolInfo]) -> dict[str, Any]:
        """Whether a volume so described can be received into the pool: its format
        there and the bytes it needs, or the error (nothing is reserved)."""
        from virtstore.backup.migrate import Candidate, needed
        from virtstore.engine.names import check_volume_name

        check_volume_name(name)
        pdef, backend = self.volumes._active_pool(pool_name)
        if not backend.supports("create_volume"):
            raise backend.unsupported("volume receive")
        if capacity <= 0:
            raise InvalidArgument("a received volume's capacity must be positive")
        caps = backend.caps
        fmt = format or (like if like in caps.vol_formats else caps.default_vol_format or "raw")
        if fmt not in caps.vol_formats:
            raise InvalidArgument(f"pool '{pool_name}' makes no {fmt} volumes (only "
                                  f"{', '.join(caps.vol_formats) or 'none'})")
        if self.index.state_of(pool_name, name) is not None or backend.name_taken(pdef, name):
            raise AlreadyExists(f"storage volume '{name}' exists already in pool "
                                f"'{pool_name}'")
        available = pool_info(pool_name).available
        need = needed(Candidate(pdef, backend, available), capacity, required)
        if available < need:
            raise NoSpace(f"pool '{pool_name}' has {available} bytes free, {need} needed")
        return {"format": fmt, "needed": need, "available": available}

    def receive(self, pool_name: str, new_name: str, source: Iterable[tuple[int, bytes]],
                capacity: int, fmt: str, *, bandwidth: int | None = None) -> JobInfo:
        from virtstore.backup.move import start_receive

        return start_receive(self, pool_name, new_name, source, capacity, fmt,
                             bandwidth=bandwidth)

    def chunk_hashes(self, pool_name: str, name: str, *, offset: int = 0,
                     length: int | None = None) -> dict[str, Any]:
        from virtstore.backup.move import chunk_hashes
        from virtstore.backup.repo import CHUNK_SIZE

        if offset < 0 or offset % CHUNK_SIZE or (length is not None and length < 0):
            raise InvalidArgument(f"offset must be a multiple of {CHUNK_SIZE} and length "
                                  "not negative")
        pool, backend, rec = self.readable(pool_name, name, "volume checksums")
        end = rec.capacity if length is None else min(rec.capacity, offset + length)
        got = chunk_hashes(backend, pool, rec, first=offset // CHUNK_SIZE,
                           end=-(-end // CHUNK_SIZE))
        return {"chunk_size": CHUNK_SIZE, "capacity": rec.capacity,
                "chunks": {str(i): h for i, h in sorted(got.items())}}

    # -- verify ----------------------------------------------------------------
    def verify(self, directory: str) -> JobInfo:
        repo = Repository.open_existing(directory)

        def work(mon: Monitor) -> None:
            problems = verify_repository(repo, mon)
            if problems:
                shown = "; ".join(problems[:10])
                more = f" (and {len(problems) - 10} more)" if len(problems) > 10 else ""
                raise Unreadable(f"backup-verify found {len(problems)} problem(s) in "
                                 f"'{repo.path}': {shown}{more}")

        return self.jobs.start("backup-verify", work, pool=None, volume=None, total=0)


def list_backups(directory: str) -> list[dict[str, Any]]:
    return [m.summary() for m in Repository.open_existing(directory).manifests()]


def verify_repository(repo: Repository, mon: Monitor) -> list[str]:
    """Every chunk's bytes against its hash, every manifest's chunks and chain."""
    problems: list[str] = []
    good: dict[str, int] = {}
    names = list(repo.all_chunks())
    mon.set_total(sum(os.path.getsize(repo.chunk_path(n)) for n in names))
    for digest in names:
        mon.check()
        with open(repo.chunk_path(digest), "rb") as fh:
            data = fh.read()
        if sha256(data) != digest:
            problems.append(f"chunk {digest} is damaged (its content does not match its hash)")
        else:
            good[digest] = len(data)
        mon.advance(len(data))
    ids = set(repo.ids())
    for mid in sorted(ids):
        try:
            m = repo.manifest(mid)
        except (InvalidArgument, Unreadable) as exc:
            problems.append(str(exc))
            continue
        if m.parent is not None and m.parent not in ids:
            problems.append(f"backup {m.id}: its parent {m.parent} is missing")
        if m.kind == "incremental" and m.parent is None:
            problems.append(f"backup {m.id}: an incremental backup without a parent")
        if m.chunk_size != repo.chunk_size:
            problems.append(f"backup {m.id}: chunk size {m.chunk_size} differs from the "
                            f"directory's {repo.chunk_size}")
        for index, digest in sorted(m.chunks.items()):
            if index < 0 or index * m.chunk_size >= m.capacity:
                problems.append(f"backup {m.id}: chunk {index} lies past the volume's end")
            elif digest not in good:
                what = "damaged" if digest in names else "missing"
                problems.append(f"backup {m.id}: chunk {index} ({digest}) is {what}")
            elif good[digest] != m.chunk_length(index):
                problems.append(f"backup {m.id}: chunk {index} ({digest}) has "
                                f"{good[digest]} bytes, not {m.chunk_length(index)}")
    return problems


class _Backup:
    """One backup run, in the job's thread."""

    def __init__(self, repo: Repository, backend: Backend, pool: PoolDef, pool_name: str,
                 rec: VolumeRecord, tracking: str, incremental: bool, mon: Monitor,
                 job_id: str | None) -> None:
        self.repo = repo
        self.backend = backend
        self.pool = pool
        self.rec = rec
        self.mon = mon
        self.chunk = repo.chunk_size
        self.warnings: list[str] = []
        self.m = Manifest(
            id=new_backup_id(), created=_now(), kind="full", parent=None,
            volume={"pool": pool_name, "name": rec.name, "key": rec.key},
            pool_type=pool.type, format=rec.format or "raw", capacity=rec.capacity,
            chunk_size=self.chunk, tracking=tracking, job=job_id)
        # The directory's newest backup: its storage snapshot is dropped once this one
        # is made, whatever this one's kind (the chain moves on).
        self.previous = repo.latest()
        self.parent = self.previous if incremental else None
        if incremental and self.parent is None:
            self.warn("no earlier backup in the directory: this backup is a full one")

    def warn(self, text: str) -> None:
        log.warning("backup of volume '%s': %s", self.rec.name, text)
        self.warnings.append(text)

    def _usable_parent(self) -> Manifest | None:
        p = self.parent
        if p is None:
            return None
        if p.capacity != self.rec.capacity:
            self.warn(f"the volume's capacity changed since backup {p.id} "
                      f"({p.capacity} -> {self.rec.capacity} bytes): full backup")
            return None
        if p.format != self.m.format:
            self.warn(f"the volume's format changed since backup {p.id}: full backup")
            return None
        return p

    def run(self) -> None:
        parent = self._usable_parent()
        if self.m.tracking == TRACK_BITMAP:
            self._run_bitmap(parent)
        elif self.m.tracking != TRACK_HASH:
            self._run_snapshot(parent)
        else:
            self._run_hash(parent)

    def _run_snapshot(self, parent: Manifest | None) -> None:
        """Read a snapshot taken now: all of its data, or, after a backup whose snapshot
        is still there, only what the storage says changed since that one."""
        be, pool, rec = self.backend, self.pool, self.rec
        since = None
        if parent is not None:
            if parent.tracking != self.m.tracking or parent.snapshot is None:
                self.warn(f"backup {parent.id} recorded no storage snapshot: full backup")
            elif not be.backup_snapshot_exists(pool, rec, parent.snapshot):
                self.warn(f"snapshot '{parent.snapshot}' is missing from the volume: "
                          "full backup")
            else:
                since = parent.snapshot
        snap = be.backup_snapshot(pool, rec, self.m.id)
        self.m.snapshot = snap
        try:
            changed, holes = be.backup_changes(pool, rec, snap, since)
            todo = _chunks_of(changed, self.chunk, rec.capacity)
            base = parent if since is not None else None
            if base is not None:
                # A chunk that was all zeros and is a hole still is unchanged.
                todo |= _chunks_of(holes, self.chunk, rec.capacity) & base.chunks.keys()
            inherited = ({i: h for i, h in base.chunks.items() if i not in todo}
                         if base is not None else {})
            with open_reader(be, pool, rec, snapshot=snap) as reader:
                self._copy(reader, todo, inherited, base)
        except BaseException:
            self._drop_snapshot(snap)
            raise
        prev = self.previous
        if prev is not None and prev.snapshot and prev.tracking == self.m.tracking:
            self._drop_snapshot(prev.snapshot)

    def _drop_snapshot(self, snap: str) -> None:
        try:
            self.backend.backup_snapshot_drop(self.pool, self.rec, snap)
        except Exception as exc:
            log.warning("could not remove snapshot '%s' of volume '%s': %s", snap,
                        self.rec.name, exc)

    def _run_hash(self, parent: Manifest | None) -> None:
        """Read every chunk that may hold data; chunks whose hash is stored already (the
        unchanged ones) are not written again."""
        with contextlib.ExitStack() as stack:
            frozen = None
            if self.backend.supports("frozen_source"):
                try:
                    frozen = stack.enter_context(self.backend.frozen_source(self.pool,
                                                                            self.rec))
                    self.m.snapshot = "frozen copy"
                except Unsupported:
                    pass  # the live volume is read, as on any other storage
            reader = stack.enter_context(open_reader(self.backend, self.pool, self.rec,
                                                     frozen=frozen))
            todo = _chunks_of(reader.data_extents(), self.chunk, self.rec.capacity)
            self._copy(reader, todo, {}, parent)

    def _run_bitmap(self, parent: Manifest | None) -> None:
        from virtstore.formats.bitmaps import add_bitmap, list_bitmaps, remove_bitmap

        path = self.rec.path
        have = {b.name: b for b in list_bitmaps(path)}
        since = None
        if parent is not None:
            old = have.get(parent.bitmap or "")
            if parent.tracking != TRACK_BITMAP or parent.bitmap is None:
                self.warn(f"backup {parent.id} recorded no dirty bitmap: full backup")
            elif old is None:
                self.warn(f"dirty bitmap '{parent.bitmap}' is missing from the image: "
                          "full backup")
            elif not old.usable:
                self.warn(f"dirty bitmap '{parent.bitmap}' cannot be trusted (flags: "
                          f"{', '.join(old.flags) or 'none'}): full backup")
            else:
                since = parent.bitmap
        new = BITMAP_PREFIX + self.m.id
        # Added before the data is read: it records every write after this point. The
        # volume is held for reading, so nothing writes in between.
        add_bitmap(path, new)
        self.m.bitmap = new
        try:
            with open_reader(self.backend, self.pool, self.rec, bitmap=since) as reader:
                if since is not None and parent is not None:
                    todo = _chunks_of(reader.dirty_extents(), self.chunk, self.rec.capacity)
                    inherited = {i: h for i, h in parent.chunks.items() if i not in todo}
                    self._copy(reader, todo, inherited, parent)
                else:
                    todo = _chunks_of(reader.data_extents(), self.chunk, self.rec.capacity)
                    self._copy(reader, todo, {}, None)
        except BaseException:
            try:
                remove_bitmap(path, new)
            except Exception as exc:
                log.warning("could not remove dirty bitmap '%s' from '%s': %s", new, path, exc)
            raise
        # Only this chain's bitmaps go: another directory's chain keeps its own.
        if parent is not None and parent.bitmap and parent.bitmap in have:
            try:
                remove_bitmap(path, parent.bitmap)
            except Exception as exc:
                log.warning("could not remove dirty bitmap '%s' from '%s': %s",
                            parent.bitmap, path, exc)

    def _copy(self, reader: Reader, todo: set[int], inherited: dict[int, str],
              parent: Manifest | None) -> None:
        from virtstore.data.extents import is_zero

        m = self.m
        if parent is not None:
            m.kind, m.parent = "incremental", parent.id
        self.mon.set_total(sum(m.chunk_length(i) for i in todo))
        stats = {"chunks_read": 0, "bytes_read": 0, "chunks_written": 0, "bytes_written": 0,
                 "chunks_zero": 0}
        chunks = dict(inherited)
        pending: deque[tuple[int, int, Future[tuple[str, bool] | None]]] = deque()

        def one(index: int, length: int) -> tuple[str, bool] | None:
            data = reader.read(index * self.chunk, length)
            return None if is_zero(data) else self.repo.put_chunk(data)

        def settle(keep: int) -> None:
            while len(pending) > keep:
                index, length, fut = pending.popleft()
                stored = fut.result()
                stats["chunks_read"] += 1
                stats["bytes_read"] += length
                if stored is None:
                    stats["chunks_zero"] += 1
                else:
                    chunks[index], written = stored
                    if written:
                        stats["chunks_written"] += 1
                        stats["bytes_written"] += length
                self.mon.advance(length)

        # Each chunk is read, hashed and written (fsynced: a backup must be on disk when
        # its manifest says so) in a worker, several at once: a read through qemu-nbd
        # and a synced write are waits that one chunk after another would add up.
        with ThreadPoolExecutor(max_workers=_WRITERS, thread_name_prefix="backup") as pool:
            for index in sorted(todo):
                self.mon.check()
                length = m.chunk_length(index)
                pending.append((index, length, pool.submit(one, index, length)))
                settle(_IN_FLIGHT)
            settle(0)
        m.chunks = chunks
        m.stats = stats
        m.warnings = self.warnings
        m.created = _now()
        self.repo.write_manifest(m)


