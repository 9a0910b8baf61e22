"""A small etcd v3 client on etcd's JSON gateway (HTTP), standard library only.

Why not a PyPI client: ``etcd3`` speaks gRPC with generated protobuf code last released
in 2020, which breaks with current protobuf; ``etcd3gw`` is maintained but untyped,
pulls in ``requests`` and fails over between endpoints only between calls of its own
choosing. The few calls virtstore needs (range, put, delete, one transaction form,
lease grant/keepalive/revoke, status, a prefix watch) fit in this module, with one
timeout per request and failover across every endpoint of the cluster on each call.

Keys and values are ``str`` here (UTF-8); the gateway's base64 stays inside.
"""

from __future__ import annotations

import base64
import http.client
import json
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from virtstore.errors import ClusterUnavailable, InternalError

# etcd's gRPC status code for "not found" (a lease that expired or was revoked).
_NOT_FOUND = 5


def _b64(s: str) -> str:
    return base64.b64encode(s.encode()).decode("ascii")


def _unb64(s: str | None) -> str:
    return base64.b64decode(s or "").decode("utf-8", "replace")


def prefix_end(prefix: str) -> str:
    """The range end that selects every key starting with ``prefix`` (etcd's rule:
    the prefix with its last byte plus one); prefixes here are ASCII."""
    if not prefix or not prefix.isascii() or prefix[-1] == "\x7f":
        raise InternalError(f"etcd key prefix {prefix!r}: must be ASCII")
    return prefix[:-1] + chr(ord(prefix[-1]) + 1)


@dataclass(frozen=True)
class KV:
    key: str
    value: str
    create_revision: int
    mod_revision: int
    lease: int

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> KV:
        return cls(_unb64(d.get("key")), _unb64(d.get("value")),
                   int(d.get("create_revision", 0)), int(d.get("mod_revision", 0)),
                   int(d.get("lease", 0)))


@dataclass(frozen=True)
class WatchEvent:
    kind: str  # "put" or "delete"
    kv: KV


class EtcdRequestError(InternalError):
    """etcd answered, and refused the request."""

    def __init__(self, message: str, status: int = 0) -> None:
        super().__init__(message)
        self.status = status


def _endpoint(url: str) -> tuple[str, int]:
    if "://" not in url:
        url = "http://" + url
    parts = urlsplit(url)
    if parts.scheme != "http" or not parts.hostname:
        raise InternalError(f"etcd endpoint '{url}': use http://HOST:PORT")
    return parts.hostname, parts.port or 2379


