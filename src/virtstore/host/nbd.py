"""NBD: a small client (fixed newstyle handshake, simple replies) and qemu-nbd as a server.

The client lets virtstore read and write any storage qemu can open (an iSCSI LUN, an
NFS file, a remote NBD export) without a kernel nbd device, which this host may lack:
qemu-nbd opens the storage with qemu's own drivers and serves it on a private unix
socket, and ``NbdClient`` speaks the protocol over that socket (or TCP).

``NbdServer`` runs qemu-nbd through the runner (in a thread, so it stops when asked and
dies with the thread that started it), on a unix socket or a TCP port, optionally
read-only.
"""

from __future__ import annotations

import contextlib
import errno
import os
import socket
import struct
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

from virtstore.errors import CommandFailed, InvalidArgument, OperationInvalid
from virtstore.host.files import secret_file

NBDMAGIC = 0x4E42444D41474943  # "NBDMAGIC"
IHAVEOPT = 0x49484156454F5054  # "IHAVEOPT"
REPLY_MAGIC = 0x3E889045565A9
REQUEST_MAGIC = 0x25609513
SIMPLE_REPLY_MAGIC = 0x67446698
FLAG_FIXED_NEWSTYLE = 1
FLAG_NO_ZEROES = 2
OPT_ABORT = 2
OPT_GO = 7
REP_ACK = 1
REP_INFO = 3
INFO_EXPORT = 0
REP_ERR = 1 << 31
CMD_READ, CMD_WRITE, CMD_DISC, CMD_FLUSH, CMD_TRIM, CMD_WRITE_ZEROES = 0, 1, 2, 3, 4, 6
TFLAG_READ_ONLY = 1 << 1
TFLAG_SEND_FLUSH = 1 << 2
TFLAG_SEND_TRIM = 1 << 5
TFLAG_SEND_WRITE_ZEROES = 1 << 6
MAX_REQUEST = 32 << 20  # qemu-nbd's largest request


@dataclass(frozen=True)
class NbdAddress:
    """Where an export is: a unix socket or host:port, and the export name."""

    socket: str | None = None
    host: str | None = None
    port: int = 10809
    export: str = ""

    @property
    def url(self) -> str:
        if self.socket:
            return f"nbd+unix:///{self.export}?socket={self.socket}"
        host = f"[{self.host}]" if self.host and ":" in self.host else self.host
        return f"nbd://{host}:{self.port}/{self.export}"


def parse_url(url: str) -> NbdAddress:
    """``nbd://host[:port]/export`` or ``nbd+unix:///export?socket=PATH``."""
    from urllib.parse import parse_qs, urlsplit

    u = urlsplit(url)
    export = u.path[1:] if u.path.startswith("/") else u.path
    if u.scheme == "nbd+unix":
        sock = parse_qs(u.query).get("socket", [""])[0]
        if not sock:
            raise InvalidArgument(f"NBD URL '{url}' names no socket")
        return NbdAddress(socket=sock, export=export)
    if u.scheme in ("nbd", "nbd+tcp"):
        if not u.hostname:
            raise InvalidArgument(f"NBD URL '{url}' names no host")
        return NbdAddress(host=u.hostname, port=u.port or 10809, export=export)
    raise InvalidArgument(f"not an NBD URL: '{url}'")


class NbdError(CommandFailed):
    pass


