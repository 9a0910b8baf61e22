"""Storage snapshots of volumes — which libvirt's storage API does not have.

qcow2 volumes get internal snapshots (``qemu-img snapshot``) or, with ``external``,
overlays: the current image becomes a read-only snapshot file and a new qcow2 overlay on
top of it takes the volume's name. Raw volumes on a reflink-capable filesystem (xfs,
btrfs) get reflink copies. Snapshot files live beside the volume with a hidden prefix.
Every step that changes the volume's name swaps a fully made file in with rename().
"""

from __future__ import annotations

import os
import secrets as pysecrets
import time

from virtstore.api import SnapshotInfo
from virtstore.backends._net_utils import VolumeDataOps
from virtstore.backends.base import Backend, VolumeRecord
from virtstore.backends.dir import SNAPSHOT_PREFIX
from virtstore.engine import journal, locks
from virtstore.engine.index import VolumeIndex
from virtstore.engine.names import check_volume_name
from virtstore.engine.volumes import VolumeManager
from virtstore.errors import (
    AlreadyExists,
    NoSuchVolume,
    OperationInvalid,
    Unsupported,
)
from virtstore.host.files import open_volume, refuse_symlink
from virtstore.host.runner import run
from virtstore.xml import PoolDef

INTERNAL = "internal"
EXTERNAL = "external"
REFLINK = "reflink"


