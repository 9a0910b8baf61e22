"""virtstored's HTTP: the OpenAPI document, keep-alive, pipelining, chunked bodies,
Server-Sent Events, and requests served side by side."""

from __future__ import annotations

import json
import socket
import threading
import time
from pathlib import Path

import pytest

import virtstore
from conftest import dir_pool_xml
from server_fixtures import Daemon, daemon_fixture, read_response, request  # noqa: F401
from virtstore.server.app import ROUTES


def _connect(d: Daemon) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(10)
    s.connect(str(d.rw_socket))
    return s


def test_openapi_document_is_valid_and_complete(daemon: Daemon) -> None:
    validator = pytest.importorskip("openapi_spec_validator")
    r = request(daemon.ro_socket, "GET", "/openapi.json")
    assert r.status == 200
    doc = json.loads(r.body)
    validator.validate(doc)
    assert doc["openapi"].startswith("3.")
    for route in ROUTES:
        op = doc["paths"][route.path][route.method.lower()]
        assert op["summary"]
        assert ("x-access" in op) == (route.access != "read")
    # what the document promises for a volume is what the server sends
    vol_props = set(doc["components"]["schemas"]["Volume"]["properties"])
    c = virtstore.connect(daemon.rw_uri)
    from virtstore.api import VolumeCreateArgs

    c.volume_create("default", VolumeCreateArgs("a.img", 4096))
    c.close()
    got = request(daemon.rw_socket, "GET", "/v1/pools/default/volumes/a.img").json()
    assert set(got) == vol_props  # type: ignore[arg-type]
    pool_props = set(doc["components"]["schemas"]["Pool"]["properties"])
    got = request(daemon.rw_socket, "GET", "/v1/pools/default").json()
    assert set(got) == pool_props  # type: ignore[arg-type]


def test_keep_alive_and_pipelining(daemon: Daemon) -> None:
    s = _connect(daemon)
    for _ in range(3):
        s.sendall(b"GET /v1/pools/default HTTP/1.1\r\nHost: x\r\n\r\n")
        r = read_response(s)
        assert r.status == 200 and json.loads(r.body)["name"] == "default"
    # three requests in one write: three answers, in order
    s.sendall(b"GET /v1/pools/default HTTP/1.1\r\nHost: x\r\n\r\n"
              b"GET /v1/pools/nope HTTP/1.1\r\nHost: x\r\n\r\n"
              b"GET /v1/version HTTP/1.1\r\nHost: x\r\n\r\n")
    assert read_response(s).status == 200
    assert read_response(s).status == 404
    r = read_response(s)
    assert r.status == 200 and json.loads(r.body)["role"] == "rw"
    s.close()


def test_chunked_body_expect_continue_and_head(daemon: Daemon, tmp_path: Path) -> None:
    xml = dir_pool_xml("chunky", tmp_path / "c").encode()
    s = _connect(daemon)
    s.sendall(b"POST /v1/pools HTTP/1.1\r\nHost: x\r\nContent-Type: application/xml\r\n"
              b"Transfer-Encoding: chunked\r\n\r\n")
    for i in range(0, len(xml), 10):
        piece = xml[i:i + 10]
        s.sendall(b"%x\r\n%s\r\n" % (len(piece), piece))
    s.sendall(b"0\r\n\r\n")
    r = read_response(s)
    assert r.status == 201, r
    assert r.headers["location"] == "/v1/pools/chunky"
    # Expect: 100-continue gets its interim answer before the body is sent
    body = json.dumps({"autostart": True}).encode()
    s.sendall(b"POST /v1/pools/chunky/autostart HTTP/1.1\r\nHost: x\r\n"
              b"Content-Type: application/json\r\nExpect: 100-continue\r\n"
              b"Content-Length: %d\r\n\r\n" % len(body))
    interim = s.recv(100)
    assert interim.startswith(b"HTTP/1.1 100 Continue\r\n\r\n")
    s.sendall(body)
    assert read_response(s).status == 204
    s.sendall(b"HEAD /v1/pools/chunky HTTP/1.1\r\nHost: x\r\n\r\n")
    s.settimeout(1)
    head = s.recv(65536)
    assert head.startswith(b"HTTP/1.1 200 ")
    assert head.endswith(b"\r\n\r\n")  # no body follows the headers
    s.close()
    assert request(daemon.rw_socket, "GET", "/v1/pools/chunky").json()["autostart"] is True  # type: ignore[index]


