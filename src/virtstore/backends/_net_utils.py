"""What the network backends share: pool secrets, and small helpers.

A pool's ``<auth>`` names a secret (by UUID or usage); its value lives in the engine's
secret store, which the engine lends each of its backends through its hooks
(``Backend.secrets()``), so a backend asks ``auth_secret(pool, type, self.secrets())``
when it connects to its server.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, BinaryIO, Protocol

from virtstore.errors import InvalidArgument
from virtstore.xml import PoolDef

if TYPE_CHECKING:
    from virtstore.data.monitor import Monitor

CHUNK = 4 << 20


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


def upload_chunks(source: BinaryIO, name: str, size: int, *, offset: int, length: int | None,
                  sparse: bool, monitor: Monitor, write: Callable[[bytes, int], object],
                  zero: Callable[[int, int], object]) -> None:
    """Copy ``source`` into volume ``name`` of ``size`` bytes from ``offset`` by
    ``write(data, at)``, all-zero chunks by ``zero(at, n)`` when ``sparse``; a source
    larger than the room left, or shorter than ``length``, is refused."""
    from virtstore.backends._block_data import check_range
    from virtstore.data.extents import is_zero

    limit = check_range(size, offset, length, name)
    if length is not None:
        monitor.set_total(length)
    done = 0
    while done < limit:
        data = read_exact(source, min(CHUNK, limit - done))
        if not data:
            break
        if sparse and is_zero(data):
            zero(offset + done, len(data))
        else:
            write(data, offset + done)
        done += len(data)
        monitor.advance(len(data))
    if length is not None and done < length:
        raise InvalidArgument(f"the source ended after {done} of {length} bytes")
    if length is None and read_exact(source, 1):
        raise InvalidArgument(f"the upload is larger than volume '{name}' "
                              f"({size - offset} bytes from offset {offset})")


def clear_chunks(size: int, chunk: int, clear: Callable[[int, int], object],
                 monitor: Monitor) -> None:
    """``clear(offset, n)`` over a whole volume of ``size`` bytes, ``chunk`` at a time (a
    wipe: zeroing or discarding)."""
    monitor.set_total(size)
    for pos in range(0, size, chunk):
        n = min(chunk, size - pos)
        clear(pos, n)
        monitor.advance(n)
