"""Sparse-aware copies: only data extents move, holes stay holes, reflink when asked.

``copy_sparse`` walks the source's data extents (SEEK_DATA/SEEK_HOLE) and moves each
with copy_file_range(2) (the kernel copies without a round trip through user space,
and on NFS 4.2 or CIFS servers it is a server-side copy), falling back to
pread/pwrite where copy_file_range cannot (across filesystem types, special files,
old kernels). Holes cost neither time nor space. ``copy_file`` adds reflink (FICLONE):
a copy that shares the source's extents until either side is written.
"""

from __future__ import annotations

import errno
import fcntl
import os
import stat

from virtstore.data.extents import (
    NO_SPACE,
    NOT_SUPPORTED,
    data_extents,
    nospace,
    refused,
    size_of,
    start_writeback,
    zero_out,
    zero_runs,
)
from virtstore.data.monitor import Monitor
from virtstore.errors import InvalidArgument, Unsupported
from virtstore.host.files import open_volume

CHUNK = 8 << 20  # bytes per system call: the unit of progress, throttle and cancel
ZERO_BLOCK = 4096  # the granularity of detect_zeroes
WRITEBACK_EVERY = 32 << 20  # start writing a copy to disk after this much new data
FICLONE = 0x40049409  # _IOW(0x94, 9, int)
REFLINK_MODES = ("auto", "always", "never")
# copy_file_range(2) cannot copy between these two files (cross-device on some
# kernels, special files, files opened O_APPEND, old kernels): use pread/pwrite.
_CFR_FALLBACK = NOT_SUPPORTED | {errno.EXDEV, errno.EBADF, errno.ETXTBSY, errno.EPERM}
_REFLINK_IMPOSSIBLE = NOT_SUPPORTED | {errno.EXDEV}


class RangeWriter:
    """Writes one range of the target, tracking the target's size so holes past its
    end cost nothing."""

    def __init__(self, dst_fd: int, *, dst_zeroed: bool) -> None:
        st = os.fstat(dst_fd)
        self.fd = dst_fd
        self.regular = stat.S_ISREG(st.st_mode)
        self.size = st.st_size if self.regular else size_of(dst_fd)
        self.zeroed = dst_zeroed
        self.written = 0
        self._unflushed = 0
        self._flush_from = 0

    def hole(self, offset: int, length: int) -> None:
        if self.zeroed or length <= 0:
            return
        if self.regular and offset >= self.size:
            return
        try:
            zero_out(self.fd, offset, length, size=self.size if self.regular else None)
        except OSError as exc:
            if exc.errno in NO_SPACE:
                raise nospace(exc, "copying") from exc
            raise

    def wrote(self, end: int, n: int) -> None:
        self.written += n
        if self.regular and end > self.size:
            self.size = end
        if not self._unflushed:
            self._flush_from = end - n
        self._unflushed += n
        if self._unflushed >= WRITEBACK_EVERY and self.regular:
            start_writeback(self.fd, self._flush_from, end - self._flush_from)
            self._unflushed = 0

    def pwrite(self, buf: memoryview, offset: int) -> None:
        while len(buf):
            try:
                n = os.pwrite(self.fd, buf, offset)
            except OSError as exc:
                if exc.errno in NO_SPACE:
                    raise nospace(exc, "copying") from exc
                raise
            if n <= 0:
                raise OSError(errno.EIO, "short write")
            self.wrote(offset + n, n)
            buf = buf[n:]
            offset += n

    def finish(self, end: int) -> None:
        """Give a regular target at least ``end`` bytes (a trailing hole has no writes)."""
        if self.regular and self.size < end:
            try:
                os.ftruncate(self.fd, end)
            except OSError as exc:
                if exc.errno in NO_SPACE:
                    raise nospace(exc, "copying") from exc
                raise
            self.size = end


