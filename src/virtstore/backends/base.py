"""The one contract every pool backend implements, and the capabilities derived from it.

The engine owns state, names, locks, jobs and the journal; a backend only touches
storage. Volume creation is staged: the backend makes the volume under a staging name
the engine chose and journalled, and the engine then asks it to commit (publish under
the final name, never replacing anything) or discard. That is how a killed process
never leaves a half-made volume under its final name, whatever the backend.

Every optional operation is a method of ``Backend`` that raises "unsupported"; a
backend supports what it overrides (libvirt's NULL entries of ``virStorageBackend``,
in Python). ``supports()``, ``features()`` and ``has_feature()`` read that, so what
``pool-capabilities --features`` lists cannot disagree with what the code does.
"""

from __future__ import annotations

import abc
from collections.abc import Mapping
from contextlib import AbstractContextManager, nullcontext

from virtstore.errors import AuthFailed, OperationInvalid, Unsupported
from virtstore.types import field, record

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any, BinaryIO, ClassVar, Protocol

    from virtstore.data.monitor import Monitor
    from virtstore.host.nbd import QemuSource
    from virtstore.types import SnapshotInfo
    from virtstore.xml import PoolDef, VolDef, VolSource
else:
    Protocol = object  # only type checkers look at the protocols' structure


@record(frozen=True)
class BackendCaps:
    """What a backend is, as data (its operations are derived: ``Backend.supports``)."""

    pool_type: str
    vol_formats: tuple[str, ...] = ()
    default_vol_format: str | None = None
    shared: bool = False
    file_based: bool = False
    volume_type: str = "file"


@record(frozen=True)
class PoolSizes:
    capacity: int = 0
    allocation: int = 0
    available: int = 0
    # Whether this pool's storage is reachable from other hosts, where that depends on
    # the pool and not only its type (a shared LVM volume group); None: the type says.
    shared: bool | None = None


@record(frozen=True)
class Stamp:
    """What the index remembers of a volume to tell whether it changed since."""

    ino: int
    size: int
    mtime_ns: int
    ctime_ns: int


@record(slots=True)
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


@record
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


@record(frozen=True)
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


@record(frozen=True)
class CloneOptions:
    """How a clone or create-from fills its target, beyond the plain copy."""

    format: str | None = None  # None: the source's
    capacity: int | None = None  # None: the source's
    reflink: bool = False
    prealloc_metadata: bool = False
    compat: str | None = None
    cluster_size: int | None = None
    lazy_refcounts: bool = False
    mode: int | None = None
    src_secret: bytes | None = None  # LUKS passphrase of an encrypted source
    dst_secret: bytes | None = None  # and of an encrypted target
    cipher: Mapping[str, str] | None = None
    ivgen: Mapping[str, str] | None = None


@record(frozen=True)
class SnapshotRow:
    """A storage snapshot the engine remembers for a backend (files beside a volume)."""

    volume: str
    name: str
    kind: str
    created: float
    path: str | None


class EngineHooks(Protocol):
    """What the engine lends a backend: journalled scratch names, and a place to remember
    snapshots that the storage itself cannot name."""

    def scratch(self, backend: Backend, pool: PoolDef, volume: str,
                op: str) -> AbstractContextManager[str]:
        """A staging path of the pool, journalled while the block runs; whatever is
        still at the path when the block ends (or after a crash, at the next start) is
        discarded."""

    def snapshot_rows(self, pool: PoolDef, volume: str) -> list[SnapshotRow]: ...

    def add_snapshot_row(self, pool: PoolDef, row: SnapshotRow) -> None: ...

    def drop_snapshot_row(self, pool: PoolDef, volume: str, name: str) -> None: ...

    def secret(self, uuid: str | None, usage: str | None, usage_type: str) -> bytes:
        """The value of a secret named by UUID, or by usage of the given type."""


class _NoSecrets:
    def secret(self, uuid: str | None, usage: str | None, usage_type: str) -> bytes:
        raise AuthFailed("no secret store is available to read the pool's auth secret")


