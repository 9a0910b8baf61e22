"""HTTP to virtstored: kept-alive connections, one per thread.

A lookup is one small request, so the client's cost per request decides remote lookup
speed. Requests whose bodies are bytes (every call but the data streams) go through
``_Wire``: the request written in one ``sendall``, the answer read into one buffer and
its head split by hand, on a blocking socket whose timeouts are the kernel's
(``SO_RCVTIMEO``), so a recv is one system call rather than a poll and a recv. Per
lookup over the unix socket that is 12 us of client CPU against 36 us through
``http.client``, whose header parsing goes through the ``email`` package. Uploads and
downloads, whose bodies are streams, keep ``http.client`` (on a connection of their
own). ``http.client`` itself measured about twice as fast per request as httpx or
requests; neither path needs a dependency. ``http.client`` and ``ssl`` are imported
only by the streams and by https URIs: together they cost a command on the unix socket
over 20 ms of start-up.
"""

from __future__ import annotations

# _socket, not socket: the socket module's enums cost a remote command ~3 ms, and the
# unix socket needs none of them (TCP and TLS import socket when used).
import _socket
import contextlib
import json
import os
import struct
import threading
from urllib.parse import quote, unquote, urlsplit

from virtstore.errors import AuthFailed, InternalError, InvalidArgument, error_for_code

TYPE_CHECKING = False
if TYPE_CHECKING:
    import http.client
    import ssl
    from typing import Any, BinaryIO

DEFAULT_TIMEOUT = 300.0
HTTPS_PORT = 8443
BLOCK = 1024 * 1024


def q(name: str) -> str:
    """A name as one path segment: '/' and everything else escaped."""
    return quote(name, safe="")


def _unix_connection(path: str, timeout: float) -> http.client.HTTPConnection:
    import http.client
    import socket  # http.client reads through the socket module's makefile()

    class UnixConnection(http.client.HTTPConnection):
        def connect(self) -> None:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.settimeout(self.timeout)
            try:
                sock.connect(path)
            except OSError:
                sock.close()
                raise
            self.sock = sock

    return UnixConnection("localhost", timeout=timeout, blocksize=BLOCK)


class Response:
    """A whole answer; ``headers`` by lower-case name."""

    __slots__ = ("body", "headers", "status")

    def __init__(self, status: int, headers: dict[str, str], body: bytes) -> None:
        self.status = status
        self.headers = headers
        self.body = body

    def getheader(self, name: str, default: str | None = None) -> str | None:
        return self.headers.get(name.lower(), default)

    def json(self) -> Any:
        if len(self.body) < BIG_ANSWER:
            return json.loads(self.body)
        # A listing: orjson decodes it 2-3 times faster. Not for small answers, since its
        # import (it loads dataclasses, inspect, uuid and datetime) would cost a command
        # answered in one record more than its decoding saves.
        import orjson

        return orjson.loads(self.body)


MAX_HEAD = 256 * 1024
BIG_ANSWER = 64 * 1024
# Below malloc's mmap threshold (128 KiB): a read's buffer comes from the heap instead
# of an mmap, mremap and munmap for every answer.
RECV = 64 * 1024


class _Retry(Exception):
    """A kept-alive connection the server had closed: nothing of the answer came."""


class _Closed(ConnectionError):
    """The server closed the connection before its answer was whole."""


class _BadAnswer(ValueError):
    """An answer that is not HTTP/1.x."""


