"""Events in the shared store: every process on the root sees every other's.

Lifecycle events (pools defined, started, ...; volumes created, deleted) and job
progress go into one append-only table; subscribers poll it by id. That is what lets a
CLI command, the daemon and a test all watch the same host without a message bus.
"""

from __future__ import annotations

import json
import threading
import time

from virtstore.engine.store import Store
from virtstore.types import Event, JobInfo

# Old events are pruned so the table stays small; a subscriber that falls this far
# behind has missed them (it can re-list to resynchronise).
KEEP_EVENTS = 10_000
_POLL = 0.05


class EventLog:
    def __init__(self, store: Store) -> None:
        self.store = store
        self._since_prune = 0
        self._closed = threading.Event()

    def close(self) -> None:
        """Readers waiting in ``since`` return at once, and later calls find nothing:
        the store is about to close under them."""
        self._closed.set()

    def emit(self, kind: str, action: str, *, pool: str | None = None,
             name: str | None = None, job: JobInfo | None = None) -> None:
        payload = json.dumps(job.to_dict()) if job is not None else None
        with self.store.write() as db:
            cur = db.execute("INSERT INTO events(time, kind, action, pool, name, job) "
                             "VALUES(?,?,?,?,?,?)", (time.time(), kind, action, pool, name,
                                                     payload))
            self._since_prune += 1
            if self._since_prune >= 500:
                self._since_prune = 0
                db.execute("DELETE FROM events WHERE id <= ?",
                           (int(cur.lastrowid or 0) - KEEP_EVENTS,))

    def latest_id(self) -> int:
        row = self.store.query_one("SELECT MAX(id) AS m FROM events")
        return int(row["m"] or 0) if row is not None else 0

    def since(self, last_id: int, *, timeout: float = 0.0, limit: int = 1000) -> list[Event]:
        if last_id < 0:
            return []
        deadline = time.monotonic() + max(0.0, timeout)
        while True:
            if self._closed.is_set():
                return []
            rows = self.store.query("SELECT * FROM events WHERE id > ? ORDER BY id LIMIT ?",
                                    (last_id, limit))
            if rows or time.monotonic() >= deadline:
                return [Event(id=r["id"], time=r["time"], kind=r["kind"], action=r["action"],
                              pool=r["pool"], name=r["name"],
                              job=JobInfo(**json.loads(r["job"])) if r["job"] else None)
                        for r in rows]
            self._closed.wait(_POLL)
