"""Cluster-wide pool definitions: a shared pool defined on one member is defined on
every member, with per-member values for the keys that differ from host to host.

etcd keys, under ``/virtstore/v1/pools/<pool>/`` (the name %-quoted):

    def               {"xml", "uuid", "autostart", "member", "since"}: the cluster's
                      definition and autostart mark, and who wrote them last
    member/<member>   {key: value}: that member's own values of host-local keys

A member's local definition is the cluster's with its own values put in. A local mark
(meta ``cluster-pool:<name>``) says which local pools came from the cluster and keeps
the storage id of the cluster's definition: leases are keyed on it, so a member's own
device path or monitor list never splits a volume's lease.

Publishing happens inside the pool manager's write transaction, before the local
change: when etcd refuses or cannot be reached, nothing changes locally either.
Following is one thread per daemon: a full read, then a watch from the revision after
it; each event re-reads the pool's two keys and makes the local definition match. The
follower also starts the cluster pools marked autostart (the cluster's mark, or the
member's own ``autostart`` value) that are not running here: all of them on its first
read, then each one whose definition or member values change, one after the other in
a thread of their own; a start that fails is logged and its reason kept (meta
``cluster-pool-start:<name>``) for cluster-status.
"""

from __future__ import annotations

import json
import logging
import queue
import sqlite3
import threading
import time
from typing import TYPE_CHECKING, Any
from urllib.parse import quote, unquote

from virtstore.engine.cluster import PREFIX, storage_id
from virtstore.engine.poolinfo import clean_path
from virtstore.errors import (
    AlreadyExists,
    Busy,
    InvalidArgument,
    NoSuchPool,
)
from virtstore.host.etcd import KV
from virtstore.types import replace
from virtstore.xml import PoolDef, SourceDevice, SourceHost, format_pool_xml, parse_pool_xml

if TYPE_CHECKING:
    from virtstore.engine.cluster import Cluster
    from virtstore.engine.pools import PoolManager
    from virtstore.engine.state import StateRoot
    from virtstore.engine.store import Store

log = logging.getLogger("virtstore")

POOLS = PREFIX + "pools/"
_MARK = "cluster-pool:"
_START_FAILED = "cluster-pool-start:"
# A member's own value that is no key of the definition: whether it starts the pool.
AUTOSTART = "autostart"

# The keys a member may set for itself: where it finds the storage, not which storage
# it is. (part of the definition, attribute)
OVERRIDE_KEYS: dict[str, tuple[str, str]] = {
    "target.path": ("target", "path"),
    "source.device": ("source", "devices"),
    "source.host": ("source", "hosts"),
    "source.initiator": ("source", "initiator_iqn"),
}


def covers(pool_type: str) -> bool:
    """Whether pools of this type are cluster-wide: those on storage every member
    reaches (the backend says it is shared); a host's own disks stay its own."""
    from virtstore.backends import backend_for

    return backend_for(pool_type).caps.shared


def _pool_prefix(name: str) -> str:
    return f"{POOLS}{quote(name, safe='')}/"


def def_key(name: str) -> str:
    return _pool_prefix(name) + "def"


def member_key(name: str, member: str) -> str:
    return _pool_prefix(name) + "member/" + quote(member, safe="")


def _split_key(key: str) -> tuple[str, str | None]:
    """(pool name, member or None) of a key under POOLS."""
    name, _, rest = key[len(POOLS):].partition("/")
    member = unquote(rest[len("member/"):]) if rest.startswith("member/") else None
    return unquote(name), member


def _set_key(pool: PoolDef, key: str, value: Any) -> None:
    part, attr = OVERRIDE_KEYS[key]
    setattr(pool, part, replace(getattr(pool, part), **{attr: value}))


