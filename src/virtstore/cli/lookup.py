"""virsh's rules for naming a pool or a volume on the command line."""

from __future__ import annotations

from virtstore.cli.context import failing
from virtstore.errors import InvalidArgument, NoSuchPool, NoSuchVolume, VirtstoreError

TYPE_CHECKING = False
if TYPE_CHECKING:
    from virtstore.api import Connection, PoolInfo, VolumeInfo


def pool_info(conn: Connection, ident: str) -> PoolInfo:
    """A pool given by name or by UUID: the name is tried first."""
    with failing(f"failed to get pool '{ident}'"):
        return _pool_info(conn, ident)


def _pool_info(conn: Connection, ident: str) -> PoolInfo:
    try:
        return conn.pool_info(ident)
    except NoSuchPool as by_name:
        try:
            name = conn.pool_lookup_by_uuid(ident)
        except (NoSuchPool, InvalidArgument):
            raise by_name from None
        return conn.pool_info(name)


def pool_name(conn: Connection, ident: str) -> str:
    return pool_info(conn, ident).name


def volume(conn: Connection, ident: str, pool: str | None = None, *,
           pool_option: str | None = "pool") -> VolumeInfo:
    """A volume given by name (with ``--pool``), by key or by path.

    With a pool, the name is tried in that pool first, then the key and the path,
    and a volume found by key or path must belong to that pool. ``pool_option`` names
    the option that would have helped, for virsh's message when none was given.
    """
    if pool is not None:
        # The common case in one query, without the pool's sizes (and its backend): the
        # pool named by its name, the volume by its name. Anything else takes the way
        # below, which gives virsh's answer and messages.
        try:
            return conn.volume_info(pool, ident)
        except VirtstoreError:
            pass
    pool_name = pool_info(conn, pool).name if pool is not None else None
    hint = f", specifying --{pool_option} might help" if pool is None and pool_option else ""
    with failing(f"failed to get vol '{ident}'{hint}"):
        return _volume(conn, ident, pool_name)


def _volume(conn: Connection, ident: str, pool: str | None) -> VolumeInfo:
    if pool is not None:
        try:
            return conn.volume_info(pool, ident)
        except NoSuchVolume:
            pass
        try:
            found = conn.volume_by_path_or_key(ident)
        except NoSuchVolume:
            raise NoSuchVolume(f"Storage volume not found: no storage vol with matching "
                               f"name, key or path '{ident}' in pool '{pool}'") from None
        if found.pool != pool:
            raise NoSuchVolume(f"Requested volume '{ident}' is not in pool '{pool}'")
        return found
    try:
        return conn.volume_by_path_or_key(ident)
    except NoSuchVolume:
        raise NoSuchVolume(f"Storage volume not found: no storage vol with matching key or "
                           f"path '{ident}' (a volume name needs --pool)") from None
