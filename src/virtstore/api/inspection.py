"""Looking inside volumes for the embedded engine: each volume's guest-visible bytes
through a private read-only NBD export (holding the volume's read lock), read by the
inspect layer's worker process."""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

from virtstore.errors import VirtstoreError

if TYPE_CHECKING:
    from virtstore.api.embedded import EmbeddedConnection

_T = TypeVar("_T")


def _read_guest(conn: EmbeddedConnection, pool: str, name: str,
                op: Callable[[str], _T]) -> _T:
    from virtstore.engine.nbd import export_volume

    with export_volume(conn, pool, name, read_only=True) as exp:
        return op(exp.url)


def volume_df(conn: EmbeddedConnection, pool: str, name: str) -> dict[str, Any]:
    from virtstore.inspect import run

    return _read_guest(conn, pool, name, run.df)


def pool_df(conn: EmbeddedConnection, pool: str) -> list[dict[str, Any]]:
    """volume_df of every volume, several at once: each one waits mostly on its
    qemu-nbd and its reader process, so one by one a pool of 100 took a minute.
    Two per CPU, since each mostly waits. The store (one SQLite connection) is used by
    one thread at a time, so starting and stopping the exports is serialized, the
    reading is not."""
    from concurrent.futures import ThreadPoolExecutor

    from virtstore.engine.nbd import export_volume
    from virtstore.inspect import run

    store_lock = threading.Lock()

    def one(name: str) -> dict[str, Any]:
        try:
            with store_lock:
                exp = export_volume(conn, pool, name, read_only=True)
            try:
                return {"volume": name, **run.df(exp.url)}
            finally:
                with store_lock:
                    exp.stop()
        except VirtstoreError as exc:
            return {"volume": name, "error": str(exc)}

    names = [vol.name for vol in conn.list_volumes(pool)]
    width = max(1, min(len(names), 2 * (os.cpu_count() or 1)))
    with ThreadPoolExecutor(max_workers=width, thread_name_prefix="pool-df") as workers:
        return list(workers.map(one, names))


def boot_files(conn: EmbeddedConnection, pool: str, name: str,
               extract_dir: str | None) -> dict[str, Any]:
    from virtstore.inspect import run

    if extract_dir is not None:
        extract_dir = os.path.abspath(extract_dir)
        os.makedirs(extract_dir, exist_ok=True)
    return _read_guest(conn, pool, name, lambda url: run.single(
        "boot", url, extract_dir or ""))


def inspect(conn: EmbeddedConnection, pool: str, name: str) -> dict[str, Any]:
    from virtstore.inspect import run

    return _read_guest(conn, pool, name, lambda url: run.single("inspect", url))
