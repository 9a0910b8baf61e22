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
POOL_DF_THREADS_PER_CPU = 2


def _read_guest(conn: EmbeddedConnection, pool: str, name: str,
                op: Callable[[str], _T]) -> _T:
    from virtstore.engine.nbd import export_volume

    with export_volume(conn, pool, name, read_only=True) as exp:
        return op(exp.url)


def volume_df(conn: EmbeddedConnection, pool: str, name: str) -> dict[str, Any]:
    from virtstore.inspect import run

    return _read_guest(conn, pool, name, run.df)


def pool_df(conn: EmbeddedConnection, pool: str) -> list[dict[str, Any]]:
    """volume_df of every volume, several at once. Each thread keeps one reader process
    for all the volumes it reads (a process per volume cost more than the reading), and
    starts and stops its qemu-nbd exports itself: the engine serves threads at once,
    as it does the server's connections."""
    from concurrent.futures import ThreadPoolExecutor

    from virtstore.engine.nbd import export_volume
    from virtstore.inspect import run

    mine = threading.local()
    readers: list[run.Reader] = []

    def one(name: str) -> dict[str, Any]:
        reader = getattr(mine, "reader", None)
        if reader is None:
            reader = mine.reader = run.Reader()
            readers.append(reader)
        try:
            with export_volume(conn, pool, name, read_only=True) as exp:
                return {"volume": name, **reader.df(exp.url)}
        except VirtstoreError as exc:
            return {"volume": name, "error": str(exc)}

    names = [vol.name for vol in conn.list_volumes(pool)]
    # Each volume mostly waits (on qemu-nbd starting and stopping, on reads): more
    # threads than CPUs.
    width = max(1, min(len(names), POOL_DF_THREADS_PER_CPU * (os.cpu_count() or 1)))
    try:
        with ThreadPoolExecutor(max_workers=width, thread_name_prefix="pool-df") as workers:
            return list(workers.map(one, names))
    finally:
        for reader in readers:
            reader.close()


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
