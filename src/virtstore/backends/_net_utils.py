"""What the network backends share: pool secrets, and small helpers.

Secrets. A pool's ``<auth>`` names a secret (by UUID or usage); its value lives in the
engine's SecretStore. Backends are shared by every connection of a process, so the
engine registers its SecretStore here when a connection opens (``register_secrets``)
and a backend asks ``auth_secret(pool)`` when it connects to its server. Stores are
held by weak reference: a closed, forgotten connection drops out by itself.
"""

from __future__ import annotations

import threading
import weakref
from typing import BinaryIO, Protocol

from virtstore.errors import AuthFailed, InvalidArgument, NoSuchSecret
from virtstore.xml import PoolDef


class SecretSource(Protocol):
    def lookup_by_usage(self, usage_type: str, usage_id: str) -> str: ...

    def get_value(self, uuid: str, *, internal: bool = False) -> bytes: ...


_sources: list[weakref.ref[SecretSource]] = []
_sources_lock = threading.Lock()


def register_secrets(store: SecretSource) -> None:
    """Make ``store``'s secrets available to the backends (newest store asked first)."""
    with _sources_lock:
        _sources[:] = [r for r in _sources if r() is not None and r() is not store]
        _sources.insert(0, weakref.ref(store))


def unregister_secrets(store: SecretSource) -> None:
    with _sources_lock:
        _sources[:] = [r for r in _sources if r() is not None and r() is not store]


def secret_value(uuid: str | None, usage: str | None, usage_type: str) -> bytes:
    """The value of the secret a pool's auth refers to, from any registered store."""
    with _sources_lock:
        stores = [s for s in (r() for r in _sources) if s is not None]
    if not stores:
        raise AuthFailed("no secret store is available to read the pool's auth secret")
    last: Exception | None = None
    for store in stores:
        try:
            key = uuid if uuid else store.lookup_by_usage(usage_type, usage or "")
            return store.get_value(key, internal=True)
        except NoSuchSecret as exc:
            last = exc
    what = f"uuid '{uuid}'" if uuid else f"usage '{usage}'"
    raise NoSuchSecret(f"no secret with {what} for the pool's authentication"
                       + (f": {last}" if last else ""))


def auth_secret(pool: PoolDef, auth_type: str) -> tuple[str, bytes] | None:
    """(username, secret value) of the pool's ``<auth type=auth_type>``, None without auth."""
    auth = pool.source.auth
    if auth is None:
        return None
    if auth.type != auth_type:
        raise InvalidArgument(f"unsupported authentication type '{auth.type}' for "
                              f"'{pool.type}' pools (expected '{auth_type}')")
    usage_type = "ceph" if auth_type == "ceph" else "iscsi"
    value = secret_value(auth.secret.uuid, auth.secret.usage, usage_type)
    return auth.username, value


def fold_ino(ino: int) -> int:
    """An inode number as the index stores it (SQLite integers are signed 64-bit; FUSE and
    NFS servers hand out unsigned 64-bit inode numbers)."""
    return ino & ((1 << 63) - 1)


def read_exact(src: BinaryIO, n: int) -> bytes:
    """Up to ``n`` bytes of ``src``, fewer only at its end."""
    parts: list[bytes] = []
    got = 0
    while got < n:
        data = src.read(n - got)
        if not data:
            break
        parts.append(data)
        got += len(data)
    return b"".join(parts)
