"""Volume operations: create (staged, journalled, published without replacing), delete, XML."""

from __future__ import annotations

import contextlib
import itertools
import secrets as pysecrets
import sqlite3
from dataclasses import dataclass
from typing import TYPE_CHECKING

from virtstore.backends.base import Backend, CreateRequest, VolumeRecord
from virtstore.engine import journal, locks, nesting
from virtstore.engine.confine import Confinement, check_backing
from virtstore.engine.index import VolumeIndex
from virtstore.engine.names import check_volume_name
from virtstore.engine.secrets import SecretStore
from virtstore.engine.state import StateRoot
from virtstore.engine.volxml import volume_xml
from virtstore.errors import (
    AlreadyExists,
    Busy,
    InvalidArgument,
    NoSuchVolume,
    OperationInvalid,
    Unsupported,
)
from virtstore.host.files import existing_path
from virtstore.types import VolumeCreateArgs

if TYPE_CHECKING:
    from virtstore.engine.cluster import Cluster, Lease
    from virtstore.engine.events import EventLog

from virtstore.xml import BackingStore, PoolDef, VolDef, VolTarget, parse_volume_xml


@dataclass(frozen=True)
class StagedTarget:
    """A volume being made: its reserved name, final path, staging path, journal entry."""

    pool_name: str
    pool: PoolDef
    backend: Backend
    name: str
    final: str
    staging: str
    entry: int


# Largest size we accept: what qemu-img and the kernel can address (2^63 - 1 bytes).
MAX_SIZE = (1 << 63) - 1


