"""SIGKILL in the middle of create, clone, convert, upload, wipe and resize.

Every trial runs the operation in a child process on a real dir pool under /var/lib,
kills it at a random point and checks the invariants of ``harness.Trial.check`` from a
new connection. The seed is fixed for CI; ``VIRTSTORE_RELIABILITY_SEED`` changes it and
``VIRTSTORE_RELIABILITY_KILLS`` scales the number of kills per operation.
"""

from __future__ import annotations

import os
import random
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from conftest import requires_qemu_img as needs_qemu_img
from reliability import summary
from reliability.harness import (
    Expect,
    Kill,
    MiB,
    Outcome,
    Trial,
    pattern,
    qcow2_of,
    random_kill,
    raw_bytes,
    run_and_kill,
    sha,
    wiped_front_to_back,
    zero_raw,
)

SEED = int(os.environ.get("VIRTSTORE_RELIABILITY_SEED", "20240611"))
SCALE = float(os.environ.get("VIRTSTORE_RELIABILITY_KILLS", "1"))
SIZE = 4 * MiB
# 16 MiB/s: a 4 MiB copy takes a quarter of a second, long enough to land in it.
BANDWIDTH = 16 * MiB


def kills(n: int) -> int:
    return max(1, round(n * SCALE))


@pytest.fixture
def trial(area: Path) -> Iterator[Trial]:
    yield Trial.make(area)


def put(trial: Trial, name: str, data: bytes) -> None:
    """Write a volume's bytes behind the engine's back (then refresh)."""
    trial.path(name).write_bytes(data)
    os.chmod(trial.path(name), 0o600)
    with trial.fresh() as c:
        c.pool_refresh(trial.pool)


def until_killed(target: int, attempt: Callable[[int], Outcome], *, limit: int = 4) -> int:
    """Run trials until ``target`` of them killed a live child; returns the kills."""
    done = tries = 0
    while done < target and tries < target * limit:
        out = attempt(tries)
        tries += 1
        done += out.killed
    assert done >= target, f"only {done} of {tries} trials killed their child in time"
    return done


def assert_clean(problems: list[str], out: Outcome, kill: Kill) -> None:
    assert not problems, (f"after a kill {kill.describe()} (child said {out.lines}, "
                          f"seed {SEED}): " + "; ".join(problems))


@pytest.mark.parametrize("fmt", ["raw", "qcow2"])
def test_kill_during_create(trial: Trial, fmt: str) -> None:
    rng = random.Random(f"{SEED}-create-{fmt}")
    cap = MiB
    made = qcow2_of(cap, deep=False) if fmt == "qcow2" else zero_raw(cap)
    last = qcow2_of(cap) if fmt == "qcow2" else zero_raw(cap)

    def attempt(t: int) -> Outcome:
        names = [f"{fmt}-{t}-{i}" for i in range(300)]
        # Some kills land while the child starts and opens the root, most in the loop.
        kill = (Kill(after="start", delay=rng.uniform(0.02, 0.15)) if rng.random() < 0.2
                else Kill(after="ready", delay=rng.uniform(0, 0.12)))
        spec = trial.spec("create", names=names, capacity=cap, format=fmt,
                          allocation=cap if fmt == "raw" else None)
        out = run_and_kill(spec, kill)
        created = [w[0] for w in out.words("created")]
        for n in created:
            trial.expected[n] = made
        in_flight = {names[len(created)]: last} if len(created) < len(names) else {}
        if out.killed and "ready" in out.lines:
            summary.add("kills_mid_op")
        with trial.fresh() as c:
            assert_clean(trial.check(c, out, in_flight=in_flight), out, kill)
            for n in list(trial.expected):
                trial.forget(c, n)
        return out

    until_killed(kills(24), attempt)


def _source(trial: Trial) -> bytes:
    data = pattern(1, SIZE)
    put(trial, "src", data)
    trial.expected["src"] = raw_bytes(sha(data), size=SIZE)
    return data


def _source_is_free(trial: Trial) -> None:
    """A write job on the source starts (and ends): nothing holds a lock on it."""
    with trial.fresh() as c:
        info = c.job_wait(c.volume_resize(trial.pool, "src", SIZE).id, timeout=30)
        assert info.state == "done", info.error


def test_kill_during_clone(trial: Trial) -> None:
    rng = random.Random(f"{SEED}-clone")
    data = _source(trial)

    def attempt(t: int) -> Outcome:
        dst = f"copy-{t}"
        kill = random_kill(rng, after="job", span=0.3, progress_total=SIZE)
        out = run_and_kill(trial.spec("clone", src="src", dst=dst, bandwidth=BANDWIDTH),
                           kill)
        with trial.fresh() as c:
            problems = trial.check(c, out, in_flight={dst: raw_bytes(sha(data), size=SIZE)})
            assert_clean(problems, out, kill)
            if dst in trial.expected:
                trial.forget(c, dst)
        if t % 5 == 0:
            _source_is_free(trial)
        return out

    until_killed(kills(24), attempt)


