"""virtstored's listeners: accepting connections on unix sockets and TLS, with limits per
listener and per peer (``Limits``), each connection served by its own thread
(``HTTPConnection``)."""

from __future__ import annotations

import contextlib
import logging
import selectors
import socket
import ssl
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from virtstore.server.http import (
    TLS_HANDSHAKE_TIMEOUT,
    HTTPConnection,
    HTTPError,
    Limits,
    Peer,
    Request,
    Response,
    _render,
    error_response,
)

log = logging.getLogger("virtstored")


@dataclass
class Listener:
    sock: socket.socket
    kind: str  # unix-rw, unix-ro, tcp
    label: str
    tls: ssl.SSLContext | None = None


def _peer_for(listener: Listener, sock: socket.socket, addr: Any) -> tuple[Peer, str | None]:
    """Who connected, and the key its connections are counted under (None: not counted;
    the read-write socket's peers are root)."""
    if listener.kind.startswith("unix"):
        creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        pid, uid, gid = struct.unpack("3i", creds)
        key = None if listener.kind == "unix-rw" else f"uid {uid}"
        return Peer(listener.kind, uid=uid, gid=gid, pid=pid), key
    host, port = addr[0], addr[1]
    where = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    return Peer(listener.kind, addr=where), f"address {host}"


class Counts:
    """The connections held, by listener kind and by peer, against ``Limits``: one
    place decides whether one more is let in."""

    def __init__(self, limits: Limits) -> None:
        self.limits = limits

    def admit(self, kind: str, key: str | None) -> str | None:
        """Count one more connection of ``kind`` from ``key``, or say why not."""
        raise NotImplementedError

    def release(self, kind: str, key: str | None) -> None:
        raise NotImplementedError

    def active(self) -> int:
        raise NotImplementedError

    def why_full(self, active: int, by_kind: dict[str, int], kind: str,
                 key: str | None, of_peer: int) -> str | None:
        """Why one more connection of ``kind`` (``of_peer`` already open from ``key``)
        is refused, given what is held; None if it is not."""
        lim = self.limits
        if active >= lim.total:
            return f"all {lim.total} connections in use"
        if kind == "unix-rw":
            return None
        others = active - by_kind.get("unix-rw", 0)
        if others >= lim.total - lim.rw_reserve:
            return "the remaining connections are kept for the read-write socket"
        own = lim.ro if kind == "unix-ro" else lim.tcp
        if by_kind.get(kind, 0) >= own:
            return f"all {own} connections of this listener in use"
        if key is not None and of_peer >= lim.per_peer:
            return f"{lim.per_peer} connections already open from {key}"
        return None


class LocalCounts(Counts):
    """The counts of a server that is the only process on its listeners."""

    def __init__(self, limits: Limits) -> None:
        super().__init__(limits)
        self._lock = threading.Lock()
        self._active = 0
        self._by_kind: dict[str, int] = {}
        self._by_peer: dict[str, int] = {}

    def admit(self, kind: str, key: str | None) -> str | None:
        with self._lock:
            of_peer = self._by_peer.get(key, 0) if key is not None else 0
            why = self.why_full(self._active, self._by_kind, kind, key, of_peer)
            if why is None:
                self._count(kind, key, 1)
            return why

    def release(self, kind: str, key: str | None) -> None:
        with self._lock:
            self._count(kind, key, -1)

    def active(self) -> int:
        with self._lock:
            return self._active

    def _count(self, kind: str, key: str | None, step: int) -> None:
        self._active += step
        self._by_kind[kind] = self._by_kind.get(kind, 0) + step
        if key is not None:
            left = self._by_peer.get(key, 0) + step
            if left:
                self._by_peer[key] = left
            else:
                del self._by_peer[key]


