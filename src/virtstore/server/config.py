"""virtstored's options: command line over the config file over the defaults.

The config file (``/etc/virtstore/virtstored.conf`` unless ``--config``) is TOML, or
plain ``key = value`` lines with ``#`` comments; keys are the long options' names
(``listen``, ``tls_cert``, ``tls-cert``, ...).
"""

from __future__ import annotations

import argparse
import os
import tomllib
from dataclasses import dataclass, field, fields
from typing import Any
from urllib.parse import urlsplit

from virtstore.errors import InvalidArgument

CONFIG_FILE = "/etc/virtstore/virtstored.conf"
TOKENS_FILE = "/etc/virtstore/tokens"
RW_SOCKET = "virtstored.sock"
RO_SOCKET = "virtstored-ro.sock"


@dataclass
class Options:
    root: str | None = None
    socket_dir: str | None = None  # default ROOT/run
    listen: str | None = None  # HOST:PORT, TLS
    # HOST:PORT on loopback, plain HTTP: the web page (and the API) for this host's user
    web: str | None = None
    tls_cert: str | None = None
    tls_key: str | None = None
    tls_ca: str | None = None  # clients must present a certificate signed by it
    tokens: str | None = None
    max_connections: int = 256  # every listener together
    rw_reserve: int | None = None  # of max_connections, for the read-write socket alone;
    # default an eighth
    max_connections_ro: int = 128
    max_connections_tcp: int = 128
    max_connections_per_peer: int = 32  # per uid (read-only socket), per address (TCP)
    head_timeout: float = 20.0  # seconds for a request's whole head
    workers: int | None = None  # processes serving requests; default one per processor
    log_level: str = "info"
    # Where remote (TCP) callers may put file pools; none: nowhere.
    remote_pool_roots: list[str] = field(default_factory=list)
    # Directories whose files may be backing files though no pool holds them.
    backing_roots: list[str] = field(default_factory=list)
    # The https:// URIs remote (TCP) callers may name as vol-move targets: the daemon
    # goes there with its own credentials, so a caller must not pick the host.
    move_targets: list[str] = field(default_factory=list)
    # The etcd cluster this host is a member of (docs/cluster.md): endpoints
    # "http://HOST:PORT,..." (a TOML array in the file), the member's name (default the
    # host name) and the lease TTL in seconds.
    cluster: str | None = None
    cluster_member: str | None = None
    cluster_ttl: int = 10

    def socket_paths(self, root: str) -> tuple[str, str]:
        d = self.socket_dir or os.path.join(root, "run")
        return os.path.join(d, RW_SOCKET), os.path.join(d, RO_SOCKET)


def parse_args(argv: list[str] | None) -> tuple[argparse.Namespace, argparse.ArgumentParser]:
    p = argparse.ArgumentParser(
        prog="virtstored",
        description="virtstore's daemon: the storage API over HTTP on unix sockets "
                    "(and optionally TLS on TCP).")
    p.add_argument("--config", help=f"config file (default {CONFIG_FILE} if it exists)")
    p.add_argument("--root", help="state root (default: $VIRTSTORE_ROOT, /var/lib/virtstore "
                   "as root)")
    p.add_argument("--socket-dir", help="directory of the unix sockets (default ROOT/run)")
    p.add_argument("--listen", metavar="HOST:PORT", help="also serve HTTPS on this address")
    p.add_argument("--web", metavar="HOST:PORT", help="also serve the web page and the API "
                   "over plain HTTP on this loopback address (e.g. 127.0.0.1:8080); its "
                   "login tokens are written to RUN/web-token and RUN/web-token-ro")
    p.add_argument("--tls-cert", help="server certificate (PEM) for --listen")
    p.add_argument("--tls-key", help="server private key (PEM) for --listen")
    p.add_argument("--tls-ca", help="require client certificates signed by this CA")
    p.add_argument("--tokens", help=f"bearer tokens file, 'TOKEN ro|rw [NAME]' lines "
                   f"(default {TOKENS_FILE} if it exists)")
    p.add_argument("--max-connections", type=int,
                   help="concurrent connections, every listener together (256)")
    p.add_argument("--rw-reserve", type=int, help="of --max-connections, how many only the "
                   "read-write socket may use (an eighth)")
    p.add_argument("--max-connections-ro", type=int,
                   help="concurrent connections on the read-only socket (128)")
    p.add_argument("--max-connections-tcp", type=int,
                   help="concurrent connections over TCP (128)")
    p.add_argument("--max-connections-per-peer", type=int, help="concurrent connections per "
                   "uid on the read-only socket and per address over TCP (32)")
    p.add_argument("--workers", type=int, metavar="N", help="processes serving requests "
                   "(default: one per processor the daemon may run on)")
    p.add_argument("--head-timeout", type=float, metavar="SECONDS",
                   help="time for a request's whole head to arrive (20)")
    p.add_argument("--log-level", choices=("debug", "info", "warning", "error"))
    p.add_argument("--remote-pool-root", dest="remote_pool_roots", action="append",
                   metavar="DIR", help="remote (TCP) callers may define file pools under "
                   "DIR (repeatable; default: nowhere)")
    p.add_argument("--backing-root", dest="backing_roots", action="append", metavar="DIR",
                   help="files under DIR may be backing files of volumes (repeatable; "
                   "default: only volumes of defined pools)")
    p.add_argument("--move-target", dest="move_targets", action="append", metavar="URI",
                   help="remote (TCP) callers may move volumes to the virtstored at this "
                   "https:// URI (repeatable; default: nowhere)")
    p.add_argument("--cluster", metavar="URL,...", help="etcd endpoints of the cluster this "
                   "host is a member of (default: none, a host alone)")
    p.add_argument("--cluster-member", metavar="NAME", help="this member's name in the "
                   "cluster (default: the host name)")
    p.add_argument("--cluster-ttl", type=int, metavar="SECONDS",
                   help="how long this member's leases outlive it (default 10)")
    return p.parse_args(argv), p


