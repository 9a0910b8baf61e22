"""virtstored's worker processes: pre-forked, all accepting on the listening sockets
they inherit, each with its own engine on the shared state root.

One Python process runs one request at a time (the GIL); a host with several cores
answers more with several processes. Everything the workers must agree on is already
shared: pools, volumes, jobs, events and locks live in the state root's SQLite store.
What is not is kept here: the connection counts behind the limits (``SharedCounts``),
in memory mapped by every worker.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import signal
import struct
import threading
import time
from collections.abc import Callable

from virtstore.engine.shared import SharedRegion
from virtstore.server.http import Limits
from virtstore.server.listen import Counts

log = logging.getLogger("virtstored")

_KINDS = {"unix-rw": 1, "unix-ro": 2, "tcp": 3}
_HEAD = 4  # per worker: active, then one count per listener kind
_Q = struct.Struct("q")


def default_workers() -> int:
    """One worker per processor the daemon may run on."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def _peer_id(key: str) -> int:
    # Stable across processes (hash() of a str is not, with PYTHONHASHSEED random).
    return int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "little",
                          signed=True) or 1


class SharedCounts(Counts):
    """Connection counts of every worker, each in its own slot of a shared mapping, so
    the limits hold for the daemon as a whole. A worker that dies has its slot cleared
    by the supervisor before the next one takes it."""

    def __init__(self, limits: Limits, workers: int) -> None:
        super().__init__(limits)
        self.workers = workers
        self.peers = limits.total  # a worker holds at most this many distinct peers
        self.slot_size = (_HEAD + 2 * self.peers) * 8
        self.region = SharedRegion(self.slot_size * workers, "virtstored-counts")
        self.mem = self.region.mem
        self.slot = -1

    def bind(self, slot: int) -> None:
        """In a worker: the slot its connections are counted in."""
        self.slot = slot

    def _totals(self, peer: int | None) -> tuple[int, dict[str, int], int]:
        active = 0
        by_kind = dict.fromkeys(_KINDS, 0)
        of_peer = 0
        table = struct.Struct(f"{2 * self.peers}q")
        for w in range(self.workers):
            base = w * self.slot_size
            head = struct.unpack_from(f"{_HEAD}q", self.mem, base)
            active += head[0]
            for kind, i in _KINDS.items():
                by_kind[kind] += head[i]
            if peer is not None:
                pairs = table.unpack_from(self.mem, base + _HEAD * 8)
                for j in range(0, len(pairs), 2):
                    if pairs[j] == peer:
                        of_peer += pairs[j + 1]
        return active, by_kind, of_peer

    def _add(self, offset: int, step: int) -> None:
        _Q.pack_into(self.mem, offset, _Q.unpack_from(self.mem, offset)[0] + step)

    def _count(self, kind: str, peer: int | None, step: int) -> None:
        base = self.slot * self.slot_size
        self._add(base, step)
        self._add(base + _KINDS[kind] * 8, step)
        if peer is None:
            return
        table = base + _HEAD * 8
        free = -1
        for j in range(self.peers):
            at = table + 16 * j
            pid, count = struct.unpack_from("qq", self.mem, at)
            if pid == peer and count:
                struct.pack_into("qq", self.mem, at, peer if count + step else 0,
                                 count + step)
                return
            if free < 0 and count == 0:
                free = at
        if step > 0 and free >= 0:
            struct.pack_into("qq", self.mem, free, peer, step)

    def admit(self, kind: str, key: str | None) -> str | None:
        peer = _peer_id(key) if key is not None else None
        with self.region.locked():
            active, by_kind, of_peer = self._totals(peer)
            why = self.why_full(active, by_kind, kind, key, of_peer)
            if why is None:
                self._count(kind, peer, 1)
            return why

    def release(self, kind: str, key: str | None) -> None:
        peer = _peer_id(key) if key is not None else None
        with self.region.locked():
            self._count(kind, peer, -1)

    def active(self) -> int:
        with self.region.locked():
            return self._totals(None)[0]

    def clear(self, slot: int) -> None:
        """In the supervisor: a worker ended, and its connections with it."""
        with self.region.locked():
            start = slot * self.slot_size
            self.mem[start:start + self.slot_size] = bytes(self.slot_size)


def _die_with_parent() -> None:
    """Ask the kernel to kill this worker when the supervisor dies (even by SIGKILL),
    so no worker outlives it holding the sockets and a state root's journal rows."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        pr_set_pdeathsig = 1
        if libc.prctl(pr_set_pdeathsig, signal.SIGKILL, 0, 0, 0) == 0:
            return
    except (OSError, AttributeError):
        pass
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(0.5)
        os.kill(os.getpid(), signal.SIGKILL)

    threading.Thread(target=watch, daemon=True, name="parent-watch").start()


class Supervisor:
    """Forks ``workers`` processes that each run ``work(slot)``, starts a new one in
    the slot of any that dies, and on ``stop`` passes SIGTERM on and waits for them."""

    # A worker that dies sooner than this after its start is restarted after a pause.
    RESTART_PAUSE = 1.0

    def __init__(self, workers: int, work: Callable[[int], None],
                 counts: SharedCounts, grace: float) -> None:
        self.workers = workers
        self.work = work
        self.counts = counts
        self.grace = grace
        self.children: dict[int, tuple[int, float]] = {}  # pid: slot, start time
        self.stopping = False
        self.master = os.getpid()

    def _spawn(self, slot: int) -> None:
        pid = os.fork()
        if pid == 0:  # the worker
            status = 0
            try:
                signal.signal(signal.SIGTERM, signal.SIG_DFL)
                signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C: the supervisor stops us
                _die_with_parent()
                if os.getppid() != self.master:
                    os._exit(0)
                self.counts.bind(slot)
                self.work(slot)
            except BaseException:
                log.exception("worker %d failed", slot)
                status = 1
            finally:
                logging.shutdown()
                os._exit(status)
        self.children[pid] = (slot, time.monotonic())

    def stop(self) -> None:
        """From a signal handler: pass the stop on to every worker."""
        self.stopping = True
        for pid in list(self.children):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)

    def run(self) -> None:
        for slot in range(self.workers):
            self._spawn(slot)
        if self.stopping:  # a stop that came while they were being started
            self.stop()
        deadline: float | None = None
        while self.children:
            if self.stopping and deadline is None:
                deadline = time.monotonic() + self.grace
            try:
                pid, status = os.waitpid(-1, os.WNOHANG if deadline else 0)
            except ChildProcessError:
                break
            if pid == 0:  # stopping: the workers are draining
                if deadline is not None and time.monotonic() > deadline:
                    for left in list(self.children):
                        with contextlib.suppress(ProcessLookupError):
                            os.kill(left, signal.SIGKILL)
                    deadline = time.monotonic() + self.grace
                time.sleep(0.05)
                continue
            entry = self.children.pop(pid, None)
            if entry is None:
                # Not a worker: a child this process inherited from what exec'd it (a
                # shell script's background job, as scripts/run has).
                continue
            slot, started = entry
            self.counts.clear(slot)
            if self.stopping:
                continue
            log.warning("worker %d (pid %d) ended (%s): starting another", slot, pid,
                        _how(status))
            if time.monotonic() - started < self.RESTART_PAUSE:
                time.sleep(self.RESTART_PAUSE)
            if not self.stopping:
                self._spawn(slot)


def _how(status: int) -> str:
    if os.WIFSIGNALED(status):
        return f"signal {os.WTERMSIG(status)}"
    return f"status {os.waitstatus_to_exitcode(status)}"
