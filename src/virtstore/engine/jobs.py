"""Jobs: long work in a worker thread, with progress, cancel, bandwidth and a record.

A job's row in the store is its public face: any process on the root can list it, wait
for it and cancel it (a flag the worker polls). The worker thread lives in the process
that started the job; if that process dies, the next one to open the root marks the
job failed and the journal removes what it left.
"""

from __future__ import annotations

import errno
import logging
import secrets
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from virtstore.engine import locks
from virtstore.engine.events import EventLog
from virtstore.engine.store import Store
from virtstore.errors import Cancelled, NoSuchJob, NoSuchVolume, OperationInvalid, VirtstoreError
from virtstore.host.files import own_start_time, process_alive
from virtstore.types import JOB_CANCELLED, JOB_DONE, JOB_FAILED, JOB_FINAL, JOB_RUNNING, JobInfo

if TYPE_CHECKING:
    from virtstore.data.monitor import Monitor

log = logging.getLogger("virtstore")

Work = Callable[["Monitor"], None]
# How often a worker looks at the store for a cancel request from another process, and
# how often progress is written there.
_CANCEL_POLL = 0.25
_PROGRESS_WRITE = 0.2
_PROGRESS_EVENT = 0.5
# Finished jobs kept in the table.
KEEP_FINISHED = 1000
# Jobs that change their own volume in place or swap its file; when one dies its volume
# is read again (clones and conversions publish a new volume through the journal).
_WRITES_ITS_VOLUME = ("resize", "wipe", "upload")


@dataclass
class _Local:
    cancel: threading.Event = field(default_factory=threading.Event)
    fenced: bool = False  # cancelled because the job may no longer write at all
    done: threading.Event = field(default_factory=threading.Event)
    thread: threading.Thread | None = None


def _info(row: sqlite3.Row) -> JobInfo:
    started = row["started"]
    ended = row["ended"]
    elapsed = ((ended or time.time()) - started) if started else 0.0
    rate = row["bytes_done"] / elapsed if elapsed > 0 else 0.0
    return JobInfo(id=row["id"], kind=row["kind"], state=row["state"], pool=row["pool"],
                   volume=row["volume"], target_pool=row["target_pool"],
                   target_volume=row["target_volume"], bytes_done=row["bytes_done"],
                   bytes_total=row["bytes_total"], rate=rate, started=started, ended=ended,
                   error=row["error"], error_code=row["error_code"], bandwidth=row["bandwidth"])


