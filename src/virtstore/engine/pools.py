"""Pool lifecycle: define, create, build, start, stop, delete, undefine, refresh, autostart."""

from __future__ import annotations

import logging
import uuid as uuidlib
from typing import TYPE_CHECKING

from virtstore.backends.base import Backend, Stamp
from virtstore.engine import locks, nesting
from virtstore.engine.confine import Confinement, check_pool_target
from virtstore.engine.events import EventLog
from virtstore.engine.index import VolumeIndex
from virtstore.engine.names import check_name
from virtstore.engine.poolinfo import PoolReader, clean_path
from virtstore.engine.state import PoolRow, StateRoot
from virtstore.errors import (
    AlreadyExists,
    InvalidArgument,
    OperationInvalid,
    Unsupported,
    VirtstoreError,
)
from virtstore.host.files import live_stat
from virtstore.types import replace
from virtstore.xml import Permissions, PoolDef, format_pool_xml, parse_pool_xml

if TYPE_CHECKING:
    from virtstore.engine.clusterpools import ClusterPools

log = logging.getLogger("virtstore")

# Pool types whose target is a local directory: libvirt reports its owner and mode.
_LOCAL_TARGET = ("dir", "fs", "netfs")


def _not_valid(name: str, state: str) -> OperationInvalid:
    return OperationInvalid(f"Requested operation is not valid: storage pool '{name}' is {state}")


