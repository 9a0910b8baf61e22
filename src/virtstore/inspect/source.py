"""Where a guest's bytes come from: a volume through NBD, a file, and slices of either
(a partition, a logical volume). Reads are bounds-checked and cached in aligned chunks,
because filesystem readers ask for many small pieces."""

from __future__ import annotations

import os
from collections import OrderedDict
from typing import Protocol


class GuestDataError(Exception):
    """The guest's data is not what it claims to be (truncated, inconsistent, too big)."""


class Source(Protocol):
    @property
    def size(self) -> int: ...

    def pread(self, offset: int, length: int) -> bytes: ...


class FileSource:
    """A raw image file or block device, read by offset."""

    def __init__(self, path: str) -> None:
        self.fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        self._size = os.lseek(self.fd, 0, os.SEEK_END)

    @property
    def size(self) -> int:
        return self._size

    def pread(self, offset: int, length: int) -> bytes:
        return os.pread(self.fd, length, offset)

    def close(self) -> None:
        os.close(self.fd)


class NbdSource:
    """An NBD export (qemu-nbd serving a volume read-only)."""

    def __init__(self, url: str) -> None:
        from virtstore.host.nbd import NbdClient, parse_url

        self.client = NbdClient(parse_url(url))

    @property
    def size(self) -> int:
        return int(self.client.size)

    def pread(self, offset: int, length: int) -> bytes:
        return self.client.pread(offset, length)

    def close(self) -> None:
        self.client.close()


CHUNK = 64 << 10
CACHE_CHUNKS = 256  # 16 MiB


class Cached:
    """Aligned-chunk LRU cache over a source; reads past the end are refused."""

    def __init__(self, inner: Source) -> None:
        self.inner = inner
        self._size = inner.size
        self._cache: OrderedDict[int, bytes] = OrderedDict()

    @property
    def size(self) -> int:
        return self._size

    def _chunk(self, index: int) -> bytes:
        data = self._cache.get(index)
        if data is not None:
            self._cache.move_to_end(index)
            return data
        start = index * CHUNK
        data = self.inner.pread(start, min(CHUNK, self._size - start))
        self._cache[index] = data
        if len(self._cache) > CACHE_CHUNKS:
            self._cache.popitem(last=False)
        return data

    def pread(self, offset: int, length: int) -> bytes:
        check_range(offset, length, self._size)
        if length > 4 * CHUNK:  # big reads (a kernel image) bypass the cache
            return self.inner.pread(offset, length)
        out = []
        pos, end = offset, offset + length
        while pos < end:
            index = pos // CHUNK
            data = self._chunk(index)
            lo = pos - index * CHUNK
            piece = data[lo:lo + end - pos]
            if not piece:
                raise GuestDataError(f"short read at offset {pos}")
            out.append(piece)
            pos += len(piece)
        return b"".join(out)


def check_range(offset: int, length: int, size: int) -> None:
    if offset < 0 or length < 0 or offset + length > size:
        raise GuestDataError(f"read of {length} bytes at offset {offset} is outside the "
                             f"{size} bytes there are")


class Slice:
    """``length`` bytes of ``inner`` from ``offset``: a partition, a linear LV."""

    def __init__(self, inner: Source, offset: int, length: int) -> None:
        if offset < 0 or length < 0 or offset + length > inner.size:
            raise GuestDataError(f"a region of {length} bytes at offset {offset} does not "
                                 f"fit in {inner.size} bytes")
        self.inner = inner
        self.offset = offset
        self._size = length

    @property
    def size(self) -> int:
        return self._size

    def pread(self, offset: int, length: int) -> bytes:
        check_range(offset, length, self._size)
        return self.inner.pread(self.offset + offset, length)


class Concat:
    """Pieces of other sources one after the other: an LV made of several segments."""

    def __init__(self, pieces: list[Source]) -> None:
        self.pieces = pieces
        self._size = sum(p.size for p in pieces)

    @property
    def size(self) -> int:
        return self._size

    def pread(self, offset: int, length: int) -> bytes:
        check_range(offset, length, self._size)
        out = []
        base = 0
        for p in self.pieces:
            if length <= 0:
                break
            if offset < base + p.size:
                lo = offset - base
                n = min(length, p.size - lo)
                out.append(p.pread(lo, n))
                offset += n
                length -= n
            base += p.size
        return b"".join(out)
