"""Connecting to a Ceph cluster for an rbd pool, as libvirt's rbd backend does.

libvirt reads no ceph.conf: everything comes from the pool XML. The monitors are the
source hosts (``host:port``, IPv6 in brackets), the cephx user and key come from the
pool's ``<auth type='ceph'>`` (the secret's value is the raw key; librados wants it in
base64), timeouts default to 30 s, and ``<rbd:config_opts>`` are applied last, so they
override anything. Connections are cached per settings (a connect costs a round trip
to the monitors and a cephx handshake) and closed when the pool stops.
"""

from __future__ import annotations

import base64
import contextlib
import json
import logging
import os
import struct
import tempfile
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from virtstore.backends._net_utils import SecretLookup, auth_secret
from virtstore.errors import AuthFailed, InvalidArgument, OperationInvalid
from virtstore.xml import AuthSecret, PoolDef, SourceHost

log = logging.getLogger("virtstore")

if TYPE_CHECKING:
    import rados  # type: ignore[import-not-found]

DEFAULT_TIMEOUTS = (("client_mount_timeout", "30"), ("rados_mon_op_timeout", "30"),
                    ("rados_osd_op_timeout", "30"))


@dataclass(frozen=True)
class Settings:
    """Everything needed to reach one rbd pool; hashable, so connections are cached by it."""

    mon_host: str
    user: str | None
    key: str | None  # base64, as librados takes it
    options: tuple[tuple[str, str], ...]
    pool: str
    namespace: str

    @property
    def where(self) -> str:
        return self.mon_host or "(no monitors)"


def split_source_name(name: str | None) -> tuple[str, str]:
    """(RADOS pool, namespace) of ``<source><name>``: ``pool`` or ``pool/namespace``."""
    if not name:
        raise InvalidArgument("missing source pool name for rbd pool")
    pool, _, namespace = name.partition("/")
    return pool, namespace


def mon_host(hosts: list[SourceHost]) -> str:
    parts = []
    for h in hosts:
        host = f"[{h.name}]" if ":" in h.name and not h.name.startswith("[") else h.name
        parts.append(f"{host}:{h.port}" if h.port else host)
    return ",".join(parts)


def valid_cephx_key(raw: bytes) -> bool:
    """A cephx secret: type (u16, 1 = AES), created (u32 s, u32 ns), length (u16) and
    that many bytes, little-endian (what ``ceph-authtool --gen-print-key`` encodes)."""
    if len(raw) < 12:
        return False
    ktype, length = struct.unpack_from("<H", raw, 0)[0], struct.unpack_from("<H", raw, 10)[0]
    return ktype == 1 and length == len(raw) - 12 and length in (16, 32)


def settings(pool: PoolDef, secrets: SecretLookup) -> Settings:
    rados_pool, namespace = split_source_name(pool.source.name)
    creds = auth_secret(pool, "ceph", secrets)
    user = key = None
    if creds is not None:
        user = creds[0]
        if not valid_cephx_key(creds[1]):
            raise AuthFailed(f"the secret of ceph user '{user}' is not a valid cephx key "
                             "(set it to the key of the user's keyring, base64-decoded)")
        key = base64.b64encode(creds[1]).decode("ascii")
    return Settings(mon_host=mon_host(pool.source.hosts), user=user, key=key,
                    options=tuple(pool.rbd_config_opts), pool=rados_pool,
                    namespace=namespace)


# -- the staging name carries the pool's connection (not its secret value) ----------------
STAGING_TAG = "rbd-staging:"


def encode_staging(pool: PoolDef, image: str) -> str:
    auth = pool.source.auth
    data: dict[str, Any] = {
        "hosts": [[h.name, h.port] for h in pool.source.hosts],
        "name": pool.source.name, "opts": pool.rbd_config_opts, "image": image}
    if auth is not None:
        data["auth"] = [auth.type, auth.username, auth.secret.uuid, auth.secret.usage]
    return STAGING_TAG + json.dumps(data, separators=(",", ":"))


def decode_staging(staging: str) -> tuple[PoolDef, str] | None:
    """The pool (enough of it to connect) and image name of a staging name, or None."""
    if not staging.startswith(STAGING_TAG):
        return None
    try:
        data = json.loads(staging[len(STAGING_TAG):])
        from virtstore.xml import Auth, PoolSource

        source = PoolSource(hosts=[SourceHost(name=h, port=p) for h, p in data["hosts"]],
                            name=data["name"])
        if data.get("auth"):
            a_type, a_user, a_uuid, a_usage = data["auth"]
            source.auth = Auth(type=a_type, username=a_user,
                               secret=AuthSecret(uuid=a_uuid, usage=a_usage))
        pool = PoolDef(type="rbd", name="(staging)", source=source,
                       rbd_config_opts=[(str(k), str(v)) for k, v in data.get("opts", [])])
        return pool, str(data["image"])
    except (ValueError, KeyError, TypeError):
        return None


