"""A real virtstored for tests: a subprocess on a temporary root, stopped by its PID.

Test modules import the fixtures they use (``daemon_fixture``, ``certs_fixture``,
``tls_daemon_fixture``); their fixture names drop the suffix.

Also a throwaway CA with server and client certificates (openssl CLI), a tokens file,
and a raw HTTP helper for requests no well-behaved client would send.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import pytest

from virtstore.api import Connection

RW_TOKEN = "rw-token-0123456789abcdef"
RO_TOKEN = "ro-token-0123456789abcdef"


def _daemon_argv() -> list[str]:
    script = Path(sys.executable).parent / "virtstored"
    if script.exists():
        return [str(script)]
    return [sys.executable, "-m", "virtstore.server.main"]


@dataclass
class Daemon:
    root: Path
    log_path: Path
    proc: subprocess.Popen[bytes]
    sock_dir: Path
    tcp_port: int | None = None
    extra: list[str] = field(default_factory=list)
    own_sock_dir: bool = False

    @property
    def rw_socket(self) -> Path:
        return self.sock_dir / "virtstored.sock"

    @property
    def ro_socket(self) -> Path:
        return self.sock_dir / "virtstored-ro.sock"

    @property
    def rw_uri(self) -> str:
        return f"unix://{self.rw_socket}"

    @property
    def ro_uri(self) -> str:
        return f"unix://{self.ro_socket}"

    @property
    def https_uri(self) -> str:
        assert self.tcp_port is not None
        return f"https://127.0.0.1:{self.tcp_port}"

    def log(self) -> str:
        return self.log_path.read_text()

    def stop(self) -> int:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                os.kill(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        if self.own_sock_dir:
            shutil.rmtree(self.sock_dir, ignore_errors=True)
        return self.proc.returncode


def start_daemon(root: Path, *args: str, log_path: Path | None = None,
                 sock_dir: Path | None = None, tcp: bool | None = None,
                 wrap: tuple[str, ...] = ()) -> Daemon:
    """``sock_dir`` None: a short directory under /tmp (a unix socket's path must fit in
    108 bytes, which pytest's temporary paths may not). ``wrap``: a command the daemon
    runs under (``ip netns exec NS``)."""
    root.mkdir(parents=True, exist_ok=True)
    log_path = log_path or root.parent / f"{root.name}-virtstored.log"
    own = sock_dir is None
    if sock_dir is None:
        sock_dir = Path(tempfile.mkdtemp(prefix="vs-", dir="/tmp"))
        args = ("--socket-dir", str(sock_dir), *args)
    env = {k: v for k, v in os.environ.items()
           if k not in ("VIRTSTORE_DEFAULT_URI", "VIRTSTORE_ROOT")}
    with open(log_path, "wb") as out:
        proc = subprocess.Popen([*wrap, *_daemon_argv(), "--root", str(root), "--log-level",
                                 "debug",
                                 *args], stdout=out, stderr=subprocess.STDOUT, env=env)
    d = Daemon(root, log_path, proc, sock_dir, extra=list(args), own_sock_dir=own)
    deadline = time.monotonic() + 30
    want_tcp = "--listen" in args if tcp is None else tcp
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"virtstored exited with {proc.returncode}:\n{d.log()}")
        text = d.log()
        ready = "(unix-ro)" in text
        if want_tcp:
            m = re.search(r"listening on https://[^ ]+:(\d+) \(tcp\)", text)
            ready = ready and m is not None
            if m:
                d.tcp_port = int(m.group(1))
        if ready:
            return d
        time.sleep(0.05)
    d.stop()
    raise RuntimeError(f"virtstored did not start:\n{d.log()}")


@pytest.fixture(name="daemon")
def daemon_fixture(tmp_path: Path) -> Iterator[Daemon]:
    d = start_daemon(tmp_path / "state")
    yield d
    d.stop()


class Setup(NamedTuple):
    conn: Connection
    root: Path
    tmp: Path


@pytest.fixture(params=["embedded", "remote"], name="setup")
def setup_fixture(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Setup]:
    """The same test twice: on the engine in process, and through a virtstored."""
    import virtstore

    root = tmp_path / "state"
    if request.param == "embedded":
        conn = virtstore.connect(root=str(root))
        yield Setup(conn, root, tmp_path)
        conn.close()
        return
    d = start_daemon(root)
    conn = virtstore.connect(d.rw_uri)
    assert type(conn).__name__ == "RemoteConnection"
    try:
        yield Setup(conn, root, tmp_path)
    finally:
        conn.close()
        d.stop()


# -- TLS material -------------------------------------------------------------------------


@dataclass
class Certs:
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    other_ca: Path


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


def _make_ca(d: Path, name: str) -> tuple[Path, Path]:
    key, crt = d / f"{name}.key", d / f"{name}.crt"
    _openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
             "-nodes", "-keyout", str(key), "-out", str(crt), "-days", "2",
             "-subj", f"/CN={name}", "-addext", "basicConstraints=critical,CA:TRUE",
             "-addext", "keyUsage=critical,keyCertSign,cRLSign", cwd=d)
    return crt, key


def _make_leaf(d: Path, name: str, ca: tuple[Path, Path], ext: str) -> tuple[Path, Path]:
    key, csr, crt = d / f"{name}.key", d / f"{name}.csr", d / f"{name}.crt"
    _openssl("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
             "-keyout", str(key), "-out", str(csr), "-subj", f"/CN={name}", cwd=d)
    extfile = d / f"{name}.ext"
    extfile.write_text(ext)
    _openssl("x509", "-req", "-in", str(csr), "-CA", str(ca[0]), "-CAkey", str(ca[1]),
             "-CAcreateserial", "-out", str(crt), "-days", "2", "-extfile", str(extfile),
             cwd=d)
    return crt, key


def make_certs(d: Path) -> Certs:
    if shutil.which("openssl") is None:
        pytest.skip("the openssl command (Debian openssl) is not installed")
    d.mkdir(parents=True, exist_ok=True)
    ca = _make_ca(d, "test-ca")
    other = _make_ca(d, "other-ca")
    server = _make_leaf(d, "server", ca, "subjectAltName=IP:127.0.0.1,DNS:localhost\n"
                        "extendedKeyUsage=serverAuth\n")
    client = _make_leaf(d, "client", ca, "extendedKeyUsage=clientAuth\n")
    return Certs(ca[0], server[0], server[1], client[0], client[1], other[0])


@pytest.fixture(scope="session", name="certs")
def certs_fixture(tmp_path_factory: pytest.TempPathFactory) -> Certs:
    return make_certs(tmp_path_factory.mktemp("tls"))


def write_tokens(path: Path) -> Path:
    path.write_text(f"# test tokens\n{RW_TOKEN} rw admin\n{RO_TOKEN} ro viewer\n")
    path.chmod(0o600)
    return path


@pytest.fixture(name="tls_daemon")
def tls_daemon_fixture(tmp_path: Path, certs: Certs) -> Iterator[Daemon]:
    tokens = write_tokens(tmp_path / "tokens")
    # Remote callers may put pools in the test's directory (and nowhere else).
    d = start_daemon(tmp_path / "state", "--listen", "127.0.0.1:0",
                     "--tls-cert", str(certs.server_cert), "--tls-key", str(certs.server_key),
                     "--tokens", str(tokens), "--remote-pool-root", str(tmp_path))
    yield d
    d.stop()


# -- raw HTTP -----------------------------------------------------------------------------


@dataclass
class Raw:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> object:
        return json.loads(self.body)


def raw_request(sock_path: Path, data: bytes, timeout: float = 10.0) -> Raw:
    """Send bytes as they are on a fresh unix connection; read one response."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(timeout)
    s.connect(str(sock_path))
    try:
        try:
            s.sendall(data)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the server may answer and close before reading it all
        return read_response(s)
    finally:
        s.close()


# Bytes read past one response (pipelined answers can arrive in one recv), per socket.
_unread: dict[int, bytes] = {}


def read_response(s: socket.socket) -> Raw:
    buf = _unread.pop(s.fileno(), b"")
    while b"\r\n\r\n" not in buf:
        chunk = s.recv(65536)
        if not chunk:
            raise ConnectionError(f"connection closed before a response: {buf!r}")
        buf += chunk
    head, _, rest = buf.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {}
    for line in lines[1:]:
        k, _, v = line.partition(":")
        headers[k.strip().lower()] = v.strip()
    length = int(headers.get("content-length", "0"))
    while len(rest) < length:
        chunk = s.recv(65536)
        if not chunk:
            break
        rest += chunk
    if len(rest) > length:
        _unread[s.fileno()] = rest[length:]
    return Raw(status, headers, rest[:length])


def request(sock_path: Path, method: str, path: str, body: bytes = b"",
            headers: dict[str, str] | None = None) -> Raw:
    hdrs = {"Host": "localhost", "Content-Length": str(len(body)), "Connection": "close",
            **(headers or {})}
    head = f"{method} {path} HTTP/1.1\r\n" + "".join(f"{k}: {v}\r\n" for k, v in hdrs.items())
    return raw_request(sock_path, head.encode() + b"\r\n" + body)
