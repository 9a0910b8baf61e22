"""virtstored against requests a hostile or broken peer sends: HTTP framing, bodies that
are not what they claim, integers past a file offset, clients that leave mid-upload, and
peers that try to take every connection. A real daemon over its sockets."""

from __future__ import annotations

import json
import os
import socket
import ssl
import subprocess
import sys
import time
from pathlib import Path

import pytest

from server_fixtures import (
    RO_TOKEN,
    Certs,
    Daemon,
    certs_fixture,  # noqa: F401
    daemon_fixture,  # noqa: F401
    raw_request,
    read_response,
    request,
    start_daemon,
    write_tokens,
)

JSON = {"Content-Type": "application/json"}
DATA = bytes(range(256)) * 4096  # 1 MiB a volume holds through each test
BIG = (2**64, 2**63)


def _error(r: object) -> dict[str, str]:
    """The one-line JSON error of an answer."""
    body = r.body  # type: ignore[attr-defined]
    assert b"\n" not in body.strip(), body
    err: dict[str, str] = json.loads(body)["error"]
    assert err["code"] and err["message"]
    return err


def _no_traceback(d: Daemon) -> None:
    log = d.log()
    assert "Traceback" not in log and "internal-error" not in log, log[-3000:]


def _volume_with_data(d: Daemon) -> None:
    r = request(d.rw_socket, "POST", "/v1/pools/default/volumes",
                json.dumps({"name": "v", "capacity": len(DATA)}).encode(), JSON)
    assert r.status == 201, r
    r = request(d.rw_socket, "PUT", "/v1/pools/default/volumes/v/upload", DATA,
                {"Content-Type": "application/octet-stream"})
    assert r.status == 200, r


def _state(d: Daemon) -> tuple[list[str], list[str], bytes, list[str]]:
    """What a request must not change: the index's volumes, the pool's files, the data,
    and the jobs."""
    r = request(d.rw_socket, "GET", "/v1/pools/default/volumes")
    assert r.status == 200
    vols = [v["name"] for v in r.json()]  # type: ignore[union-attr,index]
    files = sorted(os.listdir(d.root / "images"))
    data = (d.root / "images" / "v").read_bytes() if "v" in files else b""
    r = request(d.rw_socket, "GET", "/v1/jobs")
    jobs = [j["id"] for j in r.json()]  # type: ignore[union-attr,index]
    return vols, files, data, jobs


# -- HTTP framing -------------------------------------------------------------------------


def _chunked_create(d: Daemon, name: str, te_lines: str) -> object:
    body = json.dumps({"name": name, "capacity": 4096}).encode()
    head = ("POST /v1/pools/default/volumes HTTP/1.1\r\nHost: x\r\n"
            "Content-Type: application/json\r\nConnection: close\r\n" + te_lines + "\r\n")
    return raw_request(d.rw_socket, head.encode() + b"%x\r\n%s\r\n0\r\n\r\n" % (len(body), body))


def test_only_chunked_alone_is_a_transfer_coding(daemon: Daemon) -> None:
    cases = ["Transfer-Encoding: gzip, chunked\r\n",
             "Transfer-Encoding: gzip\r\nTransfer-Encoding: chunked\r\n",
             "Transfer-Encoding: chunked, chunked\r\n",
             "Transfer-Encoding: identity, chunked\r\n",
             "Transfer-Encoding: chunked, gzip\r\n"]
    for i, te in enumerate(cases):
        r = _chunked_create(daemon, f"te{i}", te)
        assert r.status in (400, 501), (te, r)  # type: ignore[attr-defined]
        err = _error(r)
        assert err["code"] in ("unsupported", "invalid-argument"), err
    assert _state(daemon)[:2] == ([], [])
    # chunked alone is fine
    r = _chunked_create(daemon, "plain", "Transfer-Encoding: chunked\r\n")
    assert r.status == 201, r  # type: ignore[attr-defined]
    assert _state(daemon)[:2] == (["plain"], ["plain"])
    _no_traceback(daemon)