def _strings(path: str, key: str, value: Any, what: str) -> list[str]:
    """A TOML array of strings, or a comma-separated string."""
    if isinstance(value, str):
        value = [v.strip() for v in value.split(",") if v.strip()]
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise InvalidArgument(f"{path}: '{key}' must be a list of {what}")
    return value


def _dir_list(path: str, key: str, value: Any) -> list[str]:
    """A list of absolute directories."""
    value = _strings(path, key, value, "directories")
    for v in value:
        if not os.path.isabs(v):
            raise InvalidArgument(f"{path}: '{key}': '{v}' is not an absolute path")
    return [os.path.normpath(v) for v in value]


def _uri_list(path: str, key: str, value: Any) -> list[str]:
    """A list of https:// URIs, compared by scheme, host and port."""
    out = []
    for v in _strings(path, key, value, "https:// URIs"):
        parts = urlsplit(v)
        if parts.scheme != "https" or not parts.hostname:
            raise InvalidArgument(f"{path}: '{key}': '{v}' is not an https://HOST:PORT URI")
        out.append(f"https://{parts.netloc.lower()}")
    return out


def _plain(text: str, path: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for lineno, line in enumerate(text.splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        key, eq, value = line.partition("=")
        if not eq:
            raise InvalidArgument(f"{path}:{lineno}: expected 'key = value'")
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
            value = value[1:-1]
        out[key.strip()] = value
    return out


def read_config(path: str) -> dict[str, Any]:
    with open(path, encoding="utf-8") as fh:
        text = fh.read()
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError:
        return _plain(text, path)


def load(argv: list[str] | None = None) -> Options:
    ns, _ = parse_args(argv)
    opts = Options()
    known = {f.name: f for f in fields(Options)}
    path = ns.config or (CONFIG_FILE if os.path.exists(CONFIG_FILE) else None)
    if path is not None:
        try:
            conf = read_config(path)
        except OSError as exc:
            raise InvalidArgument(f"cannot read config file '{path}': "
                                  f"{exc.strerror or exc}") from None
        for key, value in conf.items():
            name = key.replace("-", "_")
            if name not in known:
                raise InvalidArgument(f"{path}: unknown option '{key}'")
            kind = str(known[name].type).removesuffix(" | None")
            if kind in ("int", "float"):
                try:
                    if isinstance(value, bool):
                        raise TypeError
                    value = int(value) if kind == "int" else float(value)
                except (TypeError, ValueError):
                    raise InvalidArgument(f"{path}: {name} must be "
                                          f"{'an integer' if kind == 'int' else 'a number'}") \
                        from None
            elif name in ("remote_pool_roots", "backing_roots"):
                value = _dir_list(path, key, value)
            elif name == "move_targets":
                value = _uri_list(path, key, value)
            elif name == "cluster" and isinstance(value, list):
                value = ",".join(str(v) for v in value)
            elif not isinstance(value, str):
                raise InvalidArgument(f"{path}: '{key}' must be a string")
            setattr(opts, name, value)
    for name in known:
        value = getattr(ns, name, None)
        if value is not None:
            setattr(opts, name, value)
    if opts.tokens is None and os.path.exists(TOKENS_FILE):
        opts.tokens = TOKENS_FILE
    for name in ("remote_pool_roots", "backing_roots"):
        setattr(opts, name, _dir_list("command line", name, getattr(opts, name)))
    opts.move_targets = _uri_list("command line", "move_targets", opts.move_targets)
    for name in ("max_connections", "max_connections_ro", "max_connections_tcp",
                 "max_connections_per_peer"):
        if getattr(opts, name) < 1:
            raise InvalidArgument(f"{name} must be at least 1")
    if opts.rw_reserve is None:
        opts.rw_reserve = min(opts.max_connections - 1, max(1, opts.max_connections // 8))
    if not 0 <= opts.rw_reserve < opts.max_connections:
        raise InvalidArgument("rw_reserve must be at least 0 and less than max_connections")
    if opts.workers is not None and not 1 <= opts.workers <= 256:
        raise InvalidArgument("workers must be at least 1 and at most 256")
    if not 0 < opts.head_timeout <= 3600:  # also refuses NaN
        raise InvalidArgument("head_timeout must be more than 0 and at most 3600 seconds")
    if opts.listen and not (opts.tls_cert and opts.tls_key):
        raise InvalidArgument("--listen needs --tls-cert and --tls-key: TCP is served over "
                              "TLS only")
    if opts.web:
        check_loopback(opts.web)
    return opts


def check_loopback(value: str) -> None:
    """Plain HTTP carries bearer tokens in the clear: only on this host's loopback."""
    import ipaddress

    host, _ = parse_listen(value)
    try:
        loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if not loopback:
        raise InvalidArgument(f"--web serves plain HTTP: it binds a loopback address only "
                              f"(127.0.0.1, ::1), not '{host}'; use --listen with TLS for "
                              "other hosts")


def parse_listen(value: str) -> tuple[str, int]:
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or not host:
        raise InvalidArgument(f"--listen expects HOST:PORT, not '{value}'")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    n = int(port)
    if n > 65535:
        raise InvalidArgument(f"port {n} out of range")
    return host, n
