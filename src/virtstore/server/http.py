"""HTTP/1.1 for virtstored: one thread per connection, blocking sockets, httptools' parser.

Why this stack. The engine is synchronous (SQLite, files, outside tools), so the thread
that owns a connection calls it directly: there is no hand-off between an event loop and
a thread pool on every request, and a slow call (a pool build, a job's wait) holds only
its own connection. Parsing is httptools (llhttp, the parser of Node.js, kept by the
uvloop authors); nothing here parses HTTP by hand. Measured on the daemon's typical
request (a volume lookup over the unix socket, one keep-alive client on stdlib
``http.client``, same handler in each case):

    thread per connection + httptools          11,300 requests/s
    asyncio + httptools, engine call inline     9,600 (a slow call stalls every client)
    asyncio + httptools + thread pool           6,600
    aiohttp + thread pool                       4,350

Limits: a request line (URL) of 8 KiB, 64 KiB of headers, 100 headers; body limits are
the handlers' (``Request.body(limit)``); idle keep-alive connections are closed after
``IDLE_TIMEOUT``, a request that stalls mid-way after ``IO_TIMEOUT``, and a request's head
must be whole within ``Limits.head_timeout``. Connections are counted per listener and per
peer (``Limits``, applied by the listeners in server/listen.py), with a share kept for
the read-write socket.

Only HTTP/1.0 and 1.1, only ``Transfer-Encoding: chunked`` (anything else could be framed
differently by a proxy in front), and no charset but UTF-8 for a body.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import ssl
import struct
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Any
from urllib.parse import unquote_to_bytes

import httptools

from virtstore.errors import InvalidArgument

log = logging.getLogger("virtstored")

MAX_URL = 8 * 1024
MAX_HEADER_BYTES = 64 * 1024
JSON_TYPE = "application/json"
MAX_HEADERS = 100
IDLE_TIMEOUT = 120.0
IO_TIMEOUT = 60.0
TLS_HANDSHAKE_TIMEOUT = 10.0
RECV_SIZE = 256 * 1024  # reads of a request body
# After an answer given before its request body was read, how much of that body and
# for how long to take in before closing (see _discard_rest).
LINGER_BYTES = 4 * 1024 * 1024
LINGER_TIMEOUT = 1.0
# Reads of a request's head: below malloc's mmap threshold (128 KiB), so a read's buffer
# comes from the heap instead of an mmap, mremap and munmap for every request.
HEAD_RECV_SIZE = 64 * 1024

_REASONS = {s.value: s.phrase for s in HTTPStatus}


@dataclass(frozen=True)
class Limits:
    """How many connections the server holds, and how long a request's head may take."""

    total: int = 256  # every listener together; the read-write socket's only limit
    rw_reserve: int = 32  # of ``total``, kept for the read-write socket
    ro: int = 128  # the read-only socket
    tcp: int = 128
    per_peer: int = 32  # per uid on the read-only socket, per remote address over TCP
    head_timeout: float = 20.0  # from the connection's start or a head's first byte


class HTTPError(Exception):
    """A failure answered with ``status`` and a JSON error body."""

    def __init__(self, status: int, code: str, message: str, *, close: bool = False,
                 headers: tuple[tuple[str, str], ...] = ()) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.close = close
        self.headers = headers


class ClientGone(Exception):
    """The peer closed the connection or stalled past the timeout."""


@dataclass
class Peer:
    """Who is on the other end of a connection."""

    listener: str  # unix-rw, unix-ro, tcp
    uid: int | None = None
    gid: int | None = None
    pid: int | None = None
    addr: str | None = None
    cert_subject: str | None = None


class _Message:
    __slots__ = ("body", "body_size", "complete", "header_bytes", "header_count", "headers",
                 "headers_done", "keep_alive", "method", "too_long", "url", "version")

    def __init__(self) -> None:
        self.url = b""
        self.headers: dict[str, str] = {}
        self.header_count = 0
        self.header_bytes = 0
        self.method = ""
        self.version = ""
        self.keep_alive = True
        self.headers_done = False
        self.complete = False
        self.body: deque[bytes] = deque()
        self.body_size = 0
        self.too_long = False


