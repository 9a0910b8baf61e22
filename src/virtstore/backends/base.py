"""The small interface every pool backend implements, and its capability table.

The engine owns state, names, locks and the journal; a backend only touches storage.
Volume creation is staged: the backend makes the volume under a staging name the
engine chose and journalled, and the engine then asks it to commit (publish under the
final name, never replacing anything) or discard. That is how a killed process never
leaves a half-made volume under its final name, whatever the backend.
"""

from __future__ import annotations

import abc
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from virtstore.errors import Unsupported
from virtstore.xml import PoolDef, VolDef, VolSource


@dataclass(frozen=True)
class BackendCaps:
    """What a backend can do, as data: the engine asks before it calls."""

    pool_type: str
    build: bool = False
    delete: bool = False
    vol_create: bool = False
    vol_delete: bool = False
    vol_formats: tuple[str, ...] = ()
    default_vol_format: str | None = None
    shared: bool = False
    file_based: bool = False
    volume_type: str = "file"


@dataclass(frozen=True)
class PoolSizes:
    capacity: int = 0
    allocation: int = 0
    available: int = 0


@dataclass(frozen=True)
class Stamp:
    """What the index remembers of a volume to tell whether it changed since."""

    ino: int
    size: int
    mtime_ns: int
    ctime_ns: int


@dataclass(slots=True)
class VolumeRecord:
    """One volume as the index stores it."""

    name: str
    path: str
    key: str
    type: str
    format: str | None = None
    capacity: int = 0
    allocation: int = 0
    physical: int = 0
    backing_path: str | None = None
    backing_format: str | None = None
    compat: str | None = None
    cluster_size: int | None = None
    lazy_refcounts: bool = False
    encryption: str | None = None
    mode: int | None = None
    uid: int | None = None
    gid: int | None = None
    ino: int = 0
    size: int = 0
    mtime_ns: int = 0
    ctime_ns: int = 0
    atime_ns: int = 0


@dataclass
class ScanResult:
    """What a refresh found: changed or new records, names unchanged, and skipped entries."""

    changed: list[VolumeRecord] = field(default_factory=list)
    unchanged: list[str] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)

    def add(self, rec: VolumeRecord, known: Mapping[str, Stamp]) -> None:
        """File a record just read: unchanged when the index holds its very stamp."""
        if known.get(rec.name) == Stamp(rec.ino, rec.size, rec.mtime_ns, rec.ctime_ns):
            self.unchanged.append(rec.name)
        else:
            self.changed.append(rec)


@dataclass(frozen=True)
class CreateRequest:
    """A volume to make, resolved by the engine: paths absolute, secrets fetched."""

    vol: VolDef
    capacity: int
    allocation: int
    format: str
    backing_path: str | None = None
    backing_format: str | None = None
    prealloc_metadata: bool = False
    encryption_secret: bytes | None = None


class Backend(abc.ABC):
    caps: BackendCaps

    def host_problem(self) -> str | None:
        """Why this host cannot run this pool type (missing tool or kernel feature), or None."""
        return None

    def unsupported(self, what: str) -> Unsupported:
        return Unsupported(f"this function is not supported by the connection driver: "
                           f"{what} is not supported by '{self.caps.pool_type}' pools")

    # -- pool lifecycle --------------------------------------------------------
    def build(self, pool: PoolDef, overwrite: bool | None) -> None:
        raise self.unsupported("pool build")

    @abc.abstractmethod
    def start(self, pool: PoolDef) -> None: ...

    def stop(self, pool: PoolDef) -> None:  # noqa: B027 - most pools have nothing to undo
        """Nothing to undo by default (a dir pool has nothing mounted)."""

    def delete(self, pool: PoolDef) -> None:
        raise self.unsupported("pool delete")

    @abc.abstractmethod
    def sizes(self, pool: PoolDef) -> PoolSizes: ...

    @abc.abstractmethod
    def scan(self, pool: PoolDef, known: Mapping[str, Stamp]) -> ScanResult:
        """List the pool's volumes, re-reading only those whose stamp changed."""

    # -- volumes ---------------------------------------------------------------
    def volume_path(self, pool: PoolDef, name: str) -> str:
        raise self.unsupported("volume paths")

    def staging_path(self, pool: PoolDef, token: str) -> str:
        raise self.unsupported("volume creation")

    def create_volume(self, pool: PoolDef, staging: str, req: CreateRequest) -> None:
        raise self.unsupported("volume creation")

    def commit_volume(self, pool: PoolDef, staging: str, final: str) -> None:
        raise self.unsupported("volume creation")

    def discard_staging(self, staging: str) -> None:
        raise self.unsupported("volume creation")

    def delete_volume(self, pool: PoolDef, rec: VolumeRecord) -> None:
        raise self.unsupported("volume deletion")

    def volume_source(self, pool: PoolDef, name: str) -> VolSource | list[VolSource] | None:
        """Where a volume lies on the pool's devices (partitions, LVs), for its XML."""
        return None

    def read_volume(self, pool: PoolDef, name: str) -> VolumeRecord | None:
        """Read one volume's current state (after create), or None if it is not there."""
        raise self.unsupported("volume lookup")

    def still_there(self, pool: PoolDef, rec: VolumeRecord) -> bool:
        """Whether a volume a scan saw is still there, where that is cheap to ask (a
        refresh asks under the index's write lock); True where it is not."""
        return True

    def device_identity(self, pool: PoolDef, name: str) -> dict[str, Any] | None:
        """A LUN volume's SCSI identity (vendor, product, revision, serial, ...), read
        live from the target; None where volumes are not LUNs."""
        return None


class UnavailableBackend(Backend):
    """A pool type this build knows the XML of but cannot run yet."""

    def __init__(self, pool_type: str) -> None:
        self.caps = BackendCaps(pool_type=pool_type)

    def host_problem(self) -> str | None:
        return f"storage pool type '{self.caps.pool_type}' is not supported in this version"

    def start(self, pool: PoolDef) -> None:
        raise Unsupported(self.host_problem() or "")

    def sizes(self, pool: PoolDef) -> PoolSizes:
        return PoolSizes()

    def scan(self, pool: PoolDef, known: Mapping[str, Stamp]) -> ScanResult:
        return ScanResult()