# -- connections ----------------------------------------------------------------------------
_Key = tuple[str, str | None, str | None, tuple[tuple[str, str], ...]]


def _key(s: Settings) -> _Key:
    return (s.mon_host, s.user, s.key, s.options)


@contextlib.contextmanager
def _quiet_stderr() -> Iterator[None]:
    """librados's messenger prints some complaints straight to file descriptor 2 while
    it connects, whatever its log options say (e.g. a monitor port that speaks the
    other protocol version); our stderr carries one-line errors only. What it prints
    goes to our log instead."""
    with tempfile.TemporaryFile() as sink:
        saved = os.dup(2)
        try:
            os.dup2(sink.fileno(), 2)
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            sink.seek(0)
            chatter = sink.read().decode(errors="replace").strip()
            if chatter:
                log.debug("librados: %s", chatter)


class Clusters:
    """Connected cluster handles of one backend instance, by settings: a connection costs
    a monitor round trip and a thread pool, so the pools of one cluster share one."""

    def __init__(self) -> None:
        self._handles: dict[_Key, rados.Rados] = {}
        self._lock = threading.Lock()

    def get(self, s: Settings) -> rados.Rados:
        """A connected cluster handle for these settings."""
        with self._lock:
            handle = self._handles.get(_key(s))
            if handle is None or handle.state != "connected":
                handle = self._handles[_key(s)] = _connect(s)
            return handle

    def forget(self, s: Settings) -> None:
        """Close the connection of these settings (the pool stopped)."""
        with self._lock:
            handle = self._handles.pop(_key(s), None)
        if handle is not None:
            handle.shutdown()

    def close(self) -> None:
        with self._lock:
            handles, self._handles = list(self._handles.values()), {}
        for handle in handles:
            handle.shutdown()

    def ioctx(self, s: Settings, pool: str | None = None,
              namespace: str | None = None) -> rados.Ioctx:
        import rados

        name = pool or s.pool
        try:
            io = self.get(s).open_ioctx(name)
        except rados.ObjectNotFound as exc:
            raise OperationInvalid(f"failed to create the RBD IoCTX. Does the pool '{name}' "
                                   "exist?: No such file or directory") from exc
        except rados.Error as exc:
            raise OperationInvalid(f"failed to open RADOS pool '{name}': {exc}") from exc
        ns = s.namespace if namespace is None else namespace
        if ns:
            io.set_namespace(ns)
        return io


def _connect(s: Settings) -> rados.Rados:
    import rados

    # Failures come back as errors, not as chatter on our stderr (set first: they
    # apply from the next option on).
    conf: dict[str, str] = {"err_to_stderr": "false", "log_to_stderr": "false",
                            "mon_host": s.mon_host}
    if s.key is not None:
        conf["key"] = s.key
        conf["auth_supported"] = "cephx"
    else:
        conf["auth_supported"] = "none"
    # Default features for new images, and timeouts, as libvirt sets them; the pool's
    # own options come last and win.
    conf["rbd_default_format"] = "2"
    for name, value in DEFAULT_TIMEOUTS:
        conf[name] = value
    for name, value in s.options:
        conf[name] = value
    try:
        handle = rados.Rados(rados_id=s.user or "admin", conf=conf)  # no ceph.conf
    except rados.Error as exc:
        raise InvalidArgument(f"failed to configure the RADOS client: {exc}") from exc
    try:
        with _quiet_stderr():
            handle.connect()
    except rados.PermissionDeniedError as exc:
        handle.shutdown()
        raise AuthFailed(f"failed to connect to the RADOS monitor on: {s.where}: "
                         f"authentication failed for user '{s.user}' ({exc})") from exc
    except rados.InvalidArgumentError as exc:
        handle.shutdown()
        if s.key is not None:
            raise AuthFailed(f"failed to connect to the RADOS monitor on: {s.where}: the "
                             f"secret of user '{s.user}' is not a valid cephx key "
                             f"({exc})") from exc
        raise OperationInvalid(f"failed to connect to the RADOS monitor on: "
                               f"{s.where}: {exc}") from exc
    except (rados.Error, OSError) as exc:
        handle.shutdown()
        raise OperationInvalid(f"failed to connect to the RADOS monitor on: "
                               f"{s.where}: {exc}") from exc
    return handle