def copy_sparse(src_fd: int, dst_fd: int, *, src_offset: int = 0, dst_offset: int = 0,
                length: int | None = None, monitor: Monitor, detect_zeroes: bool = False,
                dst_zeroed: bool = False, allow_clone: bool = True) -> int:
    """Copy ``length`` bytes (default: to the source's end) of ``src_fd`` from
    ``src_offset`` into ``dst_fd`` at ``dst_offset``; return the bytes written.

    Only the source's data extents are read and written. A hole is skipped when it
    lies past the end of a regular target, or when ``dst_zeroed`` says the target
    already reads as zeros there (a new file, a zeroed device); elsewhere it is made
    to read as zeros by the cheapest means (a punched hole, BLKZEROOUT, written zeros).
    A regular target ends at least ``dst_offset + length`` bytes long.

    ``detect_zeroes`` also treats all-zero 4 KiB blocks inside data extents as holes
    (data goes through user space then). ``allow_clone=False`` keeps copy_file_range
    away, since on xfs and btrfs it shares extents like a reflink.

    Progress: holes count as skipped (no bandwidth), data as moved. Raises NoSpace on
    ENOSPC/EDQUOT and Cancelled when the monitor says so; the target then holds part
    of the copy.
    """
    if src_offset < 0 or dst_offset < 0 or (length is not None and length < 0):
        raise InvalidArgument("offsets and length must not be negative")
    if length is None:
        length = max(0, size_of(src_fd) - src_offset)
    if not monitor.total:
        monitor.set_total(length)
    writer = RangeWriter(dst_fd, dst_zeroed=dst_zeroed)
    shift = dst_offset - src_offset
    end = src_offset + length
    use_cfr = allow_clone and not detect_zeroes
    buf: bytearray | None = None
    pos = src_offset
    monitor.check()
    for off, n in data_extents(src_fd, src_offset, end):
        if off > pos:
            writer.hole(pos + shift, off - pos)
            monitor.skip(off - pos)
        pos = off
        stop = off + n
        while pos < stop:
            step = min(monitor.chunk_size(CHUNK), stop - pos)
            if use_cfr:
                try:
                    done = os.copy_file_range(src_fd, dst_fd, step, pos, pos + shift)
                except OSError as exc:
                    if exc.errno in NO_SPACE:
                        raise nospace(exc, "copying") from exc
                    if exc.errno not in _CFR_FALLBACK:
                        raise
                    use_cfr = False
                    continue
                if done == 0:  # nothing more to read here (the source shrank)
                    use_cfr = False
                    continue
                writer.wrote(pos + shift + done, done)
                pos += done
                monitor.advance(done)
                continue
            if buf is None:
                buf = bytearray(monitor.chunk_size(CHUNK))
            view = memoryview(buf)[:min(step, len(buf))]
            # Have the next chunk read from disk while this one is written.
            _read_ahead(src_fd, pos + len(view), min(len(view), stop - pos - len(view)))
            got = os.preadv(src_fd, [view], pos)
            if got == 0:  # the source ended early: the rest reads as zeros
                writer.hole(pos + shift, stop - pos)
                monitor.skip(stop - pos)
                pos = stop
                break
            data = view[:got]
            if detect_zeroes:
                for a, b, zero in zero_runs(data, ZERO_BLOCK):
                    if zero:
                        writer.hole(pos + a + shift, b - a)
                    else:
                        writer.pwrite(data[a:b], pos + a + shift)
            else:
                writer.pwrite(data, pos + shift)
            pos += got
            monitor.advance(got)
    if end > pos:
        writer.hole(pos + shift, end - pos)
        monitor.skip(end - pos)
    writer.finish(dst_offset + length)
    return writer.written


def _read_ahead(fd: int, offset: int, length: int) -> None:
    if length > 0:
        try:
            os.posix_fadvise(fd, offset, length, os.POSIX_FADV_WILLNEED)
        except OSError:
            pass  # advisory (a pipe or an odd device): reading still works


def reflink(src_fd: int, dst_fd: int) -> bool:
    """Make ``dst_fd`` share all of ``src_fd``'s extents (FICLONE); False when the
    filesystem cannot (no reflink support, different filesystems, not regular files)."""
    return _ficlone(src_fd, dst_fd)