class _Wire:
    """One kept-alive HTTP/1.1 connection for requests with a bytes body (or none).

    Answers carry a Content-Length, a chunked body, or end at the connection's end;
    leftover bytes (none from virtstored, which answers one request at a time) stay
    in the buffer for the next answer.
    """

    __slots__ = ("buf", "host", "sock", "used")

    def __init__(self, sock: _socket.socket, host: str) -> None:
        self.sock = sock
        self.host = host
        self.buf = b""
        self.used = False

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()

    def _more(self) -> bytes:
        data = self.sock.recv(RECV)
        if not data:
            raise _Closed("virtstored closed the connection")
        return data

    def exchange(self, method: str, path: str, body: bytes | None,
                 headers: dict[str, str]) -> tuple[int, str, dict[str, str], bytes, bool]:
        """Send one request, read its whole answer: status, reason, headers, body and
        whether the server closes the connection after it."""
        lines = [f"{method} {path} HTTP/1.1\r\nHost: {self.host}\r\n"]
        for k, v in headers.items():
            lines.append(f"{k}: {v}\r\n")
        if body is not None or method in ("POST", "PUT", "PATCH"):
            lines.append(f"Content-Length: {len(body) if body is not None else 0}\r\n")
        lines.append("\r\n")
        head = "".join(lines).encode("latin-1")
        reused = self.used
        self.used = True
        try:
            self.sock.sendall(head + body if body else head)
            buf = self.buf or self._more()
        except (ConnectionResetError, BrokenPipeError, _Closed):
            if reused:
                raise _Retry() from None
            raise
        while True:
            end = buf.find(b"\r\n\r\n")
            while end < 0:
                if len(buf) > MAX_HEAD:
                    raise _BadAnswer("the answer's head is too long")
                buf += self._more()
                end = buf.find(b"\r\n\r\n")
            text = buf[:end].decode("latin-1")
            buf = buf[end + 4:]
            status_line, _, rest = text.partition("\r\n")
            version, _, tail = status_line.partition(" ")
            code, _, reason = tail.partition(" ")
            if not version.startswith("HTTP/1.") or not code.isdigit():
                raise _BadAnswer(f"not an HTTP answer: {status_line[:80]!r}")
            status = int(code)
            if not 100 <= status < 200:
                break
            # An interim answer (100 Continue): the real one follows.
        hdrs: dict[str, str] = {}
        for line in rest.split("\r\n") if rest else ():
            k, _, v = line.partition(":")
            key = k.strip().lower()
            old = hdrs.get(key)
            hdrs[key] = v.strip() if old is None else f"{old}, {v.strip()}"
        close = (hdrs.get("connection", "").lower() == "close" or version == "HTTP/1.0")
        if method == "HEAD" or status in (204, 304):
            data = b""
        elif "chunked" in hdrs.get("transfer-encoding", "").lower():
            data, buf = self._chunked(buf)
        elif "content-length" in hdrs:
            length = int(hdrs["content-length"])
            while len(buf) < length:
                buf += self._more()
            data, buf = buf[:length], buf[length:]
        else:
            parts = [buf]
            while chunk := self.sock.recv(RECV):
                parts.append(chunk)
            data, buf, close = b"".join(parts), b"", True
        self.buf = buf
        return status, reason, hdrs, data, close

    def _chunked(self, buf: bytes) -> tuple[bytes, bytes]:
        parts: list[bytes] = []
        while True:
            end = buf.find(b"\r\n")
            while end < 0:
                buf += self._more()
                end = buf.find(b"\r\n")
            size = int(buf[:end].split(b";", 1)[0], 16)
            buf = buf[end + 2:]
            if size == 0:
                while (end := buf.find(b"\r\n")) != 0:  # trailers, then the empty line
                    if end < 0:
                        buf += self._more()
                    else:
                        buf = buf[end + 2:]
                return b"".join(parts), buf[2:]
            while len(buf) < size + 2:
                buf += self._more()
            parts.append(buf[:size])
            buf = buf[size + 2:]


def _kernel_timeouts(sock: _socket.socket, timeout: float) -> None:
    """Blocking socket, with send and receive timeouts kept by the kernel."""
    sock.settimeout(None)
    sec = int(timeout)
    tv = struct.pack("ll", sec, int((timeout - sec) * 1e6))
    sock.setsockopt(_socket.SOL_SOCKET, _socket.SO_RCVTIMEO, tv)
    sock.setsockopt(_socket.SOL_SOCKET, _socket.SO_SNDTIMEO, tv)


def raise_for(status: int, body: bytes, reason: str = "") -> None:
    """The VirtstoreError a server's error answer stands for."""
    try:
        err = json.loads(body)["error"]
        code, message = str(err["code"]), str(err["message"])
    except (ValueError, KeyError, TypeError):
        raise InternalError(f"server answered HTTP {status} {reason}".strip()) from None
    raise error_for_code(code)(message)


