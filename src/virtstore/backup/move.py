"""vol-move: a volume copied into another pool (any type and format the pool makes), of
this engine or of another host's virtstored, the copy read back and checked against
the source chunk by chunk, then the source deleted, in one job.

The copy is made as a restore is (staged: no name until it is whole) while the job holds
the source for writing, so nothing changes it in between. A failed or cancelled copy
leaves no new volume; a copy that does not read back as the source, or a source that
cannot be deleted, has the new volume deleted again: the source stays, unchanged. Only
a process killed between the copy's publication and the source's deletion leaves both.

To another host, the copy travels through the target's API: ``volume_receive`` takes
the source's data pieces (holes stay holes on the wire) into a staged volume that gets
its name only when the stream ended whole, and ``volume_chunk_hashes`` reads the copy
back there, so only hashes cross the network for the check.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, Any, Protocol

from virtstore.backup.access import open_reader, write_data
from virtstore.backup.repo import CHUNK_SIZE, chunks_of, sha256
from virtstore.engine.locks import WRITE
from virtstore.errors import InvalidArgument, OperationInvalid
from virtstore.types import JobInfo

if TYPE_CHECKING:
    from virtstore.backends.base import Backend, VolumeRecord
    from virtstore.backup.access import Reader, Writer
    from virtstore.backup.ops import BackupOps
    from virtstore.data.monitor import Monitor
    from virtstore.xml import PoolDef

log = logging.getLogger("virtstore")

# Chunks of data the target reads back and hashes per call (1 GiB).
_CHECK_STEP = 256


class Target(Protocol):
    """What a move needs of the other host's engine (a ``Connection`` to it)."""

    uri: str

    def volume_receive_check(self, pool: str, name: str, capacity: int, *,
                             format: str | None = None, like: str | None = None,
                             required: int = 0) -> dict[str, Any]: ...

    def volume_receive(self, pool: str, name: str, source: Iterable[tuple[int, bytes]],
                       capacity: int, *, format: str | None = None, like: str | None = None,
                       required: int = 0, bandwidth: int | None = None) -> JobInfo: ...

    def volume_chunk_hashes(self, pool: str, name: str, *, offset: int = 0,
                            length: int | None = None) -> dict[str, Any]: ...

    def job_wait(self, job_id: str, timeout: float | None = None) -> JobInfo: ...

    def volume_delete(self, pool: str, name: str) -> None: ...

    def close(self) -> None: ...


def _chunks(reader: Reader, capacity: int) -> list[int]:

    return sorted(chunks_of(reader.data_extents(), CHUNK_SIZE, capacity))


def _length(index: int, capacity: int) -> int:
    return min(CHUNK_SIZE, capacity - index * CHUNK_SIZE)


def chunk_hashes(backend: Backend, pool: PoolDef, rec: VolumeRecord,
                 mon: Monitor | None = None, *, first: int = 0,
                 end: int | None = None) -> dict[int, str]:
    """SHA-256 of every CHUNK_SIZE chunk (of indexes ``first`` to ``end``) of the volume
    that holds anything but zeros, read as any reader would (through its format)."""
    from virtstore.data.extents import is_zero

    out: dict[int, str] = {}
    with open_reader(backend, pool, rec) as reader:
        for index in _chunks(reader, rec.capacity):
            if index < first or (end is not None and index >= end):
                continue
            if mon is not None:
                mon.check()
            n = _length(index, rec.capacity)
            data = reader.read(index * CHUNK_SIZE, n)
            if not is_zero(data):
                out[index] = sha256(data)
            if mon is not None:
                mon.advance(n)
    return out


def _compare(source: str, copied: dict[int, str], got: dict[int, str]) -> None:
    for index in sorted(set(copied) | set(got)):
        if copied.get(index) != got.get(index):
            raise OperationInvalid(f"the copy of volume '{source}' differs from it at "
                                   f"byte {index * CHUNK_SIZE}: the source is kept")


