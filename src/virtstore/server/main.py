"""``virtstored``: one embedded engine, served on unix sockets and optionally HTTPS."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import signal
import socket
import ssl
import sys
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

from virtstore import open_connection
from virtstore.errors import InvalidArgument, VirtstoreError
from virtstore.server.auth import Authenticator, new_token, write_token_file
from virtstore.server.config import Options, load, parse_listen
from virtstore.server.http import Limits
from virtstore.server.listen import Listener, Server

if TYPE_CHECKING:
    from virtstore.api.embedded import EmbeddedConnection
    from virtstore.engine.cluster import ClusterConfig
    from virtstore.server.app import App

log = logging.getLogger("virtstored")

# On stop, how long requests being handled get to finish (new connections are refused).
DRAIN_TIMEOUT = 10.0


def _setup_logging(level: str) -> None:
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(getattr(logging, level.upper(), logging.INFO))


def _bind_unix(path: str, mode: int) -> socket.socket:
    """A listening unix socket at ``path`` with ``mode`` from its first moment."""
    if os.path.lexists(path):
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(path)
        except OSError:
            os.unlink(path)  # a socket left by a daemon that died
        else:
            raise InvalidArgument(f"another virtstored is serving '{path}'")
        finally:
            probe.close()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(0o777 & ~mode)
    try:
        sock.bind(path)
    finally:
        os.umask(old)
    os.chmod(path, mode)
    sock.listen(128)
    return sock


def _tls_context(opts: Options) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    assert opts.tls_cert and opts.tls_key
    ctx.load_cert_chain(opts.tls_cert, opts.tls_key)
    if opts.tls_ca:
        ctx.load_verify_locations(opts.tls_ca)
        ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


def _bind_tcp(value: str, ctx: ssl.SSLContext | None) -> Listener:
    """A TCP listener: TLS with ``ctx``, plain HTTP (the loopback web listener) without."""
    host, port = parse_listen(value)
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    family, _, _, _, addr = infos[0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(addr)
    sock.listen(128)
    bound = sock.getsockname()
    shown = f"[{bound[0]}]" if family == socket.AF_INET6 else bound[0]
    scheme = "http" if ctx is None else "https"
    return Listener(sock, "tcp", f"{scheme}://{shown}:{bound[1]}", ctx)


def _web_tokens(run_dir: str, auth: Authenticator) -> str:
    """Fresh login tokens for the web page at each start (read-write and read-only), in
    root-only files beside the sockets: whoever can read them is root already, as for
    the read-write socket. Returns the read-write file's path."""
    paths = {}
    for role, name in (("rw", "web-token"), ("ro", "web-token-ro")):
        token = new_token()
        paths[role] = os.path.join(run_dir, name)
        write_token_file(paths[role], token)
        auth.add_token(token, role, "web" if role == "rw" else "web-ro")
    return paths["rw"]


@contextlib.contextmanager
def _pid_lock(run_dir: str) -> Iterator[int]:
    """One daemon per state root: an flock on run/virtstored.pid."""
    path = os.path.join(run_dir, "virtstored.pid")
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno in (errno.EAGAIN, errno.EACCES):
                raise InvalidArgument(f"another virtstored holds '{path}'") from None
            raise
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        try:
            yield fd
        finally:
            # Still holding the lock: no other daemon can have written it since.
            with contextlib.suppress(OSError):
                os.unlink(path)
    finally:
        os.close(fd)


