"""vol-move: a volume copied into another pool (any type and format the pool makes),
the copy read back and checked against the source chunk by chunk, then the source
deleted, in one job.

The copy is made as a restore is (staged: no name until it is whole) while the job holds
the source for writing, so nothing changes it in between. A failed or cancelled copy
leaves no new volume; a copy that does not read back as the source, or a source that
cannot be deleted, has the new volume deleted again: the source stays, unchanged. Only
a process killed between the copy's publication and the source's deletion leaves both.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from virtstore.backup.access import open_reader, write_data
from virtstore.backup.repo import CHUNK_SIZE, sha256
from virtstore.errors import InvalidArgument, OperationInvalid
from virtstore.types import JobInfo

if TYPE_CHECKING:
    from virtstore.backup.access import Reader, Writer
    from virtstore.backup.ops import BackupOps
    from virtstore.data.monitor import Monitor

log = logging.getLogger("virtstore")


def _chunks(reader: Reader, capacity: int) -> list[int]:
    from virtstore.backup.ops import _chunks_of

    return sorted(_chunks_of(reader.data_extents(), CHUNK_SIZE, capacity))


def _length(index: int, capacity: int) -> int:
    return min(CHUNK_SIZE, capacity - index * CHUNK_SIZE)


def start_move(ops: BackupOps, pool_name: str, name: str, to_pool: str, *,
               new_name: str | None, format: str | None,
               bandwidth: int | None) -> JobInfo:
    new = new_name or name
    if (to_pool, new) == (pool_name, name):
        raise InvalidArgument("a volume moves to another pool or under another name")
    spool, sbe, rec = ops.readable(pool_name, name, "volume move")
    if not sbe.supports("delete_volume"):
        raise sbe.unsupported("volume move (its volumes cannot be deleted)")
    tpool, tbe = ops.volumes._active_pool(to_pool)
    if not tbe.supports("create_volume"):
        raise tbe.unsupported("volume move")
    fmt = format or (rec.format if rec.format in tbe.caps.vol_formats
                     else tbe.caps.default_vol_format or "raw")
    # Chunk index -> SHA-256 of what the source holds there (all zeros: absent).
    copied: dict[int, str] = {}

    def fill(out: Writer, mon: Monitor) -> None:
        from virtstore.data.extents import is_zero

        with open_reader(sbe, spool, rec) as reader:
            todo = _chunks(reader, rec.capacity)
            # Copied, then read back from the copy.
            mon.set_total(2 * sum(_length(i, rec.capacity) for i in todo))
            for index in todo:
                mon.check()
                n = _length(index, rec.capacity)
                data = reader.read(index * CHUNK_SIZE, n)
                if not is_zero(data):
                    write_data(out, index * CHUNK_SIZE, data)
                    copied[index] = sha256(data)
                mon.advance(n)

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


def _check_copy(ops: BackupOps, pool_name: str, name: str, source: str, capacity: int,
                copied: dict[int, str], mon: Monitor) -> None:
    """Read the new volume as any reader would (through its format) and compare every
    chunk that either side holds with the source's."""
    from virtstore.data.extents import is_zero

    pool, backend = ops.volumes._active_pool(pool_name)
    rec = ops.index.get(pool_name, name)
    with open_reader(backend, pool, rec) as reader:
        if reader.capacity < capacity:
            raise OperationInvalid(f"the copy of volume '{source}' is smaller than it "
                                   f"({reader.capacity} < {capacity} bytes): the source is "
                                   "kept")
        for index in sorted(set(_chunks(reader, capacity)) | set(copied)):
            mon.check()
            n = _length(index, capacity)
            data = reader.read(index * CHUNK_SIZE, n)
            got = None if is_zero(data) else sha256(data)
            if got != copied.get(index):
                raise OperationInvalid(f"the copy of volume '{source}' differs from it at "
                                       f"byte {index * CHUNK_SIZE}: the source is kept")
            mon.advance(n)