def _source_data(reader: Reader, capacity: int, copied: dict[int, str],
                 mon: Monitor) -> Iterator[tuple[int, bytes]]:
    """The source's chunks that hold data, recording each one's hash in ``copied``."""
    from virtstore.data.extents import is_zero

    for index in _chunks(reader, capacity):
        mon.check()
        n = _length(index, capacity)
        data = reader.read(index * CHUNK_SIZE, n)
        if not is_zero(data):
            copied[index] = sha256(data)
            yield index * CHUNK_SIZE, data
        mon.advance(n)


def start_move(ops: BackupOps, pool_name: str, name: str, to_pool: str, *,
               new_name: str | None, format: str | None,
               bandwidth: int | None) -> JobInfo:
    new = new_name or name
    if (to_pool, new) == (pool_name, name):
        raise InvalidArgument("a volume moves to another pool or under another name")
    spool, sbe, rec = _movable(ops, pool_name, name)
    tpool, tbe = ops.volumes._active_pool(to_pool)
    if not tbe.supports("create_volume"):
        raise tbe.unsupported("volume move")
    fmt = format or (rec.format if rec.format in tbe.caps.vol_formats
                     else tbe.caps.default_vol_format or "raw")
    # Chunk index -> SHA-256 of what the source holds there (all zeros: absent).
    copied: dict[int, str] = {}

    def fill(out: Writer, mon: Monitor) -> None:
        with open_reader(sbe, spool, rec) as reader:
            # Copied, then read back from the copy.
            mon.set_total(2 * sum(_length(i, rec.capacity)
                                  for i in _chunks(reader, rec.capacity)))
            for offset, data in _source_data(reader, rec.capacity, copied, mon):
                write_data(out, offset, data)

    def after(job_id: str, mon: Monitor) -> None:
        try:
            _check_copy(ops, to_pool, new, name, rec.capacity, copied, mon)
            ops.volumes.delete(pool_name, name, owner=job_id)
        except BaseException:
            try:
                ops.volumes.delete(to_pool, new, owner=job_id)
            except Exception as exc:
                log.warning("vol-move of '%s': could not delete the copy '%s' of pool "
                            "'%s' again: %s", name, new, to_pool, exc)
            raise

    return ops._fill_new(to_pool, tpool, tbe, new, rec.capacity, fmt, fill, kind="move",
                         bandwidth=bandwidth, source=(pool_name, name), after=after)


def _movable(ops: BackupOps, pool_name: str,
             name: str) -> tuple[PoolDef, Backend, VolumeRecord]:
    spool, sbe, rec = ops.readable(pool_name, name, "volume move")
    if not sbe.supports("delete_volume"):
        raise sbe.unsupported("volume move (its volumes cannot be deleted)")
    return spool, sbe, rec


def _check_copy(ops: BackupOps, pool_name: str, name: str, source: str, capacity: int,
                copied: dict[int, str], mon: Monitor) -> None:
    """Read the new volume as any reader would (through its format) and compare every
    chunk that either side holds with the source's."""
    pool, backend = ops.volumes._active_pool(pool_name)
    rec = ops.index.get(pool_name, name)
    if rec.capacity < capacity:
        raise OperationInvalid(f"the copy of volume '{source}' is smaller than it "
                               f"({rec.capacity} < {capacity} bytes): the source is kept")
    _compare(source, copied, chunk_hashes(backend, pool, rec, mon))


def start_move_to_host(ops: BackupOps, pool_name: str, name: str, target: Target,
                       to_pool: str, *, new_name: str | None, format: str | None,
                       bandwidth: int | None) -> JobInfo:
    """The move to another host's ``to_pool``. Takes ``target`` over: it is closed when
    the job ends (or at once when the job does not start)."""
    from virtstore.backup.migrate import describe

    new = new_name or name
    try:
        spool, sbe, rec = _movable(ops, pool_name, name)
        like = rec.format or "raw"
        required = int(describe(sbe, spool, rec)["required"])
        # Refused before anything is copied: a name taken there, a pool without the
        # room or the format.
        target.volume_receive_check(to_pool, new, rec.capacity, format=format, like=like,
                                    required=required)
    except BaseException:
        target.close()
        raise
    copied: dict[int, str] = {}
    job_ids: list[str] = []

    def work(mon: Monitor) -> None:
        try:
            _copy_to_host(ops, pool_name, name, spool, sbe, rec, target, to_pool, new,
                          format, like, required, copied, mon, job_ids[0])
        finally:
            target.close()

    def prepare(db: object, job_id: str) -> None:
        job_ids.append(job_id)

    try:
        return ops.jobs.start("move", work, pool=pool_name, volume=name,
                              target_pool=to_pool, target_volume=new, bandwidth=bandwidth,
                              lock=[(pool_name, name, WRITE)],
                              must_exist=[(pool_name, name)], prepare=prepare)
    except BaseException:
        target.close()
        raise