def _parse_value(key: str, text: str) -> Any:
    items = [x.strip() for x in text.split(",") if x.strip()]
    if key == "target.path":
        if not text.startswith("/"):
            raise InvalidArgument(f"{key}='{text}': must be an absolute path")
        return clean_path(text)
    if key == "source.device":
        if not items:
            raise InvalidArgument(f"{key}: give at least one path")
        return [SourceDevice(path=p) for p in items]
    if key == "source.host":
        hosts = []
        for item in items:
            if item.startswith("["):  # [address]:port
                host, _, port = item[1:].partition("]")
                port = port.lstrip(":")
            elif item.count(":") == 1:
                host, _, port = item.partition(":")
            else:
                host, port = item, ""
            if port and not port.isdigit():
                raise InvalidArgument(f"{key}: '{item}' is not HOST or HOST:PORT")
            hosts.append(SourceHost(host, int(port) if port else None))
        if not hosts:
            raise InvalidArgument(f"{key}: give at least one host")
        return hosts
    return text


def _render(pool: PoolDef, key: str) -> str:
    part, attr = OVERRIDE_KEYS[key]
    value = getattr(getattr(pool, part), attr)
    if key == "source.device":
        return ",".join(d.path for d in value)
    if key == "source.host":
        return ",".join(h.name + (f":{h.port}" if h.port else "") for h in value)
    return str(value or "")


def autostart_of(doc: dict[str, Any], ov: dict[str, str]) -> bool:
    """Whether a member starts the pool: its own ``autostart`` value, else the
    cluster's mark."""
    own = ov.get(AUTOSTART)
    return own == "yes" if own in ("yes", "no") else bool(doc.get("autostart"))


def with_overrides(base: PoolDef, values: dict[str, str]) -> PoolDef:
    pool = replace(base)
    for key, text in values.items():
        if key in OVERRIDE_KEYS:
            _set_key(pool, key, _parse_value(key, text))
    return pool


def _load(kv: KV | None) -> dict[str, Any]:
    if kv is None:
        return {}
    try:
        doc = json.loads(kv.value)
    except ValueError:
        return {}
    return doc if isinstance(doc, dict) else {}


def marked(store: Store, name: str) -> dict[str, Any] | None:
    """The local mark of a pool that came from the cluster: its uuid and storage id."""
    value = store.get_meta(_MARK + name)
    return json.loads(value) if value else None


def lease_storage(store: Store, name: str, pool: PoolDef) -> str:
    """What the leases of ``name``'s volumes are keyed on cluster-wide."""
    mark = marked(store, name)
    return str(mark["storage"]) if mark else storage_id(pool)


