"""The volume index: what every listing and lookup reads, kept in SQLite.

Listings come from one query; a refresh rewrites only the rows whose file changed.
Rows in state 'creating' or 'deleting' belong to an operation in flight and are
invisible to listings and lookups.

Rows are kept narrow because a cold refresh writes one per volume: a path that is
just the pool's target plus the name, and a key equal to the path, are stored as NULL
and derived on read; rarely used image details go in one JSON column. Ownership,
mode and timestamps are read from the file when a volume's XML is asked for (what a
scan read of a volume that is no local file is kept with the rarely used details).
"""

from __future__ import annotations

import functools
import os
import stat
from collections.abc import Callable, Mapping

from virtstore.engine.store import Store
from virtstore.errors import NoSuchVolume
from virtstore.host.files import live_stat
from virtstore.types import VolumeInfo, VolumePage

TYPE_CHECKING = False
if TYPE_CHECKING:
    import sqlite3

    from virtstore.backends.base import ScanResult, Stamp, VolumeRecord

_COLS = ("pool, name, type, format, capacity, allocation, physical, ino, size, mtime_ns, "
         "ctime_ns, state, path, key, extra")
_INSERT = f"INSERT OR REPLACE INTO volumes({_COLS}) VALUES({', '.join('?' * 15)})"
# A fresh index (first scan of a pool) needs no conflict handling.
_INSERT_NEW = _INSERT.replace("INSERT OR REPLACE", "INSERT")
# A refresh updates rows of ready volumes only: a name reserved by an operation in
# flight ('creating', 'deleting') is not the scan's to change.
_UPSERT_SCANNED = (
    _INSERT_NEW + " ON CONFLICT(pool, name) DO UPDATE SET "
    + ", ".join(f"{c.strip()}=excluded.{c.strip()}" for c in _COLS.split(",")[2:])
    + " WHERE volumes.state='ready'")
_PATH = "COALESCE(v.path, p.target_path || '/' || v.name)"
# The columns in VolumeInfo's order, so that a row is its arguments.
_SELECT_INFO = (f"SELECT v.pool, v.name, COALESCE(NULLIF(v.key, ''), {_PATH}) AS key, "
                f"{_PATH} AS path, v.type, v.format, "
                "v.capacity, v.allocation, v.physical FROM volumes v "
                "JOIN pools p ON p.name = v.pool")
_INFO_JSON = ", ".join(f"'{k}', {e}" for k, e in (
    ("pool", "v.pool"), ("name", "v.name"), ("key", f"COALESCE(NULLIF(v.key, ''), {_PATH})"),
    ("path", _PATH), ("type", "v.type"), ("format", "v.format"), ("capacity", "v.capacity"),
    ("allocation", "v.allocation"), ("physical", "v.physical")))
_SELECT_REC = (f"SELECT v.*, {_PATH} AS full_path FROM volumes v "
               "JOIN pools p ON p.name = v.pool")
_EXTRA = ("backing_path", "backing_format", "compat", "cluster_size", "lazy_refcounts",
          "encryption", "mode", "uid", "gid")
# Kept even when 0 (root): a volume that is not a local file (gluster, NFS from
# userspace) has its owner and mode only from its scan.
_IDS = ("uid", "gid")


def _info(row: sqlite3.Row | tuple[object, ...]) -> VolumeInfo:
    return VolumeInfo(*row)


def _row(pool: str, prefix: str | None, rec: VolumeRecord, state: str = "ready") -> tuple[
        object, ...]:
    """``prefix``: the pool's target path with a trailing '/', from which paths derive."""
    derived = prefix is not None and rec.path == prefix + rec.name
    extra = tuple((k, v) for k in _EXTRA
                  if (v := getattr(rec, k)) or (k in _IDS and v is not None))
    return (pool, rec.name, rec.type, rec.format, rec.capacity, rec.allocation, rec.physical,
            rec.ino, rec.size, rec.mtime_ns, rec.ctime_ns, state,
            None if derived else rec.path, None if rec.key == rec.path else rec.key,
            _encode_extra(extra) if extra else None)


@functools.lru_cache(maxsize=256)
def _encode_extra(items: tuple[tuple[str, object], ...]) -> str:
    # Many images share the same details (compat, cluster size): encode each set once.
    import json

    return json.dumps(dict(items))


def record(row: sqlite3.Row) -> VolumeRecord:
    # The backends' module only here: a listing or a lookup answers VolumeInfo records.
    from virtstore.backends.base import VolumeRecord

    path = row["full_path"]
    rec = VolumeRecord(name=row["name"], path=path, key=row["key"] or path, type=row["type"],
                       format=row["format"], capacity=row["capacity"],
                       allocation=row["allocation"], physical=row["physical"],
                       ino=row["ino"] or 0, size=row["size"] or 0,
                       mtime_ns=row["mtime_ns"] or 0, ctime_ns=row["ctime_ns"] or 0)
    if row["extra"]:
        import json

        for k, v in json.loads(row["extra"]).items():
            if k in _EXTRA:
                setattr(rec, k, v)
    return rec