class NbdClient:
    """One connection to one NBD export."""

    def __init__(self, addr: NbdAddress, *, timeout: float = 30.0) -> None:
        self.addr = addr
        if addr.socket:
            self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            target: object = addr.socket
        else:
            try:
                self.sock = socket.create_connection((addr.host or "127.0.0.1", addr.port),
                                                     timeout=timeout)
            except OSError as exc:
                raise NbdError(f"cannot connect to NBD export {addr.url}: {exc}") from exc
            target = None
        self.sock.settimeout(timeout)
        try:
            if target is not None:
                self.sock.connect(str(target))
            self.size, self.flags = self._handshake()
        except (OSError, struct.error) as exc:
            self.sock.close()
            raise NbdError(f"cannot connect to NBD export {addr.url}: {exc}") from exc
        except BaseException:
            self.sock.close()
            raise
        self._handle = 0

    # -- plumbing --------------------------------------------------------------
    def _recv(self, n: int) -> bytes:
        buf = bytearray(n)
        view = memoryview(buf)
        got = 0
        while got < n:
            k = self.sock.recv_into(view[got:], n - got)
            if k == 0:
                raise NbdError(f"NBD server {self.addr.url} closed the connection")
            got += k
        return bytes(buf)

    def _handshake(self) -> tuple[int, int]:
        magic, opt_magic, hflags = struct.unpack(">QQH", self._recv(18))
        if magic != NBDMAGIC or opt_magic != IHAVEOPT:
            raise NbdError(f"{self.addr.url} is not a newstyle NBD server")
        cflags = FLAG_FIXED_NEWSTYLE | (hflags & FLAG_NO_ZEROES)
        self.sock.sendall(struct.pack(">I", cflags))
        name = self.addr.export.encode()
        data = struct.pack(">I", len(name)) + name + struct.pack(">H", 0)
        self.sock.sendall(struct.pack(">QII", IHAVEOPT, OPT_GO, len(data)) + data)
        size = flags = None
        while True:
            rmagic, _opt, rtype, rlen = struct.unpack(">QIII", self._recv(20))
            if rmagic != REPLY_MAGIC:
                raise NbdError(f"bad option reply from {self.addr.url}")
            payload = self._recv(rlen) if rlen else b""
            if rtype & REP_ERR:
                why = payload.decode("utf-8", "replace") or f"error {rtype & ~REP_ERR}"
                raise NbdError(f"NBD server {self.addr.url} refused export "
                               f"'{self.addr.export}': {why}")
            if rtype == REP_INFO and len(payload) >= 12:
                (info_type,) = struct.unpack(">H", payload[:2])
                if info_type == INFO_EXPORT:
                    size, flags = struct.unpack(">QH", payload[2:12])
            elif rtype == REP_ACK:
                break
        if size is None or flags is None:
            raise NbdError(f"NBD server {self.addr.url} sent no export size")
        return size, flags

    def _request(self, cmd: int, offset: int, length: int, data: bytes = b"") -> bytes:
        self._handle += 1
        self.sock.sendall(struct.pack(">IHHQQI", REQUEST_MAGIC, 0, cmd, self._handle, offset,
                                      length) + data)
        if cmd == CMD_DISC:
            return b""
        magic, error, handle = struct.unpack(">IIQ", self._recv(16))
        if magic != SIMPLE_REPLY_MAGIC or handle != self._handle:
            raise NbdError(f"bad reply from NBD server {self.addr.url}")
        if error:
            raise NbdError(f"NBD request failed on {self.addr.url}: "
                           f"{os.strerror(error) if error < 200 else error}")
        return self._recv(length) if cmd == CMD_READ else b""

    # -- commands --------------------------------------------------------------
    @property
    def read_only(self) -> bool:
        return bool(self.flags & TFLAG_READ_ONLY)

    def pread(self, offset: int, length: int) -> bytes:
        out = []
        while length > 0:
            n = min(length, MAX_REQUEST)
            out.append(self._request(CMD_READ, offset, n))
            offset += n
            length -= n
        return b"".join(out)

    def pwrite(self, data: bytes | memoryview, offset: int) -> None:
        view = memoryview(data)
        while len(view):
            n = min(len(view), MAX_REQUEST)
            self._request(CMD_WRITE, offset, n, bytes(view[:n]))
            offset += n
            view = view[n:]

    def zero(self, offset: int, length: int) -> None:
        while length > 0:
            n = min(length, 1 << 30)
            if self.flags & TFLAG_SEND_WRITE_ZEROES:
                self._request(CMD_WRITE_ZEROES, offset, n)
            else:
                self.pwrite(bytes(n), offset)
            offset += n
            length -= n

    def trim(self, offset: int, length: int) -> None:
        if not self.flags & TFLAG_SEND_TRIM:
            raise OperationInvalid(f"NBD export {self.addr.url} does not support trim")
        while length > 0:
            n = min(length, 1 << 30)
            self._request(CMD_TRIM, offset, n)
            offset += n
            length -= n

    def flush(self) -> None:
        if self.flags & TFLAG_SEND_FLUSH:
            self._request(CMD_FLUSH, 0, 0)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self._request(CMD_DISC, 0, 0)
        self.sock.close()

    def __enter__(self) -> NbdClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class NbdServer:
    """qemu-nbd serving one image (or anything ``--image-opts`` describes)."""

    def __init__(self, image: str | None = None, *, fmt: str | None = "raw",
                 image_opts: str | None = None, objects: Sequence[str] = (),
                 socket_path: str | None = None, host: str | None = None,
                 port: int | None = None, export: str = "", read_only: bool = False,
                 shared: int = 8, bitmaps: Sequence[str] = ()) -> None:
        """``bitmaps``: qcow2 persistent dirty bitmaps to offer as NBD meta contexts
        (``qemu:dirty-bitmap:NAME``), which a backup reads to find what changed."""
        if (image is None) == (image_opts is None):
            raise InvalidArgument("an NBD export needs an image or image options")
        self._tmpdir: str | None = None
        if socket_path is None and host is None:
            self._tmpdir = tempfile.mkdtemp(prefix="virtstore-nbd-")
            os.chmod(self._tmpdir, 0o700)
            socket_path = os.path.join(self._tmpdir, "nbd.sock")
        if host is not None and port is None:
            port = _free_port(host)
        self.address = NbdAddress(socket=socket_path, host=host, port=port or 10809,
                                  export=export)
        # Past the host's page cache where the image's filesystem allows it; qemu refuses
        # cache=none on one without O_DIRECT (tmpfs before Linux 6.6, some FUSE), where
        # the client's flushes are what make writes durable.
        cache = "none" if image is None or direct_io_ok(image) else "writeback"
        argv = ["qemu-nbd", "--persistent", f"--shared={shared}", f"--cache={cache}",
                "--aio=threads", f"--export-name={export}"]
        if socket_path is not None:
            argv.append(f"--socket={socket_path}")
        else:
            argv += [f"--bind={host}", f"--port={port}"]
        if read_only:
            argv.append("--read-only")
        for bitmap in bitmaps:
            argv.append(f"--bitmap={bitmap}")
        for obj in objects:
            argv += ["--object", obj]
        if image_opts is not None:
            argv += ["--image-opts", image_opts]
        else:
            assert image is not None
            if fmt:
                argv.append(f"--format={fmt}")
            argv.append(image)
        self.argv = argv
        self._stop = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="qemu-nbd", daemon=True)

    def _run(self) -> None:
        from virtstore.host.runner import stream

        try:
            # stop() waits for the next look at the flag: a short wait, as a pool's df
            # starts and stops an export per volume.
            stream(self.argv, lambda _line: None, should_stop=self._stop.is_set, timeout=None,
                   poll_interval=0.02)
        except BaseException as exc:  # reported by start() or ignored after stop
            self._error = exc

    def start(self, timeout: float = 30.0) -> NbdServer:
        self._thread.start()
        deadline = time.monotonic() + timeout
        # qemu-nbd usually serves within 20-40 ms: look often at first, then every 50 ms.
        pause = 0.005
        while time.monotonic() < deadline:
            if not self._thread.is_alive():
                why = self._error or "qemu-nbd exited"
                self._cleanup()
                raise NbdError(f"qemu-nbd could not serve the image: {why}")
            if self._ready():
                return self
            time.sleep(pause)
            pause = min(2 * pause, 0.05)
        self.stop()
        raise NbdError(f"qemu-nbd did not start serving within {timeout:g}s")

    @property
    def running(self) -> bool:
        return self._thread.is_alive()

    def _ready(self) -> bool:
        # qemu-nbd listens before it opens the image: only a handshake that names the
        # export shows it serving (an image it cannot open makes it exit after listening).
        try:
            NbdClient(self.address, timeout=5).close()
        except (NbdError, OSError):
            return False
        return True

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(30)
        self._cleanup()

    def _cleanup(self) -> None:
        if self._tmpdir is not None:
            import shutil

            shutil.rmtree(self._tmpdir, ignore_errors=True)
            self._tmpdir = None

    def __enter__(self) -> NbdServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @contextlib.contextmanager
    def client(self) -> Iterator[NbdClient]:
        c = NbdClient(self.address)
        try:
            yield c
        finally:
            c.close()


def direct_io_ok(path: str) -> bool:
    """Whether ``path`` (a file or block device here) opens with O_DIRECT; True for what
    is not a local path, which qemu opens with its own drivers."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECT | os.O_CLOEXEC)
    except OSError as exc:
        return exc.errno != errno.EINVAL
    os.close(fd)
    return True


def _free_port(host: str) -> int:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def secret_object(ident: str, value: bytes, fmt: str) -> Iterator[str]:
    """qemu's ``--object`` for a secret, which goes through a file (see secret_file)."""
    with secret_file(value) as path:
        yield f"secret,id={ident},file={path},format={fmt}"


@dataclass
class QemuSource:
    """How qemu opens a volume: a filename (with its format) or ``--image-opts``."""

    image: str | None = None
    fmt: str | None = "raw"
    image_opts: str | None = None
    objects: list[str] = field(default_factory=list)