class EtcdClient:
    """Every call goes to the endpoint that answered last, then to the others in turn;
    ClusterUnavailable when none answers within ``timeout`` seconds each."""

    def __init__(self, endpoints: Sequence[str], *, timeout: float = 2.0) -> None:
        if not endpoints:
            raise InternalError("an etcd cluster needs at least one endpoint")
        self.endpoints = [_endpoint(e) for e in endpoints]
        self.timeout = timeout
        self._preferred = 0
        self._local = threading.local()  # one kept-alive connection per thread

    def endpoint_urls(self) -> list[str]:
        return [f"http://{h}:{p}" for h, p in self.endpoints]

    # -- transport -------------------------------------------------------------
    def _conn(self, i: int) -> http.client.HTTPConnection:
        conns: dict[int, http.client.HTTPConnection] = self._local.__dict__.setdefault(
            "conns", {})
        conn = conns.get(i)
        if conn is None:
            host, port = self.endpoints[i]
            conn = http.client.HTTPConnection(host, port, timeout=self.timeout)
            conns[i] = conn
        return conn

    def _drop(self, i: int) -> None:
        conns: dict[int, http.client.HTTPConnection] = self._local.__dict__.get("conns", {})
        conn = conns.pop(i, None)
        if conn is not None:
            conn.close()

    def _post(self, i: int, path: str, body: dict[str, Any]) -> dict[str, Any]:
        data = json.dumps(body).encode()
        try:
            status, raw = self._send(i, path, data)
        except (http.client.RemoteDisconnected, BrokenPipeError, ConnectionResetError):
            # A kept-alive connection the server had closed: once more on a new one.
            status, raw = self._send(i, path, data)
        try:
            doc = json.loads(raw or b"{}")
        except ValueError as exc:
            raise EtcdRequestError(f"etcd {path}: not JSON (HTTP {status})", status) from exc
        if status != 200 or "error" in doc:
            err = doc.get("error") or doc.get("message") or f"HTTP {status}"
            raise EtcdRequestError(f"etcd {path}: {err}", int(doc.get("code", 0)))
        return doc  # type: ignore[no-any-return]

    def _send(self, i: int, path: str, data: bytes) -> tuple[int, bytes]:
        conn = self._conn(i)
        try:
            conn.request("POST", path, data, {"Content-Type": "application/json"})
            resp = conn.getresponse()
            return resp.status, resp.read()
        except (OSError, http.client.HTTPException):
            self._drop(i)
            raise

    def call(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        n = len(self.endpoints)
        errors: list[str] = []
        first = self._preferred
        for k in range(n):
            i = (first + k) % n
            try:
                doc = self._post(i, path, body)
            except EtcdRequestError as exc:
                # etcd without a quorum says so per request: try another member.
                if "no leader" in str(exc) or "timed out" in str(exc):
                    errors.append(f"{self.endpoint_urls()[i]}: {exc}")
                    continue
                raise
            except (OSError, http.client.HTTPException) as exc:
                errors.append(f"{self.endpoint_urls()[i]}: {exc}")
                continue
            self._preferred = i
            return doc
        raise ClusterUnavailable("cannot reach the cluster's etcd: " + "; ".join(errors))

    def close(self) -> None:
        for i in range(len(self.endpoints)):
            self._drop(i)

    # -- keys ------------------------------------------------------------------
    def get(self, key: str) -> KV | None:
        kvs = self.call("/v3/kv/range", {"key": _b64(key)}).get("kvs") or []
        return KV.from_json(kvs[0]) if kvs else None

    def get_prefix(self, prefix: str, *, limit: int = 0) -> tuple[list[KV], int]:
        """Every key under ``prefix`` (at most ``limit``, 0 for all) and the revision
        they were read at, for a watch to start after."""
        doc = self.call("/v3/kv/range", {"key": _b64(prefix), "range_end":
                                         _b64(prefix_end(prefix)), "limit": limit})
        rev = int(doc.get("header", {}).get("revision", 0))
        return [KV.from_json(d) for d in doc.get("kvs") or []], rev

    def put(self, key: str, value: str, *, lease: int = 0) -> int:
        body: dict[str, Any] = {"key": _b64(key), "value": _b64(value)}
        if lease:
            body["lease"] = str(lease)
        doc = self.call("/v3/kv/put", body)
        return int(doc.get("header", {}).get("revision", 0))

    def delete(self, key: str) -> int:
        doc = self.call("/v3/kv/deleterange", {"key": _b64(key)})
        return int(doc.get("deleted", 0))

    def create(self, key: str, value: str, *, lease: int = 0) -> tuple[bool, int, KV | None]:
        """Put ``key`` only if it does not exist, in one transaction: (True, its
        revision, None) when made, else (False, 0, the key as it is). Finding the key
        with this very value and lease counts as made (a retried request: the values
        callers put carry their process and time, so no one else's is equal)."""
        put: dict[str, Any] = {"key": _b64(key), "value": _b64(value)}
        if lease:
            put["lease"] = str(lease)
        doc = self.call("/v3/kv/txn", {
            "compare": [{"key": _b64(key), "target": "CREATE", "create_revision": "0"}],
            "success": [{"request_put": put}],
            "failure": [{"request_range": {"key": _b64(key)}}]})
        if doc.get("succeeded"):
            return True, int(doc.get("header", {}).get("revision", 0)), None
        kvs = (doc.get("responses") or [{}])[0].get("response_range", {}).get("kvs") or []
        cur = KV.from_json(kvs[0]) if kvs else None
        if cur is not None and cur.value == value and cur.lease == lease:
            # Our own put: call() sends a request again on another member when the
            # first died before answering, though it may have committed it.
            return True, cur.mod_revision, None
        return False, 0, cur

    def replace(self, key: str, value: str, mod_revision: int) -> bool:
        """Put ``key`` only if nobody changed it since ``mod_revision``."""
        doc = self.call("/v3/kv/txn", {
            "compare": [{"key": _b64(key), "target": "MOD",
                         "mod_revision": str(mod_revision)}],
            "success": [{"request_put": {"key": _b64(key), "value": _b64(value)}}]})
        return bool(doc.get("succeeded"))

    def delete_prefix(self, prefix: str) -> int:
        doc = self.call("/v3/kv/deleterange", {"key": _b64(prefix),
                                               "range_end": _b64(prefix_end(prefix))})
        return int(doc.get("deleted", 0))

    def delete_if(self, key: str, mod_revision: int) -> bool:
        """Delete ``key`` only if nobody changed it since ``mod_revision``."""
        doc = self.call("/v3/kv/txn", {
            "compare": [{"key": _b64(key), "target": "MOD",
                         "mod_revision": str(mod_revision)}],
            "success": [{"request_delete_range": {"key": _b64(key)}}]})
        return bool(doc.get("succeeded"))

    # -- leases ----------------------------------------------------------------
    def grant(self, ttl: int) -> tuple[int, int]:
        doc = self.call("/v3/lease/grant", {"TTL": str(ttl)})
        return int(doc["ID"]), int(doc["TTL"])

    def keepalive(self, lease: int) -> int:
        """Renew ``lease``; its TTL now, 0 when it is gone (expired or revoked)."""
        doc = self.call("/v3/lease/keepalive", {"ID": str(lease)})
        return int(doc.get("result", {}).get("TTL", 0))

    def revoke(self, lease: int) -> bool:
        try:
            self.call("/v3/lease/revoke", {"ID": str(lease)})
        except EtcdRequestError as exc:
            if exc.status == _NOT_FOUND:
                return False
            raise
        return True

    # -- cluster ---------------------------------------------------------------
    def status_of(self, i: int) -> dict[str, Any]:
        """One endpoint's own status (no failover): version, leader, db size."""
        return self._post(i, "/v3/maintenance/status", {})

    def members(self) -> list[dict[str, Any]]:
        return list(self.call("/v3/cluster/member/list", {}).get("members") or [])

    # -- watch -----------------------------------------------------------------
    def watch_prefix(self, prefix: str, start_revision: int, stop: threading.Event, *,
                     idle: float = 5.0) -> Iterator[WatchEvent | int]:
        """Changes under ``prefix`` from ``start_revision`` on, across endpoint
        failures, until ``stop`` is set; also yields the revision (an int) after each
        batch so the caller can tell how far it has seen. A connection silent for
        ``idle`` seconds is reopened from the next revision, so a member that died
        without closing the socket costs at most that long."""
        next_rev = start_revision
        attempt = 0
        while not stop.is_set():
            i = (self._preferred + attempt) % len(self.endpoints)
            host, port = self.endpoints[i]
            conn = http.client.HTTPConnection(host, port, timeout=idle)
            try:
                body = json.dumps({"create_request": {
                    "key": _b64(prefix), "range_end": _b64(prefix_end(prefix)),
                    "start_revision": str(next_rev)}}).encode()
                conn.request("POST", "/v3/watch", body, {"Content-Type": "application/json"})
                resp = conn.getresponse()
                if resp.status != 200:
                    raise OSError(f"watch: HTTP {resp.status}")
                attempt = 0
                while not stop.is_set():
                    line = resp.readline()
                    if not line:
                        raise OSError("watch stream closed")
                    result = json.loads(line).get("result") or {}
                    if result.get("compact_revision") and int(result["compact_revision"]) > 0:
                        # History before it is gone: the caller must read afresh.
                        raise InternalError(f"watch: revision {next_rev} was compacted")
                    for ev in result.get("events") or []:
                        kv = KV.from_json(ev.get("kv", {}))
                        next_rev = max(next_rev, kv.mod_revision + 1)
                        yield WatchEvent("delete" if ev.get("type") == "DELETE" else "put", kv)
                    rev = int(result.get("header", {}).get("revision", 0))
                    if rev:
                        yield rev
            except (OSError, http.client.HTTPException, ValueError):
                attempt += 1
                if attempt % len(self.endpoints) == 0:
                    stop.wait(0.5)  # every endpoint refused: do not spin
            finally:
                conn.close()

