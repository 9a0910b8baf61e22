"""Who may do what, and what hostile requests get: virtstored as a real process."""

from __future__ import annotations

import http.client
import json
import os
import socket
import ssl
import stat
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

import virtstore
from conftest import dir_pool_xml
from server_fixtures import (
    RO_TOKEN,
    RW_TOKEN,
    Certs,
    Daemon,
    certs_fixture,  # noqa: F401
    daemon_fixture,  # noqa: F401
    raw_request,
    request,
    start_daemon,
    tls_daemon_fixture,  # noqa: F401
    write_tokens,
)
from virtstore.errors import AuthFailed, Forbidden, InternalError, InvalidArgument, NoSuchPool


def _pool_names(d: Daemon) -> list[str]:
    r = request(d.rw_socket, "GET", "/v1/pools")
    assert r.status == 200
    return [p["name"] for p in r.json()]  # type: ignore[union-attr,index]


# -- unix sockets -----------------------------------------------------------------------


def test_socket_modes_and_default_location(tmp_path: Path) -> None:
    # A short root so the default ROOT/run sockets fit a unix socket path.
    root = Path(os.environ.get("TMPDIR", "/tmp")) / f"vsr-{os.getpid()}"
    d = start_daemon(root, sock_dir=root / "run")
    try:
        rw, ro = root / "run" / "virtstored.sock", root / "run" / "virtstored-ro.sock"
        assert stat.S_ISSOCK(rw.stat().st_mode) and stat.S_ISSOCK(ro.stat().st_mode)
        assert stat.S_IMODE(rw.stat().st_mode) == 0o600
        assert stat.S_IMODE(ro.stat().st_mode) == 0o666
        assert rw.stat().st_uid == os.geteuid()
        # a second daemon on the same root refuses to start
        proc = subprocess.run([sys.executable, "-m", "virtstore.server.main", "--root",
                               str(root)], capture_output=True, text=True, timeout=60)
        assert proc.returncode == 1
        assert "another virtstored" in proc.stdout + proc.stderr
    finally:
        assert d.stop() == 0
        import shutil

        shutil.rmtree(root, ignore_errors=True)
    assert not rw.exists() and not ro.exists()


def test_read_only_socket_refuses_changes(daemon: Daemon, tmp_path: Path) -> None:
    ro = virtstore.connect(daemon.ro_uri)
    assert [p.name for p in ro.list_pools()] == ["default"]
    assert ro.pool_info("default").state == "running"
    with pytest.raises(Forbidden):
        ro.pool_define_xml(dir_pool_xml("x", tmp_path / "x"))
    with pytest.raises(Forbidden):
        ro.pool_stop("default")
    with pytest.raises(Forbidden):
        ro.secret_define_xml("<secret><usage type='ceph'><name>n</name></usage></secret>")
    ro.close()
    # the raw answers: 403 and a JSON error
    for method, path in [("POST", "/v1/pools/default/stop"), ("DELETE", "/v1/pools/default"),
                         ("POST", "/v1/pools/default/volumes"),
                         ("GET", "/v1/pools/default/volumes/x/download")]:
        r = request(daemon.ro_socket, method, path, b"{}",
                    {"Content-Type": "application/json"})
        assert r.status == 403, (method, path)
        assert r.json()["error"]["code"] == "forbidden"  # type: ignore[index]
    assert _pool_names(daemon) == ["default"]
    rw = virtstore.connect(daemon.rw_uri)
    assert rw.pool_info("default").state == "running"
    uuid = rw.secret_define_xml("<secret private='no'><usage type='ceph'><name>n</name>"
                                "</usage></secret>")
    rw.secret_set_value(uuid, b"s3cret")
    rw.close()
    r = request(daemon.ro_socket, "GET", f"/v1/secrets/{uuid}/value")
    assert r.status == 403 and b"s3cret" not in r.body
    assert request(daemon.ro_socket, "GET", f"/v1/secrets/{uuid}").status == 200


def test_audit_log(daemon: Daemon, tmp_path: Path) -> None:
    c = virtstore.connect(daemon.rw_uri)
    c.pool_define_xml(dir_pool_xml("audited", tmp_path / "a"))
    with pytest.raises(NoSuchPool):
        c.pool_start("missing")
    c.pool_info("audited")
    c.close()
    request(daemon.ro_socket, "POST", "/v1/pools/audited/start")
    daemon.stop()
    lines = [ln for ln in daemon.log().splitlines() if "virtstored.audit" in ln]
    uid = os.geteuid()
    assert any(f"who=uid:{uid}" in ln and "op=POST /v1/pools " in ln and "result=201" in ln
               for ln in lines), lines
    assert any("op=POST /v1/pools/missing/start" in ln and "result=404 no-such-pool" in ln
               for ln in lines), lines
    assert any("read-only" in ln and "op=POST /v1/pools/audited/start" in ln
               and "result=403 forbidden" in ln for ln in lines), lines
    # reads are not audited
    assert not any("op=GET" in ln for ln in lines), lines