class _Protocol:
    """httptools' callbacks: parsed messages queue up here (pipelining included)."""

    def __init__(self) -> None:
        self.messages: deque[_Message] = deque()
        self.cur = _Message()
        self.parser: Any = None

    def on_message_begin(self) -> None:
        self.cur = _Message()
        self.messages.append(self.cur)

    def on_url(self, url: bytes) -> None:
        cur = self.cur
        if len(cur.url) + len(url) > MAX_URL:
            cur.too_long = True
        else:
            cur.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        cur = self.cur
        cur.header_count += 1
        if cur.header_count > MAX_HEADERS:
            return
        cur.header_bytes += len(name) + len(value) + 4
        key = name.decode("latin-1").lower()
        text = value.decode("latin-1")
        old = cur.headers.get(key)
        cur.headers[key] = text if old is None else f"{old}, {text}"

    def on_headers_complete(self) -> None:
        cur = self.cur
        cur.method = self.parser.get_method().decode("ascii")
        cur.version = self.parser.get_http_version()
        cur.keep_alive = bool(self.parser.should_keep_alive())
        cur.headers_done = True

    def on_body(self, data: bytes) -> None:
        cur = self.cur
        cur.body.append(data)
        cur.body_size += len(data)

    def on_message_complete(self) -> None:
        self.cur.complete = True


class Request:
    __slots__ = ("_conn", "_msg", "headers", "method", "path", "peer", "query", "raw_path",
                 "segments", "who")

    def __init__(self, conn: HTTPConnection, msg: _Message) -> None:
        self._conn = conn
        self._msg = msg
        self.method = msg.method
        self.headers = msg.headers
        self.peer = conn.peer
        self.who = ""
        url = msg.url.decode("latin-1")
        path, _, qs = url.partition("?")
        self.raw_path = path
        if not path.startswith("/"):
            raise HTTPError(400, "invalid-argument", "request target must be an absolute path")
        try:
            self.segments = [s if "%" not in s and s.isascii()
                             else unquote_to_bytes(s.encode("latin-1")).decode("utf-8")
                             for s in path[1:].split("/")]
        except UnicodeDecodeError:
            raise HTTPError(400, "invalid-argument", "path is not valid UTF-8") from None
        self.query: dict[str, str] = {}
        if qs:
            for part in qs.split("&"):
                if not part:
                    continue
                k, _, v = part.partition("=")
                try:
                    key = unquote_to_bytes(k.replace("+", " ")).decode("utf-8")
                    val = unquote_to_bytes(v.replace("+", " ")).decode("utf-8")
                except UnicodeDecodeError:
                    raise HTTPError(400, "invalid-argument",
                                    "query is not valid UTF-8") from None
                if key in self.query:
                    raise HTTPError(400, "invalid-argument",
                                    f"query parameter '{key}' given twice")
                self.query[key] = val

    @property
    def content_type(self) -> str:
        return self.headers.get("content-type", "").split(";", 1)[0].strip().lower()

    def _check_charset(self) -> None:
        """Bodies are UTF-8: text in another charset would be read as something else."""
        for param in self.headers.get("content-type", "").split(";")[1:]:
            key, _, value = param.partition("=")
            charset = value.strip().strip('"').lower()
            if key.strip().lower() == "charset" and charset not in ("utf-8", "utf8"):
                raise HTTPError(415, "invalid-argument",
                                f"unsupported charset '{charset}': bodies are UTF-8")

    def body(self, limit: int) -> bytes:
        """The whole body; 413 past ``limit`` bytes (the connection is then closed)."""
        self._check_charset()
        msg = self._msg
        length = self.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > limit:
            raise HTTPError(413, "invalid-argument",
                            f"request body larger than {limit} bytes", close=True)
        parts: list[bytes] = []
        size = 0
        while True:
            chunk = self._conn.read_body(msg)
            if not chunk:
                break
            size += len(chunk)
            if size > limit:
                raise HTTPError(413, "invalid-argument",
                                f"request body larger than {limit} bytes", close=True)
            parts.append(chunk)
        return b"".join(parts)

    def stream(self) -> BodyStream:
        self._check_charset()
        return BodyStream(self._conn, self._msg)


