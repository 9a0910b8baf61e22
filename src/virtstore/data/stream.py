"""Volume data to and from byte streams: upload, download, and a sparse framing.

``upload`` and ``download`` move a volume's bytes from or to a Python binary file
object. When that object is a regular file, its descriptor is used directly and
holes are kept (only data extents are read; holes are skipped or punched). When it
is a pipe or a socket, it is read or written in chunks; with ``sparse`` an
all-zero block read from a stream becomes a hole in the volume.

``encode_sparse`` / ``decode_sparse`` carry a range of a volume over any byte stream
with its holes as records instead of zeros (the format is in docs/data.md):

    magic   b"VSSPARS1"
    record  kind (1 byte: b"D" data, b"H" hole, b"E" end), offset (u64 BE, from the
            start of the range), length (u64 BE); a data record is followed by
            ``length`` bytes; the end record's length is the range's total length
            and its offset is 0.
"""

from __future__ import annotations

import fcntl
import os
import stat
import struct
from collections.abc import Iterable, Iterator
from typing import IO

from virtstore.data.copy import RangeWriter, copy_sparse
from virtstore.data.extents import data_extents, size_of, zero_runs, zeros
from virtstore.data.monitor import Monitor
from virtstore.errors import InvalidArgument

CHUNK = 4 << 20  # bytes per read or write of a stream
ZERO_BLOCK = 4096  # the granularity at which zeros become holes
MAGIC = b"VSSPARS1"
RECORD = struct.Struct(">cQQ")
DATA, HOLE, END = b"D", b"H", b"E"
MAX_OFFSET = 1 << 62  # offsets and lengths beyond this are refused as corrupt


def _regular_fd(obj: object) -> int | None:
    """The descriptor of a file object backed by a regular file, else None."""
    fileno = getattr(obj, "fileno", None)
    if fileno is None:
        return None
    try:
        fd = fileno()
    except (OSError, ValueError):  # io.UnsupportedOperation is both
        return None
    if not isinstance(fd, int) or not stat.S_ISREG(os.fstat(fd).st_mode):
        return None
    if fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_APPEND:
        return None  # positioned writes would land at the end: treat it as a stream
    return fd


def _check_range(offset: int, length: int | None) -> None:
    if offset < 0 or (length is not None and length < 0):
        raise InvalidArgument("offset and length must not be negative")


def _read_full(src: IO[bytes], view: memoryview) -> int:
    """Fill ``view`` from ``src`` unless it ends first; return the bytes read."""
    got = 0
    readinto = getattr(src, "readinto", None)
    while got < len(view):
        if readinto is not None:
            n = readinto(view[got:])
        else:
            data = src.read(len(view) - got)
            n = len(data) if data else 0
            view[got:got + n] = data or b""
        if not n:
            break
        got += n
    return got


def upload(src: IO[bytes], dst_fd: int, *, offset: int = 0, length: int | None = None,
           sparse: bool = True, monitor: Monitor) -> int:
    """Write the contents of ``src`` (from its current position, ``length`` bytes or up
    to its end) into ``dst_fd`` at ``offset``; return the bytes taken from ``src``.

    With ``sparse``, the holes of a regular-file source and the all-zero 4 KiB blocks
    of any source become holes in the volume (skipped past the end of a regular
    target, punched or zeroed inside it); without, every byte is written. A source
    that ends before ``length`` bytes raises InvalidArgument.
    """
    _check_range(offset, length)
    fd = _regular_fd(src)
    if fd is not None and sparse:
        pos = src.tell()
        available = max(0, os.fstat(fd).st_size - pos)
        if length is None:
            length = available
        elif length > available:
            raise InvalidArgument(f"the source has only {available} bytes, not {length}")
        copy_sparse(fd, dst_fd, src_offset=pos, dst_offset=offset, length=length,
                    monitor=monitor, detect_zeroes=True)
        src.seek(pos + length)
        return length
    if length is not None and not monitor.total:
        monitor.set_total(length)
    writer = RangeWriter(dst_fd, dst_zeroed=False)
    buf = memoryview(bytearray(CHUNK))
    done = 0
    monitor.check()
    while length is None or done < length:
        want = min(monitor.chunk_size(CHUNK), CHUNK)
        if length is not None:
            want = min(want, length - done)
        n = _read_full(src, buf[:want])
        if n == 0:
            break
        data = buf[:n]
        at = offset + done
        if sparse:
            for a, b, zero in zero_runs(data, ZERO_BLOCK):
                if zero:
                    writer.hole(at + a, b - a)
                else:
                    writer.pwrite(data[a:b], at + a)
        else:
            writer.pwrite(data, at)
        done += n
        monitor.advance(n)
    if length is not None and done < length:
        raise InvalidArgument(f"the source ended after {done} of {length} bytes")
    writer.finish(offset + done)
    return done