class SnapshotManager:
    def __init__(self, volumes: VolumeManager, index: VolumeIndex) -> None:
        self.volumes = volumes
        self.index = index
        self.store = volumes.state.store

    # -- helpers ---------------------------------------------------------------
    def _volume(self, pool_name: str, name: str) -> tuple[PoolDef, Backend, VolumeRecord]:
        pool, backend = self.volumes._active_pool(pool_name)
        if not backend.caps.file_based and not isinstance(backend, VolumeDataOps):
            raise backend.unsupported("storage snapshots")
        rec = self.index.get(pool_name, name)
        if backend.caps.file_based:
            # qemu-img opens the volume by its path: not through a symbolic link.
            refuse_symlink(rec.path)
        return pool, backend, rec

    def _locked(self, pool_name: str, name: str) -> str:
        owner = "snap-" + pysecrets.token_hex(6)
        with self.store.write() as db:
            locks.acquire(db, [(pool_name, name, locks.WRITE)], owner)
        return owner

    def _rows(self, pool_name: str, name: str) -> list[SnapshotInfo]:
        rows = self.store.query("SELECT * FROM snapshots WHERE pool=? AND volume=? "
                                "ORDER BY created, name", (pool_name, name))
        return [SnapshotInfo(pool=pool_name, volume=name, name=r["name"], kind=r["kind"],
                             created=r["created"],
                             size=_size(r["path"]) if r["path"] else 0) for r in rows]

    def _row_path(self, pool_name: str, name: str, snap: str) -> tuple[str, str | None]:
        row = self.store.query_one("SELECT kind, path FROM snapshots WHERE pool=? AND "
                                   "volume=? AND name=?", (pool_name, name, snap))
        if row is None:
            raise NoSuchVolume(f"no snapshot '{snap}' of volume '{name}'")
        return str(row["kind"]), row["path"]

    def _internal(self, rec: VolumeRecord) -> list[SnapshotInfo]:
        from virtstore.formats.qemuimg import info

        data = info(rec.path, "qcow2")
        out = []
        for s in data.get("snapshots", []) or []:
            created = float(s.get("date-sec", 0)) + float(s.get("date-nsec", 0)) / 1e9
            out.append(SnapshotInfo(pool="", volume=rec.name, name=str(s.get("name")),
                                    kind=INTERNAL, created=created,
                                    size=int(s.get("vm-state-size", 0))))
        return out

    # -- verbs -----------------------------------------------------------------
    def list(self, pool_name: str, name: str) -> list[SnapshotInfo]:
        pool, backend, rec = self._volume(pool_name, name)
        if isinstance(backend, VolumeDataOps) and backend.handles_data(pool):
            return sorted((SnapshotInfo(pool=pool_name, volume=name, name=s.name, kind=s.kind,
                                        created=s.created, size=s.size)
                           for s in backend.snap_list(pool, rec)),
                          key=lambda s: (s.created, s.name))
        found = self._rows(pool_name, name)
        if rec.format == "qcow2":
            found += [SnapshotInfo(pool=pool_name, volume=name, name=s.name, kind=s.kind,
                                   created=s.created, size=s.size) for s in self._internal(rec)]
        return sorted(found, key=lambda s: (s.created, s.name))

    def create(self, pool_name: str, name: str, snap: str, *, external: bool) -> SnapshotInfo:
        pool, backend, rec = self._volume(pool_name, name)
        check_volume_name(snap, "snapshot")
        if any(s.name == snap for s in self.list(pool_name, name)):
            raise AlreadyExists(f"snapshot '{snap}' of volume '{name}' exists already")
        owner = self._locked(pool_name, name)
        try:
            if isinstance(backend, VolumeDataOps) and backend.handles_data(pool):
                if external:
                    raise Unsupported(f"unsupported configuration: external snapshots are "
                                      f"not supported by '{pool.type}' pools")
                backend.snap_create(pool, rec, snap)
            elif rec.format == "qcow2" and not external:
                run(["qemu-img", "snapshot", "-c", snap, rec.path])
            elif rec.format == "qcow2":
                self._create_external(pool_name, pool, backend, rec, snap)
            elif rec.format == "raw" and not external:
                self._create_reflink(pool_name, pool, backend, rec, snap)
            else:
                raise Unsupported(f"unsupported configuration: snapshots of '{rec.format}' "
                                  "volumes are not supported (qcow2: internal or external; "
                                  "raw: on a reflink-capable filesystem)")
            self.volumes_reread(pool_name, pool, backend, name)
        finally:
            locks.release(self.store, owner)
        return next(s for s in self.list(pool_name, name) if s.name == snap)

    def _snap_path(self, rec: VolumeRecord) -> str:
        return os.path.join(os.path.dirname(rec.path),
                            f"{SNAPSHOT_PREFIX}{pysecrets.token_hex(8)}")

    def _record(self, pool_name: str, name: str, snap: str, kind: str, path: str) -> None:
        with self.store.write() as db:
            db.execute("INSERT INTO snapshots(pool, volume, name, kind, created, path) "
                       "VALUES(?,?,?,?,?,?)", (pool_name, name, snap, kind, time.time(), path))

    def _create_reflink(self, pool_name: str, pool: PoolDef, backend: Backend,
                        rec: VolumeRecord, snap: str) -> None:
        from virtstore.data.copy import copy_file
        from virtstore.data.monitor import Monitor

        path = self._snap_path(rec)
        with self.store.write() as db:
            entry = journal.begin(db, "snapshot", pool_name, rec.name, path, None)
        try:
            try:
                copy_file(rec.path, path, reflink="always", monitor=Monitor())
            except Unsupported as exc:
                raise Unsupported("unsupported configuration: a raw volume's snapshot needs a "
                                  "reflink-capable filesystem (xfs, btrfs)") from exc
            os.chmod(path, 0o400)
            self._record(pool_name, rec.name, snap, REFLINK, path)
        except BaseException:
            backend.discard_staging(path)
            raise
        finally:
            journal.end(self.store, entry)

    def _create_external(self, pool_name: str, pool: PoolDef, backend: Backend,
                         rec: VolumeRecord, snap: str) -> None:
        from virtstore.formats.qcow2 import create_qcow2

        snap_path = self._snap_path(rec)
        staging = backend.staging_path(pool, pysecrets.token_hex(8))
        with self.store.write() as db:
            entry = journal.begin(db, "snapshot", pool_name, rec.name, staging, None)
        try:
            fd = open_volume(staging, os.O_WRONLY | os.O_CREAT | os.O_EXCL,
                             rec.mode if rec.mode is not None else 0o600)
            try:
                create_qcow2(fd, rec.capacity, compat="1.1", backing_file=snap_path,
                             backing_format="qcow2")
                os.fsync(fd)
            finally:
                os.close(fd)
            # The current image gets a second name (the snapshot), then the overlay takes
            # the volume's name in one rename: the volume is never missing.
            self._record(pool_name, rec.name, snap, EXTERNAL, snap_path)
            os.link(rec.path, snap_path)
            os.replace(staging, rec.path)
            os.chmod(snap_path, 0o400)
        except BaseException:
            backend.discard_staging(staging)
            if not os.path.exists(staging) and os.path.exists(snap_path) and \
                    os.path.samefile(snap_path, rec.path):
                os.unlink(snap_path)
            with self.store.write() as db:
                db.execute("DELETE FROM snapshots WHERE pool=? AND volume=? AND name=?",
                           (pool_name, rec.name, snap))
            raise
        finally:
            journal.end(self.store, entry)

    def revert(self, pool_name: str, name: str, snap: str) -> None:
        pool, backend, rec = self._volume(pool_name, name)
        owner = self._locked(pool_name, name)
        try:
            internal = [s for s in (self._internal(rec) if rec.format == "qcow2" and
                                    backend.caps.file_based else []) if s.name == snap]
            if isinstance(backend, VolumeDataOps) and backend.handles_data(pool):
                backend.snap_revert(pool, rec, snap)
            elif internal:
                run(["qemu-img", "snapshot", "-a", snap, rec.path])
            else:
                kind, path = self._row_path(pool_name, name, snap)
                assert path is not None
                if kind == REFLINK:
                    self._swap_in(pool_name, pool, backend, rec, path, reflink=True)
                else:
                    newest = self._rows(pool_name, name)[-1]
                    if newest.name != snap:
                        raise OperationInvalid(f"Requested operation is not valid: only the "
                                               f"newest external snapshot ('{newest.name}') "
                                               "can be reverted to; delete newer ones first")
                    self._swap_in(pool_name, pool, backend, rec, path, reflink=False)
            self.volumes_reread(pool_name, pool, backend, name)
        finally:
            locks.release(self.store, owner)

    def _swap_in(self, pool_name: str, pool: PoolDef, backend: Backend, rec: VolumeRecord,
                 snap_path: str, *, reflink: bool) -> None:
        staging = backend.staging_path(pool, pysecrets.token_hex(8))
        with self.store.write() as db:
            entry = journal.begin(db, "revert", pool_name, rec.name, staging, None)
        try:
            if reflink:
                from virtstore.data.copy import copy_file
                from virtstore.data.monitor import Monitor

                copy_file(snap_path, staging, reflink="always", monitor=Monitor())
            else:
                from virtstore.formats.qcow2 import create_qcow2

                fd = open_volume(staging, os.O_WRONLY | os.O_CREAT | os.O_EXCL)
                try:
                    create_qcow2(fd, rec.capacity, compat="1.1", backing_file=snap_path,
                                 backing_format="qcow2")
                finally:
                    os.close(fd)
            os.chmod(staging, rec.mode if rec.mode is not None else 0o600)
            os.replace(staging, rec.path)
        except BaseException:
            backend.discard_staging(staging)
            raise
        finally:
            journal.end(self.store, entry)

    def delete(self, pool_name: str, name: str, snap: str) -> None:
        pool, backend, rec = self._volume(pool_name, name)
        owner = self._locked(pool_name, name)
        try:
            if isinstance(backend, VolumeDataOps) and backend.handles_data(pool):
                backend.snap_delete(pool, rec, snap)
                self.volumes_reread(pool_name, pool, backend, name)
                return
            internal = [s for s in (self._internal(rec) if rec.format == "qcow2" else [])
                        if s.name == snap]
            if internal:
                run(["qemu-img", "snapshot", "-d", snap, rec.path])
                return
            kind, path = self._row_path(pool_name, name, snap)
            assert path is not None
            if kind == EXTERNAL:
                self._delete_external(pool_name, rec, snap, path)
            else:
                os.unlink(path)
            with self.store.write() as db:
                db.execute("DELETE FROM snapshots WHERE pool=? AND volume=? AND name=?",
                           (pool_name, name, snap))
            self.volumes_reread(pool_name, pool, backend, name)
        finally:
            locks.release(self.store, owner)

    def _delete_external(self, pool_name: str, rec: VolumeRecord, snap: str, path: str) -> None:
        """Drop one layer of the chain: its child is rebased onto its parent (qemu-img
        copies what the child needs), then the layer's file goes."""
        from virtstore.formats.probe import probe_image

        rows = self._rows(pool_name, rec.name)
        ext = [r for r in rows if r.kind == EXTERNAL]
        idx = next(i for i, r in enumerate(ext) if r.name == snap)
        child = rec.path if idx == len(ext) - 1 else self._row_path(
            pool_name, rec.name, ext[idx + 1].name)[1]
        assert child is not None
        parent = probe_image(path, fmt="qcow2")
        argv = ["qemu-img", "rebase", "-f", "qcow2"]
        if parent.backing_file:
            argv += ["-b", parent.backing_file, "-F", parent.backing_format or "raw"]
        else:
            argv += ["-b", ""]
        was = os.stat(child).st_mode
        os.chmod(child, 0o600)
        try:
            run([*argv, child], timeout=None)
        finally:
            os.chmod(child, was & 0o7777)
        os.unlink(path)

    def forget_volume(self, pool_name: str, name: str) -> None:
        """A deleted volume's snapshot files go with it."""
        for s in self.store.query("SELECT path FROM snapshots WHERE pool=? AND volume=?",
                                  (pool_name, name)):
            if s["path"]:
                try:
                    os.unlink(s["path"])
                except FileNotFoundError:
                    pass
        with self.store.write() as db:
            db.execute("DELETE FROM snapshots WHERE pool=? AND volume=?", (pool_name, name))

    def volumes_reread(self, pool_name: str, pool: PoolDef, backend: Backend, name: str) -> None:
        rec = backend.read_volume(pool, name)
        if rec is not None:
            self.index.publish(pool_name, rec)


def _size(path: str) -> int:
    try:
        return os.stat(path).st_blocks * 512
    except OSError:
        return 0