class BodyIncomplete(InvalidArgument):
    """The client left (or stalled) in the middle of a body the engine was reading."""


class BodyStream:
    """The request body as a file object, for data the engine reads at its own pace.

    A client gone mid-body fails the engine's work as an invalid argument (its own, in one
    line) rather than as an unexpected exception with a traceback."""

    def __init__(self, conn: HTTPConnection, msg: _Message) -> None:
        self._conn = conn
        self._msg = msg
        self._buf = b""
        self.bytes_read = 0

    def readable(self) -> bool:
        return True

    def read(self, n: int = -1) -> bytes:
        try:
            return self._read(n)
        except ClientGone as exc:
            raise BodyIncomplete(f"request body incomplete: {exc}") from None

    def _read(self, n: int) -> bytes:
        if n is None or n < 0:
            parts = [self._buf]
            self._buf = b""
            while chunk := self._conn.read_body(self._msg):
                parts.append(chunk)
            data = b"".join(parts)
        else:
            if not self._buf:
                self._buf = self._conn.read_body(self._msg)
            data, self._buf = self._buf[:n], self._buf[n:]
        self.bytes_read += len(data)
        return data

    def readinto(self, b: Any) -> int:
        data = self.read(len(b))
        b[:len(data)] = data
        return len(data)

    def close(self) -> None:
        pass


StreamFn = Callable[["StreamWriter"], "Response | None"]


@dataclass
class Response:
    status: int = 200
    body: bytes = b""
    content_type: str | None = JSON_TYPE
    headers: list[tuple[str, str]] = field(default_factory=list)
    stream: StreamFn | None = None
    close: bool = False


_date_cache: list[Any] = [0, b""]


def _date() -> bytes:
    now = int(time.time())
    if _date_cache[0] != now:
        _date_cache[0] = now
        _date_cache[1] = time.strftime("%a, %d %b %Y %H:%M:%S GMT",
                                       time.gmtime(now)).encode("ascii")
    date: bytes = _date_cache[1]
    return date


class StreamWriter:
    """A response whose length is not known up front: chunked transfer encoding."""

    def __init__(self, conn: HTTPConnection, head_only: bool) -> None:
        self._conn = conn
        self._head_only = head_only
        self.started = False
        self.finished = False
        self.bytes_sent = 0

    def start(self, status: int, content_type: str,
              headers: list[tuple[str, str]] | None = None) -> None:
        extra = list(headers or [])
        extra.append(("Transfer-Encoding", "chunked"))
        self._conn.send_head(status, content_type, None, extra, close=False)
        self.started = True

    def write(self, data: bytes | bytearray | memoryview) -> int:
        n = len(data)
        if n and not self._head_only:
            self._conn.send_raw(b"%x\r\n" % n + bytes(data) + b"\r\n")
        self.bytes_sent += n
        return n

    def flush(self) -> None:
        pass

    def finish(self) -> None:
        if not self._head_only:
            self._conn.send_raw(b"0\r\n\r\n")
        self.finished = True


def _render_head(status: int, content_type: str | None, length: int | None,
                 headers: list[tuple[str, str]], *, close: bool, body: bytes = b"") -> bytes:
    if (status == 200 and content_type == JSON_TYPE and length is not None
            and not (headers or close)):
        # Most answers (a lookup's record): one format, no list to join.
        return b"HTTP/1.1 200 OK\r\nDate: %s\r\nContent-Type: application/json\r\n" \
            b"Content-Length: %d\r\n\r\n%s" % (_date(), length, body)
    parts = [b"HTTP/1.1 %d %s\r\nDate: %s\r\n" % (
        status, _REASONS.get(status, "Unknown").encode("ascii"), _date())]
    if content_type is not None:
        parts.append(b"Content-Type: %s\r\n" % content_type.encode("latin-1"))
    if length is not None:
        parts.append(b"Content-Length: %d\r\n" % length)
    for k, v in headers:
        parts.append(f"{k}: {v}\r\n".encode("latin-1"))
    if close:
        parts.append(b"Connection: close\r\n")
    parts.append(b"\r\n")
    parts.append(body)
    return b"".join(parts)