def _ficlone(src_fd: int, dst_fd: int) -> bool:
    return refused(lambda: fcntl.ioctl(dst_fd, FICLONE, src_fd), "cloning",
                   _REFLINK_IMPOSSIBLE) is None


def filesystem_type(path: str) -> str:
    """The type of the filesystem holding ``path`` ("xfs", "ext4", ...), or "unknown"."""
    try:
        dev = os.stat(path).st_dev
        with open("/proc/self/mountinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                fields = line.split()
                if " - " not in line or len(fields) < 3:
                    continue
                major, _, minor = fields[2].partition(":")
                if os.makedev(int(major), int(minor)) == dev:
                    return line.split(" - ", 1)[1].split()[0]
    except (OSError, ValueError):
        pass
    return "unknown"


def _no_reflink_reason(src_path: str, dst_path: str) -> str:
    try:
        same = os.stat(src_path).st_dev == os.stat(dst_path).st_dev
    except OSError:
        same = True
    if not same:
        return (f"'{src_path}' and '{dst_path}' are on different filesystems, and a "
                "reflink can only share extents within one filesystem")
    fstype = filesystem_type(dst_path)
    return (f"the filesystem of '{dst_path}' ({fstype}) cannot share extents: reflink "
            "needs btrfs, xfs made with reflink=1, or another filesystem with FICLONE")


def copy_file(src_path: str, dst_path: str, *, reflink: str = "auto", monitor: Monitor,
              detect_zeroes: bool = False, fsync: bool = True,
              keep_target: bool = False) -> str:
    """Copy the file or device ``src_path`` into ``dst_path`` (created 0600 if missing,
    emptied first if a regular file, unless ``keep_target``: then the copy is written
    over it and the source's holes are zeroed in it); return "reflink" or "copy", the
    way it was done. Neither path may be a symbolic link (``open_volume``).

    ``reflink``: "auto" clones the extents when the filesystem can and copies
    otherwise; "always" raises Unsupported when it cannot; "never" writes every byte
    of data (without copy_file_range, which clones on xfs and btrfs). Holes are kept.
    With ``fsync`` the target is flushed to stable storage before returning.
    """
    if reflink not in REFLINK_MODES:
        raise InvalidArgument(f"unknown reflink mode '{reflink}': expected one of "
                              f"{', '.join(REFLINK_MODES)}")
    src = open_volume(src_path, os.O_RDONLY)
    try:
        dst = open_volume(dst_path, os.O_WRONLY | os.O_CREAT, 0o600)
        try:
            how = _copy_fds(src, dst, src_path, dst_path, reflink=reflink, monitor=monitor,
                            detect_zeroes=detect_zeroes, keep_target=keep_target)
            if fsync:
                os.fsync(dst)
            return how
        finally:
            os.close(dst)
    finally:
        os.close(src)


def _copy_fds(src: int, dst: int, src_path: str, dst_path: str, *, reflink: str,
              monitor: Monitor, detect_zeroes: bool, keep_target: bool) -> str:
    size = size_of(src)
    if not monitor.total:
        monitor.set_total(size)
    src_reg = stat.S_ISREG(os.fstat(src).st_mode)
    dst_reg = stat.S_ISREG(os.fstat(dst).st_mode)
    fresh = dst_reg and not keep_target
    if fresh and os.fstat(dst).st_size:
        os.ftruncate(dst, 0)
    if reflink != "never":
        if src_reg and dst_reg and _ficlone(src, dst):
            monitor.skip(size)
            return "reflink"
        if reflink == "always":
            if not (src_reg and dst_reg):
                raise Unsupported(f"cannot reflink '{src_path}' to '{dst_path}': reflink "
                                  "works between regular files only")
            raise Unsupported(f"cannot reflink '{src_path}' to '{dst_path}': "
                              f"{_no_reflink_reason(src_path, dst_path)}")
    monitor.check()
    copy_sparse(src, dst, length=size, monitor=monitor, detect_zeroes=detect_zeroes,
                dst_zeroed=fresh, allow_clone=reflink != "never")
    return "copy"