# -- hostile requests ---------------------------------------------------------------------


def test_path_traversal_in_names(daemon: Daemon, tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    victim.write_text("keep me")
    rel = os.path.relpath(victim, daemon.root / "images")
    enc = rel.replace("/", "%2F")
    for method, path in [
        ("DELETE", f"/v1/pools/default/volumes/{enc}"),
        ("GET", f"/v1/pools/default/volumes/{enc}"),
        ("DELETE", "/v1/pools/..%2F..%2Fetc"),
        ("GET", "/v1/pools/..%2F..%2F..%2Fetc%2Fpasswd/xml"),
        ("DELETE", "/v1/pools/default/volumes/.."),
        ("DELETE", "/v1/secrets/..%2F..%2Fpools%2Fdefault"),
    ]:
        r = request(daemon.rw_socket, method, path)
        assert 400 <= r.status < 500, (method, path, r)
        assert "error" in r.json()  # type: ignore[operator]
    body = json.dumps({"name": rel, "capacity": 1024}).encode()
    r = request(daemon.rw_socket, "POST", "/v1/pools/default/volumes", body,
                {"Content-Type": "application/json"})
    assert r.status == 400
    assert victim.read_text() == "keep me"
    assert sorted(os.listdir(daemon.root / "images")) == []
    assert (daemon.root / "pools" / "default.xml").exists()


def test_oversized_and_malformed_bodies(daemon: Daemon, tmp_path: Path) -> None:
    big = b"<pool type='dir'><name>big</name>" + b" " * (1024 * 1024 + 10) + b"</pool>"
    r = request(daemon.rw_socket, "POST", "/v1/pools", big,
                {"Content-Type": "application/xml"})
    assert r.status == 413
    # also when the length is not announced (chunked)
    chunked = (b"POST /v1/pools HTTP/1.1\r\nHost: x\r\nContent-Type: application/xml\r\n"
               b"Transfer-Encoding: chunked\r\n\r\n")
    piece = b" " * 65536
    chunked += b"".join(b"%x\r\n%s\r\n" % (len(piece), piece) for _ in range(20))
    assert raw_request(daemon.rw_socket, chunked).status == 413
    cases = [
        ("POST", "/v1/pools/default/volumes", b"{not json", "application/json", 400),
        ("POST", "/v1/pools/default/volumes", b"[1, 2]", "application/json", 400),
        ("POST", "/v1/pools/default/volumes", b'{"name": "a", "capacity": "-1G"}',
         "application/json", 400),
        ("POST", "/v1/pools/default/volumes", b'{"name": "a", "capacity": 1, "x": 1}',
         "application/json", 400),
        ("POST", "/v1/pools/default/volumes", b"[" * 100000, "application/json", 400),
        ("POST", "/v1/pools", b"<pool type='dir'><name>x</name>", "application/xml", 400),
        ("POST", "/v1/pools", b"\xff\xfe<pool/>", "application/xml", 400),
        ("POST", "/v1/pools", b"<?xml version='1.0'?><!DOCTYPE pool SYSTEM "
         b"'file:///etc/passwd'><pool type='dir'><name>dt</name><target><path>/tmp/dt"
         b"</path></target></pool>", "application/xml", 400),
        ("POST", "/v1/pools", b"<!DOCTYPE lol [<!ENTITY a 'aaaaaaaaaa'><!ENTITY b "
         b"'&a;&a;&a;&a;&a;&a;&a;&a;'>]><pool type='dir'><name>&b;</name></pool>",
         "application/xml", 400),
        ("POST", "/v1/pools", b"name=x", "application/x-www-form-urlencoded", 415),
        ("POST", "/v1/pools/default/autostart", b'{"autostart": "yes"}', "application/json",
         400),
        ("PUT", "/v1/pools/other", b"<pool type='dir'><name>named</name><target><path>"
         b"/tmp/n</path></target></pool>", "application/xml", 400),
    ]
    for method, path, body, ctype, status in cases:
        r = request(daemon.rw_socket, method, path, body, {"Content-Type": ctype})
        assert r.status == status, (path, body[:40], r)
        err = r.json()["error"]  # type: ignore[index]
        assert err["code"] and err["message"]
    assert _pool_names(daemon) == ["default"]
    assert os.listdir(daemon.root / "images") == []
    assert sorted(os.listdir(daemon.root / "pools")) == ["autostart", "default.xml"]


def test_protocol_limits(daemon: Daemon) -> None:
    sock = daemon.rw_socket
    r = raw_request(sock, b"GET /v1/pools/" + b"a" * 10000 + b" HTTP/1.1\r\nHost: x\r\n\r\n")
    assert r.status == 414
    r = raw_request(sock, b"GET /v1/pools HTTP/1.1\r\nHost: x\r\nX-Big: " + b"b" * 70000
                    + b"\r\n\r\n")
    assert r.status == 431
    many = b"".join(b"X-H%d: v\r\n" % i for i in range(150))
    assert raw_request(sock, b"GET /v1/pools HTTP/1.1\r\nHost: x\r\n" + many
                       + b"\r\n").status == 431
    assert raw_request(sock, b"GARBAGE\r\n\r\n").status == 400
    assert raw_request(sock, b"GET v1/pools HTTP/1.1\r\nHost: x\r\n\r\n").status == 400
    assert request(sock, "GET", "/v1/pools/%ff%fe").status == 400
    assert request(sock, "GET", "/v1/pools?active=maybe").status == 400
    assert request(sock, "GET", "/v1/nothing").status == 404
    r = request(sock, "PATCH", "/v1/pools/default")
    assert r.status == 405 and "GET" in r.headers["allow"]
    # the daemon still answers
    assert _pool_names(daemon) == ["default"]


# -- TCP: TLS and tokens ------------------------------------------------------------------


def _https(d: Daemon, certs: Certs, method: str, path: str, token: str | None = None,
           body: bytes | None = None) -> tuple[int, bytes]:
    ctx = ssl.create_default_context(cafile=str(certs.ca))
    assert d.tcp_port is not None
    c = http.client.HTTPSConnection("127.0.0.1", d.tcp_port, context=ctx, timeout=10)
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    if body is not None:
        headers["Content-Type"] = "application/json"
    c.request(method, path, body, headers)
    r = c.getresponse()
    data = r.read()
    c.close()
    return r.status, data


def test_tcp_needs_a_token(tls_daemon: Daemon, certs: Certs) -> None:
    status, body = _https(tls_daemon, certs, "GET", "/v1/pools")
    assert status == 401 and json.loads(body)["error"]["code"] == "auth-failed"
    assert _https(tls_daemon, certs, "GET", "/v1/pools", "wrong-token-xxxxxxxxxx")[0] == 401
    assert _https(tls_daemon, certs, "POST", "/v1/pools/default/stop")[0] == 401
    status, body = _https(tls_daemon, certs, "GET", "/v1/pools", RO_TOKEN)
    assert status == 200 and json.loads(body)[0]["name"] == "default"
    assert _https(tls_daemon, certs, "POST", "/v1/pools/default/stop", RO_TOKEN, b"{}")[0] \
        == 403
    assert _https(tls_daemon, certs, "GET", "/v1/pools/default", RW_TOKEN)[0] == 200
    tls_daemon.stop()
    log = tls_daemon.log()
    assert "authentication failed: no token from 127.0.0.1" in log
    assert "authentication failed: unknown token" in log
    assert "wrong-token" not in log and RO_TOKEN not in log


def test_remote_client_over_tls(tls_daemon: Daemon, certs: Certs, tmp_path: Path) -> None:
    with pytest.raises(AuthFailed):
        virtstore.connect(tls_daemon.https_uri, ca=str(certs.ca)).list_pools()
    ro = virtstore.connect(tls_daemon.https_uri, token=RO_TOKEN, ca=str(certs.ca))
    assert [p.name for p in ro.list_pools()] == ["default"]
    with pytest.raises(Forbidden):
        ro.pool_define_xml(dir_pool_xml("viatls", tmp_path / "t"))
    rw = virtstore.connect(tls_daemon.https_uri, token=RW_TOKEN, ca=str(certs.ca))
    assert rw.pool_define_xml(dir_pool_xml("viatls", tmp_path / "t")) == "viatls"
    assert ro.pool_info("viatls").state == "inactive"
    ro.close()
    rw.close()
    tls_daemon.stop()
    assert "who=token:admin@127.0.0.1:" in tls_daemon.log()


def test_tls_client_without_the_ca_fails(tls_daemon: Daemon, certs: Certs) -> None:
    # neither the system's CAs nor another CA vouch for the test server
    for ca in (None, str(certs.other_ca)):
        c = virtstore.connect(tls_daemon.https_uri, token=RW_TOKEN, ca=ca)
        with pytest.raises(AuthFailed, match="certificate"):
            c.list_pools()
        c.close()
    # plain HTTP on the TLS port gets nothing useful
    s = socket.create_connection(("127.0.0.1", tls_daemon.tcp_port or 0), timeout=10)
    s.sendall(b"GET /v1/pools HTTP/1.1\r\nHost: x\r\n\r\n")
    try:
        data = s.recv(65536)
    except ConnectionResetError:
        data = b""
    s.close()
    assert b"default" not in data


def test_tls_1_1_is_refused(tls_daemon: Daemon, certs: Certs) -> None:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.load_verify_locations(str(certs.ca))
    # SECLEVEL=0 lets this client speak TLS 1.1 at all, so only the server can refuse it.
    ctx.set_ciphers("DEFAULT:@SECLEVEL=0")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            ctx.minimum_version = ssl.TLSVersion.TLSv1_1
            ctx.maximum_version = ssl.TLSVersion.TLSv1_1
    except (ValueError, ssl.SSLError):
        pytest.skip("this OpenSSL cannot even offer TLS 1.1")
    s = socket.create_connection(("127.0.0.1", tls_daemon.tcp_port or 0), timeout=10)
    with pytest.raises((ssl.SSLError, OSError)):
        ctx.wrap_socket(s, server_hostname="127.0.0.1")
    s.close()


def test_client_certificates_required_with_tls_ca(tmp_path: Path, certs: Certs,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    tokens = write_tokens(tmp_path / "tokens")
    d = start_daemon(tmp_path / "state", "--listen", "127.0.0.1:0", "--tls-cert",
                     str(certs.server_cert), "--tls-key", str(certs.server_key), "--tls-ca",
                     str(certs.ca), "--tokens", str(tokens))
    try:
        no_cert = virtstore.connect(d.https_uri, token=RW_TOKEN, ca=str(certs.ca))
        with pytest.raises((AuthFailed, InternalError)):
            no_cert.list_pools()
        no_cert.close()
        monkeypatch.setenv("VIRTSTORE_CLIENT_CERT", str(certs.client_cert))
        monkeypatch.setenv("VIRTSTORE_CLIENT_KEY", str(certs.client_key))
        with_cert = virtstore.connect(d.https_uri, token=RW_TOKEN, ca=str(certs.ca))
        assert [p.name for p in with_cert.list_pools()] == ["default"]
        with_cert.pool_set_autostart("default", False)
        with_cert.close()
    finally:
        d.stop()
    assert "cert:client" in d.log()


def test_config_file_and_bad_options(tmp_path: Path, certs: Certs) -> None:
    tokens = write_tokens(tmp_path / "tokens")
    conf = tmp_path / "virtstored.conf"
    conf.write_text(f"# plain key = value\nlisten = 127.0.0.1:0\ntls-cert = {certs.server_cert}"
                    f"\ntls_key = \"{certs.server_key}\"\ntokens = {tokens}\n")
    d = start_daemon(tmp_path / "state", "--config", str(conf), tcp=True)
    try:
        assert d.tcp_port
        c = virtstore.connect(d.https_uri, token=RO_TOKEN, ca=str(certs.ca))
        assert c.pool_info("default").name == "default"
        c.close()
    finally:
        d.stop()
    toml = tmp_path / "toml.conf"
    toml.write_text(f'listen = "127.0.0.1:0"\ntls_cert = "{certs.server_cert}"\n'
                    f'tls_key = "{certs.server_key}"\nmax_connections = 8\n')
    d = start_daemon(tmp_path / "state2", "--config", str(toml), tcp=True)
    d.stop()
    assert "no tokens configured" in d.log()
    bad = tmp_path / "bad.conf"
    bad.write_text("colour = blue\n")
    for args in (["--config", str(bad)], ["--listen", "127.0.0.1:0"],
                 ["--listen", "nohost", "--tls-cert", "x", "--tls-key", "y"]):
        proc = subprocess.run([sys.executable, "-m", "virtstore.server.main", "--root",
                               str(tmp_path / "s3"), *args], capture_output=True, text=True,
                              timeout=60)
        assert proc.returncode != 0, args
        assert "virtstored" in proc.stderr or "ERROR" in proc.stdout, args


def test_remote_uri_errors(tmp_path: Path) -> None:
    with pytest.raises(InvalidArgument):
        virtstore.connect("http://127.0.0.1:1")
    c = virtstore.connect(f"unix://{tmp_path}/none.sock")
    with pytest.raises(InternalError, match="cannot connect"):
        c.list_pools()