def download(src_fd: int, sink: IO[bytes], *, offset: int = 0, length: int | None = None,
             sparse: bool = True, monitor: Monitor) -> int:
    """Write ``length`` bytes (default: to the end) of ``src_fd`` from ``offset`` to
    ``sink`` at its current position; return the bytes delivered.

    With ``sparse`` and a regular-file sink, the volume's holes become holes in the
    sink (it is extended to its full length at the end); otherwise holes are written
    as zeros (a pipe or socket cannot carry holes: see encode_sparse).
    """
    _check_range(offset, length)
    if length is None:
        length = max(0, size_of(src_fd) - offset)
    if not monitor.total:
        monitor.set_total(length)
    fd = _regular_fd(sink)
    if fd is not None:
        sink.flush()
        pos = sink.tell()
        if sparse:
            copy_sparse(src_fd, fd, src_offset=offset, dst_offset=pos, length=length,
                        monitor=monitor)
        else:
            writer = RangeWriter(fd, dst_zeroed=False)
            for piece_at, piece in _dense(src_fd, offset, length, monitor):
                writer.pwrite(piece, pos + piece_at - offset)
            writer.finish(pos + length)
        sink.seek(pos + length)
        return length
    for _, piece in _dense(src_fd, offset, length, monitor):
        _write_all(sink, piece)
    sink.flush()
    return length


def _write_all(sink: IO[bytes], data: memoryview) -> None:
    while len(data):
        n = sink.write(data)
        if n is None:  # a non-blocking raw stream that is full: try again
            continue
        data = data[n:]


def _dense(src_fd: int, offset: int, length: int,
           monitor: Monitor) -> Iterator[tuple[int, memoryview]]:
    """Every byte of the range as (source offset, bytes): data read, holes as zeros."""
    buf = memoryview(bytearray(CHUNK))
    pos = offset
    end = offset + length
    monitor.check()

    def zero_pieces(start: int, stop: int) -> Iterator[tuple[int, memoryview]]:
        while start < stop:
            n = min(monitor.chunk_size(CHUNK), CHUNK, stop - start)
            yield start, memoryview(zeros(n))
            start += n
            monitor.advance(n)

    for ext_at, ext_len in data_extents(src_fd, offset, end):
        yield from zero_pieces(pos, ext_at)
        pos = ext_at
        stop = ext_at + ext_len
        while pos < stop:
            n = min(monitor.chunk_size(CHUNK), CHUNK, stop - pos)
            got = os.preadv(src_fd, [buf[:n]], pos)
            if got == 0:  # the source shrank: the rest reads as zeros
                break
            yield pos, buf[:got]
            pos += got
            monitor.advance(got)
    yield from zero_pieces(pos, end)