def _notify_systemd() -> None:
    addr = os.environ.get("NOTIFY_SOCKET")
    if not addr:
        return
    if addr.startswith("@"):
        addr = "\0" + addr[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
            s.connect(addr)
            s.send(b"READY=1")
    except OSError as exc:
        log.warning("could not notify systemd: %s", exc)


def _cluster_config(opts: Options) -> ClusterConfig | None:
    from virtstore.engine.cluster import ClusterConfig

    if not opts.cluster:
        return None
    return ClusterConfig.parse(opts.cluster, member=opts.cluster_member, ttl=opts.cluster_ttl)


def serve(opts: Options) -> None:
    from virtstore.api.embedded import EmbeddedConnection
    from virtstore.engine.confine import Confinement
    from virtstore.server.app import App
    from virtstore.server.auth import load_tokens
    from virtstore.server.openapi import document_bytes
    from virtstore.server.workers import default_workers
    from virtstore.types import default_root

    root = os.path.abspath(opts.root or default_root())
    rw_path, ro_path = opts.socket_paths(root)
    run_dir = os.path.dirname(rw_path)
    os.makedirs(run_dir, mode=0o755, exist_ok=True)
    tokens = {}
    if opts.tokens:
        try:
            tokens = load_tokens(opts.tokens)
        except OSError as exc:
            raise InvalidArgument(f"cannot read tokens file '{opts.tokens}': "
                                  f"{exc.strerror or exc}") from None
    ctx = _tls_context(opts) if opts.listen else None
    workers = opts.workers or default_workers()
    cluster = _cluster_config(opts)
    with _pid_lock(run_dir) as lock_fd:
        # The engine recovers its journal and starts the autostart pools as it opens.
        log.info("opening the engine on %s", root)
        # Confined: the daemon acts for callers who may not own the host's files.
        confinement = Confinement.daemon(opts.backing_roots)
        conn: EmbeddedConnection | None = EmbeddedConnection(
            root, confinement=confinement, cluster=cluster, default_pool=True,
            connect=open_connection)
        if workers > 1:
            # Each worker opens its own: no SQLite connection may cross a fork.
            assert conn is not None
            conn.close()
            conn = None
        listeners: list[Listener] = []
        summary = "stopped"
        try:
            listeners.append(Listener(_bind_unix(rw_path, 0o600), "unix-rw",
                                      f"unix://{rw_path}"))
            listeners.append(Listener(_bind_unix(ro_path, 0o666), "unix-ro",
                                      f"unix://{ro_path}"))
            if opts.listen:
                assert ctx is not None
                listeners.append(_bind_tcp(opts.listen, ctx))
                if not tokens:
                    log.warning("no tokens configured: every request over TCP will be "
                                "refused (401)")
            auth = Authenticator(tokens, redeemed_dir=os.path.join(run_dir, "tickets"))
            web_note = ""
            if opts.web:
                listeners.append(_bind_tcp(opts.web, None))
                web_note = f" (log in with the token in {_web_tokens(run_dir, auth)})"
            assert opts.rw_reserve is not None  # load() sets it
            limits = Limits(total=opts.max_connections, rw_reserve=opts.rw_reserve,
                            ro=opts.max_connections_ro, tcp=opts.max_connections_tcp,
                            per_peer=opts.max_connections_per_peer,
                            head_timeout=opts.head_timeout)

            def make_app(engine: EmbeddedConnection) -> App:
                return App(engine, auth, document_bytes,
                           remote_pool_roots=opts.remote_pool_roots,
                           move_targets=opts.move_targets)

            for lst in listeners:
                log.info("listening on %s (%s)", lst.label, lst.kind)
            if opts.web:
                log.info("web page: %s/%s", listeners[-1].label, web_note)
            if conn is not None:
                summary = _serve_here(conn, make_app(conn), listeners, limits)
            else:
                from virtstore.engine.secrets import SharedEphemeralSecrets

                shared_secrets = SharedEphemeralSecrets()
                summary = _serve_workers(workers, lambda: EmbeddedConnection(
                    root, confinement=confinement, cluster=cluster,
                    ephemeral_secrets=shared_secrets, connect=open_connection),
                    make_app, listeners, limits, lock_fd)
        finally:
            for lst in listeners:
                lst.sock.close()
            for path in (rw_path, ro_path):
                with contextlib.suppress(OSError):
                    os.unlink(path)
            if conn is not None:
                conn.close()
    log.info("%s", summary)


def _stop_serving(server: Server, engine: EmbeddedConnection) -> tuple[int, int, int]:
    """After the accept loop ended: let requests finish, end every connection (event
    streams too), then let the jobs run for clients finish or cancel them, so that none
    is left half done under its final name. (requests cut short, connections closed,
    jobs cancelled)"""
    for lst in server.listeners:
        lst.sock.close()
    left = server.drain(DRAIN_TIMEOUT)
    closed = server.close_connections(DRAIN_TIMEOUT, engine.stop_waiting)
    cancelled = engine.stop_jobs(DRAIN_TIMEOUT)
    return left, closed, cancelled


def _stop_on_signals(stop: Callable[[], None]) -> Callable[[], str]:
    """SIGTERM and SIGINT call ``stop``; what stopped the server, for the last log line."""
    stopped_by: list[int] = []

    def on_signal(signum: int, frame: object) -> None:
        stopped_by.append(signum)
        stop()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    return lambda: f"signal {signal.Signals(stopped_by[0]).name}" if stopped_by else "request"


def _serve_here(engine: EmbeddedConnection, app: App, listeners: list[Listener],
                limits: Limits) -> str:
    """One process: this one accepts and serves. Returns the line to log at the end."""
    server = Server(app, listeners, limits=limits)
    engine.follow_cluster_pools()
    how = _stop_on_signals(server.shutdown)
    _notify_systemd()
    server.serve_forever()
    left, closed, cancelled = _stop_serving(server, engine)
    summary = (f"stopped on {how()}: {closed} connection(s) closed, "
               f"{cancelled} job(s) cancelled")
    return summary + (f", {left} request(s) cut short" if left else "")


def _serve_workers(workers: int, open_engine: Callable[[], EmbeddedConnection],
                   make_app: Callable[[EmbeddedConnection], App],
                   listeners: list[Listener], limits: Limits, lock_fd: int) -> str:
    """Pre-forked workers accept on the inherited sockets; this process supervises.
    Returns the line to log at the end."""
    from virtstore.server.workers import SharedCounts, Supervisor

    counts = SharedCounts(limits, workers)

    def work(slot: int) -> None:
        os.close(lock_fd)  # the supervisor alone holds the one-daemon lock
        engine = open_engine()
        if slot == 0:  # one follower of the cluster's pools per daemon
            engine.follow_cluster_pools()
        try:
            server = Server(make_app(engine), listeners, limits=limits, counts=counts)
            signal.signal(signal.SIGTERM, lambda _s, _f: server.shutdown())
            signal.signal(signal.SIGINT, signal.SIG_IGN)  # the supervisor passes it on
            server.serve_forever()
            left, closed, cancelled = _stop_serving(server, engine)
            log.debug("worker %d stopped: %d connection(s) closed, %d job(s) cancelled, "
                      "%d request(s) cut short", slot, closed, cancelled, left)
        finally:
            engine.close()

    # Long enough for a worker's drain, connections and jobs.
    sup = Supervisor(workers, work, counts, grace=3 * DRAIN_TIMEOUT + 2)
    how = _stop_on_signals(sup.stop)
    log.info("serving with %d worker processes", workers)
    _notify_systemd()
    sup.run()
    return f"stopped on {how()}: {workers} worker process(es) stopped"


def main(argv: list[str] | None = None) -> int:
    try:
        opts = load(argv)
    except VirtstoreError as exc:
        sys.stderr.write(f"virtstored: {exc}\n")
        return 2
    _setup_logging(opts.log_level)
    try:
        serve(opts)
    except VirtstoreError as exc:
        log.error("%s", exc)
        return 1
    except (OSError, ssl.SSLError) as exc:
        log.error("cannot start: %s", exc)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