def test_only_http_1_0_and_1_1(daemon: Daemon) -> None:
    for sock in (daemon.rw_socket, daemon.ro_socket):
        for line in (b"GET /v1/pools\r\n\r\n", b"GET /v1/pools HTTP/0.9\r\n\r\n",
                     b"GET /v1/pools HTTP/2.0\r\nHost: x\r\n\r\n"):
            r = raw_request(sock, line)
            assert r.status in (400, 505), (line, r)
            assert b"default" not in r.body
            _error(r)
        r = raw_request(sock, b"GET /v1/pools HTTP/1.0\r\n\r\n")
        assert r.status == 200 and b"default" in r.body
    # a change asked in HTTP/0.9 does not happen
    body = json.dumps({"name": "old", "capacity": 4096}).encode()
    r = raw_request(daemon.rw_socket, b"POST /v1/pools/default/volumes HTTP/0.9\r\n"
                    b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
    assert r.status in (400, 505)
    assert _state(daemon)[:2] == ([], [])
    _no_traceback(daemon)


def test_bodies_are_utf8(daemon: Daemon) -> None:
    _volume_with_data(daemon)
    before = _state(daemon)
    vol = json.dumps({"name": "w", "capacity": 4096}).encode()
    pool = b"<pool type='dir'><name>p</name><target><path>/tmp/p</path></target></pool>"
    cases = [
        ("POST", "/v1/pools/default/volumes", vol, "application/json; charset=latin-1"),
        ("POST", "/v1/pools/default/volumes", vol, 'application/json; charset="ISO-8859-1"'),
        ("POST", "/v1/pools", pool, "application/xml; charset=utf-16"),
        ("PUT", "/v1/pools/default/volumes/v/upload", b"x" * 4096,
         "application/octet-stream; charset=koi8-r"),
    ]
    for method, path, body, ctype in cases:
        r = request(daemon.rw_socket, method, path, body, {"Content-Type": ctype})
        assert r.status in (400, 415), (ctype, r)
        assert "charset" in _error(r)["message"]
    assert _state(daemon) == before
    r = request(daemon.rw_socket, "POST", "/v1/pools/default/volumes", vol,
                {"Content-Type": "application/json; charset=UTF-8"})
    assert r.status == 201, r
    _no_traceback(daemon)


# -- bodies and arguments -----------------------------------------------------------------


def test_lone_surrogates_in_json(daemon: Daemon) -> None:
    _volume_with_data(daemon)
    before = _state(daemon)
    for path, body in [
        ("/v1/pools/default/volumes", rb'{"name": "\ud800", "capacity": 4096}'),
        ("/v1/pools/default/volumes", rb'{"name": "a\udfffb", "capacity": 4096}'),
        ("/v1/pools/default/volumes/v/clone", rb'{"new_name": "c\udc00"}'),
        ("/v1/pools/default/volumes/v/snapshots", rb'{"name": "\ud83d"}'),
        ("/v1/import-libvirt", rb'{"config_dir": "/etc/\ud800"}'),
    ]:
        r = request(daemon.rw_socket, "POST", path, body, JSON)
        assert r.status == 400, (path, r)
        assert "surrogate" in _error(r)["message"]
    assert _state(daemon) == before
    _no_traceback(daemon)


def test_offsets_and_lengths_past_a_file_offset(daemon: Daemon) -> None:
    _volume_with_data(daemon)
    before = _state(daemon)
    queries = [f"offset={n}" for n in BIG] + [f"length={n}" for n in BIG] + [
        f"offset={2**63 - 1}&length=2", f"offset=1&length={2**64 - 1}"]
    for q in queries:
        r = request(daemon.rw_socket, "PUT", f"/v1/pools/default/volumes/v/upload?{q}",
                    b"y" * 4096, {"Content-Type": "application/octet-stream"})
        assert r.status == 400, (q, r)
        assert "at most" in _error(r)["message"]
        r = request(daemon.rw_socket, "GET", f"/v1/pools/default/volumes/v/download?{q}")
        assert r.status == 400, (q, r)
        assert "at most" in _error(r)["message"]
    for body in ({"name": "huge", "capacity": 2**64},
                 {"name": "huge", "capacity": 4096, "allocation": 2**63}):
        r = request(daemon.rw_socket, "POST", "/v1/pools/default/volumes",
                    json.dumps(body).encode(), JSON)
        assert r.status == 400, (body, r)
        _error(r)
    assert _state(daemon) == before
    _no_traceback(daemon)


def test_upload_client_leaving_mid_body(daemon: Daemon) -> None:
    _volume_with_data(daemon)
    vols, files, data, jobs = _state(daemon)
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(10)
    s.connect(str(daemon.rw_socket))
    s.sendall(b"PUT /v1/pools/default/volumes/v/upload HTTP/1.1\r\nHost: x\r\n"
              b"Content-Type: application/octet-stream\r\n"
              b"Content-Length: %d\r\n\r\n" % len(DATA) + b"z" * 65536)
    # The upload's job exists once the daemon reads the body; leave only then.
    deadline = time.monotonic() + 30
    new: list[dict[str, object]] = []
    while not new and time.monotonic() < deadline:
        r = request(daemon.rw_socket, "GET", "/v1/jobs")
        new = [j for j in r.json() if j["id"] not in jobs]  # type: ignore[union-attr,index]
        if not new:
            time.sleep(0.05)
    assert len(new) == 1 and new[0]["kind"] == "upload", new
    s.close()
    job_id = new[0]["id"]
    for _ in range(300):
        r = request(daemon.rw_socket, "GET", f"/v1/jobs/{job_id}/wait?timeout=10")
        job = r.json()
        if job["state"] != "running":  # type: ignore[index]
            break
    assert job["state"] == "failed", job  # type: ignore[index]
    assert job["error_code"] == "invalid-argument", job  # type: ignore[index]
    assert "request body incomplete" in job["error"], job  # type: ignore[index]
    assert _state(daemon) == (vols, files, data, [*jobs, job_id])
    daemon.stop()
    log = daemon.log()
    assert "Traceback" not in log and "internal-error" not in log, log[-3000:]
    lines = [ln for ln in log.splitlines() if "op=PUT /v1/pools/default/volumes/v/upload" in ln]
    assert lines[-1].endswith("result=400 invalid-argument"), lines


# -- how long a head may take -------------------------------------------------------------


def test_head_deadline(tmp_path: Path) -> None:
    d = start_daemon(tmp_path / "state", "--head-timeout", "1")
    try:
        # a head dripped one header at a time
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(10)
        s.connect(str(d.ro_socket))
        s.sendall(b"GET /v1/pools HTTP/1.1\r\nHost: x\r\n")
        sent = 0
        try:
            for sent in range(60):  # 18 s at most, where the deadline is 1 s
                s.sendall(b"X-Drip-%d: 1\r\n" % sent)
                time.sleep(0.3)
        except (BrokenPipeError, ConnectionResetError):
            pass
        assert sent < 59, "the daemon waited for the whole dripped head"
        r = read_response(s)
        s.close()
        assert r.status == 408
        assert "not received within 1 s" in _error(r)["message"]
        # a connection that sends nothing is closed, without an answer
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(15)
        s.connect(str(d.ro_socket))
        assert s.recv(100) == b""
        s.close()
        # the deadline runs from a head's first byte: a kept-alive connection may idle
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(10)
        s.connect(str(d.ro_socket))
        for _ in range(2):
            s.sendall(b"GET /v1/pools HTTP/1.1\r\nHost: x\r\n\r\n")
            assert read_response(s).status == 200
            time.sleep(1.5)
        s.close()
    finally:
        d.stop()
    _no_traceback(d)


# -- connection limits --------------------------------------------------------------------

# Connects as another user, and hands the connected sockets back: the daemon reads the
# peer's uid from SO_PEERCRED, which the kernel records at connect().
_CONNECT_AS = """
import socket, sys
back = socket.socket(fileno=int(sys.argv[1]))
socks = []
for _ in range(int(sys.argv[3])):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(sys.argv[2])
    socks.append(s)
socket.send_fds(back, [b"x"], [s.fileno() for s in socks])
"""

GET_VERSION = b"GET /v1/version HTTP/1.1\r\nHost: x\r\n\r\n"


def _unix_as(uid: int, path: Path, n: int) -> list[tuple[socket.socket, object]]:
    """``n`` connections from ``uid``, each asked one request: the socket and its answer."""
    here, there = socket.socketpair()
    with here, there:
        subprocess.run([sys.executable, "-I", "-c", _CONNECT_AS, str(there.fileno()),
                        str(path), str(n)], user=uid, pass_fds=(there.fileno(),), cwd="/",
                       check=True, timeout=60)
        _, fds, _, _ = socket.recv_fds(here, 16, n)
    out = []
    for fd in fds:
        s = socket.socket(fileno=fd)
        s.settimeout(10)
        try:
            s.sendall(GET_VERSION)
        except (BrokenPipeError, ConnectionResetError):
            pass  # refused: the answer is already there
        out.append((s, read_response(s)))
    return out


def _unix(path: Path, n: int) -> list[tuple[socket.socket, object]]:
    return _unix_as(os.geteuid(), path, n)


def _statuses(held: list[tuple[socket.socket, object]]) -> list[int]:
    return [r.status for _, r in held]  # type: ignore[attr-defined]


def _refused(held: list[tuple[socket.socket, object]]) -> object:
    return next(r for _, r in held if r.status == 503)  # type: ignore[attr-defined]


def _tls(d: Daemon, certs: Certs, source: str) -> socket.socket | None:
    """A TLS connection from ``source`` that got an answer; None if the daemon refused it."""
    ctx = ssl.create_default_context(cafile=str(certs.ca))
    raw = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    raw.settimeout(10)
    raw.bind((source, 0))
    raw.connect(("127.0.0.1", d.tcp_port or 0))
    try:
        s = ctx.wrap_socket(raw, server_hostname="127.0.0.1")
        s.sendall(b"GET /v1/version HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer "
                  + RO_TOKEN.encode() + b"\r\n\r\n")
        assert read_response(s).status == 200
    except (ssl.SSLError, OSError):
        raw.close()
        return None
    return s


def test_connection_limits(tmp_path: Path, certs: Certs) -> None:
    if os.geteuid() != 0:
        pytest.skip("connecting as other users needs root")
    conf = tmp_path / "virtstored.conf"
    conf.write_text("max_connections = 10\nrw_reserve = 2\nmax_connections_ro = 4\n"
                    "max_connections_tcp = 5\nmax_connections_per_peer = 2\n")
    tokens = write_tokens(tmp_path / "tokens")
    d = start_daemon(tmp_path / "state", "--config", str(conf), "--listen", "127.0.0.1:0",
                     "--tls-cert", str(certs.server_cert), "--tls-key",
                     str(certs.server_key), "--tokens", str(tokens))
    held: list[socket.socket] = []

    def hold(conns: list[tuple[socket.socket, object]]) -> list[int]:
        # connections made at once are accepted in no set order: which one is refused
        # is the daemon's choice, how many is not
        held.extend(s for s, _ in conns)
        return sorted(_statuses(conns))

    def hold_tls(source: str) -> bool:
        s = _tls(d, certs, source)
        if s is not None:
            held.append(s)
        return s is not None

    try:
        d.sock_dir.chmod(0o755)  # the read-only socket is for every user
        # per uid on the read-only socket
        mine = _unix(d.ro_socket, 3)
        assert hold(mine) == [200, 200, 503]
        err = _error(_refused(mine))
        assert err["code"] == "busy" and f"uid {os.geteuid()}" in err["message"], err
        # the read-only socket's own limit, whoever asks
        assert hold(_unix_as(65534, d.ro_socket, 2)) == [200, 200]
        other = _unix_as(65533, d.ro_socket, 1)
        assert hold(other) == [503]
        assert "listener" in _error(other[0][1])["message"]
        # per address over TCP
        assert [hold_tls("127.0.0.1") for _ in range(3)] == [True, True, False]
        assert [hold_tls("127.0.0.2") for _ in range(2)] == [True, True]
        # 8 connections on the read-only socket and TCP: what is left is the read-write
        # socket's, though TCP's own limit (5) is not reached
        assert not hold_tls("127.0.0.3")
        rw = _unix(d.rw_socket, 3)
        assert hold(rw) == [200, 200, 503]
        assert "all 10 connections" in _error(_refused(rw))["message"]
        for s in held:
            s.close()
        # the daemon counts the closed connections out again
        status = 0
        for _ in range(100):
            status = hold(_unix_as(65532, d.ro_socket, 1))[0]
            if status == 200:
                break
            time.sleep(0.1)
        assert status == 200
        assert hold_tls("127.0.0.3")
    finally:
        for s in held:
            s.close()
        d.stop()
    log = d.log()
    assert "too many connections: refusing one on unix://" in log
    assert "Traceback" not in log


def test_limit_options_are_checked(tmp_path: Path) -> None:
    for text in ("max_connections = 10\nrw_reserve = 10\n", "head_timeout = 0\n",
                 "max_connections_per_peer = 0\n", "max_connections_ro = 'many'\n"):
        conf = tmp_path / "bad.conf"
        conf.write_text(text)
        proc = subprocess.run([sys.executable, "-m", "virtstore.server.main", "--root",
                               str(tmp_path / "s"), "--config", str(conf)],
                              capture_output=True, text=True, timeout=60)
        assert proc.returncode == 2, (text, proc.stdout, proc.stderr)
        assert "virtstored:" in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