def _copy_to_host(ops: BackupOps, pool_name: str, name: str, spool: PoolDef, sbe: Backend,
                  rec: VolumeRecord, target: Target, to_pool: str, new: str,
                  format: str | None, like: str, required: int, copied: dict[int, str],
                  mon: Monitor, job_id: str) -> None:
    where = f"pool '{to_pool}' of {target.uri}"
    with open_reader(sbe, spool, rec) as reader:
        total = sum(_length(i, rec.capacity) for i in _chunks(reader, rec.capacity))
        mon.set_total(2 * total)
        # The target publishes the copy only when the stream ended whole: a failure or
        # a cancel here cuts the stream and leaves nothing there.
        job = target.volume_receive(to_pool, new,
                                    _source_data(reader, rec.capacity, copied, mon),
                                    rec.capacity, format=format, like=like,
                                    required=required)
        if not job.finished:
            job = target.job_wait(job.id)
        if job.state != "done":
            raise OperationInvalid(f"the copy of volume '{name}' into {where} failed: "
                                   f"{job.error or job.state}")
    try:
        checked = 0
        for first, end in _check_ranges(sorted(copied), rec.capacity):
            mon.check()
            answer = target.volume_chunk_hashes(to_pool, new, offset=first * CHUNK_SIZE,
                                                length=(end - first) * CHUNK_SIZE)
            if (int(answer["chunk_size"]) != CHUNK_SIZE
                    or int(answer["capacity"]) < rec.capacity):
                raise OperationInvalid(f"the copy of volume '{name}' in {where} does not "
                                       "have its size: the source is kept")
            _compare(name, {i: h for i, h in copied.items() if first <= i < end},
                     {int(k): str(v) for k, v in answer["chunks"].items()})
            n = sum(_length(i, rec.capacity) for i in copied if first <= i < end)
            mon.advance(n)
            checked += n
        mon.advance(total - checked)
        mon.check()
        ops.volumes.delete(pool_name, name, owner=job_id)
    except BaseException:
        try:
            target.volume_delete(to_pool, new)
        except Exception as exc:
            log.warning("vol-move of '%s': could not delete the copy '%s' of %s again: %s",
                        name, new, where, exc)
        raise


def _check_ranges(data: list[int], capacity: int) -> Iterator[tuple[int, int]]:
    """Chunk index ranges [first, end) covering the volume, each with at most
    _CHECK_STEP of the chunks in ``data`` (sorted): one call of the target each, short
    enough for one request and for progress to move."""
    first = 0
    for k in range(_CHECK_STEP, len(data), _CHECK_STEP):
        yield first, data[k]
        first = data[k]
    yield first, -(-capacity // CHUNK_SIZE)


def start_receive(ops: BackupOps, pool_name: str, name: str,
                  source: Iterable[tuple[int, bytes]], capacity: int, fmt: str, *,
                  bandwidth: int | None) -> JobInfo:
    """A new volume ``name`` of ``capacity`` bytes, in ``fmt``, holding the ``(offset,
    data)`` pieces of ``source`` (in increasing order; zeros elsewhere); it gets its name
    only when ``source`` ended without an error."""
    tpool, tbe = ops.volumes._active_pool(pool_name)

    def fill(out: Writer, mon: Monitor) -> None:
        end = 0
        for offset, data in source:
            mon.check()
            if offset < end or offset + len(data) > capacity:
                raise InvalidArgument(f"received data out of order or past the volume's "
                                      f"end (at byte {offset})")
            write_data(out, offset, data)
            end = offset + len(data)
            mon.advance(len(data))

    return ops._fill_new(pool_name, tpool, tbe, name, capacity, fmt, fill, kind="receive",
                         bandwidth=bandwidth)
