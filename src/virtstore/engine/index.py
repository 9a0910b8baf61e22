"""The volume index: what every listing and lookup reads, kept in SQLite.

Listings come from one query; a refresh rewrites only the rows whose file changed.
Rows in state 'creating' or 'deleting' belong to an operation in flight and are
invisible to listings and lookups.
"""

from __future__ import annotations

import dataclasses
import os
import sqlite3
from collections.abc import Mapping

from virtstore.api import VolumeInfo
from virtstore.backends.base import ScanResult, Stamp, VolumeRecord
from virtstore.engine.store import Store
from virtstore.errors import NoSuchVolume

_FIELDS = [f.name for f in dataclasses.fields(VolumeRecord)]
_INSERT = (f"INSERT OR REPLACE INTO volumes(pool, {', '.join(_FIELDS)}, state) "
           f"VALUES(?, {', '.join('?' for _ in _FIELDS)}, ?)")
_INFO_COLS = "pool, name, key, path, type, format, capacity, allocation, physical"


def _record_values(rec: VolumeRecord) -> list[object]:
    return [getattr(rec, f) for f in _FIELDS]


def _info(row: sqlite3.Row) -> VolumeInfo:
    return VolumeInfo(pool=row["pool"], name=row["name"], key=row["key"], path=row["path"],
                      type=row["type"], format=row["format"], capacity=row["capacity"],
                      allocation=row["allocation"], physical=row["physical"])


def record(row: sqlite3.Row) -> VolumeRecord:
    values = {f: row[f] for f in _FIELDS}
    values["lazy_refcounts"] = bool(values["lazy_refcounts"])
    return VolumeRecord(**values)


class VolumeIndex:
    def __init__(self, store: Store) -> None:
        self.store = store

    # -- reads -----------------------------------------------------------------
    def list(self, pool: str) -> list[VolumeInfo]:
        rows = self.store.query(f"SELECT {_INFO_COLS} FROM volumes WHERE pool=? AND "
                                "state='ready' ORDER BY name", (pool,))
        return [_info(r) for r in rows]

    def get(self, pool: str, name: str) -> VolumeRecord:
        row = self.store.query_one("SELECT * FROM volumes WHERE pool=? AND name=? AND "
                                   "state='ready'", (pool, name))
        if row is None:
            raise NoSuchVolume(f"Storage volume not found: no storage vol with matching "
                               f"name '{name}'")
        return record(row)

    def info(self, pool: str, name: str) -> VolumeInfo:
        row = self.store.query_one(f"SELECT {_INFO_COLS} FROM volumes WHERE pool=? AND "
                                   "name=? AND state='ready'", (pool, name))
        if row is None:
            raise NoSuchVolume(f"Storage volume not found: no storage vol with matching "
                               f"name '{name}'")
        return _info(row)

    def _active_lookup(self, column: str, value: str, what: str) -> VolumeInfo:
        row = self.store.query_one(
            f"SELECT {', '.join('v.' + c.strip() for c in _INFO_COLS.split(','))} "
            f"FROM volumes v JOIN pools p ON p.name=v.pool "
            f"WHERE v.{column}=? AND v.state='ready' AND p.active=1 LIMIT 1", (value,))
        if row is None:
            raise NoSuchVolume(f"Storage volume not found: no storage vol with matching "
                               f"{what} '{value}'")
        return _info(row)

    def by_key(self, key: str) -> VolumeInfo:
        return self._active_lookup("key", key, "key")

    def by_path(self, path: str) -> VolumeInfo:
        clean = os.path.normpath(path) if path.startswith("/") else path
        try:
            return self._active_lookup("path", clean, "path")
        except NoSuchVolume:
            real = os.path.realpath(clean) if clean.startswith("/") else clean
            if real == clean:
                raise NoSuchVolume(f"Storage volume not found: no storage vol with matching "
                                   f"path '{path}'") from None
            return self._active_lookup("path", real, "path")

    def stamps(self, pool: str) -> dict[str, Stamp]:
        rows = self.store.query("SELECT name, ino, size, mtime_ns, ctime_ns FROM volumes "
                                "WHERE pool=? AND state='ready'", (pool,))
        return {r["name"]: Stamp(r["ino"], r["size"], r["mtime_ns"], r["ctime_ns"])
                for r in rows}

    # -- writes ----------------------------------------------------------------
    def apply_scan(self, pool: str, known: Mapping[str, Stamp], result: ScanResult) -> None:
        seen = set(result.unchanged)
        seen.update(r.name for r in result.changed)
        gone = [n for n in known if n not in seen]
        with self.store.write() as db:
            db.executemany(_INSERT, [[pool, *_record_values(r), "ready"]
                                     for r in result.changed])
            # Only rows that were there when the scan began, and are unchanged since, are
            # removed: a volume created while the scan ran keeps its row.
            for name in gone:
                st = known[name]
                db.execute("DELETE FROM volumes WHERE pool=? AND name=? AND state='ready' "
                           "AND ino=? AND mtime_ns=?", (pool, name, st.ino, st.mtime_ns))

    def reserve(self, db: sqlite3.Connection, pool: str, name: str, path: str,
                vtype: str) -> bool:
        """Claim a name for a volume being made; False if the name is taken."""
        cur = db.execute("INSERT OR IGNORE INTO volumes(pool, name, key, path, type, state) "
                         "VALUES(?,?,?,?,?,'creating')", (pool, name, path, path, vtype))
        return cur.rowcount == 1

    def publish(self, pool: str, rec: VolumeRecord) -> None:
        with self.store.write() as db:
            db.execute(_INSERT, [pool, *_record_values(rec), "ready"])

    def set_state(self, pool: str, name: str, state: str, *, expect: str) -> bool:
        with self.store.write() as db:
            cur = db.execute("UPDATE volumes SET state=? WHERE pool=? AND name=? AND state=?",
                             (state, pool, name, expect))
            return cur.rowcount == 1

    def remove(self, pool: str, name: str) -> None:
        with self.store.write() as db:
            db.execute("DELETE FROM volumes WHERE pool=? AND name=?", (pool, name))
