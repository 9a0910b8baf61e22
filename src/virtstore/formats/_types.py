"""What probing an image reports, and the bounded reader the header parsers share."""

from __future__ import annotations

import os
from dataclasses import dataclass

HEAD_SIZE = 4096  # one read covers every header we parse, except the few noted
MAX_EXTRA_READ = 1 << 20  # no parser reads more than this in one go


@dataclass
class ImageInfo:
    """One image as libvirt would describe it (format names are libvirt's)."""

    format: str  # raw, qcow2, qcow, qed, vmdk, vdi, vpc, vhdx, luks, iso, cow, bochs, ...
    virtual_size: int  # capacity the guest sees
    allocation: int  # bytes allocated on disk (st_blocks * 512 for files)
    physical: int  # size of the file or device
    backing_file: str | None = None  # as written in the header (maybe relative)
    backing_format: str | None = None
    compat: str | None = None  # qcow2: "0.10" or "1.1"
    cluster_size: int | None = None
    lazy_refcounts: bool = False
    encrypted: bool = False
    encryption_format: str | None = None  # "luks" or "qcow" (legacy AES)
    corrupt: bool = False  # the header says so, or is truncated/invalid
    subformat: str | None = None  # vmdk createType, vpc/vdi fixed|dynamic|...
    path: str | None = None  # the file that was probed


class Truncated(Exception):
    """A header field lies beyond the end of the file or of a bounded read."""


class Source:
    """The first HEAD_SIZE bytes of an open image, plus bounded reads elsewhere."""

    __slots__ = ("fd", "head", "size")

    def __init__(self, fd: int, size: int, head: bytes) -> None:
        self.fd = fd
        self.size = size
        self.head = head

    def read(self, offset: int, length: int) -> bytes:
        """Exactly ``length`` bytes at ``offset``, or Truncated."""
        if offset < 0 or length < 0 or length > MAX_EXTRA_READ or offset + length > self.size:
            raise Truncated
        end = offset + length
        if end <= len(self.head):
            return self.head[offset:end]
        data = os.pread(self.fd, length, offset)
        if len(data) != length:
            raise Truncated
        return data

    def read_upto(self, offset: int, length: int) -> bytes:
        """Up to ``length`` bytes at ``offset`` (less at end of file)."""
        length = max(0, min(length, self.size - offset))
        return self.read(offset, length)


def cstring(data: bytes) -> bytes:
    """``data`` up to its first NUL."""
    nul = data.find(b"\0")
    return data if nul < 0 else data[:nul]
