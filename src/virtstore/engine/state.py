"""The engine's state root: where definitions, secrets and the database live.

Layout under the root (``--root`` / VIRTSTORE_ROOT):
    pools/NAME.xml             persistent pool definitions (libvirt XML)
    pools/autostart/NAME.xml   autostart marks (symlinks, as libvirt keeps them)
    secrets/UUID.xml, .base64  secret definitions and values, root-only
    state.db                   SQLite: pool runtime state, volume index, journal
    images/                    the default pool's directory
"""

from __future__ import annotations

import functools
import os

from virtstore.engine.store import Store
from virtstore.errors import InternalError, NoSuchPool, VirtstoreError
from virtstore.host import files
from virtstore.types import record, replace

TYPE_CHECKING = False
if TYPE_CHECKING:
    import sqlite3
    from collections.abc import Callable

    from virtstore.engine.hooks import Backends
    from virtstore.engine.secrets import SecretStore
    from virtstore.xml import PoolDef


def _warn(msg: str, *args: object) -> None:
    # logging (with traceback, string, weakref) is imported only when there is
    # something to say: most commands never log.
    import logging

    logging.getLogger("virtstore").warning(msg, *args)


@record(frozen=True)
class PoolRow:
    name: str
    uuid: str
    type: str
    persistent: bool
    active: bool
    live_xml: str | None
    target_path: str | None

    @classmethod
    def from_row(cls, row: sqlite3.Row) -> PoolRow:
        return cls(row["name"], row["uuid"], row["type"], bool(row["persistent"]),
                   bool(row["active"]), row["live_xml"], row["target_path"])


@functools.lru_cache(maxsize=64)
def _parse_live(xml: str) -> PoolDef:
    # Every volume operation needs its pool's live definition: parse each text once.
    from virtstore.xml import parse_pool_xml

    return parse_pool_xml(xml)


class StateRoot:
    def __init__(self, root: str) -> None:
        self.root = os.path.abspath(root)
        self.pools_dir = os.path.join(self.root, "pools")
        self.autostart_dir = os.path.join(self.pools_dir, "autostart")
        self.secrets_dir = os.path.join(self.root, "secrets")
        self.images_dir = os.path.join(self.root, "images")
        try:
            files.ensure_dir(self.root)
            files.ensure_dir(self.autostart_dir)
            files.ensure_dir(self.secrets_dir, 0o700, exact=True)
        except OSError as exc:
            raise InternalError(f"cannot use state root '{self.root}': "
                                f"{exc.strerror or exc}") from exc
        self.store = Store(os.path.join(self.root, "state.db"))
        # What lends the backends the pools' auth secrets (set by the connection).
        self.secret_source: Callable[[], SecretStore] | None = None

    @functools.cached_property
    def backend(self) -> Backends:
        """This engine's backends, one per pool, bound to its journal and store; made on
        first use, so that commands which never reach a backend do not import them."""
        from virtstore.engine.hooks import Backends

        backends = Backends(self.store)
        backends.hooks.secret_store = self.secret_source
        return backends

    # -- pool definitions on disk ----------------------------------------------
    def def_path(self, name: str) -> str:
        return os.path.join(self.pools_dir, name + ".xml")

    def autostart_path(self, name: str) -> str:
        return os.path.join(self.autostart_dir, name + ".xml")

    def read_def_file(self, name: str) -> PoolDef:
        data = files.read_bytes(self.def_path(name))
        if data is None:
            raise NoSuchPool(f"Storage pool not found: no storage pool with matching "
                             f"name '{name}'")
        from virtstore.xml import parse_pool_xml

        return parse_pool_xml(data)

    def write_def_file(self, pool: PoolDef) -> None:
        from virtstore.host.files import atomic_write
        from virtstore.xml import format_pool_xml

        atomic_write(self.def_path(pool.name), format_pool_xml(pool, inactive=True), 0o600)

    def remove_def_file(self, name: str) -> None:
        from virtstore.host.files import remove_quietly

        for path in (self.autostart_path(name), self.def_path(name)):
            remove_quietly(path)

    def is_autostart(self, name: str) -> bool:
        return os.path.lexists(self.autostart_path(name))

    def set_autostart(self, name: str, on: bool) -> None:
        link = self.autostart_path(name)
        if on:
            files.link_to(os.path.join("..", name + ".xml"), link)
        else:
            from virtstore.host.files import remove_quietly

            remove_quietly(link)

    def def_file_names(self) -> set[str]:
        return {n[:-4] for n in files.entries(self.pools_dir)
                if n.endswith(".xml") and not n.startswith(".")}

    # -- pool rows --------------------------------------------------------------
    def row(self, name: str) -> PoolRow:
        r = self.store.query_one("SELECT * FROM pools WHERE name=?", (name,))
        if r is None:
            raise NoSuchPool(f"Storage pool not found: no storage pool with matching "
                             f"name '{name}'")
        return PoolRow.from_row(r)

    def rows(self) -> list[PoolRow]:
        return [PoolRow.from_row(r) for r in self.store.query("SELECT * FROM pools ORDER BY name")]

    def definition(self, row: PoolRow, *, inactive: bool = False) -> PoolDef:
        """The definition in effect (live while active), or the persistent one if asked."""
        if row.active and row.live_xml and not (inactive and row.persistent):
            # A copy: callers may fill in sizes; the parse itself is cached.
            return replace(_parse_live(row.live_xml))
        if row.persistent:
            return self.read_def_file(row.name)
        if row.live_xml:
            from virtstore.xml import parse_pool_xml

            return parse_pool_xml(row.live_xml)
        raise InternalError(f"pool '{row.name}' has no definition")

    def sync_definitions(self) -> None:
        """Take in definition files added or removed behind our back (or by libvirt tools)."""
        files = self.def_file_names()
        rows = {r.name: r for r in self.rows()}
        missing = [n for n in files if n not in rows]
        gone = [r for r in rows.values() if r.persistent and r.name not in files]
        if not missing and not gone:
            return
        with self.store.write() as db:
            for name in missing:
                try:
                    pool = self.read_def_file(name)
                except VirtstoreError as exc:
                    _warn("ignoring pool definition %s: %s", self.def_path(name), exc)
                    continue
                if pool.name != name or not pool.uuid:
                    _warn("ignoring pool definition %s: name or uuid does not match "
                                "its file", self.def_path(name))
                    continue
                db.execute("INSERT OR IGNORE INTO pools(name, uuid, type, persistent, active, "
                           "target_path) VALUES(?,?,?,1,0,?)",
                           (name, pool.uuid, pool.type, pool.target.path))
            for r in gone:
                if r.active:
                    db.execute("UPDATE pools SET persistent=0 WHERE name=?", (r.name,))
                else:
                    db.execute("DELETE FROM pools WHERE name=?", (r.name,))
                    db.execute("DELETE FROM volumes WHERE pool=?", (r.name,))
