"""The crash journal: what is in flight, so the next start can clean it up.

An operation writes its staging name here in the same transaction that reserves the
volume name. If the process dies, the row stays; the next process to open the state
root sees its owner is gone, discards the staging object, and settles the name: the
volume the operation left under it (complete: a volume takes its final name only once
its data is), or none.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable

from virtstore.engine.store import Store
from virtstore.host.files import own_start_time, process_alive

TYPE_CHECKING = False
if TYPE_CHECKING:
    import sqlite3


def _warn(msg: str, *args: object) -> None:
    # Imported only when a dead process's work is cleaned up: every command loads
    # this module, few have anything to log.
    import logging

    logging.getLogger("virtstore").warning(msg, *args)

def begin(db: sqlite3.Connection, op: str, pool: str, name: str, tmp_path: str | None,
          final_path: str | None) -> int:
    pid = os.getpid()
    start = own_start_time() or "?"
    cur = db.execute("INSERT INTO journal(op, pool, name, tmp_path, final_path, pid, pid_start,"
                     " started) VALUES(?,?,?,?,?,?,?,?)",
                     (op, pool, name, tmp_path, final_path, pid, start, time.time()))
    return int(cur.lastrowid or 0)


def end(store: Store, entry: int) -> None:
    with store.write() as db:
        db.execute("DELETE FROM journal WHERE id=?", (entry,))


def recover(store: Store, discard: Callable[[str, str, str], None],
            settle: Callable[[str, str], str]) -> list[str]:
    """Clean up after operations whose process died; returns what was done, for the log.

    ``discard(pool, name, tmp_path)`` removes one staging object. ``settle(pool, name)``
    then makes the index say what the pool holds under the name, in the same
    transaction, and says what it did. Freeing the name is not enough: the process may
    have died after its volume took the final name, or after its delete removed the
    volume, and the index must not answer otherwise than a refresh would.
    """
    rows = store.query("SELECT * FROM journal")
    dead = [r for r in rows if not process_alive(int(r["pid"]), str(r["pid_start"]))]
    cleaned: list[str] = []
    for r in dead:
        with store.write() as db:
            still = db.execute("SELECT id FROM journal WHERE id=?", (r["id"],)).fetchone()
            if still is None:
                continue  # another process got to it first
            if r["tmp_path"]:
                try:
                    discard(r["pool"], r["name"], r["tmp_path"])
                except Exception as exc:
                    _warn("could not remove leftover '%s': %s", r["tmp_path"], exc)
                    continue
            try:
                outcome = settle(r["pool"], r["name"])
            except Exception as exc:
                # Kept for the next process: the name stays reserved (as a refresh
                # leaves it) rather than being guessed at.
                _warn("could not look at volume '%s' in pool '%s' after an "
                            "interrupted %s: %s", r["name"], r["pool"], r["op"], exc)
                continue
            db.execute("DELETE FROM journal WHERE id=?", (r["id"],))
        removed = f"removed '{r['tmp_path']}', " if r["tmp_path"] else ""
        what = (f"interrupted {r['op']} of volume '{r['name']}' in pool '{r['pool']}' "
                f"(process {r['pid']}): {removed}{outcome}")
        _warn("cleaned up %s", what)
        cleaned.append(what)
    discarded = [r for r in dead if r["tmp_path"]]
    if discarded:
        # A tool the dead process ran (qemu-img) is killed with it (PDEATHSIG), but the
        # signal is delivered asynchronously: it may still create its output file in the
        # instant after. Look once more, a little later.
        import time

        time.sleep(0.2)
        for r in discarded:
            try:
                discard(r["pool"], r["name"], r["tmp_path"])
            except Exception as exc:
                _warn("could not remove leftover '%s': %s", r["tmp_path"], exc)
    return cleaned
