"""Monitor: throttle sleeps, progress reports and cancel checks, on a fake clock."""

from __future__ import annotations

import pytest

from virtstore.data.monitor import CHECK_BYTES, Monitor
from virtstore.errors import Cancelled, InvalidArgument

MiB = 1 << 20


class FakeClock:
    """Time that moves only when slept on or told to."""

    def __init__(self) -> None:
        self.now = 1000.0
        self.sleeps: list[float] = []

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        assert seconds > 0
        self.sleeps.append(seconds)
        self.now += seconds


def monitor(clock: FakeClock, **kw: object) -> Monitor:
    return Monitor(clock=clock, sleep=clock.sleep, **kw)  # type: ignore[arg-type]


def test_throttle_sleeps_to_keep_the_average_rate() -> None:
    clock = FakeClock()
    m = monitor(clock, total=100 * MiB, bandwidth=10 * MiB)
    for _ in range(100):
        m.advance(MiB)
    # 100 MiB at 10 MiB/s take 10 s, all of it spent sleeping here.
    assert sum(clock.sleeps) == pytest.approx(10.0)
    assert clock.now - 1000.0 == pytest.approx(10.0)
    assert max(clock.sleeps) <= 0.1 + 1e-9  # sliced, so a cancel is seen in time


def test_throttle_one_big_step_sleeps_its_whole_share() -> None:
    clock = FakeClock()
    m = monitor(clock, bandwidth=4 * MiB)
    m.advance(8 * MiB)
    assert sum(clock.sleeps) == pytest.approx(2.0)


def test_no_sleep_when_the_work_is_slower_than_the_limit() -> None:
    clock = FakeClock()
    m = monitor(clock, bandwidth=10 * MiB)
    for _ in range(20):
        clock.now += 0.2  # 1 MiB per 0.2 s = 5 MiB/s
        m.advance(MiB)
    assert clock.sleeps == []


def test_holes_do_not_count_against_the_limit() -> None:
    clock = FakeClock()
    m = monitor(clock, total=1 << 40, bandwidth=MiB)
    m.skip(1 << 40)
    assert clock.sleeps == []
    assert m.done == 1 << 40


def test_unused_bandwidth_is_caught_up_for_one_second_only() -> None:
    clock = FakeClock()
    m = monitor(clock, bandwidth=10 * MiB)
    clock.now += 60.0  # a long stall
    for _ in range(30):
        m.advance(MiB)
    # 30 MiB at 10 MiB/s: 3 s, minus at most 1 s of credit.
    assert sum(clock.sleeps) == pytest.approx(2.0)


def test_changing_the_bandwidth_restarts_the_average() -> None:
    clock = FakeClock()
    m = monitor(clock, bandwidth=10 * MiB)
    m.advance(10 * MiB)
    assert sum(clock.sleeps) == pytest.approx(1.0)
    m.bandwidth = 1 * MiB
    clock.sleeps.clear()
    m.advance(2 * MiB)
    assert sum(clock.sleeps) == pytest.approx(2.0)
    m.bandwidth = None
    clock.sleeps.clear()
    m.advance(100 * MiB)
    assert clock.sleeps == []


def test_invalid_bandwidth() -> None:
    with pytest.raises(InvalidArgument):
        Monitor(bandwidth=0)
    with pytest.raises(InvalidArgument):
        Monitor(total=-1)


def test_chunk_size_follows_the_bandwidth() -> None:
    assert Monitor().chunk_size(8 * MiB) == 8 * MiB
    assert Monitor(bandwidth=10 * MiB).chunk_size(8 * MiB) == MiB
    assert Monitor(bandwidth=1000).chunk_size(8 * MiB) == 64 << 10


def test_progress_is_reported_at_most_ten_times_a_second_and_at_the_end() -> None:
    clock = FakeClock()
    calls: list[tuple[int, int]] = []
    m = monitor(clock, total=1000, on_progress=lambda d, t: calls.append((d, t)))
    for _ in range(999):
        m.advance(1)
    assert calls == [(1, 1000)]  # the clock did not move: only the first report
    m.advance(1)
    assert calls[-1] == (1000, 1000)  # reaching the total is always reported
    clock.now += 0.05
    m.advance(0)
    assert len(calls) == 2
    clock.now += 0.06
    m.advance(0)
    assert len(calls) == 3


class NeverCancel:
    """A should_cancel that counts how often it was asked."""

    def __init__(self) -> None:
        self.asked = 0

    def __call__(self) -> bool:
        self.asked += 1
        return False


def test_cancel_is_asked_every_64_mib_without_time_passing() -> None:
    clock, cancel = FakeClock(), NeverCancel()
    m = monitor(clock, should_cancel=cancel)
    for _ in range(640):
        m.advance(MiB)
    assert cancel.asked == 640 * MiB // CHECK_BYTES


def test_cancel_is_asked_every_200_ms() -> None:
    clock, cancel = FakeClock(), NeverCancel()
    m = monitor(clock, should_cancel=cancel)
    for _ in range(10):
        clock.now += 0.25
        m.advance(1)
    assert cancel.asked == 10


def test_cancel_raises() -> None:
    clock = FakeClock()
    stop = False
    m = monitor(clock, should_cancel=lambda: stop)
    m.advance(MiB)
    stop = True
    clock.now += 0.3
    with pytest.raises(Cancelled):
        m.advance(MiB)
    with pytest.raises(Cancelled):
        m.check()


def test_cancel_is_seen_during_a_throttle_sleep() -> None:
    clock = FakeClock()
    m = monitor(clock, bandwidth=MiB, should_cancel=lambda: clock.now > 1001.0)
    with pytest.raises(Cancelled):
        m.advance(100 * MiB)  # would sleep 100 s
    assert clock.now < 1001.5


def test_cancel_method_is_seen_at_once() -> None:
    m = Monitor()
    m.advance(1)
    m.cancel()
    assert m.cancelled()
    with pytest.raises(Cancelled):
        m.advance(1)


def test_advance_to_counts_a_reported_position() -> None:
    clock = FakeClock()
    m = monitor(clock, total=100, bandwidth=10)
    m.advance_to(50, metered=False)
    m.advance_to(40, metered=False)  # going back is ignored
    assert m.done == 50
    assert clock.sleeps == []