class Transport:
    def __init__(self, uri: str, *, token: str | None = None, ca: str | None = None,
                 cert: str | None = None, key: str | None = None,
                 timeout: float = DEFAULT_TIMEOUT) -> None:
        self.uri = uri
        self.timeout = timeout
        parts = urlsplit(uri)
        self._unix_path: str | None = None
        self._ssl: ssl.SSLContext | None = None
        if parts.scheme == "unix":
            path = unquote(parts.path)
            if not path:
                from virtstore.types import default_root

                path = os.path.join(default_root(), "run", "virtstored.sock")
            self._unix_path = path
            self.where = f"unix://{path}"
        elif parts.scheme == "https":
            if not parts.hostname:
                raise InvalidArgument(f"no host in connection URI '{uri}'")
            self._host_name = parts.hostname
            self._port = parts.port or HTTPS_PORT
            import ssl

            ctx = ssl.create_default_context(cafile=ca)
            ctx.minimum_version = ssl.TLSVersion.TLSv1_2
            if cert:
                ctx.load_cert_chain(cert, key)
            self._ssl = ctx
            self.where = f"https://{parts.netloc}"
        else:
            raise InvalidArgument(f"unsupported connection URI '{uri}': use unix:///PATH "
                                  "or https://HOST:PORT")
        self._headers: dict[str, str] = {}
        if token:
            self._headers["Authorization"] = f"Bearer {token}"
        self._local = threading.local()
        self._all: list[http.client.HTTPConnection | _Wire] = []
        self._lock = threading.Lock()
        self._host = "localhost" if self._unix_path is not None else parts.netloc

    # -- connections -----------------------------------------------------------
    def _new(self) -> http.client.HTTPConnection:
        conn: http.client.HTTPConnection
        if self._unix_path is not None:
            conn = _unix_connection(self._unix_path, self.timeout)
        else:
            import http.client

            conn = http.client.HTTPSConnection(self._host_name, self._port,
                                               timeout=self.timeout,
                                               context=self._ssl, blocksize=BLOCK)
        with self._lock:
            self._all.append(conn)
        return conn

    def _new_wire(self) -> _Wire:
        sock: _socket.socket
        if self._unix_path is not None:
            sock = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
            try:
                _kernel_timeouts(sock, self.timeout)
                sock.connect(self._unix_path)
            except OSError:
                sock.close()
                raise
        else:
            assert self._ssl is not None
            import socket

            raw = socket.create_connection((self._host_name, self._port), self.timeout)
            try:
                raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                sock = self._ssl.wrap_socket(raw, server_hostname=self._host_name)
            except OSError:  # ssl.SSLError is one
                raw.close()
                raise
        wire = _Wire(sock, self._host)
        with self._lock:
            self._all.append(wire)
        return wire

    def _wire(self) -> _Wire:
        wire: _Wire | None = getattr(self._local, "wire", None)
        if wire is None:
            try:
                wire = self._new_wire()
            except OSError as exc:  # ssl.SSLError is one
                raise self._connect_error(exc) from None
            self._local.wire = wire
        return wire

    def _drop_wire(self) -> None:
        wire = getattr(self._local, "wire", None)
        if wire is not None:
            self._local.wire = None
            wire.close()
            with self._lock:
                if wire in self._all:
                    self._all.remove(wire)

    def _conn(self) -> tuple[http.client.HTTPConnection, bool]:
        conn: http.client.HTTPConnection | None = getattr(self._local, "conn", None)
        if conn is None or conn.sock is None:
            if conn is None:
                conn = self._new()
                self._local.conn = conn
            return conn, False
        return conn, True

    def _drop(self) -> None:
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()

    def close(self) -> None:
        with self._lock:
            conns, self._all = self._all, []
        for conn in conns:
            conn.close()
        self._local = threading.local()

    def _connect_error(self, exc: Exception) -> Exception:
        if self._ssl is None:  # no TLS: ssl is not even loaded
            why = (exc.strerror if isinstance(exc, OSError) else None) or exc
            return InternalError(f"cannot connect to virtstored at {self.where}: {why}")
        import ssl

        if isinstance(exc, ssl.SSLCertVerificationError):
            return AuthFailed(f"cannot verify the certificate of {self.where}: "
                              f"{exc.verify_message or exc}")
        if isinstance(exc, ssl.SSLError):
            return AuthFailed(f"TLS with {self.where} failed: {exc.reason or exc}")
        why = (exc.strerror if isinstance(exc, OSError) else None) or exc
        return InternalError(f"cannot connect to virtstored at {self.where}: {why}")

    # -- requests --------------------------------------------------------------
    def open(self, method: str, path: str, body: bytes | BinaryIO | None = None,
             headers: dict[str, str] | None = None) -> http.client.HTTPResponse:
        """Send a request; the response with its body unread."""
        import http.client

        hdrs = self._headers if headers is None else {**self._headers, **headers}
        for attempt in (0, 1):
            conn, reused = self._conn()
            try:
                try:
                    conn.request(method, path, body, hdrs)
                except (ConnectionResetError, BrokenPipeError) as exc:
                    # The server may have answered (an error, say) before reading the
                    # whole body and closed its side: that answer is what the caller needs.
                    if body is None or isinstance(body, bytes):
                        raise
                    try:
                        return conn.getresponse()
                    except (OSError, http.client.HTTPException):
                        raise exc from None
                return conn.getresponse()
            except (ConnectionResetError, BrokenPipeError, http.client.RemoteDisconnected,
                    http.client.BadStatusLine) as exc:
                conn.close()
                # A kept-alive connection the server closed meanwhile: once more on a
                # fresh one, if the body can be sent again.
                if attempt or not reused or not (body is None or isinstance(body, bytes)):
                    raise self._connect_error(exc) from None
            except OSError as exc:
                conn.close()
                raise self._connect_error(exc) from None
        raise AssertionError("unreachable")

    def call(self, method: str, path: str, body: bytes | BinaryIO | None = None,
             headers: dict[str, str] | None = None) -> Response:
        if body is None or isinstance(body, bytes):
            return self._call_wire(method, path, body, headers)
        resp = self.open(method, path, body, headers)
        from http.client import HTTPException  # loaded by open()

        try:
            data = resp.read()
        except (OSError, HTTPException) as exc:
            self._drop()
            raise InternalError(f"reading the answer of {self.where} failed: {exc}") from None
        if resp.will_close:
            self._drop()
        if resp.status >= 400:
            raise_for(resp.status, data, resp.reason)
        return Response(resp.status, {k.lower(): v for k, v in resp.getheaders()}, data)

    def _call_wire(self, method: str, path: str, body: bytes | None,
                   headers: dict[str, str] | None) -> Response:
        hdrs = self._headers if headers is None else {**self._headers, **headers}
        for attempt in (0, 1):
            wire = self._wire()
            try:
                status, reason, got, data, close = wire.exchange(method, path, body, hdrs)
                break
            except _Retry:
                # A kept-alive connection the server closed meanwhile: once more on a
                # fresh one (the request never reached a handler).
                self._drop_wire()
                if attempt:
                    raise self._connect_error(ConnectionResetError(
                        "connection reset")) from None
            except BlockingIOError:  # SO_RCVTIMEO/SO_SNDTIMEO expired
                self._drop_wire()
                raise InternalError(f"no answer from {self.where} in {self.timeout:.0f} s"
                                    ) from None
            except (OSError, ValueError) as exc:
                self._drop_wire()
                if isinstance(exc, OSError):
                    raise self._connect_error(exc) from None
                raise InternalError(f"reading the answer of {self.where} failed: "
                                    f"{exc}") from None
        else:
            raise AssertionError("unreachable")
        if close:
            self._drop_wire()
        if status >= 400:
            raise_for(status, data, reason)
        return Response(status, got, data)

    def get_json(self, path: str) -> Any:
        return self.call("GET", path).json()

    def get_text(self, path: str) -> str:
        return self.call("GET", path).body.decode("utf-8")

    def send_json(self, method: str, path: str, value: Any = None) -> Response:
        if value is None:
            return self.call(method, path)
        return self.call(method, path, json.dumps(value).encode(),
                         {"Content-Type": "application/json"})

    def send_xml(self, method: str, path: str, xml: str) -> Response:
        return self.call(method, path, xml.encode("utf-8"),
                         {"Content-Type": "application/xml"})