def test_server_sent_events(daemon: Daemon, tmp_path: Path) -> None:
    s = _connect(daemon)
    s.sendall(b"GET /v1/events HTTP/1.1\r\nHost: x\r\nAccept: text/event-stream\r\n\r\n")
    buf = b""
    while b"retry:" not in buf:
        buf += s.recv(65536)
    assert b"Content-Type: text/event-stream" in buf
    c = virtstore.connect(daemon.rw_uri)
    c.pool_define_xml(dir_pool_xml("sse", tmp_path / "sse"))
    c.close()
    deadline = time.monotonic() + 10
    while b"\"name\":\"sse\"" not in buf and time.monotonic() < deadline:
        buf += s.recv(65536)
    s.close()
    text = buf.decode()
    assert "event: pool" in text
    data = [ln for ln in text.splitlines() if ln.startswith("data: ") and '"sse"' in ln]
    ev = json.loads(data[0][len("data: "):])
    assert (ev["kind"], ev["action"], ev["name"]) == ("pool", "defined", "sse")
    # the JSON form of the same resource
    r = request(daemon.ro_socket, "GET", f"/v1/events?since={ev['id'] - 1}")
    assert r.json()[0]["id"] == ev["id"]  # type: ignore[index]


def test_slow_requests_do_not_block_others(daemon: Daemon) -> None:
    latest = request(daemon.rw_socket, "GET", "/v1/events/latest").json()["id"]  # type: ignore[index]
    # a long poll and a client stalled half-way through its headers
    poll = _connect(daemon)
    poll.sendall(f"GET /v1/events?since={latest}&timeout=5 HTTP/1.1\r\nHost: x\r\n\r\n"
                 .encode())
    stalled = _connect(daemon)
    stalled.sendall(b"GET /v1/pools HTTP/1.1\r\nHost: x\r\nX-Slow: ")
    time.sleep(0.2)
    c = virtstore.connect(daemon.rw_uri)
    t0 = time.monotonic()
    results = []

    def lookups() -> None:
        c2 = virtstore.connect(daemon.ro_uri)
        results.extend(c2.pool_info("default").name for _ in range(50))
        c2.close()

    threads = [threading.Thread(target=lookups) for _ in range(4)]
    for t in threads:
        t.start()
    for _ in range(50):
        assert c.pool_info("default").state == "running"
    for t in threads:
        t.join(10)
    elapsed = time.monotonic() - t0
    assert results == ["default"] * 200
    assert elapsed < 3.0, elapsed
    # the long poll is still waiting, and answers when its time is up
    poll.settimeout(10)
    r = read_response(poll)
    assert r.status == 200 and json.loads(r.body) == []
    poll.close()
    stalled.close()
    c.close()