class ClusterPools:
    def __init__(self, cluster: Cluster, state: StateRoot, pools: PoolManager) -> None:
        self.cluster = cluster
        self.client = cluster.client
        self.member = cluster.member
        self.state = state
        self.pools = pools
        self.conflicts: dict[str, str] = {}  # pool name -> why it was not applied
        self.revision = 0  # the last revision the follower has seen
        # Set in the follower: it starts autostart pools. Per pool, the revisions of
        # its definition and of this member's values it last saw (a change: start).
        self.starts = False
        self._seen: dict[str, tuple[int, int]] = {}
        # Starts run in a thread of their own: a mount that hangs must not hold up the
        # following of later changes.
        self._start_queue: queue.Queue[str | None] = queue.Queue()
        self._starter: threading.Thread | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- publishing (inside the pool manager's write transaction) ---------------
    def _mark(self, db: sqlite3.Connection, pool: PoolDef, storage: str) -> None:
        db.execute("INSERT OR REPLACE INTO meta(key, value) VALUES(?, ?)",
                   (_MARK + pool.name, json.dumps({"uuid": pool.uuid, "storage": storage})))

    def publish(self, db: sqlite3.Connection, pool: PoolDef, autostart: bool) -> PoolDef:
        """Put ``pool`` in the cluster (new, or a new version of the same uuid); the
        definition this member keeps: the keys it has values of its own for stay its."""
        key = def_key(pool.name)
        cur = self.client.get(key)
        doc = _load(cur)
        mine = self.overrides(pool.name).get(self.member, {})
        base = replace(pool)
        if cur is not None:
            if doc.get("uuid") != pool.uuid:
                raise AlreadyExists(f"operation failed: pool '{pool.name}' is defined in the "
                                    f"cluster with uuid {doc.get('uuid')} (by member "
                                    f"'{doc.get('member')}')")
            old = parse_pool_xml(doc["xml"])
            for k in (k for k in mine if k in OVERRIDE_KEYS):
                part, attr = OVERRIDE_KEYS[k]
                _set_key(base, k, getattr(getattr(old, part), attr))
            autostart = bool(doc.get("autostart"))
        value = json.dumps({"xml": format_pool_xml(base, inactive=True), "uuid": pool.uuid,
                            "autostart": autostart, "member": self.member,
                            "since": time.time()})
        if cur is None:
            done = self.client.create(key, value)[0]
        else:
            done = self.client.replace(key, value, cur.mod_revision)
        if not done:
            raise Busy(f"pool '{pool.name}' was changed in the cluster meanwhile: try again")
        self._mark(db, pool, storage_id(base))
        return with_overrides(base, mine)

    def withdraw(self, db: sqlite3.Connection, name: str) -> None:
        """Undefine ``name`` cluster-wide, if it came from the cluster."""
        mark = marked(self.state.store, name)
        if mark is None:
            return
        cur = self.client.get(def_key(name))
        if cur is not None and _load(cur).get("uuid") == mark["uuid"]:
            self.client.delete_prefix(_pool_prefix(name))
        db.execute("DELETE FROM meta WHERE key=?", (_MARK + name,))

    def publish_autostart(self, name: str, on: bool) -> None:
        if marked(self.state.store, name) is None:
            return
        for _ in range(3):
            cur = self.client.get(def_key(name))
            if cur is None:
                return
            doc = _load(cur)
            doc.update(autostart=on, member=self.member, since=time.time())
            if self.client.replace(def_key(name), json.dumps(doc), cur.mod_revision):
                return
        raise Busy(f"pool '{name}' keeps changing in the cluster: try again")

    # -- per-member values -----------------------------------------------------
    def overrides(self, name: str) -> dict[str, dict[str, str]]:
        kvs, _ = self.client.get_prefix(_pool_prefix(name) + "member/")
        out = {}
        for kv in kvs:
            member = _split_key(kv.key)[1]
            if member is not None:
                out[member] = {str(k): str(v) for k, v in _load(kv).items()}
        return out

    def set_overrides(self, name: str, member: str | None,
                      values: dict[str, str | None]) -> dict[str, str]:
        """Set (a value) or unset (None) ``member``'s own values of host-local keys of
        the cluster pool ``name``; its values after."""
        member = member or self.member
        if not member or "/" in member:
            raise InvalidArgument(f"cluster member name '{member}': must be non-empty "
                                  "without '/'")
        bad = sorted(k for k in values if k not in OVERRIDE_KEYS and k != AUTOSTART)
        if bad:
            raise InvalidArgument(f"pool key '{bad[0]}' cannot differ per member (keys: "
                                  f"{', '.join([*OVERRIDE_KEYS, AUTOSTART])})")
        if values.get(AUTOSTART) not in (None, "yes", "no"):
            raise InvalidArgument(f"{AUTOSTART}='{values[AUTOSTART]}': yes or no")
        cur = self.client.get(def_key(name))
        if cur is None:
            raise NoSuchPool(f"Storage pool not found: no cluster-wide storage pool named "
                             f"'{name}'")
        base = parse_pool_xml(_load(cur)["xml"])
        ov = self.overrides(name).get(member, {})
        for k, v in values.items():
            if v is None:
                ov.pop(k, None)
            else:
                ov[k] = v
        # The result must be a definition this engine would take, and keep each value.
        want = with_overrides(base, ov)
        got = parse_pool_xml(format_pool_xml(want, inactive=True))
        for k, v in values.items():
            if v is not None and k in OVERRIDE_KEYS and _render(got, k) != _render(want, k):
                raise InvalidArgument(f"a {base.type} pool has no {k}")
        if ov:
            self.client.put(member_key(name, member), json.dumps(ov, sort_keys=True))
        else:
            self.client.delete(member_key(name, member))
        if member == self.member:
            self.apply(name)  # at once here, not only when the watch says so
        return ov

    def view(self) -> dict[str, Any]:
        """The cluster's pools, and those this member has not taken in (and why, when
        this process tried)."""
        kvs, _ = self.client.get_prefix(POOLS)
        names = sorted(_split_key(kv.key)[0] for kv in kvs if kv.key.endswith("/def")
                       and _split_key(kv.key)[1] is None)
        missing = {}
        for kv in kvs:
            name, member = _split_key(kv.key)
            if member is None and kv.key.endswith("/def"):
                mark = marked(self.state.store, name)
                if mark is None or mark["uuid"] != _load(kv).get("uuid"):
                    missing[name] = self.conflicts.get(name, "not defined on this member")
        failed = {}
        for r in self.state.store.query("SELECT key, value FROM meta WHERE key LIKE ?",
                                        (_START_FAILED + "%",)):
            name = str(r["key"])[len(_START_FAILED):]
            row = self._row_uuid(name)
            if name in names and row is not None and not row[1]:
                failed[name] = str(r["value"])
        return {"cluster_pools": names, "not_applied": missing, "not_started": failed}

    # -- following ---------------------------------------------------------------
    def apply(self, name: str) -> None:
        cur = self.client.get(def_key(name))
        self._apply(name, cur, self.client.get(member_key(name, self.member)) if cur else None)

    def sync(self) -> int:
        """Make every local definition match the cluster's; the revision read at."""
        kvs, rev = self.client.get_prefix(POOLS)
        defs: dict[str, KV] = {}
        mine: dict[str, KV] = {}
        for kv in kvs:
            name, member = _split_key(kv.key)
            if member is None and kv.key.endswith("/def"):
                defs[name] = kv
            elif member == self.member:
                mine[name] = kv
        local = {r["key"][len(_MARK):] for r in self.state.store.query(
            "SELECT key FROM meta WHERE key LIKE ?", (_MARK + "%",))}
        for name in sorted(set(defs) | local):
            self._apply(name, defs.get(name), mine.get(name))
        self.revision = rev
        return rev

    def _apply(self, name: str, cur: KV | None, ov_kv: KV | None) -> None:
        ov = {str(k): str(v) for k, v in _load(ov_kv).items()}
        try:
            if cur is None:
                self._seen.pop(name, None)
                self._drop(name)
            else:
                doc = _load(cur)
                self._take(name, doc, ov)
                seen = (cur.mod_revision, ov_kv.mod_revision if ov_kv else 0)
                if self.starts and self._seen.get(name) != seen:
                    self._seen[name] = seen
                    if autostart_of(doc, ov):
                        self._start_later(name)
            self.conflicts.pop(name, None)
        except Exception as exc:  # one broken definition must not stop the others
            self.conflicts[name] = str(exc)
            log.warning("cluster pool '%s' not applied on member %s: %s", name,
                        self.member, exc)

    def _start_later(self, name: str) -> None:
        if self._starter is None:
            self._starter = threading.Thread(target=self._run_starts,
                                             name="cluster-autostart", daemon=True)
            self._starter.start()
        self._start_queue.put(name)

    def _run_starts(self) -> None:
        while True:
            name = self._start_queue.get()
            if name is None or self._stop.is_set():
                return
            try:
                self._autostart(name)
            except Exception as exc:  # the pool went away meanwhile, the store closed
                log.warning("autostart of cluster pool '%s': %s", name, exc)

    def _autostart(self, name: str) -> None:
        """Start the pool here unless it runs; a failure is logged and kept, and the
        pool stays inactive (the other members are not concerned)."""
        row = self._row_uuid(name)
        if row is None or row[1]:
            return
        try:
            self.pools.start(name)
        except Exception as exc:
            log.warning("autostart of cluster pool '%s' on member %s failed: %s", name,
                        self.member, exc)
            self.state.store.set_meta(_START_FAILED + name, str(exc))
            return
        log.info("cluster pool '%s' started on member %s (autostart)", name, self.member)
        with self.state.store.write() as db:
            db.execute("DELETE FROM meta WHERE key=?", (_START_FAILED + name,))

    def _row_uuid(self, name: str) -> tuple[str, bool, bool] | None:
        try:
            row = self.state.row(name)
        except NoSuchPool:
            return None
        return row.uuid, row.active, row.persistent

    def _take(self, name: str, doc: dict[str, Any], ov: dict[str, str]) -> None:
        base = parse_pool_xml(doc["xml"])
        want = format_pool_xml(with_overrides(base, ov), inactive=True)
        mark = marked(self.state.store, name)
        row = self._row_uuid(name)
        if row is not None and row[0] != doc["uuid"]:
            if mark is None:
                raise AlreadyExists(f"this member has a pool '{name}' of its own (uuid "
                                    f"{row[0]}), the cluster's has uuid {doc['uuid']}")
            # Undefined and defined anew (another uuid) while this member was away.
            if row[1]:
                raise AlreadyExists(f"pool '{name}' is active here with uuid {row[0]}: "
                                    "stop it to take the cluster's new definition")
            self.pools.undefine(name, publish=False)
            row = None
        if (row is None or not row[2] or format_pool_xml(
                self.state.read_def_file(name), inactive=True) != want):
            self.pools.define(want, publish=False)
        if self.state.is_autostart(name) != autostart_of(doc, ov):
            self.pools.set_autostart(name, autostart_of(doc, ov), publish=False)
        if mark != {"uuid": base.uuid, "storage": storage_id(base)}:
            with self.state.store.write() as db:
                self._mark(db, base, storage_id(base))

    def _drop(self, name: str) -> None:
        if marked(self.state.store, name) is None:
            return
        row = self._row_uuid(name)
        if row is not None and row[2]:
            if row[1]:
                # Running here: it stays until stopped, as a pool whose file went away.
                self.pools.make_transient(name)
            else:
                self.pools.undefine(name, publish=False)
        with self.state.store.write() as db:
            db.execute("DELETE FROM meta WHERE key IN (?, ?)",
                       (_MARK + name, _START_FAILED + name))

    def follow(self) -> None:
        """Keep following the cluster's definitions in a thread until ``stop``."""
        if self._thread is not None:
            return
        self.starts = True
        self._thread = threading.Thread(target=self._follow, name="cluster-pools",
                                        daemon=True)
        self._thread.start()

    def _follow(self) -> None:
        while not self._stop.is_set():
            try:
                rev = self.sync()
                for ev in self.client.watch_prefix(POOLS, rev + 1, self._stop):
                    if isinstance(ev, int):
                        self.revision = ev
                        continue
                    name, member = _split_key(ev.kv.key)
                    if member is None or member == self.member:
                        self.apply(name)
            except Exception as exc:  # compacted history, etcd gone: read afresh
                log.warning("following the cluster's pools: %s", exc)
                self._stop.wait(1.0)

    def stop(self) -> None:
        self._stop.set()
        self._start_queue.put(None)
        if self._thread is not None:
            # A watch waiting on a quiet etcd notices only at its idle timeout; the
            # thread is a daemon and holds nothing that must be finished.
            self._thread.join(timeout=1.0)
        if self._starter is not None:
            # A start under way (a slow mount) is not waited for: it ends as a start
            # cut short by the process's end would.
            self._starter.join(timeout=1.0)
