"""HTTP to virtstored: stdlib ``http.client`` with keep-alive, one connection per thread.

Why this stack: a lookup is one small request, so the client's cost per request decides
remote lookup speed. ``http.client`` on a kept-alive unix socket measured about twice
as fast per request as httpx or requests (which add pools, hooks and header models on
top of it or of their own parser), and it needs no dependency.
"""

from __future__ import annotations

import http.client
import json
import os
import socket
import ssl
import threading
from typing import Any, BinaryIO
from urllib.parse import quote, unquote, urlsplit

from virtstore.errors import AuthFailed, InternalError, InvalidArgument, error_for_code

DEFAULT_TIMEOUT = 300.0
HTTPS_PORT = 8443
BLOCK = 1024 * 1024


def q(name: str) -> str:
    """A name as one path segment: '/' and everything else escaped."""
    return quote(name, safe="")


class _UnixConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout, blocksize=BLOCK)
        self._path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(self._path)
        except OSError:
            sock.close()
            raise
        self.sock = sock


class Response:
    __slots__ = ("body", "headers", "status")

    def __init__(self, status: int, headers: http.client.HTTPMessage, body: bytes) -> None:
        self.status = status
        self.headers = headers
        self.body = body

    def json(self) -> Any:
        return json.loads(self.body)


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
                from virtstore.api import default_root

                path = os.path.join(default_root(), "run", "virtstored.sock")
            self._unix_path = path
            self.where = f"unix://{path}"
        elif parts.scheme == "https":
            if not parts.hostname:
                raise InvalidArgument(f"no host in connection URI '{uri}'")
            self._host = parts.hostname
            self._port = parts.port or HTTPS_PORT
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
        self._all: list[http.client.HTTPConnection] = []
        self._lock = threading.Lock()

    # -- connections -----------------------------------------------------------
    def _new(self) -> http.client.HTTPConnection:
        conn: http.client.HTTPConnection
        if self._unix_path is not None:
            conn = _UnixConnection(self._unix_path, self.timeout)
        else:
            conn = http.client.HTTPSConnection(self._host, self._port, timeout=self.timeout,
                                               context=self._ssl, blocksize=BLOCK)
        with self._lock:
            self._all.append(conn)
        return conn

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

    def _connect_error(self, exc: Exception) -> Exception:
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
        hdrs = self._headers if headers is None else {**self._headers, **headers}
        for attempt in (0, 1):
            conn, reused = self._conn()
            try:
                conn.request(method, path, body, hdrs)
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
        resp = self.open(method, path, body, headers)
        try:
            data = resp.read()
        except (OSError, http.client.HTTPException) as exc:
            self._drop()
            raise InternalError(f"reading the answer of {self.where} failed: {exc}") from None
        if resp.will_close:
            self._drop()
        if resp.status >= 400:
            raise_for(resp.status, data, resp.reason)
        return Response(resp.status, resp.headers, data)

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
