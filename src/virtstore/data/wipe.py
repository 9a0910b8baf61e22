"""Destroying a volume's contents with libvirt's wipe algorithms.

- ``zero``: the volume reads as zeros afterwards. A block device gets BLKZEROOUT (the
  kernel offloads it to the device when it can, and writes zeros otherwise). A file
  is not rewritten: a sparse file has its whole range punched out, so it stays
  sparse; a fully allocated file gets FALLOC_FL_ZERO_RANGE, so it stays allocated (no
  ENOSPC later for a preallocated volume) and reads zeros. Where the filesystem can
  do neither, zeros are written. libvirt writes zeros over allocated files and
  truncates sparse ones to zero and back; the result reads the same.
- ``random``: one pass of random bytes (os.urandom, i.e. the kernel's ChaCha20
  generator) over the whole range; a sparse file becomes fully allocated.
- ``trim``: discard: holes punched over the whole file, or BLKDISCARD on a block
  device. Unlike libvirt (which supports it for rbd only), files can be trimmed. A
  discarded device range need not read as zeros afterwards.
- ``nnsa``, ``dod``, ``bsi``, ``gutmann``, ``schneier``, ``pfitzner7``, ``pfitzner33``:
  the multi-pass patterns of ``scrub -p NAME``, as libvirt runs them. Progress comes
  from scrub's per-pass bars. These write every byte of every pass.

``zero`` and ``trim`` on files only change metadata: the old bytes are released to
the filesystem, not overwritten on the medium. Use a pattern algorithm (or
``random``) when the medium itself must not keep them.
"""

from __future__ import annotations

import errno
import os
import re
import stat
from collections.abc import Callable, Iterator

from virtstore.data.extents import (
    BLKDISCARD,
    BLKZEROOUT,
    NO_SPACE,
    block_ioctl,
    nospace,
    punch_hole,
    size_of,
    write_zeros,
    zero_range,
)
from virtstore.data.monitor import Monitor
from virtstore.errors import Busy, InvalidArgument, Unsupported
from virtstore.host.files import open_volume, refuse_symlink
from virtstore.host.runner import stream

SCRUB = "scrub"
# Bars scrub 2.6 draws per pattern (its passes plus, for nnsa and dod, a verify pass).
SCRUB_PASSES = {"nnsa": 4, "dod": 4, "bsi": 9, "gutmann": 35, "schneier": 7,
                "pfitzner7": 7, "pfitzner33": 33}
SCRUB_DOTS = 48  # dots in one of scrub's progress bars
ALGORITHMS: tuple[str, ...] = ("zero", "nnsa", "dod", "bsi", "gutmann", "schneier",
                               "pfitzner7", "pfitzner33", "random", "trim")
META_CHUNK = 1 << 30  # bytes per punch / zero-range / discard call
WRITE_CHUNK = 4 << 20  # bytes per write of random data or zeros
_BAR = re.compile(r"scrub: [^|\n]{1,16}\|(\.*)")


def wipe(path: str, algorithm: str, *, monitor: Monitor, is_block: bool = False) -> None:
    """Wipe the file or block device ``path`` with ``algorithm`` (one of ALGORITHMS).

    The size stays the same. A block device is opened exclusively, so one that is
    mounted or otherwise claimed is refused (Busy).
    """
    if algorithm not in ALGORITHMS:
        raise InvalidArgument(f"unknown wipe algorithm '{algorithm}': expected one of "
                              f"{', '.join(ALGORITHMS)}")
    # A symbolic link is followed only to a device the caller says it names (an LV's
    # /dev/VG/LV); a file is opened without following one.
    st = os.lstat(path)
    block = is_block or stat.S_ISBLK(st.st_mode)
    if not block and not (stat.S_ISREG(st.st_mode) or stat.S_ISLNK(st.st_mode)):
        raise InvalidArgument(f"cannot wipe '{path}': not a regular file or block device")
    try:
        if block:
            fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC | os.O_EXCL)
        else:
            fd = open_volume(path, os.O_WRONLY)
            st = os.fstat(fd)
    except OSError as exc:
        if exc.errno == errno.EBUSY:
            raise Busy(f"cannot wipe '{path}': the device is in use") from exc
        raise
    try:
        size = size_of(fd)
        if algorithm in SCRUB_PASSES:
            if not monitor.total:
                monitor.set_total(size * SCRUB_PASSES[algorithm])
            if size:
                # The exclusive open has refused a device in use; scrub opens the
                # path itself, so let go of it first.
                os.close(fd)
                fd = -1
                if not block:
                    refuse_symlink(path)
                _scrub(path, algorithm, monitor)
            return
        if not monitor.total:
            monitor.set_total(size)
        monitor.check()
        if algorithm == "random":
            _random(fd, size, monitor)
        elif algorithm == "zero":
            if block:
                _block_zero(fd, size, monitor)
            else:
                sparse = st.st_blocks * 512 < size
                _file_zero(fd, size, monitor, keep_allocated=not sparse)
        else:  # trim
            if block:
                _block_discard(fd, size, path, monitor)
            else:
                _file_trim(fd, size, path, monitor)
        os.fsync(fd)
    finally:
        if fd >= 0:
            os.close(fd)


