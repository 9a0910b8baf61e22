"""Reading a volume for a backup and writing one for a restore.

A raw volume that is a local file is read directly (``pread``, holes found with
``SEEK_DATA``): no process in between, and no format to interpret. Every other
volume is read the way qemu opens it (the backend's ``qemu_source``): qemu-nbd serves
it read-only on a private socket, virtstore's NBD client reads it, and ``qemu-img
map`` over the same socket says where data is and, for a qcow2 with a dirty bitmap,
which extents changed. A restore writes a new raw file directly and any other new
volume through a writable qemu-nbd export of its staging object.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Protocol

from virtstore.backends.base import Backend, VolumeRecord
from virtstore.errors import Unsupported
from virtstore.xml import PoolDef

if TYPE_CHECKING:
    from virtstore.host.nbd import NbdAddress, NbdClient, QemuSource


class Reader(Protocol):
    capacity: int

    def read(self, offset: int, length: int) -> bytes: ...

    def data_extents(self) -> list[tuple[int, int]]:
        """Where the volume may hold data; outside these it reads as zeros."""
        ...

    def dirty_extents(self) -> list[tuple[int, int]]:
        """What changed since the bitmap the reader was opened with."""
        ...


def is_nbd(source: str) -> bool:
    return source.startswith(("nbd:", "nbd+"))


@contextlib.contextmanager
def open_source(source: str) -> Iterator[Reader]:
    """vol-import's source: a file or block device of this host, read as raw bytes, or
    an NBD export (``nbd://HOST[:PORT]/EXPORT``, ``nbd+unix:///EXPORT?socket=PATH``)."""
    if is_nbd(source):
        from virtstore.host.nbd import NbdClient, parse_url

        addr = parse_url(source)
        with NbdClient(addr) as client:
            yield _NbdReader(client, addr, client.size, None)
        return
    from virtstore.data.extents import size_of
    from virtstore.host.files import open_volume

    fd = open_volume(source, os.O_RDONLY)
    try:
        yield _FileReader(fd, size_of(fd))
    finally:
        os.close(fd)


class Writer(Protocol):
    def write(self, offset: int, data: bytes | memoryview) -> None: ...


class _FileReader:
    def __init__(self, fd: int, capacity: int) -> None:
        self.fd = fd
        self.capacity = capacity

    def read(self, offset: int, length: int) -> bytes:
        data = os.pread(self.fd, length, offset)
        # A file shorter than its capacity reads as zeros past its end.
        return data + bytes(length - len(data)) if len(data) < length else data

    def data_extents(self) -> list[tuple[int, int]]:
        from virtstore.data.extents import data_extents

        return list(data_extents(self.fd, 0, self.capacity))

    def dirty_extents(self) -> list[tuple[int, int]]:
        raise Unsupported("a raw file keeps no dirty bitmap")


class _NbdReader:
    """Reads from any number of threads at once: each read takes an idle connection to
    the export, or opens one more (qemu-nbd serves several), so reads of the next chunks
    are in flight together instead of one at a time."""

    def __init__(self, client: NbdClient, address: NbdAddress, capacity: int,
                 bitmap: str | None) -> None:
        self.address = address
        self.capacity = capacity
        self.bitmap = bitmap
        self._idle = [client]
        self._extra: list[NbdClient] = []
        self._lock = threading.Lock()

    def read(self, offset: int, length: int) -> bytes:
        from virtstore.host.nbd import NbdClient

        with self._lock:
            client = self._idle.pop() if self._idle else None
        if client is None:
            client = NbdClient(self.address)
            with self._lock:
                self._extra.append(client)
        try:
            return client.pread(offset, length)
        finally:
            with self._lock:
                self._idle.append(client)

    def close_extra(self) -> None:
        with self._lock:
            extra, self._extra = self._extra, []
        for client in extra:
            client.close()

    def data_extents(self) -> list[tuple[int, int]]:
        from virtstore.formats.bitmaps import data_extents

        return data_extents(self.address)

    def dirty_extents(self) -> list[tuple[int, int]]:
        from virtstore.formats.bitmaps import dirty_extents

        if self.bitmap is None:
            raise Unsupported("the volume was opened without a dirty bitmap")
        return dirty_extents(self.address, self.bitmap)


def reads_directly(backend: Backend, pool: PoolDef, rec: VolumeRecord) -> bool:
    return (backend.local_files(pool) and rec.type == "file"
            and (rec.format or "raw") == "raw" and not rec.encryption)


@contextlib.contextmanager
def open_reader(backend: Backend, pool: PoolDef, rec: VolumeRecord, *,
                bitmap: str | None = None, snapshot: str | None = None,
                frozen: QemuSource | None = None) -> Iterator[Reader]:
    """A reader of the volume as it is now, or as it was at a storage ``snapshot``, or
    of a ``frozen`` copy of it (``Backend.frozen_source``)."""
    if bitmap is None and reads_directly(backend, pool, rec):
        from virtstore.host.files import open_volume

        with contextlib.ExitStack() as stack:
            if snapshot is not None:
                # A local raw file's snapshot is a file too (on btrfs, a reflink).
                frozen = stack.enter_context(backend.snapshot_source(pool, rec, snapshot))
                if not frozen.image:
                    raise Unsupported(f"snapshot '{snapshot}' of '{rec.name}' is not a file")
            fd = open_volume(frozen.image if frozen and frozen.image else rec.path,
                             os.O_RDONLY)
            try:
                yield _FileReader(fd, rec.capacity)
            finally:
                os.close(fd)
        return
    from virtstore.host.nbd import NbdServer

    if rec.encryption:
        raise Unsupported(f"backup of encrypted volume '{rec.name}' is not supported")
    source = (contextlib.nullcontext(frozen) if frozen is not None
              else backend.qemu_source(pool, rec) if snapshot is None
              else backend.snapshot_source(pool, rec, snapshot))
    with source as src:
        bitmaps: Sequence[str] = (bitmap,) if bitmap else ()
        with NbdServer(src.image, fmt=src.fmt, image_opts=src.image_opts,
                       objects=src.objects, read_only=True, bitmaps=bitmaps,
                       export="backup") as srv, srv.client() as client:
            reader = _NbdReader(client, srv.address, client.size, bitmap)
            try:
                yield reader
            finally:
                reader.close_extra()


# The unit a chunk's zeros are skipped in when it is written into a new volume.
_SPARSE_BLOCK = 64 << 10


def write_data(out: Writer, offset: int, data: bytes | memoryview) -> None:
    """Write ``data`` at ``offset`` but for its all-zero 64 KiB blocks (runs of the
    others in one write): a new volume reads as zeros there already, so a restored or
    imported chunk allocates only what holds data."""
    from virtstore.data.extents import is_zero

    view = memoryview(data)
    start: int | None = None
    for pos in range(0, len(view), _SPARSE_BLOCK):
        zero = is_zero(view[pos:pos + _SPARSE_BLOCK])
        if not zero and start is None:
            start = pos
        elif zero and start is not None:
            out.write(offset + start, view[start:pos])
            start = None
    if start is not None:
        out.write(offset + start, view[start:])


class _FileWriter:
    """Into a new local file through the data layer's writer: it starts writeback as it
    goes (the final fsync then waits for little) and reports a full disk as such."""

    def __init__(self, fd: int) -> None:
        from virtstore.data.copy import RangeWriter

        self.out = RangeWriter(fd, dst_zeroed=True)

    def write(self, offset: int, data: bytes | memoryview) -> None:
        self.out.pwrite(memoryview(data), offset)


class _NbdWriter:
    def __init__(self, client: NbdClient) -> None:
        self.client = client

    def write(self, offset: int, data: bytes | memoryview) -> None:
        self.client.pwrite(data, offset)


class _ZeroingWriter:
    """For a new volume that does not read as zeros (a thick LV): the callers write in
    ascending order, so each gap before a write, and the tail, is written as zeros
    (NBD WRITE_ZEROES: the device zeroes it, nothing crosses the socket)."""

    def __init__(self, client: NbdClient, capacity: int) -> None:
        self.client = client
        self.capacity = capacity
        self.pos = 0

    def write(self, offset: int, data: bytes | memoryview) -> None:
        if offset < self.pos:
            raise ValueError("writes into a volume that is zeroed as it goes must ascend")
        if offset > self.pos:
            self.client.zero(self.pos, offset - self.pos)
        self.client.pwrite(data, offset)
        self.pos = offset + len(data)

    def finish(self) -> None:
        if self.pos < self.capacity:
            self.client.zero(self.pos, self.capacity - self.pos)
            self.pos = self.capacity


@contextlib.contextmanager
def open_new_volume(backend: Backend, pool: PoolDef, staging: str,
                    fmt: str) -> Iterator[Writer]:
    """A writer into a just-made staging volume. Where the backend's new volumes read
    as zeros, only what is written is touched; elsewhere the rest (up to the volume's
    end, which the storage may have rounded up) is written as zeros too."""
    if backend.local_files(pool) and fmt == "raw" and staging.startswith("/"):
        from virtstore.host.files import open_volume

        fd = open_volume(staging, os.O_WRONLY)
        try:
            yield _FileWriter(fd)
            os.fsync(fd)
        finally:
            os.close(fd)
        return
    from virtstore.host.nbd import NbdServer

    with backend.staging_source(pool, staging, fmt) as src, \
            NbdServer(src.image, fmt=src.fmt, image_opts=src.image_opts,
                      objects=src.objects, export="restore") as srv, \
            srv.client() as client:
        if backend.new_volumes_read_zeros:
            yield _NbdWriter(client)
        else:
            zeroing = _ZeroingWriter(client, client.size)
            yield zeroing
            zeroing.finish()
        client.flush()
