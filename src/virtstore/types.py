"""The data types every layer shares: pool, volume, secret, job, snapshot and event
records, filters and creation arguments. This module imports nothing of the project,
so the engine, the backends, the transports and the CLI can all use it without cycles.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from typing import Any, Protocol

# Pool states, as libvirt names them (virStoragePoolState).
POOL_INACTIVE = "inactive"
POOL_BUILDING = "building"
POOL_RUNNING = "running"
POOL_DEGRADED = "degraded"
POOL_INACCESSIBLE = "inaccessible"


@dataclass(frozen=True)
class PoolInfo:
    name: str
    uuid: str
    type: str
    state: str
    persistent: bool
    autostart: bool
    capacity: int
    allocation: int
    available: int
    target_path: str | None
    shared: bool = False  # the pool's storage is reachable from other hosts too

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class VolumeInfo:
    pool: str
    name: str
    key: str
    path: str
    type: str  # file, block, dir, network, netdir, ploop
    format: str | None
    capacity: int
    allocation: int
    physical: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# How a page of volumes may be sorted ('-' before one: descending).
VOLUME_SORT_KEYS = ("name", "type", "format", "capacity", "allocation")
MAX_PAGE = 1000


@dataclass(frozen=True)
class VolumePage:
    """One page of a pool's volumes, sorted and filtered, and how many match in all."""

    total: int
    offset: int
    volumes: list[VolumeInfo]


@dataclass(frozen=True)
class SecretInfo:
    uuid: str
    usage_type: str | None
    usage_id: str | None
    description: str | None
    ephemeral: bool
    private: bool

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# Job states.
JOB_QUEUED = "queued"
JOB_RUNNING = "running"
JOB_DONE = "done"
JOB_FAILED = "failed"
JOB_CANCELLED = "cancelled"
JOB_FINAL = (JOB_DONE, JOB_FAILED, JOB_CANCELLED)


@dataclass(frozen=True)
class JobInfo:
    """Long work (clone, convert, wipe, upload, download, resize, build) and its progress."""

    id: str
    kind: str  # clone, create-from, resize, wipe, upload, download, build, ...
    state: str
    pool: str | None
    volume: str | None
    target_pool: str | None = None
    target_volume: str | None = None
    bytes_done: int = 0
    bytes_total: int = 0
    rate: float = 0.0  # bytes per second, averaged since the start
    started: float | None = None
    ended: float | None = None
    error: str | None = None
    error_code: str | None = None  # the VirtstoreError code of a failed job
    bandwidth: int | None = None  # bytes per second, None: unlimited

    @property
    def finished(self) -> bool:
        return self.state in JOB_FINAL

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class SnapshotInfo:
    pool: str
    volume: str
    name: str
    kind: str  # internal (qcow2), external (qcow2 overlay), reflink, native
    created: float
    size: int = 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Event:
    """A lifecycle or progress event. ``kind``: pool, volume or job."""

    id: int
    time: float
    kind: str
    action: str  # defined, undefined, started, stopped, created, deleted, refreshed, progress,
    # done, failed, cancelled
    pool: str | None = None
    name: str | None = None
    job: JobInfo | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class NbdExport(Protocol):
    """A volume served over NBD; a context manager that stops serving on exit."""

    @property
    def url(self) -> str: ...

    @property
    def running(self) -> bool: ...

    def stop(self) -> None: ...

    def __enter__(self) -> NbdExport: ...

    def __exit__(self, *exc: object) -> None: ...


@dataclass(frozen=True)
class PoolFilter:
    """Filters of pool-list; None means "either"."""

    active: bool | None = None
    persistent: bool | None = None
    autostart: bool | None = None
    types: tuple[str, ...] = ()

    def matches(self, info: PoolInfo) -> bool:
        if self.active is not None and (info.state != POOL_INACTIVE) != self.active:
            return False
        if self.persistent is not None and info.persistent != self.persistent:
            return False
        if self.autostart is not None and info.autostart != self.autostart:
            return False
        return not (self.types and info.type not in self.types)


@dataclass(frozen=True)
class VolumeCreateArgs:
    """vol-create-as in arguments rather than XML."""

    name: str
    capacity: int
    allocation: int | None = None
    format: str | None = None
    backing_vol: str | None = None  # name in the same pool, key or path
    backing_vol_format: str | None = None
    prealloc_metadata: bool = False


def default_root() -> str:
    """State root: VIRTSTORE_ROOT, else /var/lib/virtstore for root, else the XDG data dir."""
    env = os.environ.get("VIRTSTORE_ROOT")
    if env:
        return env
    if os.geteuid() == 0:
        return "/var/lib/virtstore"
    xdg = os.environ.get("XDG_DATA_HOME") or os.path.join(os.path.expanduser("~"), ".local",
                                                          "share")
    return os.path.join(xdg, "virtstore")