def _random(fd: int, size: int, monitor: Monitor) -> None:
    pos = 0
    while pos < size:
        n = min(monitor.chunk_size(WRITE_CHUNK), size - pos)
        buf = memoryview(os.urandom(n))
        while buf:
            try:
                w = os.pwrite(fd, buf, pos)
            except OSError as exc:
                if exc.errno in NO_SPACE:
                    raise nospace(exc, "wiping") from exc
                raise
            buf = buf[w:]
            pos += w
            monitor.advance(w)


def _ranges(pos: int, size: int, chunk: Callable[[], int]) -> Iterator[tuple[int, int]]:
    """(offset, length) pieces of [pos, size), each at most ``chunk()`` long."""
    while pos < size:
        n = min(chunk(), size - pos)
        yield pos, n
        pos += n


def _file_zero(fd: int, size: int, monitor: Monitor, *, keep_allocated: bool) -> None:
    for pos, n in _ranges(0, size, lambda: META_CHUNK):
        try:
            (zero_range if keep_allocated else punch_hole)(fd, pos, n)
        except Unsupported:
            _write_zeros(fd, pos, size, monitor)
            return
        monitor.skip(n)


def _write_zeros(fd: int, start: int, size: int, monitor: Monitor) -> None:
    for pos, n in _ranges(start, size, lambda: monitor.chunk_size(WRITE_CHUNK)):
        write_zeros(fd, pos, n)
        monitor.advance(n)


def _block_zero(fd: int, size: int, monitor: Monitor) -> None:
    for pos, n in _ranges(0, size, lambda: monitor.chunk_size(64 << 20)):
        if not block_ioctl(fd, BLKZEROOUT, pos, n):
            _write_zeros(fd, pos, size, monitor)
            return
        monitor.advance(n)


def _file_trim(fd: int, size: int, path: str, monitor: Monitor) -> None:
    for pos, n in _ranges(0, size, lambda: META_CHUNK):
        try:
            punch_hole(fd, pos, n)
        except Unsupported as exc:
            raise Unsupported(f"cannot trim '{path}': {exc}") from exc
        monitor.skip(n)


def _block_discard(fd: int, size: int, path: str, monitor: Monitor) -> None:
    for pos, n in _ranges(0, size, lambda: META_CHUNK):
        if not block_ioctl(fd, BLKDISCARD, pos, n):
            raise Unsupported(f"cannot trim '{path}': the device does not support discard")
        monitor.skip(n)


class ScrubProgress:
    """Turns scrub's bars ("scrub: random  |.....|", one dot per 1/48 of a pass, no
    newline until the pass ends) into a fraction of all ``passes`` done."""

    def __init__(self, passes: int) -> None:
        self.passes = passes
        self.bars = 0  # bars finished
        self.dots = 0  # dots in the bar being drawn
        self._line = ""

    def feed(self, piece: str) -> None:
        self._line += piece
        m = _BAR.match(self._line)
        if m is not None and not self._line.startswith("scrub: scrubbing"):
            self.dots = len(m.group(1))
        if self._line.endswith("\n"):
            if m is not None and self._line.rstrip("\n").endswith("|") and m.end() < len(
                    self._line.rstrip("\n")):
                self.bars += 1
                self.dots = 0
                self.passes = max(self.passes, self.bars)
            self._line = ""

    @property
    def fraction(self) -> float:
        done = self.bars + min(self.dots, SCRUB_DOTS) / SCRUB_DOTS
        return min(1.0, done / self.passes) if self.passes else 1.0


def _scrub(path: str, algorithm: str, monitor: Monitor) -> None:
    progress = ScrubProgress(SCRUB_PASSES[algorithm])
    base = monitor.done
    span = max(0, monitor.total - base)

    def on_line(piece: str) -> None:
        progress.feed(piece)
        # scrub cannot be throttled from here: progress is counted, not metered.
        monitor.advance_to(base + int(span * progress.fraction), metered=False)

    stream([SCRUB, "-p", algorithm, "-f", "-S", path], on_line,
           should_stop=monitor.cancelled, timeout=None, separators="\n.")
    monitor.advance_to(base + span, metered=False)