class VolumeManager:
    def __init__(self, state: StateRoot, index: VolumeIndex, secrets: SecretStore,
                 events: EventLog | None = None,
                 confinement: Confinement | None = None) -> None:
        self.state = state
        self.index = index
        self.secrets = secrets
        self.events = events
        self.confinement = confinement or Confinement()
        # Set when this engine is a member of a cluster (engine/cluster.py).
        self.cluster: Cluster | None = None

    # -- cluster ---------------------------------------------------------------
    def write_lease(self, pool_name: str, pool: PoolDef, backend: Backend, name: str,
                    op: str) -> Lease | None:
        """The cluster-wide write lease on a volume of a shared pool (None when this
        engine is alone or the pool's storage is this host's own); Busy if another
        holder has it. A new volume's name is claimed with it before it is made."""
        if self.cluster is None or not backend.caps.shared:
            return None
        from virtstore.engine.clusterpools import lease_storage

        return self.cluster.acquire(pool_name, pool, name, op=op,
                                    storage=lease_storage(self.state.store, pool_name, pool))

    def end_lease(self, lease: Lease | None) -> None:
        if lease is not None and self.cluster is not None:
            self.cluster.release(lease)

    # -- backing files -----------------------------------------------------------
    def _is_volume(self, path: str) -> bool:
        try:
            self.index.by_path(path)
        except NoSuchVolume:
            return False
        return True

    def check_backing(self, path: str, *, of: str | None = None) -> None:
        check_backing(path, self.confinement, self._is_volume, of=of)

    def check_chain(self, rec: VolumeRecord) -> None:
        """Before a tool reads through ``rec``'s backing chain: every backing file in it
        must pass ``check_backing`` (as the headers say now, not as last indexed)."""
        if not self.confinement.backing_in_pools:
            return
        from virtstore.formats.probe import backing_chain

        chain = backing_chain(rec.path, rec.format)
        for child, parent in itertools.pairwise(chain):
            self.check_backing(str(parent.path), of=child.path)
        last = chain[-1]
        if last.backing_file:  # a network backing ends the chain
            self.check_backing(last.backing_file, of=last.path)

    def _active_pool(self, name: str) -> tuple[PoolDef, Backend]:
        row = self.state.row(name)
        if not row.active:
            raise OperationInvalid(f"Requested operation is not valid: storage pool "
                                   f"'{name}' is not active")
        return self.state.definition(row), self.state.backend(row.type, row.name)

    # -- create ----------------------------------------------------------------
    def create_xml(self, pool_name: str, xml: str, *, prealloc_metadata: bool) -> str:
        pool, _ = self._active_pool(pool_name)
        vol = parse_volume_xml(xml, pool, capacity_optional=True)
        return self._create(pool_name, vol, prealloc_metadata=prealloc_metadata)

    def create_args(self, pool_name: str, args: VolumeCreateArgs) -> str:
        self._active_pool(pool_name)
        vol = VolDef(name=args.name, capacity=args.capacity,
                     allocation=args.allocation, allocation_given=args.allocation is not None,
                     target=VolTarget(format=args.format))
        if args.backing_vol:
            path = self._resolve_backing(pool_name, args.backing_vol)
            vol.backing_store = BackingStore(path=path, format=args.backing_vol_format)
        return self._create(pool_name, vol, prealloc_metadata=args.prealloc_metadata)

    def _resolve_backing(self, pool_name: str, ident: str) -> str:
        """--backing-vol: a volume name in this pool, a key, or a path."""
        with contextlib.suppress(NoSuchVolume):
            return self.index.info(pool_name, ident).path
        with contextlib.suppress(NoSuchVolume):
            return self.index.by_key(ident).path
        path = existing_path(ident)
        if path is not None:
            self.check_backing(ident)
            return path
        raise NoSuchVolume(f"Storage volume not found: no storage vol with matching "
                           f"name '{ident}'")

    def _request(self, pool: PoolDef, backend: Backend, vol: VolDef,
                 prealloc_metadata: bool) -> CreateRequest:
        t = vol.target
        fmt = t.format or backend.caps.default_vol_format or "raw"
        if fmt not in backend.caps.vol_formats:
            raise Unsupported(f"unsupported configuration: format '{fmt}' is not supported "
                              f"by '{pool.type}' pools")
        backing_path = backing_format = backing_capacity = None
        if vol.backing_store is not None and vol.backing_store.path:
            backing_path = vol.backing_store.path
            if backend.caps.file_based:
                self.check_backing(backing_path)  # before anything reads it
            backing_format, backing_capacity = backend.backing_of(
                pool, fmt, backing_path, vol.backing_store.format)
        capacity = vol.capacity
        if capacity is None or not vol.capacity_given:
            if backing_capacity is None:
                raise InvalidArgument("missing capacity for storage volume")
            capacity = backing_capacity
        if capacity < 0 or capacity > MAX_SIZE:
            raise InvalidArgument(f"invalid capacity {capacity}: must be 0 to {MAX_SIZE} bytes")
        allocation = vol.allocation if vol.allocation_given and vol.allocation is not None \
            else capacity
        if allocation < 0:
            raise InvalidArgument("invalid allocation: must not be negative")
        allocation = min(allocation, capacity)
        if t.lazy_refcounts and t.compat == "0.10":
            raise InvalidArgument("unsupported configuration: lazy_refcounts not supported "
                                  "with compat level 0.10")
        if t.lazy_refcounts and fmt == "qcow2" and not t.compat:
            t.compat = "1.1"
        secret = None
        if t.encryption is not None:
            enc = t.encryption
            if enc.format != "luks":
                raise Unsupported("unsupported configuration: creation of qcow/qcow2 files "
                                  "with legacy encryption is not supported")
            if fmt not in ("raw", "luks", "qcow2"):
                raise Unsupported(f"unsupported configuration: LUKS encryption is not "
                                  f"supported for format '{fmt}'")
            if not enc.secrets:
                raise InvalidArgument("missing encryption secret for LUKS volume")
            s = enc.secrets[0]
            uuid = s.uuid or self.secrets.lookup_by_usage("volume", s.usage or "")
            secret = self.secrets.get_value(uuid, internal=True)
            if fmt == "raw":
                fmt = "luks"
        return CreateRequest(vol=vol, capacity=capacity, allocation=allocation, format=fmt,
                             backing_path=backing_path, backing_format=backing_format,
                             prealloc_metadata=prealloc_metadata, encryption_secret=secret)

    def _create(self, pool_name: str, vol: VolDef, *, prealloc_metadata: bool) -> str:
        pool, backend = self._active_pool(pool_name)
        check_volume_name(vol.name)
        if not backend.supports("create_volume"):
            raise backend.unsupported("volume creation")
        req = self._request(pool, backend, vol, prealloc_metadata)
        lease = self.write_lease(pool_name, pool, backend, vol.name, "create")
        try:
            with self.state.store.write() as db:
                target = self.reserve_target(db, pool_name, pool, backend, vol.name)
            try:
                backend.create_volume(pool, target.staging, req)
                if lease is not None:
                    lease.check()
            except BaseException:
                self.abort_target(target)
                raise
            self.finish_target(target)
        finally:
            self.end_lease(lease)
        return vol.name

    # -- staged targets, shared with the data operations ------------------------
    def reserve_target(self, db: sqlite3.Connection, pool_name: str, pool: PoolDef,
                       backend: Backend, name: str, op: str = "create") -> StagedTarget:
        """Claim ``name`` (invisible until published) and journal its staging path."""
        check_volume_name(name)
        final = backend.volume_path(pool, name)
        staging = backend.staging_path(pool, pysecrets.token_hex(8))
        if not self.index.reserve(db, pool_name, name, final, backend.caps.volume_type):
            raise AlreadyExists(f"storage volume '{name}' exists already")
        if backend.name_taken(pool, name):
            db.execute("DELETE FROM volumes WHERE pool=? AND name=? AND state='creating'",
                       (pool_name, name))
            raise AlreadyExists(f"Requested operation is not valid: volume target path "
                                f"'{final}' already exists")
        entry = journal.begin(db, op, pool_name, name, staging, final)
        return StagedTarget(pool_name, pool, backend, name, final, staging, entry)

    def finish_target(self, t: StagedTarget) -> None:
        """Publish the staged volume under its final name, never replacing anything."""
        try:
            t.backend.commit_volume(t.pool, t.staging, t.final)
        except BaseException:
            self.abort_target(t)
            raise
        rec = t.backend.read_volume(t.pool, t.name)
        with self.state.store.write():  # one commit for the row, the journal and the event
            if rec is not None:
                self.index.publish(t.pool_name, rec)
            journal.end(self.state.store, t.entry)
            if self.events is not None:
                self.events.emit("volume", "created", pool=t.pool_name, name=t.name)

    def abort_target(self, t: StagedTarget) -> None:
        try:
            t.backend.discard_staging(t.staging)
        finally:
            self.index.remove(t.pool_name, t.name)
            journal.end(self.state.store, t.entry)

    # -- recovery --------------------------------------------------------------
    def settle(self, pool_name: str, name: str) -> str:
        """Make the index say what the pool holds under ``name`` after an operation on
        it died with its process (its staging object already discarded), as a refresh
        would; returns what was done, for the log.

        A name reserved by a create, clone or create-from is published when a volume is
        there: the backend publishes only a volume whose data is complete (made, then
        synced where the data is not metadata alone), so what is there is whole.
        Otherwise the name is freed. A volume being deleted is listed again when it is
        still there, dropped when it is gone. A listed volume (upload, wipe, snapshot,
        revert) is read again: its content may have been swapped."""
        state = self.index.state_of(pool_name, name)
        if state is None:
            return "no row for the name"
        if state == "ready":
            return self.reread(pool_name, name)
        row = self.state.row(pool_name)
        rec = self.state.backend(row.type, row.name).read_volume(self.state.definition(row), name)
        if rec is None:
            self.index.remove(pool_name, name)
            if state == "deleting" and self.events is not None:
                self.events.emit("volume", "deleted", pool=pool_name, name=name)
            return "the volume is not there, its name is free"
        self.index.publish(pool_name, rec)
        if state == "creating" and self.events is not None:
            self.events.emit("volume", "created", pool=pool_name, name=name)
        return "the volume is there and listed"

    def reread(self, pool_name: str, name: str) -> str:
        """Index a listed volume as it is now, after a job writing it died. A volume
        that is not there is left to a refresh (nothing here removes one)."""
        if self.index.state_of(pool_name, name) != "ready":
            return "not listed, left as it is"
        row = self.state.row(pool_name)
        rec = self.state.backend(row.type, row.name).read_volume(self.state.definition(row), name)
        if rec is None:
            return "the volume is not there, left to a refresh"
        self.index.publish(pool_name, rec)
        return "the volume is read again"

    # -- delete ----------------------------------------------------------------
    def delete(self, pool_name: str, name: str, *, owner: str = "") -> None:
        """Delete the volume; ``owner``: the job deleting it, which may hold its lock (a
        move drops its source)."""
        pool, backend = self._active_pool(pool_name)
        rec = self.index.get(pool_name, name)
        if not backend.supports("delete_volume"):
            raise backend.unsupported("volume deletion")
        # A volume that is the source device of a running pool stays.
        nesting.check_volume_unused(self.state, self.index, pool_name, rec)
        # Not while another member writes it, or a guest there holds it.
        lease = self.write_lease(pool_name, pool, backend, name, "delete")
        try:
            with self.state.store.write() as db:
                locks.check_free(db, pool_name, name, owner)
                cur = db.execute("UPDATE volumes SET state='deleting' WHERE pool=? AND "
                                 "name=? AND state='ready'", (pool_name, name))
                if cur.rowcount != 1:
                    raise Busy(f"volume '{name}' is in use by another operation")
                entry = journal.begin(db, "delete", pool_name, name, None, rec.path)
            try:
                backend.delete_volume(pool, rec)
            except BaseException:
                self.index.set_state(pool_name, name, "ready", expect="deleting")
                journal.end(self.state.store, entry)
                raise
        finally:
            self.end_lease(lease)
        # One commit for the row, the journal and the event, as a create's: each write
        # transaction is a turn on the database's lock, which concurrent writers queue for.
        with self.state.store.write():
            self.index.remove(pool_name, name)
            journal.end(self.state.store, entry)
            if self.events is not None:
                self.events.emit("volume", "deleted", pool=pool_name, name=name)

    # -- XML -------------------------------------------------------------------
    def xml(self, pool_name: str, name: str) -> str:
        return volume_xml(self.state, self.index, pool_name, name)
