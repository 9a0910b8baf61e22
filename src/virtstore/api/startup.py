"""What an engine process does first on a state root: recover what dead processes
left, sync definitions, offer the default pool, autostart after a boot."""

from __future__ import annotations

import functools

from virtstore.errors import NoSuchPool, VirtstoreError
from virtstore.host.files import boot_id, process_alive
from virtstore.types import JOB_FINAL

TYPE_CHECKING = False
if TYPE_CHECKING:
    from virtstore.api.embedded import EmbeddedConnection

DEFAULT_POOL = "default"


def warn(msg: str, *args: object) -> None:
    # logging (with traceback, string, weakref) is imported only when there is
    # something to say: most commands never log.
    import logging

    logging.getLogger("virtstore").warning(msg, *args)


def startup(self: EmbeddedConnection, default_pool: bool) -> None:
    """Recovery, definition sync, the default pool and the boot's autostart, each
    run when its cheap check says there is work: the checks are a few queries,
    and the managers that do the work are imported only then."""
    store = self.state.store
    if _dead_owners(self, "SELECT pid, pid_start FROM jobs WHERE state NOT IN "
                         "(?,?,?)", JOB_FINAL):
        self.jobs.recover()
    if _dead_owners(self, "SELECT pid, pid_start FROM journal"):
        from virtstore.engine import journal

        journal.recover(store, functools.partial(_discard_leftover, self),
                        self.volumes.settle)
    self.state.sync_definitions()
    if self.cluster is not None:
        _sync_cluster_pools(self)
    meta = {str(r["key"]): r["value"] for r in store.query(
        "SELECT key, value FROM meta WHERE key IN ('default_pool', 'boot_id')")}
    # Offered once per state root: a default pool the user undefined stays gone.
    offer_default = default_pool and meta.get("default_pool") is None
    if offer_default:
        _make_default_pool(self)
    current = boot_id()
    if meta.get("boot_id") != current:
        # First process since the host booted: this is the engine's start.
        store.set_meta("boot_id", current)
        self.pools.on_host_start()
    elif offer_default and self.state.is_autostart(DEFAULT_POOL):
        _start_default_pool(self)
    if offer_default:
        store.set_meta("default_pool", "1")


def _sync_cluster_pools(self: EmbeddedConnection) -> None:
    """Take in the cluster's pool definitions (before the boot's autostart, so that a
    cluster pool marked autostart starts with the others)."""
    cp = self.pools.cluster_pools
    assert cp is not None
    try:
        cp.sync()
    except VirtstoreError as exc:
        warn("could not read the cluster's pool definitions: %s", exc)


def _dead_owners(self: EmbeddedConnection, sql: str, params: tuple[object, ...] = ()) -> bool:
    """Whether a row the query returns belongs to a process that is gone."""
    return any(not process_alive(int(r["pid"]), str(r["pid_start"]))
               for r in self.state.store.query(sql, params))


def _start_default_pool(self: EmbeddedConnection) -> None:
    try:
        if not self.state.row(DEFAULT_POOL).active:
            self.pools.start(DEFAULT_POOL)
    except VirtstoreError as exc:
        warn("could not start the default pool: %s", exc)


def _discard_leftover(self: EmbeddedConnection, pool: str, name: str, tmp_path: str) -> None:
    row = self.state.row(pool)
    self.state.backend(row.type, row.name).discard_staging(tmp_path)


def _make_default_pool(self: EmbeddedConnection) -> None:
    """A `default` dir pool, autostarted, as libvirt installs one."""
    try:
        self.state.row(DEFAULT_POOL)
        return
    except NoSuchPool:
        pass
    xml = (f"<pool type='dir'><name>{DEFAULT_POOL}</name><target>"
           f"<path>{self.state.images_dir}</path></target></pool>")
    try:
        self.pools.define(xml)
        self.pools.build(DEFAULT_POOL, overwrite=None)
        self.state.set_autostart(DEFAULT_POOL, True)
    except VirtstoreError as exc:
        warn("could not set up the default pool: %s", exc)
