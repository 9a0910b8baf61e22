"""Several hosts on one shared storage: write leases and membership in etcd.

Each engine that needs the cluster opens a *session*: one etcd lease (TTL
``ClusterConfig.ttl``) kept alive by a thread of this process, with a member key on it.
A volume of a shared pool is written only under a *write lease*: a key
``/virtstore/v1/vol/<storage>/<volume>`` made by a transaction that succeeds only if
the key does not exist, so exactly one holder in the whole cluster has it. A new
volume's name is claimed the same way before any byte is made. Job leases hang on the
session, so a holder that dies loses them when its session expires; explicit leases
(``vol-lease``, for a running guest) get an etcd lease of their own, renewed while
this process lives and by repeating ``vol-lease``.

A member that cannot confirm its session in time (etcd unreachable) counts every lease
on it as lost, cancels the jobs writing under them and refuses new leases with
ClusterUnavailable until etcd answers again.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote, unquote

from virtstore.errors import Busy, ClusterUnavailable, InvalidArgument, VirtstoreError
from virtstore.host.etcd import KV, EtcdClient
from virtstore.xml import PoolDef

log = logging.getLogger("virtstore")

PREFIX = "/virtstore/v1/"
MEMBERS = PREFIX + "members/"
LEASES = PREFIX + "vol/"

# Pool types whose storage is named by its source alone: the monitors or portals a
# member lists may differ from host to host while the storage is the same.
_NAMED_BY_SOURCE = ("rbd", "sheepdog")
# A session is trusted for this share of its TTL after the keepalive that confirmed it
# was sent: the rest is the margin for clocks and the request itself.
_TRUST = 0.8
# How often the watchdog looks at the trust windows (seconds).
_WATCHDOG = 0.2


@dataclass(frozen=True)
class ClusterConfig:
    endpoints: tuple[str, ...]
    member: str
    ttl: int = 10
    timeout: float = 2.0

    def __post_init__(self) -> None:
        if not self.endpoints:
            raise InvalidArgument("a cluster needs at least one etcd endpoint")
        if self.ttl < 2:
            raise InvalidArgument("the cluster lease TTL must be at least 2 seconds")
        if not self.member or "/" in self.member:
            raise InvalidArgument(f"cluster member name '{self.member}': must be non-empty "
                                  "without '/'")

    @classmethod
    def parse(cls, endpoints: str, *, member: str | None = None,
              ttl: int | None = None) -> ClusterConfig:
        eps = tuple(e.strip() for e in endpoints.split(",") if e.strip())
        return cls(eps, member or socket.gethostname(), ttl or 10)

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> ClusterConfig | None:
        """VIRTSTORE_CLUSTER (etcd endpoints, comma-separated), VIRTSTORE_CLUSTER_MEMBER
        (default the host name), VIRTSTORE_CLUSTER_TTL (seconds)."""
        env = os.environ if env is None else env
        eps = env.get("VIRTSTORE_CLUSTER", "").strip()
        if not eps:
            return None
        ttl = env.get("VIRTSTORE_CLUSTER_TTL")
        try:
            ttl_s = int(ttl) if ttl else None
        except ValueError:
            raise InvalidArgument(f"VIRTSTORE_CLUSTER_TTL='{ttl}': not a number") from None
        return cls.parse(eps, member=env.get("VIRTSTORE_CLUSTER_MEMBER") or None, ttl=ttl_s)


def storage_id(pool: PoolDef) -> str:
    """What a shared pool's storage is called cluster-wide, whatever each member named
    the pool: an RBD pool is its Ceph pool, an NFS pool its server and export."""
    src = pool.source
    if pool.type in _NAMED_BY_SOURCE:
        parts = [pool.type, src.name or ""]
    else:
        parts = [pool.type, src.hosts[0].name if src.hosts else "", src.dir or "",
                 src.name or "", src.devices[0].path if src.devices else ""]
    return quote(":".join(parts), safe="")


def lease_key(storage: str, volume: str) -> str:
    return f"{LEASES}{storage}/{quote(volume, safe='')}"


@dataclass
class Lease:
    """A write lease this process holds."""

    key: str
    pool: str
    volume: str
    holder: str
    op: str
    etcd_lease: int
    revision: int
    own: bool  # an etcd lease of its own (explicit), else the session's
    confirmed_until: float = 0.0  # monotonic; own leases only
    lost: threading.Event = field(default_factory=threading.Event)
    _on_lost: list[Callable[[], None]] = field(default_factory=list)

    def on_lost(self, fn: Callable[[], None]) -> None:
        """Call ``fn`` when the lease is lost (at once if it already is)."""
        self._on_lost.append(fn)
        if self.lost.is_set():
            fn()

    def _lose(self) -> None:
        self.lost.set()
        for fn in self._on_lost:
            try:
                fn()
            except Exception as exc:  # one callback must not keep the others from running
                log.warning("lease %s: %s", self.key, exc)

    def check(self) -> None:
        if self.lost.is_set():
            raise ClusterUnavailable(f"the write lease on volume '{self.volume}' of pool "
                                     f"'{self.pool}' was lost: not writing it")


def _lease_view(kv: KV) -> dict[str, Any]:
    rest = kv.key[len(LEASES):]
    storage, _, vol = rest.partition("/")
    try:
        val = json.loads(kv.value)
    except ValueError:
        val = {}
    return {"storage": unquote(storage), "volume": unquote(vol), "pool": val.get("pool"),
            "member": val.get("member"), "holder": val.get("holder"), "op": val.get("op"),
            "pid": val.get("pid"), "since": val.get("since"), "lease": kv.lease}


class Cluster:
    def __init__(self, config: ClusterConfig, *, client: EtcdClient | None = None) -> None:
        self.config = config
        self.member = config.member
        self.client = client or EtcdClient(config.endpoints, timeout=config.timeout)
        self._lock = threading.RLock()
        self._session = 0
        self._confirmed_until = 0.0
        self._held: dict[str, Lease] = {}
        self._unreleased: list[Lease] = []
        self._unreachable_since: float | None = None
        self._last_error: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._watchdog: threading.Thread | None = None
        # etcd leases given up here while etcd could not be told: revoked once it can,
        # so their keys do not wait out the TTL after this member is back.
        self._stale: list[int] = []
        self.counters = {"leases_taken": 0, "leases_lost": 0, "refused_busy": 0,
                         "refused_unavailable": 0}

    # -- session ---------------------------------------------------------------
    def _interval(self) -> float:
        return self.config.ttl / 3

    def _session_live(self) -> bool:
        return bool(self._session) and time.monotonic() < self._confirmed_until

    def _ensure_session(self) -> int:
        with self._lock:
            if self._session_live():
                return self._session
            if self._session:
                self._lose_session("its etcd session could not be renewed in time")
            sent = time.monotonic()
            lease, ttl = self.client.grant(self.config.ttl)
            self.client.put(f"{MEMBERS}{self.member}/{lease:x}", json.dumps({
                "member": self.member, "host": socket.gethostname(), "pid": os.getpid(),
                "since": time.time(), "ttl": ttl}), lease=lease)
            self._session = lease
            self._confirmed_until = sent + ttl * _TRUST
            self._start_keepalive()
            return lease

    def _start_keepalive(self) -> None:
        if self._thread is None or not self._thread.is_alive():
            self._thread = threading.Thread(target=self._keepalive_loop,
                                            name="cluster-keepalive", daemon=True)
            self._thread.start()
        if self._watchdog is None or not self._watchdog.is_alive():
            self._watchdog = threading.Thread(target=self._watchdog_loop,
                                              name="cluster-watchdog", daemon=True)
            self._watchdog.start()

    def _watchdog_loop(self) -> None:
        """Give leases up the moment their trust window ends, not when a keepalive stuck
        on an unreachable etcd finally times out (that may be after the TTL, when
        another member can already have the lease)."""
        while not self._stop.wait(_WATCHDOG):
            with self._lock:
                now = time.monotonic()
                expired = self._session and now >= self._confirmed_until
                owned = [ls for ls in self._held.values()
                         if ls.own and now >= ls.confirmed_until]
                if not expired and not owned:
                    continue
                if self._unreachable_since is None:
                    self._unreachable_since = time.time()
                    log.warning("member %s: etcd confirmed nothing within the trust window",
                                self.member)
                if expired:
                    self._lose_session("no keepalive was confirmed within the lease TTL")
                for ls in owned:
                    self._lose(ls)

    def _keepalive_loop(self) -> None:
        while not self._stop.wait(self._interval()):
            try:
                self.beat()
            except Exception as exc:  # the loop must outlive any one failure
                log.warning("cluster keepalive: %s", exc)

    def beat(self) -> None:
        """Renew the session and the explicit leases; retry releases that failed."""
        with self._lock:
            session = self._session
            owned = [ls for ls in self._held.values() if ls.own]
            pending = list(self._unreleased)
            stale = list(self._stale)
        if (not session and not owned and not pending and not stale
                and self._unreachable_since is None):
            return
        sent = time.monotonic()
        try:
            if not session:  # nothing to renew: ask etcd whether it answers again
                self.client.call("/v3/maintenance/status", {})
            left = self.client.keepalive(session) if session else -1
            renewed = {ls.key: self.client.keepalive(ls.etcd_lease) for ls in owned}
        except ClusterUnavailable as exc:
            with self._lock:
                if self._unreachable_since is None:
                    self._unreachable_since = time.time()
                    log.warning("member %s lost etcd: %s", self.member, exc)
                self._last_error = str(exc)
                now = time.monotonic()
                if self._session and now >= self._confirmed_until:
                    self._lose_session("etcd was unreachable for longer than the lease TTL")
                for ls in owned:
                    if now >= ls.confirmed_until:
                        self._lose(ls)
            return
        with self._lock:
            if self._unreachable_since is not None:
                log.warning("member %s reached etcd again", self.member)
            self._unreachable_since = None
            self._last_error = None
            if session and session == self._session:
                if left <= 0:
                    self._lose_session("its etcd session expired")
                else:
                    self._confirmed_until = sent + left * _TRUST
            for ls in owned:
                left_own = renewed.get(ls.key, 0)
                if left_own <= 0:
                    self._lose(ls)
                else:
                    ls.confirmed_until = sent + left_own * _TRUST
            self._unreleased = [ls for ls in self._unreleased if ls not in pending]
        for ls in pending:
            self._release_now(ls, retry=True)
        self._revoke_stale(stale)

    def _revoke_stale(self, stale: list[int]) -> None:
        for lease in stale:
            try:
                self.client.revoke(lease)
            except VirtstoreError as exc:
                log.warning("revoking lost lease %x: %s (will retry)", lease, exc)
                continue
            with self._lock:
                self._stale.remove(lease)

    def _lose(self, ls: Lease) -> None:
        if self._held.pop(ls.key, None) is not None:
            if ls.own:
                self._stale.append(ls.etcd_lease)
            self.counters["leases_lost"] += 1
            log.warning("member %s lost its write lease on %s/%s", self.member, ls.pool,
                        ls.volume)
            ls._lose()

    def _lose_session(self, why: str) -> None:
        log.warning("member %s: %s; its job leases are lost", self.member, why)
        for ls in [ls for ls in self._held.values() if not ls.own]:
            self._lose(ls)
        if self._session:
            self._stale.append(self._session)
        self._session = 0
        self._last_error = why

    # -- leases ----------------------------------------------------------------
    def _refuse_if_cut_off(self) -> None:
        if self._unreachable_since is not None:
            self.counters["refused_unavailable"] += 1
            raise ClusterUnavailable(
                f"member '{self.member}' has lost the cluster's etcd since "
                f"{time.strftime('%H:%M:%S', time.localtime(self._unreachable_since))} "
                f"({self._last_error}): it takes no new write leases")

    def acquire(self, pool_name: str, pool: PoolDef, volume: str, *, op: str,
                holder: str | None = None, ttl: int | None = None,
                storage: str | None = None) -> Lease:
        """The write lease on ``volume`` of the shared ``pool``, or Busy naming who
        has it. ``ttl``: an explicit lease with an etcd lease of its own (renewed if
        this member and ``holder`` already hold it). ``storage``: the pool's storage
        id when it is not the definition's own (a cluster pool's)."""
        self._refuse_if_cut_off()
        key = lease_key(storage or storage_id(pool), volume)
        holder = holder or f"{op}@{os.getpid()}"
        own = ttl is not None
        try:
            if own:
                assert ttl is not None
                sent = time.monotonic()
                etcd_lease, granted = self.client.grant(ttl)
            else:
                etcd_lease = self._ensure_session()
            value = json.dumps({"member": self.member, "holder": holder, "op": op,
                                "pool": pool_name, "pid": os.getpid(), "since": time.time(),
                                "ttl": ttl or self.config.ttl})
            made, rev, cur = self.client.create(key, value, lease=etcd_lease)
            if not made and own:
                self.client.revoke(etcd_lease)
                if cur is not None and self._same_holder(cur, holder):
                    return self._renew(cur, pool_name, volume, holder, op)
        except ClusterUnavailable:
            self.counters["refused_unavailable"] += 1
            raise
        if not made:
            self.counters["refused_busy"] += 1
            raise Busy(self._busy_message(pool_name, volume, cur))
        ls = Lease(key, pool_name, volume, holder, op, etcd_lease, rev, own)
        if own:
            ls.confirmed_until = sent + granted * _TRUST
            self._start_keepalive()
        with self._lock:
            self._held[key] = ls
            self.counters["leases_taken"] += 1
        return ls

    def _same_holder(self, cur: KV, holder: str) -> bool:
        try:
            val = json.loads(cur.value)
        except ValueError:
            return False
        return bool(val.get("member") == self.member and val.get("holder") == holder)

    def _renew(self, cur: KV, pool_name: str, volume: str, holder: str, op: str) -> Lease:
        sent = time.monotonic()
        left = self.client.keepalive(cur.lease)
        if left <= 0:  # expired between the read and the renewal: take it afresh
            raise Busy(f"the lease on volume '{volume}' of pool '{pool_name}' expired "
                       "while being renewed: try again")
        with self._lock:
            ls = self._held.get(cur.key) or Lease(cur.key, pool_name, volume, holder, op,
                                                   cur.lease, cur.mod_revision, True)
            ls.confirmed_until = sent + left * _TRUST
            self._held[cur.key] = ls
        self._start_keepalive()
        return ls

    def _busy_message(self, pool_name: str, volume: str, cur: KV | None) -> str:
        who = "another member"
        if cur is not None:
            v = _lease_view(cur)
            who = f"member '{v['member']}' ({v['op']}, holder '{v['holder']}')"
        return (f"Requested operation is not valid: volume '{volume}' in pool "
                f"'{pool_name}' is leased for writing by {who}")

    def release(self, ls: Lease) -> None:
        with self._lock:
            if self._held.get(ls.key) is ls:
                del self._held[ls.key]
            elif not ls.own:
                return  # lost already: its key went with the session
        self._release_now(ls, retry=False)

    def _release_now(self, ls: Lease, *, retry: bool) -> None:
        try:
            if ls.own:
                self.client.revoke(ls.etcd_lease)
            else:
                self.client.delete_if(ls.key, ls.revision)
        except VirtstoreError as exc:
            # The key would outlive the work while the session lives: try again later.
            log.warning("releasing lease %s: %s (will retry)", ls.key, exc)
            with self._lock:
                self._unreleased.append(ls)
            if not retry:
                self._start_keepalive()

    def unlease(self, pool_name: str, pool: PoolDef, volume: str, *, holder: str | None,
                force: bool = False, storage: str | None = None) -> None:
        """End an explicit lease: this member's with ``holder`` (any holder of this
        member when None), or anyone's with ``force`` (the holder is known dead)."""
        key = lease_key(storage or storage_id(pool), volume)
        cur = self.client.get(key)
        if cur is None:
            raise InvalidArgument(f"volume '{volume}' of pool '{pool_name}' has no lease")
        v = _lease_view(cur)
        mine = v["member"] == self.member and (holder is None or v["holder"] == holder)
        if not mine and not force:
            raise Busy(self._busy_message(pool_name, volume, cur) +
                       ": not this member's (force breaks it)")
        with self._lock:
            self._held.pop(key, None)
        if cur.lease:
            self.client.revoke(cur.lease)
        self.client.delete_if(key, cur.mod_revision)

    # -- views -----------------------------------------------------------------
    def leases(self, storage: str | None = None) -> list[dict[str, Any]]:
        prefix = f"{LEASES}{storage}/" if storage else LEASES
        kvs, _ = self.client.get_prefix(prefix)
        return [_lease_view(kv) for kv in kvs]

    def status(self) -> dict[str, Any]:
        endpoints = []
        for i, url in enumerate(self.client.endpoint_urls()):
            try:
                st = self.client.status_of(i)
                endpoints.append({"endpoint": url, "healthy": True,
                                  "version": st.get("version"),
                                  "is_leader": st.get("leader") == st.get("header", {}).get(
                                      "member_id"),
                                  "db_size": int(st.get("dbSize", 0))})
            except (OSError, VirtstoreError, ValueError) as exc:
                endpoints.append({"endpoint": url, "healthy": False, "error": str(exc)})
        members: dict[str, dict[str, Any]] = {}
        leases: list[dict[str, Any]] = []
        error = None
        try:
            kvs, _ = self.client.get_prefix(MEMBERS)
            for kv in kvs:
                val = json.loads(kv.value)
                m = members.setdefault(val["member"], {"member": val["member"],
                                                       "sessions": 0, "leases": 0})
                m["sessions"] += 1
            leases = self.leases()
            for ls in leases:
                m = members.setdefault(str(ls["member"]), {"member": ls["member"],
                                                           "sessions": 0, "leases": 0})
                m["leases"] += 1
        except VirtstoreError as exc:
            error = str(exc)
        with self._lock:
            me = {"member": self.member, "session": f"{self._session:x}" if self._session
                  else None, "session_live": self._session_live(),
                  "cut_off": self._unreachable_since is not None,
                  "last_error": self._last_error, "held": len(self._held),
                  **self.counters}
        healthy = sum(1 for e in endpoints if e["healthy"])
        return {"endpoints": endpoints, "quorum": healthy > len(endpoints) // 2,
                "members": sorted(members.values(), key=lambda m: str(m["member"])),
                "leases": len(leases), "this_member": me, "error": error}

    def close(self) -> None:
        """Release every lease and the session (others may take them at once)."""
        self._stop.set()
        with self._lock:
            held = list(self._held.values())
            session = self._session
            self._held.clear()
            self._session = 0
            stale = list(self._stale)
        self._revoke_stale(stale)
        for ls in held:
            if ls.own:
                continue  # an explicit lease outlives this process until its TTL
            self._release_now(ls, retry=True)
        try:
            if session:
                self.client.revoke(session)
        except VirtstoreError as exc:
            log.warning("closing the cluster session: %s", exc)
        for t in (self._thread, self._watchdog):
            if t is not None:
                t.join(timeout=self._interval() + 1)
        self.client.close()
