"""The client's lean HTTP/1.1 connection against answers virtstored does not send today
but HTTP allows: chunked bodies, interim answers, bodies ending with the connection,
a kept-alive connection closed by the server between requests."""

from __future__ import annotations

import socket
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from virtstore.client.transport import Transport
from virtstore.errors import InternalError, NoSuchPool


class FakeServer:
    """A unix socket server answering each request with the next scripted bytes;
    ``None`` closes the connection instead of answering."""

    def __init__(self, path: Path, answers: list[bytes | None]) -> None:
        self.path = path
        self.answers = answers
        self.requests: list[bytes] = []
        self.connections = 0
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.bind(str(path))
        self.sock.listen(4)
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _read_request(self, conn: socket.socket) -> bytes | None:
        buf = b""
        while b"\r\n\r\n" not in buf:
            chunk = conn.recv(65536)
            if not chunk:
                return None
            buf += chunk
        head, _, rest = buf.partition(b"\r\n\r\n")
        length = 0
        for line in head.split(b"\r\n")[1:]:
            k, _, v = line.partition(b":")
            if k.strip().lower() == b"content-length":
                length = int(v)
        while len(rest) < length:
            rest += conn.recv(65536)
        return head + b"\r\n\r\n" + rest

    def _serve(self) -> None:
        while self.answers:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.connections += 1
            with conn:
                while self.answers:
                    req = self._read_request(conn)
                    if req is None:
                        break
                    self.requests.append(req)
                    answer = self.answers.pop(0)
                    if answer is None:
                        break
                    conn.sendall(answer)
                    framed = b"Content-Length" in answer or b"chunked" in answer
                    if b"Connection: close" in answer or not framed:
                        break

    def close(self) -> None:
        self.sock.close()


Serve = Callable[[list[bytes | None]], Transport]


@pytest.fixture(name="serve")
def serve_fixture(tmp_path: Path) -> Iterator[Serve]:
    servers: list[FakeServer] = []
    transports: list[Transport] = []

    def start(answers: list[bytes | None]) -> Transport:
        path = Path(f"/tmp/vs-wire-{len(servers)}-{id(tmp_path)}.sock")
        path.unlink(missing_ok=True)
        servers.append(FakeServer(path, answers))
        t = Transport(f"unix://{path}", token="t0ken-0123456789abcdef", timeout=5.0)
        t.fake = servers[-1]  # type: ignore[attr-defined]
        transports.append(t)
        return t

    yield start
    for t in transports:
        t.close()
    for s in servers:
        s.close()
        s.path.unlink(missing_ok=True)


OK = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 7\r\n\r\n{\"a\":1}"


def test_request_bytes_and_headers(serve: Serve) -> None:
    t = serve([OK, OK])
    got = t.call("POST", "/v1/pools", b"<pool/>", {"Content-Type": "application/xml"})
    sent = t.fake.requests[0]  # type: ignore[attr-defined]
    assert sent.startswith(b"POST /v1/pools HTTP/1.1\r\nHost: localhost\r\n")
    assert b"Content-Length: 7\r\n" in sent and sent.endswith(b"\r\n\r\n<pool/>")
    assert got.status == 200 and got.json() == {"a": 1}
    assert got.getheader("content-type") == got.getheader("Content-Type") == "application/json"
    assert t.get_json("/v1/version") == {"a": 1}


def test_chunked_interim_and_close(serve: Serve) -> None:
    chunked = (b"HTTP/1.1 100 Continue\r\n\r\n"
               b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
               b"4;ext=1\r\n[1,2\r\n2\r\n,3\r\n1\r\n]\r\n0\r\nX-Trailer: y\r\n\r\n")
    until_eof = b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n\"to the end\""
    t = serve([chunked, OK, until_eof, OK])
    assert t.get_json("/a") == [1, 2, 3]
    assert t.get_json("/b") == {"a": 1}  # same connection, after the trailer
    assert t.get_json("/c") == "to the end"
    assert t.get_json("/d") == {"a": 1}  # a new connection after the close
    assert t.fake.connections == 2  # type: ignore[attr-defined]


def test_error_answers_and_a_dropped_keepalive(serve: Serve) -> None:
    body = b'{"error":{"code":"no-such-pool","message":"no storage pool named \'x\'"}}'
    err = b"HTTP/1.1 404 Not Found\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)
    t = serve([err, OK, None, OK])
    with pytest.raises(NoSuchPool, match="no storage pool named 'x'"):
        t.get_json("/v1/pools/x")
    assert t.get_json("/1") == {"a": 1}
    # The server closes the kept-alive connection instead of answering: the request is
    # sent once more on a fresh connection.
    assert t.get_json("/2") == {"a": 1}
    fake = t.fake  # type: ignore[attr-defined]
    assert fake.connections == 2
    assert [r.split(b" ")[1] for r in fake.requests] == [b"/v1/pools/x", b"/1", b"/2", b"/2"]
    assert all(b"Authorization: Bearer t0ken-0123456789abcdef\r\n" in r for r in fake.requests)


def test_garbage_and_silence(serve: Serve) -> None:
    t = serve([b"SPDY/3 200 OK\r\n\r\n"])
    with pytest.raises(InternalError, match="reading the answer"):
        t.get_json("/x")
    t = serve([None])
    with pytest.raises(InternalError, match="cannot connect"):
        t.get_json("/y")  # a fresh connection closed at once: no retry
