"""Where a file's data is, and how to make a range read as zeros without writing it.

``data_extents`` asks the filesystem (lseek SEEK_DATA/SEEK_HOLE) which ranges hold
data; ``punch_hole`` and ``zero_range`` deallocate or zero ranges with fallocate(2);
``zero_out`` makes any range read as zeros with the cheapest means the file or device
has; ``is_zero`` tells an all-zero buffer apart in one memcmp; ``physical_extents``
says where on the disk a file's data lies (the FIEMAP ioctl).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import fcntl
import os
import stat
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from virtstore.errors import NoSpace, Unsupported

# fallocate(2) modes (linux/falloc.h).
FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
FALLOC_FL_ZERO_RANGE = 0x10
# Block device ioctls (linux/fs.h): _IO(0x12, 119), _IO(0x12, 127), _IOR(0x12, 114, u64).
BLKDISCARD = 0x1277
BLKZEROOUT = 0x127F
BLKGETSIZE64 = 0x80081272

# Errors that mean "this file or filesystem cannot do that", not "it failed".
NOT_SUPPORTED = frozenset({errno.EOPNOTSUPP, errno.ENOTSUP, errno.ENOSYS, errno.EINVAL,
                           errno.ENOTTY, errno.ENODEV})
NO_SPACE = frozenset({errno.ENOSPC, errno.EDQUOT})
ZERO_CHUNK = 4 << 20  # bytes written per pwrite when zeros must really be written

_zero_cache: dict[int, bytearray] = {}


def nospace(exc: OSError, what: str) -> NoSpace:
    """The NoSpace error for an ENOSPC or EDQUOT ``exc`` met while doing ``what``."""
    why = "disk quota exceeded" if exc.errno == errno.EDQUOT else "no space left on device"
    return NoSpace(f"{why} while {what}")


def zeros(n: int) -> bytearray:
    # A bytearray on the left of == compares with any buffer by memcmp (bytes and
    # memoryview fall back to slow element-wise comparison with other buffer types).
    z = _zero_cache.get(n)
    if z is None:
        z = bytearray(n)
        if len(_zero_cache) < 32:
            _zero_cache[n] = z
    return z


def is_zero(buf: bytes | bytearray | memoryview) -> bool:
    """True if every byte of ``buf`` is zero (one memcmp per 4 MiB)."""
    mv = memoryview(buf).cast("B") if isinstance(buf, memoryview) else memoryview(buf)
    n = len(mv)
    if n <= ZERO_CHUNK:
        return bool(zeros(n) == mv)
    for off in range(0, n, ZERO_CHUNK):
        piece = mv[off:off + ZERO_CHUNK]
        if not zeros(len(piece)) == piece:
            return False
    return True


def zero_runs(buf: bytes | bytearray | memoryview,
              block: int = 4096) -> Iterator[tuple[int, int, bool]]:
    """Split ``buf`` into runs of whole ``block``s: (start, end, all_zero), in order."""
    mv = memoryview(buf).cast("B") if isinstance(buf, memoryview) else memoryview(buf)
    n = len(mv)
    if is_zero(mv):
        if n:
            yield 0, n, True
        return
    zero = zeros(block)
    start = 0
    state: bool | None = None
    for off in range(0, n, block):
        piece = mv[off:off + block]
        z = bool((zero if len(piece) == block else zeros(len(piece))) == piece)
        if state is None:
            state = z
        elif z != state:
            yield start, off, state
            start, state = off, z
    if state is not None:
        yield start, n, state


def data_extents(fd: int, start: int, end: int) -> Iterator[tuple[int, int]]:
    """The data ranges of ``fd`` within [start, end), as (offset, length), in order.

    Uses lseek SEEK_DATA/SEEK_HOLE; where the filesystem or file type cannot answer,
    the whole range (up to the end of the file) is one extent. Anything past the end
    of the file is a hole. A filesystem may report zeros as data, never data as a hole.
    """
    if end <= start:
        return
    pos = start
    while pos < end:
        try:
            data = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError as exc:
            if exc.errno == errno.ENXIO:  # no data at or after pos
                return
            if exc.errno in NOT_SUPPORTED:
                yield from _one_extent(fd, pos, end)
                return
            raise
        if data >= end:
            return
        try:
            hole = os.lseek(fd, data, os.SEEK_HOLE)
        except OSError as exc:
            if exc.errno == errno.ENXIO:  # the file shrank under us
                return
            raise
        hole = min(hole, end)
        if hole <= data:
            return
        yield data, hole - data
        pos = hole


# FIEMAP (linux/fiemap.h): _IOWR('f', 11, struct fiemap), its flags, and the layout of
# struct fiemap (32 bytes) and of each struct fiemap_extent (56 bytes) after it.
FS_IOC_FIEMAP = 0xC020660B
FIEMAP_FLAG_SYNC = 0x1
FIEMAP_EXTENT_LAST = 0x1
FIEMAP_EXTENT_UNKNOWN = 0x2
FIEMAP_EXTENT_DELALLOC = 0x4
FIEMAP_EXTENT_ENCODED = 0x8
FIEMAP_EXTENT_NOT_ALIGNED = 0x100
FIEMAP_EXTENT_DATA_INLINE = 0x200
FIEMAP_EXTENT_UNWRITTEN = 0x800
_FIEMAP_HEAD = struct.Struct("=QQIIII")
_FIEMAP_EXTENT = struct.Struct("=QQQQQI12x")
_FIEMAP_BATCH = 512


@dataclass(frozen=True)
class PhysicalExtent:
    logical: int  # offset in the file
    physical: int  # offset on the filesystem's disk (btrfs: its logical address space)
    length: int
    flags: int


def physical_extents(fd: int) -> list[PhysicalExtent]:
    """Every extent of the file behind ``fd`` with its place on the disk, in file
    order (FS_IOC_FIEMAP, the file's dirty pages written first). Unsupported where the
    filesystem cannot map its files."""
    out: list[PhysicalExtent] = []
    start = 0
    while True:
        buf = bytearray(_FIEMAP_HEAD.size + _FIEMAP_EXTENT.size * _FIEMAP_BATCH)
        _FIEMAP_HEAD.pack_into(buf, 0, start, (1 << 64) - 1 - start, FIEMAP_FLAG_SYNC, 0,
                               _FIEMAP_BATCH, 0)
        try:
            fcntl.ioctl(fd, FS_IOC_FIEMAP, buf)
        except OSError as exc:
            if exc.errno in NOT_SUPPORTED:
                raise Unsupported("this filesystem does not map its files' extents "
                                  "(FIEMAP)") from exc
            raise
        mapped = _FIEMAP_HEAD.unpack_from(buf, 0)[3]
        if mapped == 0:
            return out
        last = False
        for i in range(mapped):
            logical, physical, length, _, _, flags = _FIEMAP_EXTENT.unpack_from(
                buf, _FIEMAP_HEAD.size + i * _FIEMAP_EXTENT.size)
            out.append(PhysicalExtent(logical, physical, length, flags))
            last = bool(flags & FIEMAP_EXTENT_LAST)
        if last:
            return out
        start = out[-1].logical + out[-1].length


def _one_extent(fd: int, start: int, end: int) -> Iterator[tuple[int, int]]:
    stop = min(end, size_of(fd))
    if stop > start:
        yield start, stop - start


def size_of(fd: int) -> int:
    """The size of a regular file or a block device."""
    st = os.fstat(fd)
    if stat.S_ISBLK(st.st_mode):
        buf = fcntl.ioctl(fd, BLKGETSIZE64, b"\0" * 8)
        size: int = struct.unpack("=Q", buf)[0]
        return size
    return st.st_size


def allocated(fd: int) -> int:
    """Bytes the file takes on disk."""
    return os.fstat(fd).st_blocks * 512


# Python's os module offers posix_fallocate (mode 0: allocate) but not fallocate(2)
# with a mode, and punching holes or zeroing ranges needs its mode flags: so call
# libc's fallocate64 through ctypes (use_errno so the failure's errno survives).
_fallocate: Callable[[int, int, int, int], int] | None = None


def _libc_fallocate() -> Callable[[int, int, int, int], int]:
    global _fallocate
    if _fallocate is None:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        func = getattr(libc, "fallocate64", None) or libc.fallocate
        func.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
        func.restype = ctypes.c_int
        _fallocate = func
    return _fallocate


# sync_file_range(2) is not in Python's os module either: starting writeback of what a
# copy has written so far lets the disk work while the copy goes on, so the fsync that
# ends a copy has little left to wait for.
_SYNC_FILE_RANGE_WRITE = 2
_sync_range: Callable[[int, int, int, int], int] | None = None


def start_writeback(fd: int, offset: int, length: int) -> None:
    """Ask the kernel to begin writing [offset, offset+length) to disk; do not wait."""
    global _sync_range
    if length <= 0:
        return
    if _sync_range is None:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        func = libc.sync_file_range
        func.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
        func.restype = ctypes.c_int
        _sync_range = func
    _sync_range(fd, offset, length, _SYNC_FILE_RANGE_WRITE)  # advisory: errors ignored


def fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    """fallocate(2); raises OSError with the call's errno."""
    if length <= 0:
        return
    func = _libc_fallocate()
    while func(fd, mode, offset, length) != 0:
        err = ctypes.get_errno()
        if err == errno.EINTR:
            continue
        raise OSError(err, os.strerror(err))


def refused(call: Callable[[], object], doing: str,
            cannot: frozenset[int] = NOT_SUPPORTED) -> int | None:
    """Run ``call``: None when it worked, the errno when it is one of ``cannot`` (the
    filesystem or device cannot do it); a full device or quota is NoSpace."""
    try:
        call()
    except OSError as exc:
        if exc.errno in cannot:
            return exc.errno
        if exc.errno in NO_SPACE:
            raise nospace(exc, doing) from exc
        raise
    return None


def _fallocate_or_refuse(fd: int, mode: int, offset: int, length: int, doing: str,
                         what: str) -> None:
    err = refused(lambda: fallocate(fd, mode | FALLOC_FL_KEEP_SIZE, offset, length), doing)
    if err is not None:
        raise Unsupported(f"this filesystem cannot {what}: {os.strerror(err)}")


def punch_hole(fd: int, offset: int, length: int) -> None:
    """Deallocate [offset, offset+length): it reads as zeros, the size stays the same.

    Raises Unsupported when the filesystem cannot punch holes.
    """
    _fallocate_or_refuse(fd, FALLOC_FL_PUNCH_HOLE, offset, length, "punching a hole",
                         "punch holes")


def zero_range(fd: int, offset: int, length: int) -> None:
    """Make [offset, offset+length) read as zeros and stay allocated (ZERO_RANGE).

    Raises Unsupported when the filesystem cannot.
    """
    _fallocate_or_refuse(fd, FALLOC_FL_ZERO_RANGE, offset, length, "zeroing a range",
                         "zero ranges")


def block_ioctl(fd: int, request: int, offset: int, length: int) -> bool:
    """BLKZEROOUT or BLKDISCARD over a range; False when the device cannot."""
    return refused(lambda: fcntl.ioctl(fd, request, struct.pack("=QQ", offset, length)),
                   "zeroing a device range") is None


def write_zeros(fd: int, offset: int, length: int) -> None:
    """Write real zeros over [offset, offset+length)."""
    end = offset + length
    zero = memoryview(zeros(min(ZERO_CHUNK, max(length, 0))))
    while offset < end:
        n = min(len(zero), end - offset)
        try:
            written = os.pwrite(fd, zero[:n], offset)
        except OSError as exc:
            if exc.errno in NO_SPACE:
                raise nospace(exc, "writing zeros") from exc
            raise
        offset += written


def zero_out(fd: int, offset: int, length: int, *, size: int | None = None,
             keep_allocated: bool = False) -> None:
    """Make [offset, offset+length) read as zeros, as cheaply as the target allows.

    A regular file: nothing past ``size`` (the file's size, read when not given: it
    already reads as zeros there), else a punched hole (ZERO_RANGE with
    ``keep_allocated``), else written zeros. A block device: BLKZEROOUT (which the
    kernel offloads to the device when it can), else written zeros.
    """
    if length <= 0:
        return
    st = os.fstat(fd)
    if stat.S_ISBLK(st.st_mode):
        if not block_ioctl(fd, BLKZEROOUT, offset, length):
            write_zeros(fd, offset, length)
        return
    if not stat.S_ISREG(st.st_mode):
        write_zeros(fd, offset, length)
        return
    size = st.st_size if size is None else size
    length = min(length, size - offset)
    if length <= 0:
        return
    try:
        if keep_allocated:
            zero_range(fd, offset, length)
        else:
            punch_hole(fd, offset, length)
    except Unsupported:
        write_zeros(fd, offset, length)
