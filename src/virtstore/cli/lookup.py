"""virsh's rules for naming a pool or a volume on the command line."""

from __future__ import annotations

from typing import TYPE_CHECKING

from virtstore.errors import InvalidArgument, NoSuchPool, NoSuchVolume

if TYPE_CHECKING:
    from virtstore.api import Connection, PoolInfo, VolumeInfo


def pool_info(conn: Connection, ident: str) -> PoolInfo:
    """A pool given by name or by UUID: the name is tried first."""
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


def volume(conn: Connection, ident: str, pool: str | None = None) -> VolumeInfo:
    """A volume given by name (with ``--pool``), by key or by path.

    With a pool, the name is tried in that pool first, then the key and the path,
    and a volume found by key or path must belong to that pool.
    """
    if pool is not None:
        pinfo = pool_info(conn, pool)
        try:
            return conn.volume_info(pinfo.name, ident)
        except NoSuchVolume:
            pass
        try:
            found = conn.volume_by_path_or_key(ident)
        except NoSuchVolume:
            raise NoSuchVolume(f"no storage vol with matching name, key or path '{ident}' "
                               f"in pool '{pinfo.name}'") from None
        if found.pool != pinfo.name:
            raise NoSuchVolume(f"Requested volume '{ident}' is not in pool '{pinfo.name}'")
        return found
    try:
        return conn.volume_by_path_or_key(ident)
    except NoSuchVolume:
        raise NoSuchVolume(f"no storage vol with matching key or path '{ident}' "
                           "(a volume name needs --pool)") from None
