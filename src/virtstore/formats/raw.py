"""Raw images with plain system calls: ftruncate for sparse, posix_fallocate for allocated."""

from __future__ import annotations

import errno
import fcntl
import os
import struct

from virtstore.errors import InvalidArgument, NoSpace

# <linux/fs.h>; the kernel reads and writes an int whatever the ioctl number says.
FS_IOC_GETFLAGS = 0x80086601
FS_IOC_SETFLAGS = 0x40086602
FS_NOCOW_FL = 0x00800000
_NO_FLAGS = (errno.ENOTTY, errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS, errno.EPERM)


def set_nocow(fd: int) -> bool:
    """Turn off copy-on-write for an empty file (btrfs); False where the filesystem
    has no such flag. It must be set before any data is written."""
    try:
        buf = fcntl.ioctl(fd, FS_IOC_GETFLAGS, struct.pack("i", 0))
        flags = struct.unpack("i", buf)[0]
        if flags & FS_NOCOW_FL:
            return True
        fcntl.ioctl(fd, FS_IOC_SETFLAGS, struct.pack("i", flags | FS_NOCOW_FL))
        buf = fcntl.ioctl(fd, FS_IOC_GETFLAGS, struct.pack("i", 0))
    except OSError as exc:
        if exc.errno in _NO_FLAGS:
            return False
        raise
    return bool(struct.unpack("i", buf)[0] & FS_NOCOW_FL)


def create_raw(target: str | int, size: int, allocation: int = 0, *,
               nocow: bool = False) -> None:
    """Make ``target`` a raw image of ``size`` bytes with the first ``allocation``
    bytes allocated (0: fully sparse; >= size: fully allocated).

    ``target`` is an existing empty file the caller created (opened O_RDWR here)
    or an open read-write descriptor, left open. ``nocow`` is applied first, where the
    filesystem supports it. On ENOSPC this raises NoSpace and leaves the file as it
    is: the caller, which owns the (temporary) name, removes it.
    """
    if size < 0 or allocation < 0:
        raise InvalidArgument(f"invalid capacity {size} or allocation {allocation}")
    # Read-write: glibc's posix_fallocate, on a filesystem without fallocate (NFSv3),
    # reads each block before writing it.
    fd = os.open(target, os.O_RDWR | os.O_CLOEXEC) if isinstance(target, str) else target
    try:
        if nocow:
            set_nocow(fd)
        os.ftruncate(fd, size)
        allocate = min(allocation, size)
        if allocate > 0:
            try:
                os.posix_fallocate(fd, 0, allocate)
            except OSError as exc:
                if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                    raise NoSpace(f"no space left to allocate {allocate} bytes") from exc
                raise
    finally:
        if isinstance(target, str):
            os.close(fd)