class JobManager:
    def __init__(self, store: Store, events: EventLog,
                 reread: Callable[[str, str], object] | None = None) -> None:
        """``reread(pool, name)`` indexes a volume as it is now: the process of a job
        that was writing it may have died after changing it and before indexing it."""
        self.store = store
        self.events = events
        self.reread = reread
        self._local: dict[str, _Local] = {}
        self._lock = threading.Lock()

    # -- reads -----------------------------------------------------------------
    def info(self, job_id: str) -> JobInfo:
        row = self.store.query_one("SELECT * FROM jobs WHERE id=?", (job_id,))
        if row is None:
            raise NoSuchJob(f"no job with id '{job_id}'")
        return _info(row)

    def all(self, *, include_finished: bool = True) -> list[JobInfo]:
        if include_finished:
            rows = self.store.query("SELECT * FROM jobs ORDER BY started, id")
        else:
            rows = self.store.query("SELECT * FROM jobs WHERE state NOT IN (?,?,?) "
                                    "ORDER BY started, id", JOB_FINAL)
        return [_info(r) for r in rows]

    # -- start -----------------------------------------------------------------
    def start(self, kind: str, work: Work, *, pool: str | None, volume: str | None,
              target_pool: str | None = None, target_volume: str | None = None,
              total: int = 0, bandwidth: int | None = None,
              lock: Iterable[tuple[str, str, str]] = (),
              prepare: Callable[[sqlite3.Connection, str], None] | None = None,
              must_exist: Iterable[tuple[str, str]] = ()) -> JobInfo:
        """Record the job, take its volume locks (all or none) and start its worker.

        ``prepare(db, job_id)`` runs in the same transaction (to reserve a target name
        and journal a staging path), so a conflict leaves nothing behind.
        """
        if bandwidth is not None and bandwidth <= 0:
            from virtstore.errors import InvalidArgument

            raise InvalidArgument("bandwidth must be a positive number of bytes per second")
        job_id = secrets.token_hex(6)
        start = own_start_time() or "?"
        with self.store.write() as db:
            # Checked under the write lock: a volume deleted since the caller looked it
            # up is refused here rather than failing inside the job.
            for pool_name, vol_name in must_exist:
                if db.execute("SELECT 1 FROM volumes WHERE pool=? AND name=? AND "
                              "state='ready'", (pool_name, vol_name)).fetchone() is None:
                    raise NoSuchVolume(f"Storage volume not found: no storage vol with "
                                       f"matching name '{vol_name}'")
            locks.acquire(db, lock, job_id)
            if prepare is not None:
                prepare(db, job_id)
            db.execute("INSERT INTO jobs(id, kind, state, pool, volume, target_pool, "
                       "target_volume, bytes_total, started, bandwidth, pid, pid_start) "
                       "VALUES(?,?,?,?,?,?,?,?,?,?,?,?)",
                       (job_id, kind, JOB_RUNNING, pool, volume, target_pool, target_volume,
                        total, time.time(), bandwidth, _pid(), start))
        local = _Local()
        with self._lock:
            self._local[job_id] = local
        thread = threading.Thread(target=self._run, args=(job_id, work, total, bandwidth, local),
                                  name=f"job-{job_id}", daemon=False)
        local.thread = thread
        thread.start()
        return self.info(job_id)

    def _run(self, job_id: str, work: Work, total: int, bandwidth: int | None,
             local: _Local) -> None:
        from virtstore.data.monitor import Monitor

        last_write = last_event = last_poll = 0.0
        cancel_seen = False

        def progress(done: int, tot: int) -> None:
            nonlocal last_write, last_event
            now = time.monotonic()
            if now - last_write < _PROGRESS_WRITE and done < tot:
                return
            last_write = now
            with self.store.write() as db:
                db.execute("UPDATE jobs SET bytes_done=?, bytes_total=? WHERE id=?",
                           (done, tot, job_id))
            if now - last_event >= _PROGRESS_EVENT:
                last_event = now
                self.events.emit("job", "progress", name=job_id, job=self.info(job_id))

        def should_cancel() -> bool:
            nonlocal last_poll, cancel_seen
            if local.cancel.is_set() or cancel_seen:
                monitor.fenced = monitor.fenced or local.fenced
                return True
            now = time.monotonic()
            if now - last_poll >= _CANCEL_POLL:
                last_poll = now
                row = self.store.query_one("SELECT cancel_requested FROM jobs WHERE id=?",
                                           (job_id,))
                cancel_seen = bool(row and row["cancel_requested"])
            return cancel_seen

        monitor = Monitor(total, bandwidth=bandwidth, on_progress=progress,
                          should_cancel=should_cancel)
        state, error, code = JOB_DONE, None, None
        try:
            work(monitor)
        except Cancelled:
            state, error, code = JOB_CANCELLED, "cancelled", Cancelled.code
        except VirtstoreError as exc:
            state, error, code = JOB_FAILED, str(exc), exc.code
        except OSError as exc:
            # The storage said no (read-only, gone, full): the job's error, in one line.
            where = f" '{exc.filename}'" if exc.filename else ""
            nospace = exc.errno in (errno.ENOSPC, errno.EDQUOT)
            state, error = JOB_FAILED, f"{exc.strerror or exc}{where}"
            code = "no-space" if nospace else "operation-invalid"
        except Exception as exc:  # the job records it; the thread must not die silently
            log.exception("job %s failed", job_id)
            state, error, code = JOB_FAILED, f"internal error: {exc}", "internal-error"
        try:
            locks.release(self.store, job_id)
            with self.store.write() as db:
                db.execute("UPDATE jobs SET state=?, ended=?, error=?, error_code=?, "
                           "bytes_done=CASE WHEN ?='done' THEN MAX(bytes_done, ?) "
                           "ELSE bytes_done END, "
                           "bytes_total=MAX(bytes_total, ?) WHERE id=?",
                           (state, time.time(), error, code, state, monitor.done,
                            monitor.total, job_id))
                db.execute("DELETE FROM jobs WHERE state IN (?,?,?) AND id NOT IN (SELECT id "
                           "FROM jobs WHERE state IN (?,?,?) ORDER BY ended DESC LIMIT ?)",
                           (*JOB_FINAL, *JOB_FINAL, KEEP_FINISHED))
            self.events.emit("job", state, name=job_id, job=self.info(job_id))
        finally:
            local.done.set()

    # -- control ---------------------------------------------------------------
    def wait(self, job_id: str, timeout: float | None = None) -> JobInfo:
        with self._lock:
            local = self._local.get(job_id)
        if local is not None:
            local.done.wait(timeout)
            return self.info(job_id)
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            info = self.info(job_id)
            if info.finished or (deadline is not None and time.monotonic() >= deadline):
                return info
            if not self._owner_alive(job_id):
                self.recover()
                continue
            time.sleep(0.05)

    def cancel(self, job_id: str, *, fence: bool = False) -> None:
        """``fence``: the job lost its write lease, so it stops without undoing (see
        Monitor.cancel); only for jobs of this process."""
        info = self.info(job_id)
        if info.finished:
            raise OperationInvalid(f"Requested operation is not valid: job '{job_id}' is "
                                   f"already {info.state}")
        with self.store.write() as db:
            db.execute("UPDATE jobs SET cancel_requested=1 WHERE id=?", (job_id,))
        with self._lock:
            local = self._local.get(job_id)
        if local is not None:
            local.fenced = local.fenced or fence
            local.cancel.set()

    def _owner_alive(self, job_id: str) -> bool:
        row = self.store.query_one("SELECT pid, pid_start FROM jobs WHERE id=?", (job_id,))
        return row is None or process_alive(int(row["pid"]), str(row["pid_start"]))

    def recover(self) -> list[str]:
        """Mark jobs whose process died as failed, and index the volumes they wrote."""
        rows = self.store.query("SELECT id, kind, pool, volume, pid, pid_start FROM jobs "
                                "WHERE state NOT IN (?,?,?)", JOB_FINAL)
        dead = [r for r in rows if not process_alive(int(r["pid"]), str(r["pid_start"]))]
        for r in dead:
            job_id = r["id"]
            with self.store.write() as db:
                cur = db.execute("UPDATE jobs SET state=?, ended=?, error=?, error_code=? "
                                 "WHERE id=? AND state NOT IN (?,?,?)",
                                 (JOB_FAILED, time.time(), "interrupted: the process "
                                  "running it ended", "internal-error", job_id, *JOB_FINAL))
                db.execute("DELETE FROM vol_locks WHERE owner=?", (job_id,))
                # In the transaction that frees its lock, so no other job on the volume
                # starts from the stale row; only by the process that marked it failed.
                if cur.rowcount == 1 and self.reread is not None and r["pool"] \
                        and r["volume"] and r["kind"] in _WRITES_ITS_VOLUME:
                    try:
                        self.reread(r["pool"], r["volume"])
                    except Exception as exc:
                        log.warning("could not read volume '%s' in pool '%s' again after "
                                    "an interrupted %s: %s", r["volume"], r["pool"],
                                    r["kind"], exc)
            log.warning("job %s was interrupted: its process ended", job_id)
        return [r["id"] for r in dead]

    def join_local(self, timeout: float | None = None, *, cancel: bool = False) -> int:
        """Wait for this process's jobs (on close); with ``cancel``, ask them to stop
        first (each removes what it was making before it ends). How many were asked."""
        with self._lock:
            items = list(self._local.items())
        asked = 0
        if cancel:
            for job_id, local in items:
                if not local.done.is_set():
                    with self.store.write() as db:
                        db.execute("UPDATE jobs SET cancel_requested=1 WHERE id=?", (job_id,))
                    local.cancel.set()
                    asked += 1
        deadline = None if timeout is None else time.monotonic() + timeout
        for _, local in items:
            local.done.wait(None if deadline is None else max(0.0, deadline - time.monotonic()))
        return asked

    def running_in_pool(self, pool: str) -> bool:
        row = self.store.query_one("SELECT 1 FROM jobs WHERE state NOT IN (?,?,?) AND "
                                   "(pool=? OR target_pool=?) LIMIT 1", (*JOB_FINAL, pool, pool))
        return row is not None


def _pid() -> int:
    import os

    return os.getpid()