def encode_sparse(fd: int, offset: int, length: int, monitor: Monitor, *,
                  detect_zeroes: bool = True) -> Iterator[bytes]:
    """The range [offset, offset+length) of ``fd`` in the sparse framing, in pieces.

    Holes of the file (and, with ``detect_zeroes``, all-zero 4 KiB blocks) become hole
    records; adjacent holes are merged. Data records carry at most 4 MiB each.
    """
    _check_range(offset, length)
    if not monitor.total:
        monitor.set_total(length)
    yield MAGIC
    hole_at = 0  # the pending hole, relative to offset
    hole_len = 0
    pos = offset
    end = offset + length
    monitor.check()

    def flush_hole() -> Iterator[bytes]:
        nonlocal hole_len
        if hole_len:
            yield RECORD.pack(HOLE, hole_at, hole_len)
            hole_len = 0

    def add_hole(at: int, n: int) -> None:
        # Everything before ``pos`` was either sent or is in the pending hole, so a
        # new hole always continues the pending one.
        nonlocal hole_at, hole_len
        if hole_len:
            hole_len += n
        else:
            hole_at, hole_len = at, n

    for ext_at, ext_len in data_extents(fd, offset, end):
        if ext_at > pos:
            add_hole(pos - offset, ext_at - pos)
            monitor.skip(ext_at - pos)
        pos = ext_at
        stop = ext_at + ext_len
        while pos < stop:
            n = min(monitor.chunk_size(CHUNK), CHUNK, stop - pos)
            data = os.pread(fd, n, pos)
            if not data:
                break
            runs = zero_runs(data, ZERO_BLOCK) if detect_zeroes else [(0, len(data), False)]
            for a, b, zero in runs:
                if zero:
                    add_hole(pos - offset + a, b - a)
                    continue
                yield from flush_hole()
                yield RECORD.pack(DATA, pos - offset + a, b - a)
                yield data if (a, b) == (0, len(data)) else data[a:b]
            pos += len(data)
            monitor.advance(len(data))
        if pos < stop:  # the file shrank under us: the rest is a hole
            add_hole(pos - offset, stop - pos)
            monitor.skip(stop - pos)
            pos = stop
    if end > pos:
        add_hole(pos - offset, end - pos)
        monitor.skip(end - pos)
    yield from flush_hole()
    yield RECORD.pack(END, 0, length)


def decode_sparse(chunks: Iterable[bytes], dst_fd: int, offset: int, monitor: Monitor, *,
                  dst_zeroed: bool = False) -> int:
    """Write a sparse-framed stream into ``dst_fd`` at ``offset``; return its length.

    Hole records (and gaps between records) are skipped past the end of a regular
    target or where ``dst_zeroed`` says the target reads as zeros, and zeroed
    (punched) elsewhere; a regular target is extended to ``offset`` + the total length.
    A malformed stream raises InvalidArgument; what was written stays written.
    """
    _check_range(offset, 0)
    writer = RangeWriter(dst_fd, dst_zeroed=dst_zeroed)
    head = bytearray()  # magic or record header being assembled
    need = len(MAGIC)
    magic_seen = False
    data_left = 0  # bytes of the current data record still to come
    data_at = 0  # where they go, relative to offset
    next_at = 0  # the first offset the next record may use
    total: int | None = None
    monitor.check()
    for chunk in chunks:
        view = memoryview(chunk).cast("B")
        i = 0
        while i < len(view):
            if total is not None:
                raise InvalidArgument("sparse stream: data after the end record")
            if data_left:
                n = min(data_left, len(view) - i)
                writer.pwrite(view[i:i + n], offset + data_at)
                data_at += n
                data_left -= n
                i += n
                monitor.advance(n)
                continue
            take = min(need - len(head), len(view) - i)
            head += view[i:i + take]
            i += take
            if len(head) < need:
                break
            if not magic_seen:
                if bytes(head) != MAGIC:
                    raise InvalidArgument("not a sparse stream (bad magic)")
                magic_seen = True
                head.clear()
                need = RECORD.size
                continue
            kind, at, n = RECORD.unpack(head)
            head.clear()
            if at > MAX_OFFSET or n > MAX_OFFSET:
                raise InvalidArgument("sparse stream: offset or length out of range")
            if kind == END:
                if n < next_at or at != 0:
                    raise InvalidArgument(f"sparse stream: end record says {n} bytes but "
                                          f"records reach {next_at}")
                total = n
                continue
            if kind not in (DATA, HOLE):
                raise InvalidArgument(f"sparse stream: unknown record kind {kind!r}")
            if at < next_at:
                raise InvalidArgument(f"sparse stream: record at {at} overlaps the "
                                      f"previous one (which ends at {next_at})")
            if at > next_at:
                writer.hole(offset + next_at, at - next_at)
                monitor.skip(at - next_at)
            if kind == HOLE:
                writer.hole(offset + at, n)
                monitor.skip(n)
            else:
                data_at, data_left = at, n
            next_at = at + n
    if total is None or data_left:
        raise InvalidArgument("sparse stream: truncated (no end record)")
    if total > next_at:
        writer.hole(offset + next_at, total - next_at)
        monitor.skip(total - next_at)
    writer.finish(offset + total)
    return total