def _render(resp: Response, head_only: bool, close: bool) -> bytes:
    body = resp.body
    no_body = resp.status in (204, 304) or 100 <= resp.status < 200
    return _render_head(resp.status, None if no_body else resp.content_type,
                        None if no_body else len(body), resp.headers, close=close,
                        body=b"" if (head_only or no_body) else body)


class HTTPConnection:
    """One client connection: reads requests, hands them to the app, writes responses."""

    def __init__(self, sock: socket.socket, peer: Peer,
                 app: Callable[[Request], Response], *,
                 head_timeout: float = Limits.head_timeout) -> None:
        self.sock = sock
        self.peer = peer
        self.app = app
        self.proto = _Protocol()
        self.parser = httptools.HttpRequestParser(self.proto)
        self.proto.parser = self.parser
        self._continue_sent: _Message | None = None
        self._keep = True
        self._linger = False
        self.head_timeout = head_timeout
        # The first request's head is due from the connection's start, so a peer cannot
        # hold a connection open by sending nothing.
        self._head_deadline: float | None = time.monotonic() + head_timeout
        # Plain sockets block, with timeouts kept by the kernel: a recv or a send is then
        # one system call, where Python's own timeouts poll before each. TLS sockets keep
        # Python's timeouts, which the ssl module expects.
        self._kernel_timeouts = not isinstance(sock, ssl.SSLSocket)
        self._timeout: float | None = None
        if self._kernel_timeouts:
            sock.settimeout(None)
        self._set_timeout(IO_TIMEOUT)

    def _set_timeout(self, timeout: float) -> None:
        if timeout == self._timeout:
            return
        self._timeout = timeout
        if self._kernel_timeouts:
            # A zero timeval means no timeout at all: never go below a millisecond.
            timeout = max(timeout, 0.001)
            sec = int(timeout)
            tv = struct.pack("ll", sec, int((timeout - sec) * 1e6))
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, tv)
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, tv)
        else:
            self.sock.settimeout(timeout)

    # -- reading ---------------------------------------------------------------
    def _fill(self, timeout: float, size: int = HEAD_RECV_SIZE) -> int:
        """Read and parse what the peer sent; the number of bytes, 0 at its end."""
        self._set_timeout(timeout)
        try:
            data = self.sock.recv(size)
        except (TimeoutError, ssl.SSLError, OSError) as exc:
            raise ClientGone(str(exc)) from None
        if not data:
            return 0
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            # An Upgrade request is answered as a plain one and nothing is upgraded; the
            # parser stops there, so the connection closes after the answer.
            self._keep = False
        except httptools.HttpParserError as exc:
            raise HTTPError(400, "invalid-argument", f"malformed HTTP request: {exc}",
                            close=True) from None
        return len(data)

    def _next_message(self) -> _Message | None:
        msgs = self.proto.messages
        fed = 0
        deadline, self._head_deadline = self._head_deadline, None
        while not msgs or not msgs[0].headers_done:
            if deadline is None and (msgs or fed):
                # Part of a head is here: the rest is due within the head timeout, however
                # slowly it trickles in.
                deadline = time.monotonic() + self.head_timeout
            timeout = IDLE_TIMEOUT if deadline is None else min(
                IO_TIMEOUT, deadline - time.monotonic())
            try:
                if timeout <= 0:
                    raise ClientGone("request head deadline passed")
                n = self._fill(timeout)
            except ClientGone:
                if deadline is None or time.monotonic() < deadline or not (msgs or fed):
                    raise
                raise HTTPError(408, "invalid-argument", "request head not received within "
                                f"{self.head_timeout:g} s", close=True) from None
            if not n:
                return None
            fed += n
            if msgs and not msgs[0].headers_done:
                m = msgs[0]
                if m.too_long:
                    raise HTTPError(414, "invalid-argument", "request URL too long", close=True)
                if m.header_count > MAX_HEADERS or fed > MAX_HEADER_BYTES + MAX_URL:
                    raise HTTPError(431, "invalid-argument", "request headers too large",
                                    close=True)
        m = msgs[0]
        if m.too_long:
            raise HTTPError(414, "invalid-argument", "request URL too long", close=True)
        if m.header_count > MAX_HEADERS or m.header_bytes > MAX_HEADER_BYTES:
            raise HTTPError(431, "invalid-argument", "request headers too large", close=True)
        if m.version not in ("1.0", "1.1"):
            raise HTTPError(505, "unsupported", f"HTTP/{m.version} is not supported: "
                            "HTTP/1.0 or HTTP/1.1 only", close=True)
        te = m.headers.get("transfer-encoding")
        if te is not None and te.strip().lower() != "chunked":
            # A proxy that reads the body by another coding than ours would see another
            # request in it.
            raise HTTPError(501, "unsupported", f"Transfer-Encoding '{te}' is not supported: "
                            "only 'chunked'", close=True)
        return m

    def read_body(self, msg: _Message) -> bytes:
        """The next piece of ``msg``'s body; b"" at its end."""
        while not msg.body and not msg.complete:
            if self._continue_sent is not msg:
                self._continue_sent = msg
                if msg.headers.get("expect", "").lower() == "100-continue":
                    self.send_raw(b"HTTP/1.1 100 Continue\r\n\r\n")
            if not self._fill(IO_TIMEOUT, RECV_SIZE):
                raise ClientGone("connection closed")
        if msg.body:
            return msg.body.popleft()
        return b""

    # -- writing ---------------------------------------------------------------
    def send_raw(self, data: bytes) -> None:
        try:
            self.sock.sendall(data)
        except (TimeoutError, ssl.SSLError, OSError) as exc:
            raise ClientGone(str(exc)) from None

    def send_head(self, status: int, content_type: str | None, length: int | None,
                  headers: list[tuple[str, str]], *, close: bool, body: bytes = b"") -> None:
        self.send_raw(_render_head(status, content_type, length, headers, close=close,
                                   body=body))

    def _send(self, resp: Response, head_only: bool, close: bool) -> None:
        self.send_raw(_render(resp, head_only, close))

    # -- the loop --------------------------------------------------------------
    def serve(self) -> None:
        try:
            while self._keep:
                if not self._serve_one():
                    break
        except ClientGone as exc:
            log.debug("connection from %s ended: %s", self.peer.addr or "unix", exc)
        finally:
            if self._linger:
                self._discard_rest()
            with contextlib.suppress(OSError):
                self.sock.close()

    def _discard_rest(self) -> None:
        """Answered before the body was read: read a little of what the client still
        sends before closing, as closing a socket with unread input resets it (TCP) and
        the client could lose the answer it is about to read."""
        try:
            self.sock.shutdown(socket.SHUT_WR)
            self._set_timeout(LINGER_TIMEOUT)
            left = LINGER_BYTES
            while left > 0:
                data = self.sock.recv(min(left, RECV_SIZE))
                if not data:
                    break
                left -= len(data)
        except (TimeoutError, ssl.SSLError, OSError):
            pass

    def _serve_one(self) -> bool:
        try:
            msg = self._next_message()
        except HTTPError as err:
            self._set_timeout(IO_TIMEOUT)
            self._send(error_response(err), False, True)
            return False
        if msg is None:
            return False
        head_only = msg.method == "HEAD"
        try:
            req = Request(self, msg)
            resp = self.app(req)
        except HTTPError as err:
            resp = error_response(err)
        close = resp.close or not msg.keep_alive or not self._keep
        if resp.stream is not None:
            writer = StreamWriter(self, head_only)
            fallback = resp.stream(writer)
            if writer.started:
                if not writer.finished:
                    # Failed half-way: close without the last chunk, so the client sees
                    # a truncated body rather than a short one that looks whole.
                    return False
            else:
                self._send(fallback or Response(204), head_only, close or not msg.complete)
        else:
            if not msg.complete:
                close = True  # an unread body: no way to find the next request
                self._linger = True
            self._send(resp, head_only, close)
        if close or not msg.complete:
            return False
        self.proto.messages.popleft()
        return True


def error_response(err: HTTPError) -> Response:
    import json

    body = json.dumps({"error": {"code": err.code, "message": err.message}}).encode()
    return Response(err.status, body, headers=list(err.headers), close=err.close)


# -- listening ---------------------------------------------------------------------
