"""Memory shared by the processes forked from one parent (virtstored's workers), with a
lock that orders both those processes and the threads of each."""

from __future__ import annotations

import contextlib
import fcntl
import mmap
import os
import threading
from collections.abc import Iterator


class SharedRegion:
    """``size`` bytes mapped shared, made before the fork. What is written there never
    reaches a disk (short of swap, as any process memory)."""

    def __init__(self, size: int, name: str) -> None:
        self.size = size
        self.mem = mmap.mmap(-1, size)  # anonymous and shared: children see the same pages
        # A POSIX record lock belongs to a process, so it orders the processes; the
        # threads of one process are ordered by the thread lock.
        self._fd = os.memfd_create(name)
        self._threads = threading.Lock()

    @contextlib.contextmanager
    def locked(self) -> Iterator[mmap.mmap]:
        with self._threads:
            fcntl.lockf(self._fd, fcntl.LOCK_EX)
            try:
                yield self.mem
            finally:
                fcntl.lockf(self._fd, fcntl.LOCK_UN)
