"""Pools nested on volumes: a pool whose source device is a volume of another pool.

A raw file in a dir pool can be the disk of a disk pool, whose partition is the PV of
a logical pool, and so on. Two things make that work:

* A source device that is a regular file gets a loop device while its pool runs:
  ``attach_sources`` before the backend starts, ``detach_sources`` after it stops.
  The loop devices the engine attached are remembered under the state root
  (``run/loops/POOL.json``), so a stop detaches exactly those, also from another
  process; a loop device someone else attached to the file is used, never detached.
* A lower pool cannot be stopped or deleted, and a lower volume cannot be deleted,
  while a running pool uses it: ``check_pool_unused`` / ``check_volume_unused`` say
  which pool uses what.
"""

from __future__ import annotations

import contextlib
import json
import os
from typing import TYPE_CHECKING

from virtstore.errors import Busy, NoSuchVolume, OperationInvalid
from virtstore.host import files
from virtstore.xml import PoolDef

if TYPE_CHECKING:
    from virtstore.backends.base import VolumeRecord
    from virtstore.engine.index import VolumeIndex
    from virtstore.engine.state import StateRoot

# Pool types whose <source><device path=...> is a local block device (or a file for one).
BLOCK_SOURCE_TYPES = ("fs", "disk", "logical", "zfs", "btrfs")


def _record_path(state: StateRoot, pool: str) -> str:
    return os.path.join(state.root, "run", "loops", pool + ".json")


def _read_record(state: StateRoot, pool: str) -> dict[str, str]:
    try:
        data = json.loads(files.read_bytes(_record_path(state, pool)) or b"{}")
    except (OSError, ValueError):
        return {}
    return {str(k): str(v) for k, v in data.items()} if isinstance(data, dict) else {}


def _write_record(state: StateRoot, pool: str, record: dict[str, str]) -> None:
    path = _record_path(state, pool)
    if not record:
        files.remove_quietly(path)
        return
    files.ensure_dir(os.path.dirname(path), 0o700)
    files.atomic_write(path, json.dumps(record))


def file_sources(pool: PoolDef) -> list[str]:
    """The source device paths of ``pool`` that are regular files."""
    if pool.type not in BLOCK_SOURCE_TYPES:
        return []
    from virtstore.backends._block_utils import is_regular_file

    return [d.path for d in pool.source.devices if is_regular_file(d.path)]


def attach_sources(state: StateRoot, pool: PoolDef) -> list[str]:
    """Give every file source of ``pool`` a loop device; the ones attached now."""
    from virtstore.host import loop

    record = _read_record(state, pool.name)
    attached: list[str] = []
    try:
        for path in file_sources(pool):
            if loop.devices_of(path):
                continue  # already attached (by us earlier, or by someone else)
            dev = loop.attach(path)
            attached.append(dev)
            record[path] = dev
    except BaseException:
        for dev in attached:
            with contextlib.suppress(Exception):
                loop.detach(dev)
        raise
    _write_record(state, pool.name, record)
    return attached


def detach_sources(state: StateRoot, pool: PoolDef) -> None:
    """Detach the loop devices ``attach_sources`` made for ``pool``."""
    from virtstore.host import loop

    record = _read_record(state, pool.name)
    left: dict[str, str] = {}
    errors: list[str] = []
    for path, dev in record.items():
        back = loop.backing_file(dev)
        if back is None or os.path.realpath(back) != os.path.realpath(path):
            continue  # gone already, or reused for something else since
        try:
            loop.detach(dev)
        except Exception as exc:
            left[path] = dev
            errors.append(str(exc))
    _write_record(state, pool.name, left)
    if errors:
        raise OperationInvalid(f"pool '{pool.name}' stopped but its loop devices could not "
                               f"all be detached: {'; '.join(errors)}")


def forget(state: StateRoot, pool: str) -> None:
    """Drop the record of a pool's loop devices (after a boot none are left)."""
    _write_record(state, pool, {})


def _owner(index: VolumeIndex, state: StateRoot, path: str) -> tuple[str, str] | None:
    """(pool, volume) of a running pool that ``path`` is a volume of, or None."""
    try:
        info = index.by_path(path)
        return info.pool, info.name
    except NoSuchVolume:
        pass
    real = os.path.realpath(path)
    if real != path:
        try:
            info = index.by_path(real)
            return info.pool, info.name
        except NoSuchVolume:
            pass
    # A file in a file-based pool that the index has not seen yet.
    for row in state.rows():
        if row.active and row.target_path and row.type in ("dir", "fs", "netfs", "btrfs"):
            target = row.target_path.rstrip("/") + "/"
            if real.startswith(target):
                return row.name, real[len(target):].split("/", 1)[0]
    return None


def upper_users(state: StateRoot, index: VolumeIndex, lower: str,
                volume_path: str | None = None) -> list[tuple[str, str]]:
    """Running pools whose source device is a volume of pool ``lower`` (or exactly
    ``volume_path``): [(upper pool, source path)]."""
    users: list[tuple[str, str]] = []
    for row in state.rows():
        if not row.active or row.name == lower or row.type not in BLOCK_SOURCE_TYPES:
            continue
        try:
            pool = state.definition(row)
        except Exception:
            continue
        for dev in pool.source.devices:
            if volume_path is not None:
                if os.path.realpath(dev.path) == os.path.realpath(volume_path):
                    users.append((row.name, dev.path))
                continue
            owner = _owner(index, state, dev.path)
            if owner is not None and owner[0] == lower:
                users.append((row.name, dev.path))
    return users


def check_pool_unused(state: StateRoot, index: VolumeIndex, name: str, action: str) -> None:
    """Refuse to ``action`` (stop, delete, ...) pool ``name`` while a pool runs on it."""
    users = upper_users(state, index, name)
    if users:
        upper, path = users[0]
        raise Busy(f"Requested operation is not valid: cannot {action} storage pool '{name}': "
                   f"its volume '{path}' is the source of running pool '{upper}'")


def check_volume_unused(state: StateRoot, index: VolumeIndex, pool: str,
                        rec: VolumeRecord) -> None:
    """Refuse to delete a volume that is the source device of a running pool."""
    users = upper_users(state, index, pool, volume_path=rec.path)
    if users:
        raise Busy(f"Requested operation is not valid: volume '{rec.name}' of pool '{pool}' "
                   f"is the source of running pool '{users[0][0]}'")
