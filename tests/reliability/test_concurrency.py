"""Processes racing on one pool: create, clone, resize and delete on overlapping names,
with a process refreshing and listing all along. Once on the embedded engine (every
process opens the same state root), once with several clients of one virtstored.

Legitimate failures (docs/reliability.md): ``already-exists`` (create or clone onto a
name that is taken or being made), ``no-such-volume`` (the volume is not there, or is
still being made or being deleted), ``busy`` (a job holds the volume). Anything else,
or a job that starts and then fails, is a bug.
"""

from __future__ import annotations

import multiprocessing
import os
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import pytest

from reliability import summary
from reliability.harness import RACE_SIZES, STAGING_PREFIX, race_lister, race_worker
from virtstore.api import Connection
from virtstore.api.embedded import EmbeddedConnection

WORKERS = 4
OPS = int(os.environ.get("VIRTSTORE_RELIABILITY_OPS", "600"))
NAMES = [f"v{i}" for i in range(8)]
LEGITIMATE = {
    "create": {"already-exists"},
    "clone": {"already-exists", "no-such-volume", "busy"},
    "resize": {"no-such-volume", "busy"},
    "delete": {"no-such-volume", "busy"},
}


def race(target: str, pool: str, seed: int) -> tuple[list[tuple[str, str, str, str]], int]:
    ctx = multiprocessing.get_context("spawn")
    stop = ctx.Manager().Event()
    with ProcessPoolExecutor(WORKERS + 1, mp_context=ctx) as ex:
        lister = ex.submit(race_lister, target, pool, stop)
        futures = [ex.submit(race_worker, target, pool, seed * 100 + k, OPS, NAMES)
                   for k in range(WORKERS)]
        results = [r for f in futures for r in f.result(timeout=300)]
        stop.set()
        listings, failures = lister.result(timeout=60)
    assert not failures, f"refresh/list failed meanwhile: {failures[:5]}"
    assert listings > 0
    summary.add("ops", len(results))
    summary.add("listings", listings)
    return results, listings


def check_outcome(conn: Connection, pool: str, pooldir: Path,
                  results: list[tuple[str, str, str, str]]) -> None:
    bad = [r for r in results if r[2] != "ok" and r[2] not in LEGITIMATE[r[0]]]
    assert not bad, f"illegitimate failures: {bad[:10]}"
    # Every name: successful creations (create or clone onto it) minus successful
    # deletions is 0 or 1, and 1 exactly when it exists now.
    made = Counter(r[1] for r in results if r[2] == "ok" and r[0] in ("create", "clone"))
    gone = Counter(r[1] for r in results if r[2] == "ok" and r[0] == "delete")
    conn.pool_refresh(pool)
    listed = {v.name: v for v in conn.list_volumes(pool)}
    for name in NAMES:
        want = 1 if name in listed else 0
        fits = made[name] - gone[name] == want
        if not fits:
            summary.lost(f"'{name}': {made[name]} made, {gone[name]} deleted, "
                         f"{'listed' if want else 'absent'}")
        assert fits, (f"'{name}': made {made[name]}, deleted {gone[name]}, "
                      f"listed: {bool(want)}")
    files = sorted(os.listdir(pooldir))
    assert not [f for f in files if f.startswith(STAGING_PREFIX)], files
    assert files == sorted(listed), f"directory {files} vs listing {sorted(listed)}"
    for v in listed.values():
        assert v.capacity in RACE_SIZES and (pooldir / v.name).stat().st_size == v.capacity
    assert not conn.list_jobs(include_finished=False)
    for name in listed:  # no lock left behind: everything can be deleted
        conn.volume_delete(pool, name)
    assert os.listdir(pooldir) == []
    kinds = Counter((r[0], r[2]) for r in results)
    assert kinds[("create", "ok")] and kinds[("delete", "ok")], kinds


def _pool(conn: Connection, pooldir: Path) -> str:
    pooldir.mkdir()
    conn.pool_define_xml(f"<pool type='dir'><name>race</name><target><path>{pooldir}"
                         "</path></target></pool>")
    conn.pool_start("race")
    return "race"


def test_race_embedded(area: Path) -> None:
    root = area / "state"
    with EmbeddedConnection(str(root)) as conn:
        pool = _pool(conn, area / "pool")
    results, _ = race(str(root), pool, seed=1)
    with EmbeddedConnection(str(root)) as conn:
        check_outcome(conn, pool, area / "pool", results)


def test_race_clients_of_one_daemon(area: Path) -> None:
    import virtstore
    from server_fixtures import start_daemon

    try:
        daemon = start_daemon(area / "state")
    except RuntimeError as exc:
        pytest.fail(f"virtstored did not start: {exc}")
    try:
        conn = virtstore.connect(daemon.rw_uri)
        try:
            pool = _pool(conn, area / "pool")
            results, _ = race(daemon.rw_uri, pool, seed=2)
            check_outcome(conn, pool, area / "pool", results)
        finally:
            conn.close()
    finally:
        daemon.stop()
