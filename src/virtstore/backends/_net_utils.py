"""What the network backends share: pool secrets, and small helpers.

A pool's ``<auth>`` names a secret (by UUID or usage); its value lives in the engine's
secret store, which the engine lends each of its backends through its hooks
(``Backend.secrets()``), so a backend asks ``auth_secret(pool, type, self.secrets())``
when it connects to its server.
"""

from __future__ import annotations

from typing import BinaryIO, Protocol

from virtstore.errors import InvalidArgument
from virtstore.xml import PoolDef


class SecretLookup(Protocol):
    """Where a backend reads the value of the secret a pool's ``<auth>`` names (the
    engine's secret store, lent through its hooks)."""

    def secret(self, uuid: str | None, usage: str | None, usage_type: str) -> bytes: ...


def auth_secret(pool: PoolDef, auth_type: str,
                secrets: SecretLookup) -> tuple[str, bytes] | None:
    """(username, secret value) of the pool's ``<auth type=auth_type>``, None without auth."""
    auth = pool.source.auth
    if auth is None:
        return None
    if auth.type != auth_type:
        raise InvalidArgument(f"unsupported authentication type '{auth.type}' for "
                              f"'{pool.type}' pools (expected '{auth_type}')")
    usage_type = "ceph" if auth_type == "ceph" else "iscsi"
    value = secrets.secret(auth.secret.uuid, auth.secret.usage, usage_type)
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
