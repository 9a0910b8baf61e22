"""The engine's side of the backend contract: backend instances bound to this engine,
journalled scratch names, and the snapshot rows of snapshots kept as files."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

from virtstore.backends import new_backend
from virtstore.backends.base import Backend, SnapshotRow
from virtstore.engine.store import Store
from virtstore.errors import AuthFailed, NoSuchSecret

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable

    from virtstore.engine.secrets import SecretStore
    from virtstore.xml import PoolDef


class Hooks:
    """EngineHooks on this engine's store."""

    def __init__(self, store: Store) -> None:
        self.store = store
        # Set by the connection that opens it; called only when a pool needs a secret.
        self.secret_store: Callable[[], SecretStore] | None = None

    def secret(self, uuid: str | None, usage: str | None, usage_type: str) -> bytes:
        store = self.secret_store() if self.secret_store is not None else None
        if store is None:
            raise AuthFailed("no secret store is available to read the pool's auth secret")
        try:
            key = uuid if uuid else store.lookup_by_usage(usage_type, usage or "")
            return store.get_value(key, internal=True)
        except NoSuchSecret as exc:
            what = f"uuid '{uuid}'" if uuid else f"usage '{usage}'"
            raise NoSuchSecret(f"no secret with {what} for the pool's authentication: "
                               f"{exc}") from None

    @contextmanager
    def scratch(self, backend: Backend, pool: PoolDef, volume: str,
                op: str) -> Iterator[str]:
        from virtstore.engine import journal  # here: reading a pool's sizes needs none

        staging = backend.staging_path(pool, os.urandom(8).hex())
        with self.store.write() as db:
            entry = journal.begin(db, op, pool.name, volume, staging, None)
        try:
            yield staging
        finally:
            try:
                backend.discard_staging(staging)
            finally:
                journal.end(self.store, entry)

    def snapshot_rows(self, pool: PoolDef, volume: str) -> list[SnapshotRow]:
        rows = self.store.query("SELECT name, kind, created, path FROM snapshots WHERE pool=? "
                                "AND volume=? ORDER BY created, name", (pool.name, volume))
        return [SnapshotRow(volume, r["name"], r["kind"], r["created"], r["path"])
                for r in rows]

    def add_snapshot_row(self, pool: PoolDef, row: SnapshotRow) -> None:
        with self.store.write() as db:
            db.execute("INSERT INTO snapshots(pool, volume, name, kind, created, path) "
                       "VALUES(?,?,?,?,?,?)",
                       (pool.name, row.volume, row.name, row.kind, row.created, row.path))

    def drop_snapshot_row(self, pool: PoolDef, volume: str, name: str) -> None:
        with self.store.write() as db:
            db.execute("DELETE FROM snapshots WHERE pool=? AND volume=? AND name=?",
                       (pool.name, volume, name))


class Backends:
    """This engine's backend instances, one per pool (as Incus loads a driver per pool),
    bound to its hooks; what an instance holds open (an RBD connection) goes with it."""

    def __init__(self, store: Store) -> None:
        self.hooks = Hooks(store)
        self._made: dict[tuple[str, str], Backend] = {}

    def close(self) -> None:
        for be in self._made.values():
            be.close()
        self._made.clear()

    def __call__(self, pool_type: str, pool: str) -> Backend:
        be = self._made.get((pool_type, pool))
        if be is None:
            be = new_backend(pool_type)
            be.hooks = self.hooks
            self._made[(pool_type, pool)] = be
        return be

    def drop(self, pool: str) -> None:
        """The pool is gone (undefined, or a transient pool stopped)."""
        for key in [k for k in self._made if k[1] == pool]:
            self._made.pop(key).close()