# Per-volume features (Proxmox's volume_has_feature): the operation each one needs.
FEATURES: dict[str, str] = {
    "snapshot": "snap_create",
    "snapshot-external": "snap_create_external",
    "clone-linked": "vol_clone",
    "clone-full": "vol_clone",
    "copy": "vol_clone",
    "resize-grow": "vol_resize",
    "resize-shrink": "vol_resize",
    "upload": "vol_upload",
    "download": "vol_download",
    "wipe": "vol_wipe",
    "export": "qemu_source",
}

def qemu_format(fmt: str) -> str:
    """The qemu driver of a volume format ("none", a block pool's own, is raw)."""
    return "raw" if fmt in ("none", "") else fmt


class Backend(abc.ABC):
    caps: BackendCaps
    hooks: EngineHooks | None = None  # set by the engine that owns this instance
    # Refinements of what the overridden methods can do, where one method serves both.
    linked_clones: ClassVar[bool] = False
    can_shrink: ClassVar[bool] = False
    copies: ClassVar[bool] = False  # create-from: a new volume from XML, filled by a copy
    snapshot_kind: ClassVar[str] = "native"
    # A just-made volume reads as zeros everywhere (a file, a zvol, an RBD image; not a
    # thick LV, which holds whatever its extents held): a restore or import then skips
    # the zeros, and allocates nothing for them.
    new_volumes_read_zeros: ClassVar[bool] = True
    # Per volume format, the kinds of snapshot ``snap_create`` (and the external verb)
    # make: what ``pool-capabilities --features`` shows.
    snapshot_kinds: ClassVar[dict[str, tuple[str, ...]]] = {}

    # -- what this backend can do, derived from what it overrides ---------------
    @classmethod
    def supports(cls, op: str) -> bool:
        """Whether the backend implements ``op`` (a method name), not the default."""
        return getattr(cls, op) is not getattr(Backend, op)

    def features(self) -> dict[str, bool]:
        """Per feature of FEATURES, whether some volume of such a pool can have it."""
        out = {f: self.supports(op) for f, op in FEATURES.items()}
        # Files and block devices are exported by path, without an override.
        out["export"] = out["export"] or self.caps.volume_type in ("file", "block")
        out["clone-linked"] = out["clone-linked"] and self.linked_clones
        out["resize-shrink"] = out["resize-shrink"] and self.can_shrink
        out["copy"] = out["copy"] and self.copies
        return out

    def has_feature(self, feature: str, pool: PoolDef, rec: VolumeRecord,
                    snapshot: str | None = None) -> bool:
        """Whether ``feature`` is available for this volume in its current state."""
        if feature not in FEATURES:
            raise OperationInvalid(f"unknown volume feature '{feature}': use one of "
                                   f"{', '.join(FEATURES)}")
        return self.features()[feature] and self.pool_has(feature, pool)

    def pool_has(self, feature: str, pool: PoolDef) -> bool:
        """Whether this pool (its mode, its filesystem) offers a feature the backend
        implements; True unless a backend knows better."""
        return True

    def secrets(self) -> EngineHooks | _NoSecrets:
        """Where this backend reads its pools' auth secrets."""
        return self.hooks if self.hooks is not None else _NoSecrets()

    def close(self) -> None:  # noqa: B027 - most backends hold nothing open
        """Release what this instance holds open (connections); its engine is closing."""

    def engine(self) -> EngineHooks:
        if self.hooks is None:
            raise OperationInvalid(f"'{self.caps.pool_type}' backend used without an engine")
        return self.hooks

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

    def sizes_at(self, target_path: str) -> PoolSizes | None:
        """The running pool's sizes from its target path alone, when that is all
        ``sizes`` reads; None: call ``sizes`` with the definition (which costs a parse)."""
        return None

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

    def staging_source(self, pool: PoolDef, staging: str,
                       fmt: str) -> AbstractContextManager[QemuSource]:
        """How qemu opens a just-made staging volume to write its content (a restore,
        an import). A staging path that is a file or a device is opened by that path."""
        if not staging.startswith("/"):
            raise self.unsupported("writing a new volume's content")
        from virtstore.host.nbd import QemuSource

        return nullcontext(QemuSource(image=staging, fmt=qemu_format(fmt)))

    def live_source(self, pool: PoolDef) -> None:  # noqa: B027 - most have none
        """Add a running pool's runtime state to its ``<source>`` (a disk pool's free
        extents), for its XML."""

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

    # -- data operations: the engine calls them from its jobs with the volume locked,
    # and publishes what ``read_volume`` says afterwards ----------------------
    def vol_resize(self, pool: PoolDef, rec: VolumeRecord, capacity: int, *,
                   shrink: bool, allocate: bool) -> None:
        raise self.unsupported("volume resize")

    def vol_wipe(self, pool: PoolDef, rec: VolumeRecord, algorithm: str,
                 monitor: Monitor) -> None:
        raise self.unsupported("volume wipe")

    def vol_upload(self, pool: PoolDef, rec: VolumeRecord, source: BinaryIO, *, offset: int,
                   length: int | None, sparse: bool, monitor: Monitor) -> None:
        raise self.unsupported("volume upload")

    def vol_download(self, pool: PoolDef, rec: VolumeRecord, sink: BinaryIO, *, offset: int,
                     length: int | None, sparse: bool, monitor: Monitor) -> None:
        raise self.unsupported("volume download")

    def vol_clone(self, pool: PoolDef, src_pool: PoolDef, src: VolumeRecord, staging: str, *,
                  linked: bool, monitor: Monitor,
                  options: CloneOptions = CloneOptions()) -> None:  # noqa: B008 - frozen
        """Make ``staging`` (from ``staging_path``) a copy of ``src`` (a volume of
        ``src_pool``, of the same pool type); the engine then commits or discards it
        like any created volume."""
        raise self.unsupported("volume clone")

    def check_clone(self, pool: PoolDef, src_pool: PoolDef, src_backend: Backend,
                    src: VolumeRecord, *, linked: bool, options: CloneOptions,
                    what: str) -> None:
        """Refuse, before any job starts, a clone into this pool that ``vol_clone``
        cannot make. By default a backend clones volumes of its own pool type, in the
        source's format."""
        if what == "volume create-from" and not self.copies:
            raise self.unsupported(what)
        if src_pool.type != pool.type:
            raise Unsupported(f"unsupported configuration: a '{src_pool.type}' volume can be "
                              f"cloned only into a '{src_pool.type}' pool")
        fmt = options.format or src.format or "raw"
        if fmt != (src.format or "raw") or fmt not in self.caps.vol_formats:
            raise Unsupported(f"unsupported configuration: format '{fmt}' is not supported "
                              f"for clones in '{pool.type}' pools")
        if linked and not self.linked_clones:
            raise Unsupported(f"unsupported configuration: linked clones are not supported "
                              f"by '{pool.type}' pools")

    def clone_total(self, src: VolumeRecord, options: CloneOptions, linked: bool) -> int:
        """The bytes a clone's progress counts up to (holes count: they are skipped)."""
        return 0 if linked else src.capacity

    def check_resize(self, pool: PoolDef, rec: VolumeRecord, capacity: int, *,  # noqa: B027
                     shrink: bool, allocate: bool) -> None:
        """Refuse, before any job starts, a resize ``vol_resize`` cannot do."""

    def data_size(self, pool: PoolDef, rec: VolumeRecord) -> int:
        """The bytes a wipe or a whole download goes through."""
        return rec.capacity

    def backing_of(self, pool: PoolDef, fmt: str, path: str,
                   given_format: str | None) -> tuple[str | None, int | None]:
        """A new volume's ``<backingStore>``: its format and capacity where they can be
        read (None where not). Block backends give a backing store their own meaning
        (an LVM snapshot's origin) and check it when they create."""
        return given_format, None

    def name_taken(self, pool: PoolDef, name: str) -> bool:
        """Whether something not in the index already holds ``name`` in the pool."""
        return False

    def check_volume(self, pool: PoolDef, rec: VolumeRecord) -> None:  # noqa: B027
        """Refuse, before any work, a volume this backend must not touch (a file volume
        that is a symbolic link)."""

    def local_files(self, pool: PoolDef) -> bool:
        """Whether this pool's volumes are files on this host, at their paths."""
        return False

    # -- storage snapshots -----------------------------------------------------
    def snap_list(self, pool: PoolDef, rec: VolumeRecord) -> list[SnapshotInfo]:
        raise self.unsupported("storage snapshots")

    def snap_create(self, pool: PoolDef, rec: VolumeRecord, snap: str) -> None:
        raise self.unsupported("storage snapshots")

    def snap_create_external(self, pool: PoolDef, rec: VolumeRecord, snap: str) -> None:
        raise Unsupported(f"unsupported configuration: external snapshots are not "
                          f"supported by '{self.caps.pool_type}' pools")

    def snap_revert(self, pool: PoolDef, rec: VolumeRecord, snap: str) -> None:
        """Put the volume back as it was at ``snap``; NoSuchVolume if there is none.
        (``snap_delete`` likewise.)"""
        raise self.unsupported("storage snapshots")

    def snap_delete(self, pool: PoolDef, rec: VolumeRecord, snap: str) -> None:
        raise self.unsupported("storage snapshots")

    def forget_snapshots(self, pool: PoolDef, rec: VolumeRecord) -> None:  # noqa: B027
        """A deleted volume's snapshots go with it (where the storage keeps them apart)."""

    # -- change tracking for incremental backups ---------------------------------
    # Where the storage itself says what changed between two snapshots (RBD's
    # diff_iterate), a backup reads a snapshot it takes and the next one reads only what
    # changed since: the method's name, as backup manifests state it ("" where none).
    backup_tracking: ClassVar[str] = ""

    def backup_tracking_for(self, pool: PoolDef, rec: VolumeRecord) -> str:
        """The change tracking the storage keeps for this volume ("" where none)."""
        return self.backup_tracking

    def backup_snapshot(self, pool: PoolDef, rec: VolumeRecord, backup_id: str) -> str:
        """Take a hidden snapshot of the volume for backup ``backup_id``; its name."""
        raise self.unsupported("backup snapshots")

    def backup_snapshot_exists(self, pool: PoolDef, rec: VolumeRecord, snap: str) -> bool:
        raise self.unsupported("backup snapshots")

    def backup_snapshot_drop(self, pool: PoolDef, rec: VolumeRecord, snap: str) -> None:
        raise self.unsupported("backup snapshots")

    def backup_extents(self, pool: PoolDef, rec: VolumeRecord, snap: str,
                       since: str | None) -> list[tuple[int, int]]:
        """The extents of snapshot ``snap`` that changed since snapshot ``since`` (with
        None: every extent that holds data)."""
        raise self.unsupported("backup snapshots")

    def backup_changes(self, pool: PoolDef, rec: VolumeRecord, snap: str, since: str | None
                       ) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
        """(changed, holes): ``backup_extents``, and the extents that are holes in
        ``snap`` though the storage cannot tell since when (they changed only where the
        previous backup held data there). Storage that knows when a hole was made
        reports it among the changed extents, and no holes."""
        return self.backup_extents(pool, rec, snap, since), []

    def frozen_source(self, pool: PoolDef,
                      rec: VolumeRecord) -> AbstractContextManager[QemuSource]:
        """The volume as it is at this instant, readable while the context lasts (a
        reflink copy of a raw file), where the storage makes one cheaply; a backup reads
        it instead of a volume a running guest keeps writing."""
        raise self.unsupported("frozen copies")

    def snapshot_source(self, pool: PoolDef, rec: VolumeRecord,
                        snap: str) -> AbstractContextManager[QemuSource]:
        """How qemu opens the volume as it was at a snapshot (read-only)."""
        raise self.unsupported("reading a snapshot")

    # -- how qemu opens a volume (NBD export) ------------------------------------
    def qemu_source(self, pool: PoolDef,
                    rec: VolumeRecord) -> AbstractContextManager[QemuSource]:
        """How qemu opens the volume. A file or a block device is opened by its path;
        a backend whose volumes qemu reaches otherwise (a URL, a secret) overrides this."""
        if rec.type not in ("file", "block") or not rec.path.startswith("/"):
            raise Unsupported(f"volumes of '{self.caps.pool_type}' pools cannot be "
                              "exported over NBD")
        from virtstore.host.nbd import QemuSource

        return nullcontext(QemuSource(image=rec.path, fmt=rec.format or "raw"))


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