def _fill_live(rec: VolumeRecord) -> None:
    """Owner, mode and access time, read from the volume itself."""
    st = live_stat(rec.path)
    if st is None:
        return
    rec.mode, rec.uid, rec.gid = stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid
    rec.atime_ns = st.st_atime_ns


def _missing(what: str, value: str) -> NoSuchVolume:
    return NoSuchVolume(f"Storage volume not found: no storage vol with matching {what} "
                        f"'{value}'")


# Listings kept as JSON text for a process that answers many of them (a daemon's
# worker): at most this many pools', each at most this long.
_LISTINGS_KEPT = 4
_LISTING_MAX = 32 << 20


class VolumeIndex:
    def __init__(self, store: Store) -> None:
        self.store = store
        self._listings: dict[str, tuple[tuple[int, int], bytes]] = {}

    def _prefix(self, pool: str) -> str | None:
        row = self.store.query_one("SELECT target_path FROM pools WHERE name=?", (pool,))
        if row is None or not row["target_path"]:
            return None
        return str(row["target_path"]).rstrip("/") + "/"

    # -- reads -----------------------------------------------------------------
    def list(self, pool: str) -> list[VolumeInfo]:
        rows = self.store.query_tuples(f"{_SELECT_INFO} WHERE v.pool=? AND v.state='ready' "
                                "ORDER BY v.name", (pool,))
        return [_info(r) for r in rows]

    def list_json(self, pool: str) -> bytes:
        """``list``'s rows as a JSON array of VolumeInfo objects, made by SQLite: a
        listing answered without a Python object per volume."""
        # The same text again while nothing in the database changed: making it costs
        # SQLite about 2 µs per volume, asking whether anything changed a few µs in all.
        version = self.store.version()
        kept = self._listings.get(pool)
        if kept is not None and kept[0] == version:
            return kept[1]
        # In name order: the rows are searched by the primary key (pool, name); an
        # ordered subquery would cost a second JSON parse of every object.
        row = self.store.query_one(
            f"SELECT json_group_array(json_object({_INFO_JSON})) AS j FROM volumes v "
            "JOIN pools p ON p.name = v.pool WHERE v.pool=? AND v.state='ready'", (pool,))
        text = str(row["j"] if row is not None else "[]").encode()
        if len(text) <= _LISTING_MAX:
            if len(self._listings) >= _LISTINGS_KEPT:
                self._listings.clear()
            # Kept under the version read before the query: a change in between makes
            # the next call make it again.
            self._listings[pool] = (version, text)
        return text

    def page(self, pool: str, offset: int, limit: int, key: str, desc: bool,
             flt: str) -> VolumePage:
        """One query for the count and one for the rows: the name order comes from the
        primary key, other orders sort only the matching rows."""
        where = "v.pool=? AND v.state='ready'"
        args: list[object] = [pool]
        if flt:
            # LIKE is case-insensitive for ASCII; escape its wildcards in the filter.
            esc = flt.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
            where += " AND v.name LIKE ? ESCAPE '\\'"
            args.append(f"%{esc}%")
        count = self.store.query_one(f"SELECT count(*) AS n FROM volumes v WHERE {where}",
                                     tuple(args))
        order = "DESC" if desc else "ASC"
        by = f"v.name {order}" if key == "name" else f"v.{key} {order}, v.name"
        rows = self.store.query(f"{_SELECT_INFO} WHERE {where} ORDER BY {by} LIMIT ? OFFSET ?",
                                (*args, limit, offset))
        return VolumePage(int(count["n"]) if count else 0, offset, [_info(r) for r in rows])

    def get(self, pool: str, name: str) -> VolumeRecord:
        row = self.store.query_one(f"{_SELECT_REC} WHERE v.pool=? AND v.name=? AND "
                                   "v.state='ready'", (pool, name))
        if row is None:
            raise _missing("name", name)
        rec = record(row)
        _fill_live(rec)
        return rec

    def info(self, pool: str, name: str) -> VolumeInfo:
        row = self.store.query_one(f"{_SELECT_INFO} WHERE v.pool=? AND v.name=? AND "
                                   "v.state='ready'", (pool, name))
        if row is None:
            raise _missing("name", name)
        return _info(row)

    def info_if_active(self, pool: str, name: str) -> VolumeInfo | None:
        """The volume when its pool is running and holds it, in one query (a daemon's
        most frequent request); None: ask again the long way for the reason why not."""
        row = self.store.query_one(f"{_SELECT_INFO} WHERE v.pool=? AND v.name=? AND "
                                   "v.state='ready' AND p.active=1", (pool, name))
        return None if row is None else _info(row)

    def _by_path(self, path: str) -> VolumeInfo | None:
        active = "AND v.state='ready' AND p.active=1 LIMIT 1"
        row = self.store.query_one(f"{_SELECT_INFO} WHERE v.path=? {active}", (path,))
        if row is None:
            # Most paths are a pool's target plus a name: find the pool, then the row by
            # its primary key.
            parent, name = os.path.split(path)
            pool = self.store.query_one("SELECT name FROM pools WHERE target_path=? AND "
                                        "active=1", (parent,))
            if pool is not None:
                row = self.store.query_one(f"{_SELECT_INFO} WHERE v.pool=? AND v.name=? AND "
                                           f"v.path IS NULL {active}", (pool["name"], name))
        return None if row is None else _info(row)

    def by_key(self, key: str) -> VolumeInfo:
        row = self.store.query_one(f"{_SELECT_INFO} WHERE v.key=? AND v.state='ready' AND "
                                   "p.active=1 LIMIT 1", (key,))
        if row is not None:
            return _info(row)
        found = self._by_path(key) if key.startswith("/") else None
        if found is None or found.key != key:
            raise _missing("key", key)
        return found

    def by_path(self, path: str) -> VolumeInfo:
        clean = os.path.normpath(path) if path.startswith("/") else path
        found = self._by_path(clean)
        if found is None and clean.startswith("/"):
            real = os.path.realpath(clean)
            if real != clean:
                found = self._by_path(real)
        if found is None:
            raise _missing("path", path)
        return found

    def state_of(self, pool: str, name: str) -> str | None:
        """The row's state ('ready', 'creating', 'deleting'), None if there is no row."""
        row = self.store.query_one("SELECT state FROM volumes WHERE pool=? AND name=?",
                                   (pool, name))
        return None if row is None else str(row["state"])

    def stamps(self, pool: str) -> dict[str, Stamp]:
        from virtstore.backends.base import Stamp

        rows = self.store.query("SELECT name, ino, size, mtime_ns, ctime_ns FROM volumes "
                                "WHERE pool=? AND state='ready'", (pool,))
        return {r["name"]: Stamp(r["ino"] or 0, r["size"] or 0, r["mtime_ns"] or 0,
                                 r["ctime_ns"] or 0) for r in rows}

    # -- writes ----------------------------------------------------------------
    def apply_scan(self, pool: str, known: Mapping[str, Stamp], result: ScanResult, *,
                   still_there: Callable[[VolumeRecord], bool] | None = None) -> None:
        """Write a scan's result. ``still_there(rec)`` is asked again, under the write
        lock, about the volumes that have no row by then."""
        seen = set(result.unchanged)
        seen.update(r.name for r in result.changed)
        gone = [n for n in known if n not in seen]
        prefix = self._prefix(pool)
        with self.store.write() as db:
            fresh = not known and db.execute("SELECT 1 FROM volumes WHERE pool=? LIMIT 1",
                                             (pool,)).fetchone() is None
            changed = result.changed
            if not fresh and still_there is not None and changed:
                # A volume the scan saw may have been deleted (row and file) before this
                # transaction: without this look it would come back as a ghost row.
                rowed = {r[0] for r in db.execute("SELECT name FROM volumes WHERE pool=?",
                                                  (pool,))}
                changed = [r for r in changed if r.name in rowed or still_there(r)]
            db.executemany(_INSERT_NEW if fresh else _UPSERT_SCANNED,
                           [_row(pool, prefix, r) for r in changed])
            # Only rows that were there when the scan began, and are unchanged since, are
            # removed: a volume created while the scan ran keeps its row.
            for name in gone:
                st = known[name]
                db.execute("DELETE FROM volumes WHERE pool=? AND name=? AND state='ready' "
                           "AND ino=? AND mtime_ns=?", (pool, name, st.ino, st.mtime_ns))

    def reserve(self, db: sqlite3.Connection, pool: str, name: str, path: str,
                vtype: str) -> bool:
        """Claim a name for a volume being made; False if the name is taken."""
        cur = db.execute("INSERT OR IGNORE INTO volumes(pool, name, path, type, state) "
                         "VALUES(?,?,?,?,'creating')", (pool, name, path, vtype))
        return cur.rowcount == 1

    def publish(self, pool: str, rec: VolumeRecord) -> None:
        prefix = self._prefix(pool)
        with self.store.write() as db:
            db.execute(_INSERT, _row(pool, prefix, rec))

    def set_state(self, pool: str, name: str, state: str, *, expect: str) -> bool:
        with self.store.write() as db:
            cur = db.execute("UPDATE volumes SET state=? WHERE pool=? AND name=? AND state=?",
                             (state, pool, name, expect))
            return cur.rowcount == 1

    def remove(self, pool: str, name: str) -> None:
        with self.store.write() as db:
            db.execute("DELETE FROM volumes WHERE pool=? AND name=?", (pool, name))
