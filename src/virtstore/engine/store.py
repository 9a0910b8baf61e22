"""The SQLite store shared by every process on one state root.

Definitions stay libvirt XML files; this database holds what is not a definition: pool
runtime state, the volume index (listings without a rescan), and the crash journal.
WAL mode lets readers go on while one writer commits; ``BEGIN IMMEDIATE`` makes each
mutation a short cross-process critical section, which is what keeps two CLI commands
from creating the same volume name twice.
"""

from __future__ import annotations

# The C module under sqlite3: the package's Python part adds only the default datetime
# adapters, which the store never uses, and imports datetime for them (about a
# millisecond of every command). Same classes, same functions.
import _sqlite3 as sqlite3
import _thread
import fcntl
import zlib
from collections.abc import Iterator
from contextlib import contextmanager

from virtstore.host import files

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

SCHEMA_VERSION = 2

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta(
    key TEXT PRIMARY KEY,
    value TEXT
);
CREATE TABLE IF NOT EXISTS pools(
    name TEXT PRIMARY KEY,
    uuid TEXT NOT NULL UNIQUE,
    type TEXT NOT NULL,
    persistent INTEGER NOT NULL,
    active INTEGER NOT NULL DEFAULT 0,
    live_xml TEXT,
    target_path TEXT
);
CREATE TABLE IF NOT EXISTS volumes(
    pool TEXT NOT NULL,
    name TEXT NOT NULL,
    type TEXT NOT NULL,
    format TEXT,
    capacity INTEGER NOT NULL DEFAULT 0,
    allocation INTEGER NOT NULL DEFAULT 0,
    physical INTEGER NOT NULL DEFAULT 0,
    ino INTEGER,
    size INTEGER,
    mtime_ns INTEGER,
    ctime_ns INTEGER,
    state TEXT NOT NULL DEFAULT 'ready',
    path TEXT,
    key TEXT,
    extra TEXT,
    PRIMARY KEY(pool, name)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS volumes_key ON volumes(key) WHERE key IS NOT NULL;
CREATE INDEX IF NOT EXISTS volumes_path ON volumes(path) WHERE path IS NOT NULL;
CREATE TABLE IF NOT EXISTS journal(
    id INTEGER PRIMARY KEY,
    op TEXT NOT NULL,
    pool TEXT NOT NULL,
    name TEXT NOT NULL,
    tmp_path TEXT,
    final_path TEXT,
    pid INTEGER NOT NULL,
    pid_start TEXT NOT NULL,
    started REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS jobs(
    id TEXT PRIMARY KEY,
    kind TEXT NOT NULL,
    state TEXT NOT NULL,
    pool TEXT,
    volume TEXT,
    target_pool TEXT,
    target_volume TEXT,
    bytes_done INTEGER NOT NULL DEFAULT 0,
    bytes_total INTEGER NOT NULL DEFAULT 0,
    started REAL,
    ended REAL,
    error TEXT,
    error_code TEXT,
    bandwidth INTEGER,
    cancel_requested INTEGER NOT NULL DEFAULT 0,
    pid INTEGER NOT NULL,
    pid_start TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS vol_locks(
    pool TEXT NOT NULL,
    name TEXT NOT NULL,
    mode TEXT NOT NULL,
    owner TEXT NOT NULL,
    pid INTEGER NOT NULL,
    pid_start TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS vol_locks_vol ON vol_locks(pool, name);
CREATE TABLE IF NOT EXISTS events(
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    time REAL NOT NULL,
    kind TEXT NOT NULL,
    action TEXT NOT NULL,
    pool TEXT,
    name TEXT,
    job TEXT
);
CREATE TABLE IF NOT EXISTS pool_runtime(
    name TEXT PRIMARY KEY,
    capacity INTEGER NOT NULL,
    allocation INTEGER NOT NULL,
    available INTEGER NOT NULL,
    mode INTEGER,
    owner INTEGER,
    grp INTEGER
);
CREATE TABLE IF NOT EXISTS snapshots(
    pool TEXT NOT NULL,
    volume TEXT NOT NULL,
    name TEXT NOT NULL,
    kind TEXT NOT NULL,
    created REAL NOT NULL,
    path TEXT,
    PRIMARY KEY(pool, volume, name)
);
"""

_DDL_DIGEST = format(zlib.crc32(SCHEMA.encode()), "08x")


class Store:
    """One SQLite connection per Store; a Store is used by one thread at a time."""

    def __init__(self, path: str) -> None:
        self.path = path
        # isolation_level=None: we issue BEGIN ourselves, so the lock is taken up front.
        self.db = sqlite3.connect(path, timeout=60.0, isolation_level=None,
                                  check_same_thread=False)
        self.db.row_factory = sqlite3.Row
        # _thread, not threading: a command reading one row need not import the latter.
        self._lock = _thread.RLock()
        self._depth = 0
        self._writer_fd: int | None = None  # opened at the first write
        self.db.execute("PRAGMA busy_timeout=60000")
        mode = self.db.execute("PRAGMA journal_mode=WAL").fetchone()[0]
        if mode != "wal":  # e.g. a filesystem without shared memory: still correct, slower
            self.db.execute("PRAGMA journal_mode=DELETE")
        # NORMAL in WAL mode: a commit is durable at the next checkpoint; the index can be
        # rebuilt by a refresh, so it does not need a sync per commit.
        self.db.execute("PRAGMA synchronous=NORMAL")
        if self._schema_current():
            # Every open after the first: no DDL and no write lock, which a read-only
            # command would otherwise take (and wait for) just to open the store.
            return
        # executescript() commits on its own, so it runs outside write(); the statements
        # are idempotent, which makes concurrent first opens safe.
        self.db.executescript(SCHEMA)
        with self.write():
            row = self.db.execute("SELECT value FROM meta WHERE key='schema'").fetchone()
            if row is not None and row[0] != str(SCHEMA_VERSION):
                # The index is a cache of what is on disk: an older layout is dropped and
                # refilled by the next refresh of each pool.
                self.db.execute("DROP TABLE IF EXISTS volumes")
            self.db.execute("INSERT OR REPLACE INTO meta(key, value) VALUES('schema', ?)",
                            (str(SCHEMA_VERSION),))
        self.db.executescript(SCHEMA)
        with self.write():
            self.db.execute("INSERT OR REPLACE INTO meta(key, value) "
                            "VALUES('schema_ddl', ?)", (_DDL_DIGEST,))

    def _schema_current(self) -> bool:
        """Whether this store was set up with this very SCHEMA (version and text: a
        table added without a version bump still gets made)."""
        try:
            rows = dict(self.db.execute("SELECT key, value FROM meta WHERE key IN "
                                        "('schema', 'schema_ddl')").fetchall())
        except sqlite3.OperationalError:  # no meta table yet: a new store
            return False
        return rows == {"schema": str(SCHEMA_VERSION), "schema_ddl": _DDL_DIGEST}

    @contextmanager
    def write(self) -> Iterator[sqlite3.Connection]:
        """A write transaction that holds the database's write lock from its start."""
        with self._lock:
            if self._depth:
                self._depth += 1
                try:
                    yield self.db
                finally:
                    self._depth -= 1
                return
            writer_fd = self._take_writer_lock()
            try:
                self.db.execute("BEGIN IMMEDIATE")
                self._depth = 1
                try:
                    yield self.db
                except BaseException:
                    self._depth = 0
                    self.db.execute("ROLLBACK")
                    raise
                self._depth = 0
                self.db.execute("COMMIT")
            finally:
                if writer_fd is not None:
                    fcntl.flock(writer_fd, fcntl.LOCK_UN)

    def _take_writer_lock(self) -> int | None:
        """Queue for the write lock on a lock file first: a process waiting there wakes
        the moment the writer before it is done, where SQLite's busy handler sleeps 1,
        2, 5, 10... ms between tries, which is most of the latency of concurrent writes
        (several daemon workers, several CLI commands). False: no lock file to use
        (a read-only state root); SQLite's own lock still orders the writers."""
        if self._writer_fd is None:
            self._writer_fd = files.open_lock_file(self.path + ".lock")
        if self._writer_fd < 0:
            return None
        fcntl.flock(self._writer_fd, fcntl.LOCK_EX)
        return self._writer_fd

    def query(self, sql: str, params: tuple[object, ...] = ()) -> list[sqlite3.Row]:
        with self._lock:
            return self.db.execute(sql, params).fetchall()

    def query_tuples(self, sql: str, params: tuple[object, ...] = ()) -> list[tuple[Any, ...]]:
        """Rows as plain tuples: cheaper than sqlite3.Row when there are many."""
        with self._lock:
            cur = self.db.cursor()
            cur.row_factory = None
            rows: list[tuple[Any, ...]] = cur.execute(sql, params).fetchall()
            return rows

    def query_one(self, sql: str, params: tuple[object, ...] = ()) -> sqlite3.Row | None:
        with self._lock:
            row: sqlite3.Row | None = self.db.execute(sql, params).fetchone()
            return row

    def version(self) -> tuple[int, int]:
        """Differs from an earlier answer once anything changed the database since: a
        commit of another connection (SQLite's data_version) or a change through this
        one (its total_changes)."""
        with self._lock:
            return int(self.db.execute("PRAGMA data_version").fetchone()[0]), \
                self.db.total_changes

    def get_meta(self, key: str) -> str | None:
        row = self.query_one("SELECT value FROM meta WHERE key=?", (key,))
        return None if row is None else str(row["value"])

    def set_meta(self, key: str, value: str) -> None:
        with self.write() as db:
            db.execute("INSERT OR REPLACE INTO meta(key, value) VALUES(?, ?)", (key, value))

    def close(self) -> None:
        self.db.close()
        if self._writer_fd is not None and self._writer_fd >= 0:
            files.close_fd(self._writer_fd)
            self._writer_fd = None