@needs_qemu_img
def test_kill_during_convert(trial: Trial) -> None:
    """raw to qcow2 through qemu-img (clone with a format, and create-from)."""
    rng = random.Random(f"{SEED}-convert")
    _source(trial)

    def attempt(t: int) -> Outcome:
        dst = f"conv-{t}.qcow2"
        if t % 2:
            spec = trial.spec("clone", src="src", dst=dst, format="qcow2", bandwidth=BANDWIDTH)
        else:
            xml = (f"<volume><name>{dst}</name><target><format type='qcow2'/></target>"
                   "</volume>")
            spec = trial.spec("create-from", src="src", xml=xml, bandwidth=BANDWIDTH)
        kill = random_kill(rng, after="job", span=0.35, progress_total=SIZE)
        out = run_and_kill(spec, kill)
        with trial.fresh() as c:
            problems = trial.check(c, out,
                                   in_flight={dst: qcow2_of(SIZE, same_as=trial.path("src"))})
            assert_clean(problems, out, kill)
            if dst in trial.expected:
                trial.forget(c, dst)
        return out

    until_killed(kills(18), attempt)


def test_kill_during_upload(trial: Trial, area: Path) -> None:
    """An upload that covers the volume replaces it whole or not at all."""
    rng = random.Random(f"{SEED}-upload")
    contents = [pattern(10, SIZE), pattern(11, SIZE)]
    files = []
    for i, data in enumerate(contents):
        files.append(area / f"upload-{i}")
        files[-1].write_bytes(data)
    put(trial, "up", contents[0])
    trial.expected["up"] = raw_bytes(sha(contents[0]), size=SIZE)

    def attempt(t: int) -> Outcome:
        now = trial.path("up").read_bytes()
        other = 1 if now == contents[0] else 0
        kill = random_kill(rng, after="job", span=0.3, progress_total=SIZE)
        out = run_and_kill(trial.spec("upload", name="up", file=str(files[other]),
                                      bandwidth=BANDWIDTH), kill)
        trial.expected["up"] = raw_bytes(sha(now), sha(contents[other]), size=SIZE)
        with trial.fresh() as c:
            assert_clean(trial.check(c, out), out, kill)
        return out

    until_killed(kills(20), attempt)


def test_kill_during_wipe(trial: Trial) -> None:
    """A raw volume is wiped in place: a killed wipe leaves it the same size, listed and
    usable, destroyed from the start up to some point and untouched after it."""
    rng = random.Random(f"{SEED}-wipe")
    size = 2 * MiB

    def attempt(t: int) -> Outcome:
        original = pattern(100 + t, size)
        put(trial, "w", original)
        trial.expected["w"] = wiped_front_to_back(original)
        kill = random_kill(rng, after="job", span=0.3, progress_total=size)
        out = run_and_kill(trial.spec("wipe", name="w", algorithm="random",
                                      bandwidth=8 * MiB), kill)
        with trial.fresh() as c:
            assert_clean(trial.check(c, out), out, kill)
        return out

    until_killed(kills(16), attempt)


@needs_qemu_img
def test_kill_during_resize(trial: Trial) -> None:
    """Raw (ftruncate; with allocation when growing) and qcow2 (qemu-img resize): the
    capacity is the old one or the new one, the data is kept either way."""
    from virtstore.api import VolumeCreateArgs

    rng = random.Random(f"{SEED}-resize")
    head = pattern(7, MiB)
    small, big = 2 * MiB, 24 * MiB

    def raw_of(*sizes: int) -> Expect:
        return raw_bytes(*(sha(head + bytes(n - MiB)) for n in sizes))

    for name in ("r", "ra"):
        put(trial, name, head + bytes(small - MiB))
        trial.expected[name] = raw_of(small)
    with trial.fresh() as c:
        c.volume_create(trial.pool, VolumeCreateArgs("q", small, format="qcow2"))
    trial.expected["q"] = qcow2_of(small, big)

    def attempt(t: int) -> Outcome:
        name = ("r", "q", "ra")[t % 3]
        with trial.fresh() as c:
            cur = c.volume_info(trial.pool, name).capacity
        if name == "ra":  # grows by 4 MiB each time, allocated
            new, shrink, allocate = cur + 4 * MiB, False, True
        else:  # toggles between two sizes, sparse
            new, shrink, allocate = (big if cur == small else small), cur != small, False
        if name != "q":
            trial.expected[name] = raw_of(cur, new)
        spec = trial.spec("resize", name=name, capacity=new, shrink=shrink, allocate=allocate)
        kill = Kill(after="job", delay=rng.uniform(0, 0.02 if name != "q" else 0.06))
        out = run_and_kill(spec, kill)
        with trial.fresh() as c:
            assert_clean(trial.check(c, out), out, kill)
        return out

    until_killed(kills(18), attempt, limit=10)
