"""What a pool is, read without changing anything: info, listing, lookups.

Kept apart from PoolManager (engine/pools.py) so that read-only commands import neither
the XML layer nor the lifecycle code: a pool's sizes come from its target path alone
when its backend can tell them that way (a directory: one ``statvfs``).
"""

from __future__ import annotations

from virtstore.engine.state import PoolRow, StateRoot
from virtstore.errors import NoSuchPool
from virtstore.types import POOL_INACTIVE, POOL_RUNNING, PoolInfo


class PoolReader:
    def __init__(self, state: StateRoot) -> None:
        self.state = state

    def info(self, name: str) -> PoolInfo:
        return self._info(self.state.row(name))

    def _info(self, row: PoolRow) -> PoolInfo:
        backend = self.state.backend(row.type, row.name)
        from virtstore.backends.base import PoolSizes  # loaded with the backend

        sizes = PoolSizes()
        if row.active:
            quick = backend.sizes_at(row.target_path) if row.target_path else None
            sizes = quick if quick is not None else backend.sizes(self.state.definition(row))
        return PoolInfo(name=row.name, uuid=row.uuid, type=row.type,
                        state=POOL_RUNNING if row.active else POOL_INACTIVE,
                        persistent=row.persistent,
                        autostart=row.persistent and self.state.is_autostart(row.name),
                        capacity=sizes.capacity, allocation=sizes.allocation,
                        available=sizes.available, target_path=row.target_path,
                        shared=backend.caps.shared if sizes.shared is None else sizes.shared)

    def list(self) -> list[PoolInfo]:
        return [self._info(r) for r in self.state.rows()]

    def by_uuid(self, uuid: str) -> str:
        import uuid as uuidlib

        try:
            key = str(uuidlib.UUID(uuid))
        except ValueError:
            key = uuid
        r = self.state.store.query_one("SELECT name FROM pools WHERE uuid=?", (key,))
        if r is None:
            raise NoSuchPool(f"Storage pool not found: no storage pool with matching "
                             f"uuid '{uuid}'")
        return str(r["name"])

    def by_target_path(self, path: str) -> str:
        clean = clean_path(path)
        r = self.state.store.query_one("SELECT name FROM pools WHERE target_path=?", (clean,))
        if r is None:
            raise NoSuchPool(f"Storage pool not found: no storage pool with matching "
                             f"target path '{path}'")
        return str(r["name"])


def clean_path(path: str | None) -> str | None:
    if not path:
        return path
    import os

    return os.path.normpath(path) if path.startswith("/") else path
