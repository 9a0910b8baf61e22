"""Progress, bandwidth limit and cancellation for long data operations.

A ``Monitor`` is what a data function reports to: ``advance(n)`` after moving ``n``
bytes, ``skip(n)`` after passing over ``n`` bytes that cost no I/O (a hole). It keeps
the average rate at or under ``bandwidth`` by sleeping, calls ``on_progress(done,
total)`` at most ``REPORT_INTERVAL`` apart (plus once when the total is reached), and
raises Cancelled once ``should_cancel()`` turns true or ``cancel()`` was called.

``should_cancel`` may be costly (a look at a job table), so it is asked at most every
``CHECK_INTERVAL`` seconds, and whenever ``CHECK_BYTES`` more bytes were done, and
before each long sleep; ``cancel()`` is seen at once. The clock and the sleep are
injectable, so the throttle can be tested without waiting.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

from virtstore.errors import Cancelled, InvalidArgument

REPORT_INTERVAL = 0.1  # seconds between two on_progress calls
CHECK_INTERVAL = 0.2  # seconds between two should_cancel calls, at most
CHECK_BYTES = 64 << 20  # bytes between two should_cancel calls, at most
SLEEP_SLICE = 0.1  # a throttle sleep is cut in slices this long to see a cancel
BURST = 1.0  # seconds of unused bandwidth that may be caught up at full speed


class Monitor:
    """Bytes done / total, a bandwidth limit and a cancel flag for one operation."""

    def __init__(self, total: int = 0, *, bandwidth: int | None = None,
                 on_progress: Callable[[int, int], None] | None = None,
                 should_cancel: Callable[[], bool] | None = None,
                 clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], None] = time.sleep) -> None:
        if total < 0:
            raise InvalidArgument(f"invalid total {total}")
        self._total = total
        self._done = 0
        self._on_progress = on_progress
        self._should_cancel = should_cancel
        self._clock = clock
        self._sleep = sleep
        self._cancelled = threading.Event()
        now = clock()
        self._last_report = now - REPORT_INTERVAL
        self._reported_total = False
        self._last_check = now
        self._checked_at = 0
        # The throttle's baseline: bytes counted against the limit since ``_t0``.
        self._bandwidth: int | None = None
        self._t0 = now
        self._metered = 0
        self.bandwidth = bandwidth
        # Set with a cancel when the operation lost the right to write (its cluster
        # lease): it must not undo what it wrote either, since an undo is a write too.
        self.fenced = False

    # -- state -------------------------------------------------------------------------

    @property
    def done(self) -> int:
        return self._done

    @property
    def total(self) -> int:
        return self._total

    def set_total(self, n: int) -> None:
        if n < 0:
            raise InvalidArgument(f"invalid total {n}")
        self._total = n
        self._reported_total = False

    @property
    def bandwidth(self) -> int | None:
        """Bytes per second, None for no limit. May be changed while the operation runs:
        the average is then measured from the change on."""
        return self._bandwidth

    @bandwidth.setter
    def bandwidth(self, value: int | None) -> None:
        if value is not None and value <= 0:
            raise InvalidArgument(f"invalid bandwidth {value}: it must be a positive number "
                                  "of bytes per second")
        self._bandwidth = value
        self._t0 = self._clock()
        self._metered = 0

    def chunk_size(self, default: int) -> int:
        """How many bytes to move per step: ``default``, or about a tenth of a second's
        worth when throttled (at least 64 KiB), so the rate stays smooth."""
        bw = self._bandwidth
        if bw is None:
            return default
        return max(64 << 10, min(default, (bw // 10) & ~4095))

    # -- cancellation ------------------------------------------------------------------

    def cancel(self) -> None:
        """Ask the operation to stop (from any thread); it raises Cancelled soon."""
        self._cancelled.set()

    def cancelled(self) -> bool:
        """True once cancel() was called or should_cancel() returned true (asked now)."""
        if self._cancelled.is_set():
            return True
        self._last_check = self._clock()
        self._checked_at = self._done
        if self._should_cancel is not None and self._should_cancel():
            self._cancelled.set()
            return True
        return False

    def check(self) -> None:
        """Raise Cancelled if the operation was asked to stop."""
        if self.cancelled():
            raise Cancelled("the operation was cancelled")

    def _maybe_check(self) -> None:
        if self._cancelled.is_set():
            raise Cancelled("the operation was cancelled")
        if (self._done - self._checked_at >= CHECK_BYTES
                or self._clock() - self._last_check >= CHECK_INTERVAL):
            self.check()

    # -- progress ----------------------------------------------------------------------

    def advance(self, n: int) -> None:
        """Count ``n`` bytes moved: report, throttle, and raise Cancelled if asked to stop."""
        self._add(n, metered=True)

    def skip(self, n: int) -> None:
        """Count ``n`` bytes passed over without I/O (holes): they count for progress but
        not against the bandwidth limit."""
        self._add(n, metered=False)

    def advance_to(self, done: int, *, metered: bool = True) -> None:
        """Set the bytes done to ``done`` when a tool reports a position, not a step."""
        if done > self._done:
            self._add(done - self._done, metered=metered)

    def report(self) -> None:
        """Call on_progress now."""
        self._last_report = self._clock()
        if self._done >= self._total:
            self._reported_total = True
        if self._on_progress is not None:
            self._on_progress(self._done, self._total)

    def _add(self, n: int, *, metered: bool) -> None:
        if n < 0:
            raise ValueError(f"negative progress {n}")
        self._done += n
        if metered:
            self._forget_old_credit()
            self._metered += n
        self._maybe_check()
        if metered and self._bandwidth is not None:
            self._throttle()
        now = self._clock()
        if now - self._last_report >= REPORT_INTERVAL or (
                self._total and self._done >= self._total and not self._reported_total):
            self.report()

    def throttle_delay(self) -> float:
        """Seconds to wait now so the average rate since the baseline is ≤ bandwidth."""
        bw = self._bandwidth
        if bw is None:
            return 0.0
        due = self._t0 + self._metered / bw
        return max(0.0, due - self._clock())

    def _forget_old_credit(self) -> None:
        # Behind by more than the burst (the disk was slow, or the caller paused):
        # forget the old credit rather than run unthrottled to make it all up.
        bw = self._bandwidth
        if bw is None:
            return
        now = self._clock()
        if self._t0 + self._metered / bw < now - BURST:
            self._t0 = now - BURST
            self._metered = 0

    def _throttle(self) -> None:
        delay = self.throttle_delay()
        while delay > 0:
            self._sleep(min(delay, SLEEP_SLICE))
            self._maybe_check()
            delay = self.throttle_delay()
