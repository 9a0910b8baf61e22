"""vol-import: a file, a block device or an NBD export into a new volume; an import
from an NBD export is resumable.

The new volume is made as a restore makes it (staged: no name until it is whole). What
is read from an NBD export (a p2v source over the network, where reading again is what
costs) is also kept, chunk by chunk, in a checkpoint under the state root
(``imports/KEY/``: the backup directory format, one manifest whose chunks are the ones
read so far and ``stats.done_through`` the last chunk index done). When such an import
fails or its process is killed, the next vol-import of the same export into the same
pool and name takes every chunk up to that index from the checkpoint, each checked
against its SHA-256, and reads the export only from there on. An export whose size
changed starts over. The checkpoint goes when the import succeeds or is cancelled; it
costs as much disk as the data read until then. A local file or device is not
checkpointed: reading it again costs what reading a checkpoint would, and writing one
would make every import several times slower.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from functools import partial
from typing import TYPE_CHECKING

from virtstore.backup.access import is_nbd, open_source, write_data
from virtstore.backup.repo import CHUNK_SIZE, Manifest, Repository, Unreadable, chunks_of, now
from virtstore.errors import Cancelled, InvalidArgument
from virtstore.types import JobInfo

if TYPE_CHECKING:
    from virtstore.backup.access import Reader, Writer
    from virtstore.backup.ops import BackupOps
    from virtstore.data.monitor import Monitor

log = logging.getLogger("virtstore")

# The checkpoint's manifest is rewritten after this many chunks (and at a failure):
# what a kill can lose.
_SAVE_EVERY = 8


def _checkpoint_dir(ops: BackupOps, source: str, pool: str, name: str) -> str:
    key = hashlib.sha256(json.dumps([source, pool, name]).encode()).hexdigest()[:24]
    return os.path.join(ops.volumes.state.root, "imports", key)


def _resume_point(repo: Repository, ident: str) -> Manifest | None:
    """The checkpoint's manifest when it belongs to this very source, else None (and
    the stale checkpoint is dropped)."""
    if not repo.exists:
        return None
    try:
        m = repo.manifest("import")
        if m.volume.get("key") == ident and m.chunk_size == CHUNK_SIZE:
            return m
    except (InvalidArgument, Unreadable):
        pass
    log.warning("vol-import: checkpoint '%s' is for another source or damaged: "
                "starting over", repo.path)
    shutil.rmtree(repo.path, ignore_errors=True)
    return None


def start_import(ops: BackupOps, source: str, pool_name: str, new_name: str, *,
                 format: str | None, bandwidth: int | None) -> JobInfo:
    with open_source(source) as probe:  # a clear error now, not inside the job
        capacity = probe.capacity
    tpool, tbe = ops.volumes._active_pool(pool_name)
    if not tbe.supports("create_volume"):
        raise tbe.unsupported("volume import")
    ckdir = _checkpoint_dir(ops, source, pool_name, new_name) if is_nbd(source) else None
    resumed: list[int] = []

    def fill(out: Writer, mon: Monitor) -> None:
        from virtstore.data.extents import is_zero

        with open_source(source) as reader:
            todo = sorted(chunks_of(reader.data_extents(), CHUNK_SIZE, capacity))
            mon.set_total(sum(min(CHUNK_SIZE, capacity - i * CHUNK_SIZE) for i in todo))
            if ckdir is not None:
                resumed.append(_checkpointed(ckdir, source, reader, todo, out, mon))
                return
            for index in todo:
                mon.check()
                n = min(CHUNK_SIZE, capacity - index * CHUNK_SIZE)
                data = reader.read(index * CHUNK_SIZE, n)
                if not is_zero(data):
                    write_data(out, index * CHUNK_SIZE, data)
                mon.advance(n)

    def after(job_id: str, mon: Monitor) -> None:
        if resumed and resumed[0]:
            log.info("vol-import of '%s': %d bytes taken from the checkpoint of an earlier "
                     "attempt", source, resumed[0])
        if ckdir is not None:
            shutil.rmtree(ckdir, ignore_errors=True)

    return ops._fill_new(pool_name, tpool, tbe, new_name, capacity,
                         format or tbe.caps.default_vol_format or "raw", fill, kind="import",
                         bandwidth=bandwidth, after=after,
                         fill_file=None if ckdir is not None else partial(_copy_file, source))


def _copy_file(source: str, staging: str, fmt: str, mon: Monitor) -> None:
    """A file or device of this host into a new local image file: into raw by the data
    layer's sparse copy (data extents only, all-zero blocks left as holes), into any
    other format by ``qemu-img convert`` (which leaves zero clusters out); synced."""
    from virtstore.data.copy import copy_sparse
    from virtstore.data.extents import size_of
    from virtstore.host.files import fsync_path, open_volume

    if fmt == "raw":
        src = open_volume(source, os.O_RDONLY)
        try:
            dst = open_volume(staging, os.O_WRONLY)
            try:
                copy_sparse(src, dst, length=size_of(src), monitor=mon, detect_zeroes=True,
                            dst_zeroed=True)
                os.fsync(dst)
            finally:
                os.close(dst)
        finally:
            os.close(src)
        return
    from virtstore.data.convert import convert

    convert(source, "raw", staging, fmt, monitor=mon, target_exists=True)
    fsync_path(staging)


def _checkpointed(ckdir: str, source: str, reader: Reader, todo: list[int], out: Writer,
                  mon: Monitor) -> int:
    """Copy the chunks ``todo`` through the checkpoint in ``ckdir``; the bytes taken from
    an earlier attempt's checkpoint instead of the source."""
    from virtstore.data.extents import is_zero

    ident = json.dumps({"source": source, "capacity": reader.capacity})
    repo = Repository(ckdir)
    prev = _resume_point(repo, ident)
    repo = Repository(ckdir)
    repo.init({"pool": "", "name": "", "key": ident})
    m = prev or Manifest(id="import", created=now(), kind="full", parent=None,
                         volume={"pool": "", "name": "", "key": ident}, pool_type="",
                         format="raw", capacity=reader.capacity, chunk_size=CHUNK_SIZE,
                         tracking="import")
    done_through = m.stats.get("done_through", -1)
    resumed = unsaved = 0
    try:
        for index in todo:
            mon.check()
            n = m.chunk_length(index)
            if index <= done_through:
                if index in m.chunks:
                    write_data(out, index * CHUNK_SIZE, repo.read_chunk(m.chunks[index], n))
                resumed += n
            else:
                data = reader.read(index * CHUNK_SIZE, n)
                if not is_zero(data):
                    m.chunks[index], _ = repo.put_chunk(data)
                    write_data(out, index * CHUNK_SIZE, data)
                m.stats["done_through"] = index
                unsaved += 1
                if unsaved >= _SAVE_EVERY:
                    repo.write_manifest(m)
                    unsaved = 0
            mon.advance(n)
    except Cancelled:
        shutil.rmtree(ckdir, ignore_errors=True)
        raise
    except BaseException:
        if unsaved:
            repo.write_manifest(m)
        raise
    return resumed
