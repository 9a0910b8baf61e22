"""Storage snapshots of volumes — which libvirt's storage API does not have.

The engine names, locks and lists; the pool's backend keeps the snapshots (qcow2
internal snapshots and overlays or reflinks for files, RBD and ZFS snapshots, btrfs
read-only copies) through the contract's ``snap_*`` verbs.
"""

from __future__ import annotations

import contextlib
import secrets as pysecrets
from collections.abc import Iterator

from virtstore.backends.base import Backend, VolumeRecord
from virtstore.engine import locks
from virtstore.engine.index import VolumeIndex
from virtstore.engine.names import check_volume_name
from virtstore.engine.volumes import VolumeManager
from virtstore.errors import AlreadyExists
from virtstore.types import SnapshotInfo, replace
from virtstore.xml import PoolDef


class SnapshotManager:
    def __init__(self, volumes: VolumeManager, index: VolumeIndex) -> None:
        self.volumes = volumes
        self.index = index
        self.store = volumes.state.store

    def _volume(self, pool_name: str, name: str) -> tuple[PoolDef, Backend, VolumeRecord]:
        pool, backend = self.volumes._active_pool(pool_name)
        if not backend.supports("snap_list"):
            raise backend.unsupported("storage snapshots")
        rec = self.index.get(pool_name, name)
        backend.check_volume(pool, rec)
        return pool, backend, rec

    @contextlib.contextmanager
    def _writing(self, pool_name: str, pool: PoolDef, backend: Backend, name: str,
                 op: str) -> Iterator[None]:
        """This host's write lock on the volume, then (a shared pool of a cluster
        member) the cluster's write lease: another member's writer, a guest's lease
        included, refuses the snapshot with Busy."""
        owner = "snap-" + pysecrets.token_hex(6)
        with self.store.write() as db:
            locks.acquire(db, [(pool_name, name, locks.WRITE)], owner)
        try:
            lease = self.volumes.write_lease(pool_name, pool, backend, name, op)
            try:
                yield
            finally:
                self.volumes.end_lease(lease)
        finally:
            locks.release(self.store, owner)

    def list(self, pool_name: str, name: str) -> list[SnapshotInfo]:
        pool, backend, rec = self._volume(pool_name, name)
        return sorted((replace(s, pool=pool_name, volume=name)
                       for s in backend.snap_list(pool, rec)),
                      key=lambda s: (s.created, s.name))

    def create(self, pool_name: str, name: str, snap: str, *, external: bool) -> SnapshotInfo:
        had = self.list(pool_name, name)
        check_volume_name(snap, "snapshot")
        if any(s.name == snap for s in had):
            raise AlreadyExists(f"snapshot '{snap}' of volume '{name}' exists already")
        self._change(pool_name, name, snap, "create-external" if external else "create")
        return next(s for s in self.list(pool_name, name) if s.name == snap)

    def revert(self, pool_name: str, name: str, snap: str) -> None:
        self._change(pool_name, name, snap, "revert")

    def delete(self, pool_name: str, name: str, snap: str) -> None:
        self._change(pool_name, name, snap, "delete")

    def _change(self, pool_name: str, name: str, snap: str, verb: str) -> None:
        pool, backend, rec = self._volume(pool_name, name)
        op = "snapshot-" + verb.removesuffix("-external")
        with self._writing(pool_name, pool, backend, name, op):
            # The backend refuses a snapshot it does not have (NoSuchVolume): listing
            # them here first would read the image twice (qemu-img info).
            act = {"create": backend.snap_create, "create-external": backend.snap_create_external,
                   "revert": backend.snap_revert, "delete": backend.snap_delete}[verb]
            act(pool, rec, snap)
            self._reread(pool_name, pool, backend, name)

    def forget_volume(self, pool_name: str, name: str) -> None:
        """A deleted volume's snapshots kept apart from it go with it."""
        pool, backend = self.volumes._active_pool(pool_name)
        backend.forget_snapshots(pool, VolumeRecord(name=name, path="", key="", type="file"))

    def _reread(self, pool_name: str, pool: PoolDef, backend: Backend, name: str) -> None:
        rec = backend.read_volume(pool, name)
        if rec is not None:
            self.index.publish(pool_name, rec)