class Server:
    """Accepts on every listener from one thread; each connection gets its own thread."""

    def __init__(self, app: Callable[[Request], Response], listeners: list[Listener], *,
                 limits: Limits = Limits(),  # noqa: B008 - frozen
                 counts: Counts | None = None) -> None:
        self.app = self._counted(app)
        self.listeners = listeners
        self.limits = limits
        # Several worker processes share one set of counts (server/workers.py).
        self.counts = counts if counts is not None else LocalCounts(limits)
        self._busy = 0
        self._refused: dict[str, tuple[float, int]] = {}  # listener: last logged, since
        self._lock = threading.Lock()
        self._stop = threading.Event()
        # Open connections, so that a stop can end them (event streams never end alone).
        self._conns: dict[threading.Thread, socket.socket] = {}
        self._wake_r, self._wake_w = socket.socketpair()

    def serve_forever(self) -> None:
        sel = selectors.DefaultSelector()
        for each in self.listeners:
            each.sock.setblocking(False)
            sel.register(each.sock, selectors.EVENT_READ, each)
        sel.register(self._wake_r, selectors.EVENT_READ, None)
        try:
            while not self._stop.is_set():
                for key, _ in sel.select():
                    if key.data is None:
                        continue
                    lst: Listener = key.data
                    try:
                        sock, addr = lst.sock.accept()
                    except (BlockingIOError, InterruptedError):
                        continue
                    except OSError as exc:
                        log.warning("accept on %s failed: %s", lst.label, exc)
                        time.sleep(0.05)
                        continue
                    self._start(lst, sock, addr)
        finally:
            sel.close()

    def _start(self, lst: Listener, sock: socket.socket, addr: Any) -> None:
        sock.setblocking(True)
        try:
            peer, key = _peer_for(lst, sock, addr)
        except OSError as exc:  # gone already
            log.debug("connection on %s ended at once: %s", lst.label, exc)
            sock.close()
            return
        why = self.counts.admit(lst.kind, key)
        if why is not None:
            self._refuse(lst, sock, why)
            return
        t = threading.Thread(target=self._run, args=(lst, sock, peer, key), daemon=True,
                             name=f"conn-{lst.kind}")
        with self._lock:
            self._conns[t] = sock
        t.start()

    def _refuse(self, lst: Listener, sock: socket.socket, why: str) -> None:
        # One line per listener and second at most: a flood must not flood the log too.
        now = time.monotonic()
        last, count = self._refused.get(lst.label, (0.0, 0))
        if now - last >= 1.0:
            more = f" ({count} more refused since)" if count else ""
            log.warning("too many connections: refusing one on %s: %s%s", lst.label, why,
                        more)
            self._refused[lst.label] = (now, 0)
        else:
            self._refused[lst.label] = (last, count + 1)
        try:
            sock.settimeout(1.0)
            if lst.tls is None:  # a TLS peer could not read it before a handshake
                resp = error_response(HTTPError(503, "busy", f"too many connections: {why}"))
                sock.sendall(_render(resp, False, True))
        except OSError:
            pass
        sock.close()

    def _run(self, lst: Listener, sock: socket.socket, peer: Peer, key: str | None) -> None:
        try:
            if lst.kind == "tcp":
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if lst.tls is not None:
                sock.settimeout(TLS_HANDSHAKE_TIMEOUT)
                try:
                    tls_sock = lst.tls.wrap_socket(sock, server_side=True)
                except (ssl.SSLError, OSError) as exc:
                    log.warning("authentication failed: TLS handshake with %s on %s: %s",
                                peer.addr, lst.label, exc)
                    sock.close()
                    return
                cert = tls_sock.getpeercert()
                if cert:
                    peer.cert_subject = _subject(cert)
                sock = tls_sock
                with self._lock:
                    self._conns[threading.current_thread()] = sock
            HTTPConnection(sock, peer, self.app, head_timeout=self.limits.head_timeout).serve()
        except Exception:
            log.exception("connection on %s failed", lst.label)
            with contextlib.suppress(OSError):
                sock.close()
        finally:
            self.counts.release(lst.kind, key)
            with self._lock:
                self._conns.pop(threading.current_thread(), None)

    def _counted(self, app: Callable[[Request], Response]) -> Callable[[Request], Response]:
        def call(req: Request) -> Response:
            with self._lock:
                self._busy += 1
            try:
                return app(req)
            finally:
                with self._lock:
                    self._busy -= 1

        return call

    def drain(self, timeout: float) -> int:
        """After shutdown: wait for requests being handled; how many are left."""
        deadline = time.monotonic() + timeout
        while True:
            with self._lock:
                busy = self._busy
            if not busy or time.monotonic() >= deadline:
                return busy
            time.sleep(0.05)

    def close_connections(self, timeout: float,
                          unblock: Callable[[], None] | None = None) -> int:
        """After shutdown and drain: end every open connection (idle keep-alives, event
        streams) and wait for their threads; how many were open. ``unblock`` wakes
        handlers waiting inside the engine, once their sockets are shut."""
        with self._lock:
            conns = list(self._conns.items())
        for _, sock in conns:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass  # closed by its thread meanwhile
        if unblock is not None:
            unblock()
        deadline = time.monotonic() + timeout
        for thread, _ in conns:
            thread.join(max(0.0, deadline - time.monotonic()))
        return len(conns)

    def active_connections(self) -> int:
        return self.counts.active()

    def shutdown(self) -> None:
        self._stop.set()
        with contextlib.suppress(OSError):
            self._wake_w.send(b"x")


def _subject(cert: dict[str, Any]) -> str:
    for rdn in cert.get("subject", ()):
        for key, value in rdn:
            if key == "commonName":
                return str(value)
    return "?"
