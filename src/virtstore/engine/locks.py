"""Per-volume locks shared by every process on the root: never a pool-wide lock.

A copy takes its source for reading and its target for writing; any number of readers
may hold a volume at once, a writer holds it alone. Locks are rows in the store, taken
all-or-nothing in one write transaction, and owned by a job or operation id plus the
owning process, so a dead process's locks are recognised and dropped.
"""

from __future__ import annotations

import os
import sqlite3
from collections.abc import Iterable

from virtstore.engine.store import Store
from virtstore.errors import Busy
from virtstore.host.files import own_start_time, process_alive

READ = "r"
WRITE = "w"


def _drop_stale(db: sqlite3.Connection, pool: str, name: str) -> None:
    for row in db.execute("SELECT DISTINCT pid, pid_start FROM vol_locks WHERE pool=? AND "
                          "name=?", (pool, name)).fetchall():
        if not process_alive(int(row["pid"]), str(row["pid_start"])):
            db.execute("DELETE FROM vol_locks WHERE pid=? AND pid_start=?",
                       (row["pid"], row["pid_start"]))


def acquire(db: sqlite3.Connection, wanted: Iterable[tuple[str, str, str]], owner: str) -> None:
    """Take every (pool, name, mode) or none; raise Busy naming the first conflict.

    Runs inside the caller's write transaction.
    """
    items = list(wanted)
    for pool, name, mode in items:
        _drop_stale(db, pool, name)
        held = db.execute("SELECT mode FROM vol_locks WHERE pool=? AND name=? AND owner!=?",
                          (pool, name, owner)).fetchall()
        if any(mode == WRITE or h["mode"] == WRITE for h in held):
            raise Busy(f"Requested operation is not valid: volume '{name}' in pool '{pool}' "
                       "is in use by a running job")
    pid = os.getpid()
    start = own_start_time() or "?"
    db.executemany("INSERT INTO vol_locks(pool, name, mode, owner, pid, pid_start) "
                   "VALUES(?,?,?,?,?,?)", [(p, n, m, owner, pid, start) for p, n, m in items])


def release(store: Store, owner: str) -> None:
    with store.write() as db:
        db.execute("DELETE FROM vol_locks WHERE owner=?", (owner,))


def check_free(db: sqlite3.Connection, pool: str, name: str, owner: str = "") -> None:
    """Raise Busy if any live job (other than ``owner``) holds the volume (used by
    delete, wipe, resize)."""
    _drop_stale(db, pool, name)
    if db.execute("SELECT 1 FROM vol_locks WHERE pool=? AND name=? AND owner!=? LIMIT 1",
                  (pool, name, owner)).fetchone() is not None:
        raise Busy(f"Requested operation is not valid: volume '{name}' in pool '{pool}' is in "
                   "use by a running job")


def pool_busy(db: sqlite3.Connection, pool: str) -> bool:
    rows = db.execute("SELECT DISTINCT name FROM vol_locks WHERE pool=?", (pool,)).fetchall()
    for r in rows:
        _drop_stale(db, pool, r["name"])
    return db.execute("SELECT 1 FROM vol_locks WHERE pool=? LIMIT 1", (pool,)).fetchone() \
        is not None