def test_sparse_framing_on_the_wire(daemon: Daemon) -> None:
    from virtstore.api import VolumeCreateArgs
    from virtstore.data.stream import DATA, END, HOLE, MAGIC, RECORD
    from virtstore.server.sparse import SPARSE

    c = virtstore.connect(daemon.rw_uri)
    c.volume_create("default", VolumeCreateArgs("f.img", 1 << 20, format="raw"))
    c.close()
    vol = daemon.root / "images" / "f.img"
    # 16 MiB described in a few dozen bytes: a hole, 4 KiB of data, the end
    framed = (MAGIC + RECORD.pack(HOLE, 0, 8 << 20) + RECORD.pack(DATA, 8 << 20, 4096)
              + b"Z" * 4096 + RECORD.pack(END, 0, 16 << 20))
    r = request(daemon.rw_socket, "PUT", "/v1/pools/default/volumes/f.img/upload", framed,
                {"Content-Type": SPARSE})
    assert r.status == 200, r
    assert json.loads(r.body)["state"] == "done"
    data = vol.read_bytes()
    assert len(data) == 16 << 20
    assert data[8 << 20:(8 << 20) + 4096] == b"Z" * 4096 and data.count(0) == len(data) - 4096
    # the download in the framing is small too
    s = _connect(daemon)
    s.sendall(b"GET /v1/pools/default/volumes/f.img/download HTTP/1.1\r\nHost: x\r\n"
              b"Accept: " + SPARSE.encode() + b"\r\nConnection: close\r\n\r\n")
    raw = b""
    while chunk := s.recv(1 << 20):
        raw += chunk
    s.close()
    assert SPARSE.encode() in raw.split(b"\r\n\r\n", 1)[0]
    assert len(raw) < 64 * 1024 and b"Z" * 4096 in raw
    # a malformed stream is refused and the volume keeps its bytes
    for bad in (b"NOTMAGIC", MAGIC + RECORD.pack(DATA, 0, 100) + b"short",
                MAGIC + RECORD.pack(b"Q", 0, 1),
                MAGIC + RECORD.pack(DATA, 4096, 1) + b"x" + RECORD.pack(DATA, 0, 1) + b"y"):
        r = request(daemon.rw_socket, "PUT", "/v1/pools/default/volumes/f.img/upload", bad,
                    {"Content-Type": SPARSE})
        assert r.status == 400, (bad, r)
        assert vol.read_bytes() == data


def test_conventions_for_curl_users(daemon: Daemon, tmp_path: Path) -> None:
    """JSON without a Content-Type header, sizes as virsh's strings, and one OpenAPI tag
    per resource."""
    target = tmp_path / "c"
    r = request(daemon.rw_socket, "POST", "/v1/pools?transient=true&build=true",
                dir_pool_xml("c", target).encode(), {"Content-Type": "application/xml"})
    assert r.status == 201, r.body
    # curl -d '{...}' sends no JSON content type (or a form one, which is refused)
    body = json.dumps({"name": "v.img", "capacity": "10M"}).encode()
    r = request(daemon.rw_socket, "POST", "/v1/pools/c/volumes", body)
    assert r.status == 201, r.body
    assert (target / "v.img").stat().st_size == 10 << 20
    r = request(daemon.rw_socket, "POST", "/v1/pools/c/volumes/v.img/resize",
                json.dumps({"capacity": "1GiB"}).encode())
    assert r.status == 202, r.body
    job = r.json()["id"]  # type: ignore[index]
    request(daemon.rw_socket, "GET", f"/v1/jobs/{job}/wait?timeout=30")
    assert (target / "v.img").stat().st_size == 1 << 30
    r = request(daemon.rw_socket, "POST", "/v1/pools/c/volumes",
                json.dumps({"name": "w.img", "capacity": "ten"}).encode())
    assert r.status == 400 and b"Malformed" in r.body
    assert not (target / "w.img").exists()
    doc = request(daemon.ro_socket, "GET", "/openapi.json").json()
    tags = {m: op["tags"][0] for p, ops in doc["paths"].items()  # type: ignore[union-attr]
            for m, op in ops.items() if p.startswith("/v1/pools/{pool}/volumes/{volume}/resize")}
    assert tags == {"post": "volumes"}
    all_tags = {op["tags"][0] for ops in doc["paths"].values()  # type: ignore[union-attr]
                for op in ops.values()}
    assert {"pools", "volumes", "snapshots", "jobs", "secrets", "host", "events"} <= all_tags
