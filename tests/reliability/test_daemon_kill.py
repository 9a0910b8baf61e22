"""virtstored SIGKILLed during a burst of volume creates from several clients, then
started again on the same root: what it lists at once is what a refresh lists, every
volume on disk under a final name is listed, every acknowledged create is there, and a
create that was never answered is settled (there and taken, or absent and free).
"""

from __future__ import annotations

import os
import random
import signal
import threading
import time
from pathlib import Path

import pytest

from reliability import summary
from reliability.harness import STAGING_PREFIX
from virtstore.api import Connection, VolumeCreateArgs
from virtstore.errors import AlreadyExists, NoSuchVolume

SEED = int(os.environ.get("VIRTSTORE_RELIABILITY_SEED", "20240611"))
ROUNDS = 8
CLIENTS = 4
PER_CLIENT = 75  # 300 creates a round
SIZE = 64 << 10


def _connect(uri: str) -> Connection:
    import virtstore

    return virtstore.connect(uri)


def _burst(uri: str, pool: str, names: list[str], acked: set[str], tried: set[str],
           errors: list[str], killed: threading.Event) -> None:
    conn = _connect(uri)
    try:
        for name in names:
            tried.add(name)
            try:
                conn.volume_create(pool, VolumeCreateArgs(name, SIZE, allocation=0))
            except Exception as exc:
                if not killed.is_set():
                    errors.append(f"{name}: {type(exc).__name__}: {exc}")
                return
            acked.add(name)
    finally:
        conn.close()


def _check_after_restart(conn: Connection, pool: str, pooldir: Path, acked: set[str],
                         unanswered: set[str]) -> None:
    before = conn.list_volumes(pool)
    listed = {v.name for v in before}
    files = sorted(os.listdir(pooldir))
    assert not [f for f in files if f.startswith(STAGING_PREFIX)], files
    unlisted = [f for f in files if not f.startswith(".") and f not in listed]
    if unlisted:
        summary.lost(f"on disk, not listed after a daemon kill: {unlisted}")
    assert not unlisted, f"on disk under a final name but not listed: {unlisted}"
    lost = sorted(acked - listed)
    if lost:
        summary.lost(f"acknowledged creates lost after a daemon kill: {lost}")
    assert not lost, f"acknowledged creates not listed: {lost}"
    for name in sorted(unanswered):
        if name in listed:
            assert conn.volume_info(pool, name).capacity == SIZE
            with pytest.raises(AlreadyExists):
                conn.volume_create(pool, VolumeCreateArgs(name, SIZE, allocation=0))
        else:
            with pytest.raises(NoSuchVolume):
                conn.volume_info(pool, name)
    conn.pool_refresh(pool)
    after = conn.list_volumes(pool)
    assert before == after, (
        f"listing changed by a refresh: only before {sorted(set(before) - set(after))}, "
        f"only after {sorted(set(after) - set(before))}")
    for name in sorted(unanswered - listed):  # the name is free again
        conn.volume_create(pool, VolumeCreateArgs(name, SIZE, allocation=0))


def test_daemon_killed_during_a_create_burst(area: Path) -> None:
    from server_fixtures import start_daemon

    rng = random.Random(f"{SEED}-daemon-kill")
    root, pooldir = area / "state", area / "pool"
    pooldir.mkdir()
    daemon = start_daemon(root)
    try:
        conn = _connect(daemon.rw_uri)
        conn.pool_define_xml(f"<pool type='dir'><name>burst</name><target><path>{pooldir}"
                             "</path></target></pool>")
        conn.pool_start("burst")
        conn.close()
        for rnd in range(ROUNDS):
            acked: set[str] = set()
            tried: set[str] = set()
            errors: list[str] = []
            killed = threading.Event()
            threads = [threading.Thread(target=_burst, args=(
                daemon.rw_uri, "burst", [f"r{rnd}-c{k}-{i}" for i in range(PER_CLIENT)],
                acked, tried, errors, killed)) for k in range(CLIENTS)]
            for t in threads:
                t.start()
            # A random moment within the burst, measured in acknowledged creates.
            at = rng.randrange(10, CLIENTS * PER_CLIENT - 20)
            deadline = time.monotonic() + 30
            while len(acked) < at and time.monotonic() < deadline and not errors:
                time.sleep(0.001)
            killed.set()
            os.kill(daemon.proc.pid, signal.SIGKILL)
            daemon.proc.wait(10)
            daemon.stop()
            for t in threads:
                t.join(30)
            assert not errors, errors[:5]
            assert len(acked) >= at, f"only {len(acked)} creates answered in 30 s"
            summary.add("kills")
            daemon = start_daemon(root)
            conn = _connect(daemon.rw_uri)
            try:
                _check_after_restart(conn, "burst", pooldir, acked, tried - acked)
            finally:
                conn.close()
    finally:
        daemon.stop()
