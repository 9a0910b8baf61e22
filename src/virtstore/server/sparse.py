"""Volume data in the sparse framing (``virtstore.data.stream``) on the wire.

The engine takes an upload from a file object and gives a download to one, holes as
zeros; over HTTP the same bytes travel in the sparse framing when the client asks
(``Content-Type`` / ``Accept: application/vnd.virtstore.sparse``), so holes and zero
blocks cross the network as records rather than as zeros. The engine turns zero
blocks of an upload back into holes (``sparse=True``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Protocol

from virtstore.data.extents import zero_runs, zeros
from virtstore.data.stream import CHUNK, DATA, END, HOLE, MAGIC, MAX_OFFSET, RECORD, ZERO_BLOCK
from virtstore.errors import InvalidArgument

SPARSE = "application/vnd.virtstore.sparse"


class _Reader(Protocol):
    def read(self, n: int = -1) -> bytes: ...


def _exact(src: _Reader, n: int) -> bytes:
    parts = []
    while n:
        data = src.read(n)
        if not data:
            raise InvalidArgument("sparse stream: truncated")
        parts.append(data)
        n -= len(data)
    return b"".join(parts)


def _records(src: _Reader) -> Iterator[tuple[bytes, int, bytes | int]]:
    """A framed body as (DATA, offset, bytes) pieces of at most CHUNK bytes, (HOLE,
    offset, length) and last (END, 0, total length), checked for order and bounds."""
    if _exact(src, len(MAGIC)) != MAGIC:
        raise InvalidArgument("sparse stream: bad magic")
    pos = 0
    while True:
        kind, off, length = RECORD.unpack(_exact(src, RECORD.size))
        if off > MAX_OFFSET or length > MAX_OFFSET:
            raise InvalidArgument("sparse stream: offset or length out of range")
        if kind == END:
            if length < pos:
                raise InvalidArgument("sparse stream: end before the data")
            if src.read(1):
                raise InvalidArgument("sparse stream: data after the end record")
            yield END, 0, length
            return
        if kind not in (DATA, HOLE):
            raise InvalidArgument(f"sparse stream: unknown record {kind!r}")
        if off < pos:
            raise InvalidArgument("sparse stream: records out of order")
        pos = off
        if kind == HOLE:
            yield HOLE, pos, length
            pos += length
            continue
        left = length
        while left:
            data = src.read(min(left, CHUNK))
            if not data:
                raise InvalidArgument("sparse stream: truncated data record")
            yield DATA, pos, data
            left -= len(data)
            pos += len(data)


def data_pieces(src: _Reader, length: int) -> Iterator[tuple[int, bytes]]:
    """A framed body as its data, (offset, bytes) in order; it must end with an end
    record of ``length`` (a cut stream raises rather than ending early)."""
    for kind, off, piece in _records(src):
        if isinstance(piece, bytes):
            if off + len(piece) > length:
                raise InvalidArgument(f"sparse stream: data past the end ({length} bytes)")
            yield off, piece
        elif kind == END and piece != length:
            raise InvalidArgument(f"sparse stream: {piece} bytes, not {length}")


class SparseDecoder:
    """A framed request body read as the dense bytes it stands for."""

    def __init__(self, src: _Reader) -> None:
        self._pieces = self._dense(src)
        self._buf = b""
        self._eof = False

    def readable(self) -> bool:
        return True

    def _zeros(self, n: int) -> Iterator[bytes]:
        while n > 0:
            k = min(n, CHUNK)
            yield bytes(zeros(k))
            n -= k

    def _dense(self, src: _Reader) -> Iterator[bytes]:
        pos = 0
        for kind, off, piece in _records(src):
            if isinstance(piece, bytes):
                yield from self._zeros(off - pos)
                yield piece
                pos = off + len(piece)
            elif kind == HOLE:
                yield from self._zeros(off + piece - pos)
                pos = off + piece
            else:
                yield from self._zeros(piece - pos)

    def read(self, n: int = -1) -> bytes:
        if n is None or n < 0:
            rest = [self._buf, *self._pieces]
            self._buf = b""
            return b"".join(rest)
        while not self._buf and not self._eof:
            piece = next(self._pieces, None)
            if piece is None:
                self._eof = True
            else:
                self._buf = piece
        data, self._buf = self._buf[:n], self._buf[n:]
        return data

    def readinto(self, b: memoryview | bytearray) -> int:
        data = self.read(len(b))
        b[:len(data)] = data
        return len(data)


class SparseEncoder:
    """Dense bytes written in order, sent on as the framing (zero blocks as holes)."""

    def __init__(self, out: Callable[[bytes], object]) -> None:
        self._out = out
        self._pos = 0
        self._hole_at = 0
        self._hole_len = 0
        self._started = False

    def _start(self) -> None:
        if not self._started:
            self._started = True
            self._out(MAGIC)

    def _flush_hole(self) -> None:
        if self._hole_len:
            self._out(RECORD.pack(HOLE, self._hole_at, self._hole_len))
            self._hole_len = 0

    def write(self, data: bytes | bytearray | memoryview) -> int:
        self._start()
        view = memoryview(data).cast("B")
        for a, b, zero in zero_runs(view, ZERO_BLOCK):
            at = self._pos + a
            if zero:
                if self._hole_len:
                    self._hole_len += b - a
                else:
                    self._hole_at, self._hole_len = at, b - a
                continue
            self._flush_hole()
            self._out(RECORD.pack(DATA, at, b - a) + bytes(view[a:b]))
        self._pos += len(view)
        return len(view)

    def finish(self) -> None:
        self._start()
        self._flush_hole()
        self._out(RECORD.pack(END, 0, self._pos))