class PoolManager(PoolReader):
    def __init__(self, state: StateRoot, index: VolumeIndex,
                 events: EventLog | None = None,
                 confinement: Confinement | None = None) -> None:
        super().__init__(state)
        self.index = index
        self.events = events
        self.confinement = confinement or Confinement()
        # Set when this engine is a member of a cluster: persistent pools of shared
        # types are defined, undefined and marked autostart cluster-wide.
        self.cluster_pools: ClusterPools | None = None

    def _publishing(self, pool_type: str, publish: bool) -> ClusterPools | None:
        if not publish or self.cluster_pools is None:
            return None
        from virtstore.engine.clusterpools import covers

        return self.cluster_pools if covers(pool_type) else None

    def _check_target(self, pool: PoolDef) -> None:
        check_pool_target(pool, self.confinement, self.state.root)

    def _emit(self, action: str, name: str) -> None:
        if self.events is not None:
            self.events.emit("pool", action, pool=name, name=name)

    def xml(self, name: str, *, inactive: bool = False) -> str:
        row = self.state.row(name)
        pool = self.state.definition(row, inactive=inactive)
        if row.active and not inactive:
            self._fill_live(pool)
            backend = self.state.backend(row.type, row.name)
            backend.live_source(pool)  # e.g. a disk pool's free extents
            return format_pool_xml(pool)
        if row.active:
            # libvirt's --inactive of a running pool is its live definition, unless it
            # was redefined since it started (then the new definition, without sizes).
            live = self.state.definition(row)
            if format_pool_xml(live, inactive=True) != format_pool_xml(pool, inactive=True):
                return format_pool_xml(pool, inactive=True)
            self._fill_live(pool)
            return format_pool_xml(pool)
        if self._fill_last_known(pool):
            return format_pool_xml(pool)
        return format_pool_xml(pool, inactive=True)

    def _fill_live(self, pool: PoolDef) -> None:
        """Sizes, and the target directory's owner and mode, as a refresh reads them."""
        sizes = self.state.backend(pool.type, pool.name).sizes(pool)
        pool.capacity, pool.allocation, pool.available = (
            sizes.capacity, sizes.allocation, sizes.available)
        if pool.type in _LOCAL_TARGET and pool.target.path:
            st = live_stat(pool.target.path)
            if st is not None:
                # A new target: the parsed live definition is cached and shared.
                pool.target = replace(pool.target, permissions=Permissions(
                    mode=st.st_mode & 0o777, owner=st.st_uid, group=st.st_gid,
                    label=pool.target.permissions.label))

    def _remember(self, pool: PoolDef) -> None:
        """Keep what the running pool looked like, for the XML of the stopped pool (libvirt
        keeps its last refresh's values in memory)."""
        try:
            self._fill_live(pool)
        except VirtstoreError as exc:
            log.debug("pool %s: sizes not recorded: %s", pool.name, exc)
            return
        perms = pool.target.permissions
        with self.state.store.write() as db:
            db.execute("INSERT OR REPLACE INTO pool_runtime(name, capacity, allocation, "
                       "available, mode, owner, grp) VALUES(?,?,?,?,?,?,?)",
                       (pool.name, pool.capacity, pool.allocation, pool.available,
                        perms.mode, perms.owner, perms.group))

    def _fill_last_known(self, pool: PoolDef) -> bool:
        r = self.state.store.query_one("SELECT * FROM pool_runtime WHERE name=?", (pool.name,))
        if r is None:
            return False
        pool.capacity, pool.allocation, pool.available = (
            r["capacity"], r["allocation"], r["available"])
        if r["mode"] is not None:
            pool.target = replace(pool.target, permissions=Permissions(
                mode=r["mode"], owner=r["owner"], group=r["grp"],
                label=pool.target.permissions.label))
        return True

    # -- definitions -----------------------------------------------------------
    def _parse_new(self, xml: str) -> PoolDef:
        pool = parse_pool_xml(xml)
        check_name(pool.name, "pool")
        if not pool.uuid:
            pool.uuid = str(uuidlib.uuid4())
        pool.target.path = clean_path(pool.target.path)
        if pool.type == "dir" and not pool.target.path:
            raise InvalidArgument("missing storage pool target path")
        if pool.target.path and not pool.target.path.startswith("/"):
            # Relative to what? Not to whichever directory the caller runs in.
            raise InvalidArgument(f"storage pool target path '{pool.target.path}' must be "
                                  "absolute")
        self._check_target(pool)
        return pool

    def _check_conflicts(self, pool: PoolDef) -> PoolRow | None:
        """libvirt's duplicate rules; returns the existing row of the same pool, if any."""
        same = None
        for r in self.state.rows():
            if r.name == pool.name:
                if r.uuid != pool.uuid:
                    raise AlreadyExists(f"operation failed: pool '{r.name}' already exists "
                                        f"with uuid {r.uuid}")
                same = r
            elif r.uuid == pool.uuid:
                raise AlreadyExists(f"operation failed: pool '{r.name}' is already defined "
                                    f"with uuid {r.uuid}")
            elif (pool.type in ("dir", "fs", "netfs") and r.type == pool.type
                  and r.target_path and r.target_path == pool.target.path):
                raise AlreadyExists(f"operation failed: Storage source conflict with pool: "
                                    f"'{r.name}'")
        return same

    def define(self, xml: str, *, publish: bool = True) -> str:
        """``publish``: a cluster member defines a shared pool cluster-wide (False when
        it takes in the cluster's definition)."""
        pool = self._parse_new(xml)
        with self.state.store.write() as db:
            existing = self._check_conflicts(pool)
            if existing is not None and existing.active and existing.type != pool.type:
                raise OperationInvalid(f"pool '{pool.name}' is active: cannot change its type")
            cp = self._publishing(pool.type, publish)
            if cp is not None:
                # etcd first: when it refuses, nothing changes here either.
                pool = cp.publish(db, pool, existing is not None
                                  and self.state.is_autostart(pool.name))
            self.state.write_def_file(pool)
            if existing is None:
                db.execute("INSERT INTO pools(name, uuid, type, persistent, active, target_path)"
                           " VALUES(?,?,?,1,0,?)",
                           (pool.name, pool.uuid, pool.type, pool.target.path))
            else:
                # An active pool keeps its live definition until it is restarted.
                db.execute("UPDATE pools SET persistent=1, type=?, target_path="
                           "CASE WHEN active THEN target_path ELSE ? END WHERE name=?",
                           (pool.type, pool.target.path, pool.name))
        self._emit("defined", pool.name)
        return pool.name

    def create(self, xml: str, *, build: bool, overwrite: bool | None) -> str:
        pool = self._parse_new(xml)
        with self.state.store.write() as db:
            if self._check_conflicts(pool) is not None:
                raise AlreadyExists(f"operation failed: pool '{pool.name}' already exists "
                                    f"with uuid {pool.uuid}")
            db.execute("INSERT INTO pools(name, uuid, type, persistent, active, live_xml, "
                       "target_path) VALUES(?,?,?,0,0,?,?)",
                       (pool.name, pool.uuid, pool.type, format_pool_xml(pool, inactive=True),
                        pool.target.path))
        try:
            self.start(pool.name, build=build, overwrite=overwrite)
        except BaseException:
            with self.state.store.write() as db:
                db.execute("DELETE FROM pools WHERE name=? AND active=0", (pool.name,))
            raise
        return pool.name

    def undefine(self, name: str, *, publish: bool = True) -> None:
        with self.state.store.write() as db:
            row = self.state.row(name)
            if not row.persistent:
                raise _not_valid(name, "not persistent")
            if row.active:
                raise _not_valid(name, "still active")
            cp = self._publishing(row.type, publish)
            if cp is not None:
                cp.withdraw(db, name)
            self.state.remove_def_file(name)
            db.execute("DELETE FROM pools WHERE name=?", (name,))
            db.execute("DELETE FROM pool_runtime WHERE name=?", (name,))
            db.execute("DELETE FROM volumes WHERE pool=?", (name,))
        self.state.backend.drop(name)
        self._emit("undefined", name)

    def set_autostart(self, name: str, on: bool, *, publish: bool = True) -> None:
        with self.state.store.write():
            row = self.state.row(name)
            if not row.persistent:
                raise OperationInvalid("Requested operation is not valid: cannot set "
                                       "autostart for transient pool")
            cp = self._publishing(row.type, publish)
            if cp is not None:
                cp.publish_autostart(name, on)
            self.state.set_autostart(name, on)

    def make_transient(self, name: str) -> None:
        """An active pool whose persistent definition is gone elsewhere: it runs on
        until stopped, then it is gone (as when its file is removed by hand)."""
        with self.state.store.write() as db:
            self.state.remove_def_file(name)
            db.execute("UPDATE pools SET persistent=0 WHERE name=?", (name,))
        self._emit("undefined", name)

    # -- lifecycle -------------------------------------------------------------
    def _inactive(self, name: str, active: str = "already active") -> tuple[PoolRow, Backend]:
        """The pool's row and backend; libvirt's refusal when it is active."""
        row = self.state.row(name)
        if row.active:
            raise _not_valid(name, active)
        return row, self.state.backend(row.type, row.name)

    def build(self, name: str, *, overwrite: bool | None) -> None:
        row, backend = self._inactive(name)
        if not backend.supports("build"):
            return  # libvirt: building a pool type with nothing to build succeeds
        pool = self.state.definition(row)
        self._check_target(pool)  # a definition file may have been written by hand
        backend.build(pool, overwrite)

    def start(self, name: str, *, build: bool = False, overwrite: bool | None = None) -> None:
        row, backend = self._inactive(name)
        problem = backend.host_problem()
        if problem:
            raise Unsupported(problem)
        pool = self.state.definition(row)
        # Again here: a definition file written by hand, or a target that has become a
        # symbolic link since it was defined.
        self._check_target(pool)
        # A source device that is a file (a volume of another pool) gets a loop device.
        attached = nesting.attach_sources(self.state, pool)
        try:
            if build and backend.supports("build"):
                backend.build(pool, overwrite)
            backend.start(pool)
            try:
                self._scan_into_index(pool)
            except BaseException:
                backend.stop(pool)
                raise
        except BaseException:
            if attached:
                nesting.detach_sources(self.state, pool)
            raise
        with self.state.store.write() as db:
            cur = self.state.row(name)
            if cur.active:
                raise _not_valid(name, "already active")
            db.execute("UPDATE pools SET active=1, live_xml=?, target_path=? WHERE name=?",
                       (format_pool_xml(pool, inactive=True), pool.target.path, name))
        self._remember(pool)
        self._emit("started", name)

    def stop(self, name: str) -> None:
        nesting.check_pool_unused(self.state, self.index, name, "stop")
        with self.state.store.write() as db:
            row = self.state.row(name)
            if not row.active:
                raise _not_valid(name, "not active")
            busy = db.execute("SELECT name FROM volumes WHERE pool=? AND state!='ready' LIMIT 1",
                              (name,)).fetchone()
            if busy is not None or locks.pool_busy(db, name):
                raise OperationInvalid(f"Requested operation is not valid: pool '{name}' "
                                       "has asynchronous jobs running")
            pool = self.state.definition(row)
            if row.persistent:
                self._remember(replace(pool))
            self.state.backend(row.type, row.name).stop(pool)
            nesting.detach_sources(self.state, pool)
            if row.persistent:
                db.execute("UPDATE pools SET active=0, live_xml=NULL WHERE name=?", (name,))
            else:
                db.execute("DELETE FROM pools WHERE name=?", (name,))
                db.execute("DELETE FROM volumes WHERE pool=?", (name,))
                db.execute("DELETE FROM pool_runtime WHERE name=?", (name,))
        if not row.persistent:
            self.state.backend.drop(name)
        self._emit("stopped", name)

    def delete(self, name: str) -> None:
        row, backend = self._inactive(name, "still active")
        if not backend.supports("delete"):
            raise backend.unsupported("pool delete")
        nesting.check_pool_unused(self.state, self.index, name, "delete")
        backend.delete(self.state.definition(row))

    def refresh(self, name: str) -> None:
        row = self.state.row(name)
        if not row.active:
            raise _not_valid(name, "not active")
        pool = self.state.definition(row)
        self._scan_into_index(pool)
        self._remember(pool)
        self._emit("refreshed", name)

    def _scan_into_index(self, pool: PoolDef) -> None:
        known: dict[str, Stamp] = self.index.stamps(pool.name)
        backend = self.state.backend(pool.type, pool.name)
        result = backend.scan(pool, known)
        for name, why in result.skipped:
            log.debug("pool %s: skipped '%s': %s", pool.name, name, why)
        self.index.apply_scan(pool.name, known, result,
                              still_there=lambda rec: backend.still_there(pool, rec))

    # -- host start ------------------------------------------------------------
    def on_host_start(self) -> None:
        """After a boot: nothing is running, transient pools are gone, autostart pools start."""
        with self.state.store.write() as db:
            db.execute("DELETE FROM volumes WHERE pool IN (SELECT name FROM pools "
                       "WHERE persistent=0)")
            db.execute("DELETE FROM pools WHERE persistent=0")
            db.execute("UPDATE pools SET active=0, live_xml=NULL")
        for row in self.state.rows():
            if row.persistent and self.state.is_autostart(row.name):
                try:
                    self.start(row.name)
                except Exception as exc:  # one broken pool must not stop the others
                    log.warning("autostart of pool '%s' failed: %s", row.name, exc)
