"""The one public interface: Connection, with pool, volume and secret handles.

The CLI (and later the web page and the REST server) use only what is here. The
embedded engine implements ``Connection`` in process; a remote client implements the
same abstract methods over HTTP. Handles (``Pool``, ``Volume``, ``Secret``) are thin:
they hold a name and call back into their connection, so both transports share them.
"""

from __future__ import annotations

import abc

from virtstore.api.handles import Job, Pool, Secret, Volume, size_arg
from virtstore.errors import InvalidArgument, Unsupported
from virtstore.types import (
    JOB_CANCELLED,
    JOB_DONE,
    JOB_FAILED,
    JOB_FINAL,
    JOB_QUEUED,
    JOB_RUNNING,
    MAX_PAGE,
    POOL_BUILDING,
    POOL_DEGRADED,
    POOL_INACCESSIBLE,
    POOL_INACTIVE,
    POOL_RUNNING,
    VOLUME_SORT_KEYS,
    Event,
    JobInfo,
    NbdExport,
    PoolFilter,
    PoolInfo,
    SecretInfo,
    SnapshotInfo,
    VolumeCreateArgs,
    VolumeInfo,
    VolumePage,
    default_root,
)

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Iterable
    from typing import Any, BinaryIO

__all__ = [
    "JOB_CANCELLED",
    "JOB_DONE",
    "JOB_FAILED",
    "JOB_FINAL",
    "JOB_QUEUED",
    "JOB_RUNNING",
    "POOL_BUILDING",
    "POOL_DEGRADED",
    "POOL_INACCESSIBLE",
    "POOL_INACTIVE",
    "POOL_RUNNING",
    "Connection",
    "Event",
    "Job",
    "JobInfo",
    "NbdExport",
    "Pool",
    "PoolFilter",
    "PoolInfo",
    "Secret",
    "SecretInfo",
    "SnapshotInfo",
    "Volume",
    "VolumeCreateArgs",
    "VolumeInfo",
    "VolumePage",
    "default_root",
    "size_arg",
]


def check_page(offset: int, limit: int, sort: str) -> tuple[str, bool]:
    """The sort key and whether it is descending; InvalidArgument for a bad page."""
    key = sort.removeprefix("-")
    if key not in VOLUME_SORT_KEYS:
        raise InvalidArgument(f"cannot sort volumes by '{sort}': one of "
                              f"{', '.join(VOLUME_SORT_KEYS)}, '-' first for descending")
    if offset < 0 or not 1 <= limit <= MAX_PAGE:
        raise InvalidArgument(f"a page has 1 to {MAX_PAGE} volumes from an offset of 0 or "
                              "more")
    return key, sort.startswith("-")


class Connection(abc.ABC):
    """Pools, volumes and secrets of one host, embedded or remote."""

    uri: str

    # -- pools -----------------------------------------------------------------
    @abc.abstractmethod
    def list_pools(self, flt: PoolFilter | None = None) -> list[PoolInfo]:
        """The pools (``pool-list --all``), filtered by ``flt`` when given."""

    @abc.abstractmethod
    def pool_info(self, name: str) -> PoolInfo:
        """Raises NoSuchPool."""

    @abc.abstractmethod
    def pool_lookup_by_uuid(self, uuid: str) -> str:
        """Pool name for a UUID."""

    @abc.abstractmethod
    def pool_lookup_by_target_path(self, path: str) -> str:
        """Pool name for a target path (NoSuchPool if none)."""

    @abc.abstractmethod
    def pool_define_xml(self, xml: str) -> str:
        """Define (or redefine) a persistent pool; returns its name."""

    @abc.abstractmethod
    def pool_create_xml(self, xml: str, *, build: bool = False,
                        overwrite: bool | None = None) -> str:
        """Create and start a transient pool; returns its name."""

    @abc.abstractmethod
    def pool_xml(self, name: str, *, inactive: bool = False) -> str:
        """libvirt's pool XML; ``inactive``: the definition, with the last known sizes."""

    @abc.abstractmethod
    def pool_build(self, name: str, *, overwrite: bool | None = None) -> None:
        """overwrite None: plain build; True: --overwrite; False: --no-overwrite."""

    @abc.abstractmethod
    def pool_start(self, name: str, *, build: bool = False,
                   overwrite: bool | None = None) -> None:
        """Start a defined pool, building it first if ``build``."""

    @abc.abstractmethod
    def pool_stop(self, name: str) -> None:
        """virsh pool-destroy: stop; a transient pool disappears."""

    @abc.abstractmethod
    def pool_delete(self, name: str) -> None:
        """Remove the pool's storage (the directory); the pool must be inactive."""

    @abc.abstractmethod
    def pool_undefine(self, name: str) -> None:
        """Forget an inactive persistent pool's definition."""

    @abc.abstractmethod
    def pool_refresh(self, name: str) -> None:
        """Scan the pool's storage again for volumes made or removed outside."""

    @abc.abstractmethod
    def pool_set_autostart(self, name: str, autostart: bool) -> None:
        """Start the pool (or not) when the host starts."""

    @abc.abstractmethod
    def pool_capabilities_xml(self) -> str:
        """libvirt's ``<storagepoolCapabilities>`` document for this host."""

    @abc.abstractmethod
    def import_libvirt_pools(self, config_dir: str = "/etc/libvirt/storage") -> list[str]:
        """Define the pools (and autostart marks) found in libvirt's config; names imported."""

    # -- volumes ---------------------------------------------------------------
    @abc.abstractmethod
    def list_volumes(self, pool: str) -> list[VolumeInfo]:
        """All volumes of an active pool from the index, in name order (one query)."""

    def list_volumes_json(self, pool: str) -> bytes:
        """``list_volumes`` as a JSON array of objects (what the daemon answers)."""
        import orjson

        return orjson.dumps([v.to_dict() for v in self.list_volumes(pool)])

    def list_volumes_page(self, pool: str, *, offset: int = 0, limit: int = 100,
                          sort: str = "name", filter: str = "") -> VolumePage:
        """``limit`` volumes from ``offset``, of those whose name contains ``filter``
        (case-insensitive), ordered by ``sort`` (a key of ``VOLUME_SORT_KEYS``, '-' first
        for descending; ties in name order); with how many match in all."""
        key, desc = check_page(offset, limit, sort)
        flt = filter.casefold()
        vols = [v for v in self.list_volumes(pool) if flt in v.name.casefold()]
        if key != "name":
            blank = "" if key in ("type", "format") else 0
            vols.sort(key=lambda v: getattr(v, key) or blank)
        if desc:
            vols.reverse()
        return VolumePage(len(vols), offset, vols[offset:offset + limit])

    @abc.abstractmethod
    def volume_info(self, pool: str, name: str) -> VolumeInfo:
        """One volume of an active pool (NoSuchVolume if none)."""

    @abc.abstractmethod
    def volume_lookup_by_key(self, key: str) -> VolumeInfo:
        """The volume with this key, in any pool."""

    @abc.abstractmethod
    def volume_lookup_by_path(self, path: str) -> VolumeInfo:
        """The volume with this path, in any pool."""

    @abc.abstractmethod
    def volume_xml(self, pool: str, name: str) -> str:
        """libvirt's volume XML (``vol-dumpxml``)."""

    @abc.abstractmethod
    def volume_create_xml(self, pool: str, xml: str, *, prealloc_metadata: bool = False) -> str:
        """Create a volume from libvirt volume XML; returns its name."""

    @abc.abstractmethod
    def volume_create(self, pool: str, args: VolumeCreateArgs) -> str:
        """Create a volume as ``vol-create-as`` does; returns its name."""

    @abc.abstractmethod
    def volume_delete(self, pool: str, name: str) -> None:
        """Delete a volume and its storage."""

    # -- secrets ---------------------------------------------------------------
    @abc.abstractmethod
    def secret_define_xml(self, xml: str) -> str:
        """Define a secret; returns its UUID."""

    @abc.abstractmethod
    def list_secrets(self) -> list[SecretInfo]:
        """Every defined secret."""

    @abc.abstractmethod
    def secret_info(self, uuid: str) -> SecretInfo:
        """A secret's usage and flags (NoSuchSecret if none)."""

    @abc.abstractmethod
    def secret_lookup_by_usage(self, usage_type: str, usage_id: str) -> str:
        """The UUID of the secret with this usage."""

    @abc.abstractmethod
    def secret_xml(self, uuid: str) -> str:
        """libvirt's secret XML."""

    @abc.abstractmethod
    def secret_set_value(self, uuid: str, value: bytes) -> None:
        """Set a secret's value (raw bytes)."""

    @abc.abstractmethod
    def secret_get_value(self, uuid: str) -> bytes:
        """Raises Forbidden for a private secret."""

    @abc.abstractmethod
    def secret_undefine(self, uuid: str) -> None:
        """Remove a secret and its value."""

    # -- jobs and data operations ------------------------------------------------
    # Not abstract: a transport without them answers "unsupported" rather than failing
    # to instantiate.
    def _missing(self, what: str) -> Unsupported:
        return Unsupported(f"{what} is not supported by this connection")

    def list_jobs(self, *, include_finished: bool = True) -> list[JobInfo]:
        """Every recorded job, or only running ones without ``include_finished``."""
        raise self._missing("jobs")

    def job_info(self, job_id: str) -> JobInfo:
        """One job's state: bytes done of the total, rate, state, error."""
        raise self._missing("jobs")

    def job_wait(self, job_id: str, timeout: float | None = None) -> JobInfo:
        """Block until the job is finished (or the timeout passes); its latest state."""
        raise self._missing("jobs")

    def job_cancel(self, job_id: str) -> None:
        """Ask a job (of any process on this host) to stop; returns at once."""
        raise self._missing("jobs")

    def volume_clone(self, pool: str, name: str, new_name: str, *,
                     target_pool: str | None = None, format: str | None = None,
                     reflink: bool = False, linked: bool = False,
                     prealloc_metadata: bool = False,
                     bandwidth: int | None = None) -> JobInfo:
        """vol-clone: copy a volume (converting if ``format`` differs); ``linked`` makes a
        qcow2 overlay backed by the source instead of a copy."""
        raise self._missing("volume clone")

    def volume_create_from(self, pool: str, xml: str, src_pool: str, src_name: str, *,
                           reflink: bool = False, prealloc_metadata: bool = False,
                           bandwidth: int | None = None) -> JobInfo:
        """vol-create-from: a new volume as the XML says, filled from another volume."""
        raise self._missing("volume create-from")

    def volume_resize(self, pool: str, name: str, capacity: int, *, delta: bool = False,
                      shrink: bool = False, allocate: bool = False) -> JobInfo:
        """Change a volume's capacity (``delta``: by that much; shrinking needs
        ``shrink``); returns the job at once."""
        raise self._missing("volume resize")

    def volume_wipe(self, pool: str, name: str, algorithm: str = "zero", *,
                    bandwidth: int | None = None) -> JobInfo:
        """Overwrite a volume's contents with ``algorithm``; returns the job at once."""
        raise self._missing("volume wipe")

    def volume_upload(self, pool: str, name: str, source: BinaryIO, *, offset: int = 0,
                      length: int | None = None, sparse: bool = True,
                      bandwidth: int | None = None) -> JobInfo:
        """Write ``source`` into the volume. A regular file's holes are kept as holes."""
        raise self._missing("volume upload")

    def volume_download(self, pool: str, name: str, sink: BinaryIO, *, offset: int = 0,
                        length: int | None = None, sparse: bool = True,
                        bandwidth: int | None = None) -> JobInfo:
        """Copy the volume's bytes into ``sink``; with ``sparse`` a regular-file sink gets
        holes where the volume has them."""
        raise self._missing("volume download")

    def volume_snapshot_create(self, pool: str, name: str, snapshot: str, *,
                               external: bool = False) -> SnapshotInfo:
        """Take a storage snapshot of a volume."""
        raise self._missing("storage snapshots")

    def volume_snapshot_list(self, pool: str, name: str) -> list[SnapshotInfo]:
        """A volume's storage snapshots."""
        raise self._missing("storage snapshots")

    def volume_snapshot_revert(self, pool: str, name: str, snapshot: str) -> None:
        """Bring a volume back to a snapshot's contents."""
        raise self._missing("storage snapshots")

    def volume_snapshot_delete(self, pool: str, name: str, snapshot: str) -> None:
        """Drop a storage snapshot."""
        raise self._missing("storage snapshots")

    def volume_export_nbd(self, pool: str, name: str, *, socket_path: str | None = None,
                          host: str | None = None, port: int | None = None,
                          read_only: bool = False,
                          export_name: str | None = None) -> NbdExport:
        """Serve the volume's guest-visible content over NBD from the storage host."""
        raise self._missing("NBD export (it runs beside the volume: use the embedded engine)")

    def events_since(self, last_id: int = 0, *, timeout: float = 0.0,
                     limit: int = 1000) -> list[Event]:
        """Events after ``last_id``, waiting up to ``timeout`` seconds for the first one.
        ``last_id=-1`` means "from now on": returns [] and the caller uses
        ``latest_event_id()`` as its start."""
        raise self._missing("events")

    def latest_event_id(self) -> int:
        """The id of the newest event, to follow events from now on."""
        raise self._missing("events")

    # -- host ------------------------------------------------------------------
    def pool_type_features(self) -> list[dict[str, Any]]:
        """Per pool type, on this host: supported (and why not), shared, and which
        operations and snapshot kinds (per volume format) it offers."""
        raise self._missing("pool type features")

    def volume_features(self, pool: str, name: str) -> dict[str, bool]:
        """Per feature (snapshot, snapshot-external, clone-linked, clone-full, copy,
        resize-grow, resize-shrink, upload, download, wipe, export), whether this volume
        offers it in its current state."""
        raise self._missing("volume features")

    def volume_df(self, pool: str, name: str) -> dict[str, Any]:
        """The filesystems inside the volume (partitions, whole disk, logical volumes of
        a PV inside it) with type, label, UUID and df's numbers: ``{"table",
        "filesystems": [...]}``. A filesystem that cannot be read has an ``error``."""
        raise self._missing("reading a guest's filesystems")

    def pool_df(self, pool: str) -> list[dict[str, Any]]:
        """``volume_df`` for every volume of the pool: ``[{"volume", "filesystems"}]``,
        or ``{"volume", "error"}`` for a volume that could not be read."""
        raise self._missing("reading a guest's filesystems")

    def volume_boot_files(self, pool: str, name: str, *,
                          extract_dir: str | None = None) -> dict[str, Any]:
        """The guest's default kernel, initrd and command line (``config``, ``title``,
        ``kernel``, ``initrd``, ``cmdline``); with ``extract_dir``, also written there
        (a directory on the storage host) and listed under ``extracted``."""
        raise self._missing("reading a guest's boot files")

    def volume_inspect(self, pool: str, name: str) -> dict[str, Any]:
        """The operating system on the volume (``os``: type, distro, name, version,
        hostname, root), its ``fstab`` and its ``filesystems`` with mount points."""
        raise self._missing("inspecting a guest")

    def volume_device(self, pool: str, name: str) -> dict[str, Any]:
        """The SCSI identity of a LUN volume, read from its target: lun, device_type,
        vendor, product, revision, serial, block_size, capacity. Unsupported for
        volumes that are not LUNs."""
        raise self._missing("volume device identity")

    def host_devices(self) -> list[dict[str, Any]]:
        """The host's block devices (path, size, sector sizes, model, vendor, serial,
        WWN, transport, rotational, removable, read-only, partition table, partitions,
        filesystem type/UUID/label, holders, mount points), as plain dicts."""
        raise self._missing("host device listing")

    def find_pool_sources(self, pool_type: str, source_xml: str | None = None) -> str:
        """libvirt's virConnectFindStoragePoolSources: a <sources> document of what
        could become a pool of ``pool_type`` here; ``source_xml`` narrows the search."""
        raise self._missing("pool source discovery")

    # -- backups (docs/backup.md) -------------------------------------------------
    # ``directory`` is a path on the host that runs the engine.
    def volume_backup(self, pool: str, name: str, directory: str, *,
                      incremental: bool = False, bandwidth: int | None = None) -> JobInfo:
        """vol-backup: a full backup, or an incremental one against the newest backup in
        ``directory`` (full, with a warning in its manifest, when that cannot be trusted)."""
        raise self._missing("volume backup")

    def volume_restore(self, directory: str, pool: str, name: str, *,
                       format: str | None = None, point: str | None = None,
                       bandwidth: int | None = None) -> JobInfo:
        """vol-restore: a new volume ``name`` in ``pool`` with the content of backup
        ``point`` (the newest by default), in ``format`` (the backup's by default)."""
        raise self._missing("volume restore")

    def volume_import(self, source: str, pool: str, name: str, *, format: str | None = None,
                      bandwidth: int | None = None) -> JobInfo:
        """vol-import: the bytes of a file or block device on the engine's host (read as
        raw) into a new volume ``name`` in ``pool``, sparse; nothing is left under the
        name if it fails."""
        raise self._missing("volume import")

    def volume_move(self, pool: str, name: str, to_pool: str, *, new_name: str | None = None,
                    format: str | None = None, bandwidth: int | None = None,
                    target: str | None = None) -> JobInfo:
        """vol-move: copy the volume into ``to_pool`` (as ``new_name``, in ``format``:
        by default its own name, and its format where that pool makes it), read the copy
        back against the source, then delete the source; if any step fails the source
        stays and no copy is left. ``target``: the URI of another host's virtstored
        whose ``to_pool`` takes the copy (the engine connects to it with its own
        credentials)."""
        raise self._missing("volume move")

    def volume_receive_check(self, pool: str, name: str, capacity: int, *,
                             format: str | None = None, like: str | None = None,
                             required: int = 0) -> dict[str, Any]:
        """Whether ``volume_receive`` with these arguments would start: the name is free
        in ``pool``, the pool makes the format (``format``, else ``like`` where the pool
        makes it, else its default) and has room for ``required`` bytes of data; the
        ``format`` and the bytes ``needed`` there, or the error it would raise."""
        raise self._missing("volume receive")

    def volume_receive(self, pool: str, name: str, source: Iterable[tuple[int, bytes]],
                       capacity: int, *, format: str | None = None, like: str | None = None,
                       required: int = 0, bandwidth: int | None = None) -> JobInfo:
        """A new volume ``name`` of ``capacity`` bytes holding the ``(offset, data)``
        pieces of ``source`` (increasing offsets; zeros elsewhere), checked as
        ``volume_receive_check`` does; it gets its name only when ``source`` ended
        whole, so a failed or cut stream leaves nothing."""
        raise self._missing("volume receive")

    def volume_chunk_hashes(self, pool: str, name: str, *, offset: int = 0,
                            length: int | None = None) -> dict[str, Any]:
        """The SHA-256 (hex) of each 4 MiB chunk of the volume that holds anything but
        zeros, read through its format, for the chunks from ``offset`` (a multiple of 4
        MiB) on, ``length`` bytes of them (to the end by default): ``{"chunk_size",
        "capacity", "chunks": {index: hash}}``."""
        raise self._missing("volume checksums")

    def backup_verify(self, directory: str) -> JobInfo:
        """backup-verify: every chunk against its hash, every manifest's chunks and chain;
        the job fails listing what is wrong."""
        raise self._missing("backup verify")

    def backup_list(self, directory: str) -> list[dict[str, Any]]:
        """The backups in ``directory``, oldest first, without their chunk lists."""
        raise self._missing("backup listing")

    # -- pre-migration checks (docs/backup.md) ---------------------------------
    def volume_migrate_info(self, pool: str, name: str) -> dict[str, Any]:
        """What another host needs to know to take this volume: ``storage`` (a key of
        the shared storage it lives on, "" for local storage), ``format``, ``capacity``,
        ``required`` (bytes a copy needs, from qemu-img measure), ``backing``,
        ``encrypted``, and a ``note`` when it could not be measured."""
        raise self._missing("migration checks")

    def migrate_target_check(self, storage: str, format: str, capacity: int,
                             required: int, *,
                             backing: bool = False, encrypted: bool = False,
                             pool: str | None = None) -> dict[str, Any]:
        """On the target host: whether a volume so described is reachable here
        (``verdict`` "shared": a running pool with the same ``storage``), or which pool
        (``pool``, or the first that fits) would take a copy ("copy"), or why none can
        ("no"); with ``pool``, ``available``, ``needed`` (bytes the copy takes there)
        and a ``reason``."""
        raise self._missing("migration checks")

    # -- cluster (several hosts on shared storage; docs/cluster.md) -------------
    def cluster_status(self) -> dict[str, Any]:
        """The cluster this engine is a member of: its etcd endpoints and their health,
        quorum, members (sessions, leases held), this member's session and counters;
        ``{"clustered": False}`` for an engine alone."""
        raise self._missing("cluster status")

    def volume_lease(self, pool: str, name: str, *, holder: str | None = None,
                     ttl: int | None = None) -> dict[str, Any]:
        """Take (or renew, for the same holder) the cluster-wide write lease on a
        volume of a shared pool, e.g. before a guest starts on it; Busy if another
        holder has it. It lasts ``ttl`` seconds after the last renewal."""
        raise self._missing("volume leases")

    def volume_unlease(self, pool: str, name: str, *, holder: str | None = None,
                       force: bool = False) -> None:
        """End an explicit write lease (this member's; anyone's with ``force``)."""
        raise self._missing("volume leases")

    def volume_lease_list(self, pool: str | None = None) -> list[dict[str, Any]]:
        """The write leases held in the cluster (of one pool's storage if given)."""
        raise self._missing("volume leases")

    def pool_overrides(self, pool: str) -> dict[str, dict[str, str]]:
        """Each member's own values of the host-local keys of a cluster-wide pool."""
        raise self._missing("cluster pools")

    def pool_override(self, pool: str, key: str, value: str | None = None, *,
                      member: str | None = None) -> dict[str, str]:
        """Set (or, with None, unset) one member's own value of a host-local key of a
        cluster-wide pool (this member's by default): target.path, source.device,
        source.host, source.initiator. That member's definition follows at once; its
        values after the change."""
        raise self._missing("cluster pools")

    # -- lifetime --------------------------------------------------------------
    def close(self) -> None:  # noqa: B027 - optional hook, most transports hold nothing
        """Release resources; the default has none."""

    def __enter__(self) -> Connection:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- conveniences shared by both transports --------------------------------
    def pool(self, name: str) -> Pool:
        """A handle on one pool (NoSuchPool if there is none by that name)."""
        self.pool_info(name)
        return Pool(self, name)

    def volume(self, pool: str, name: str) -> Volume:
        """A handle on one volume (NoSuchVolume if there is none)."""
        return self.pool(pool).volume(name)

    def secret(self, uuid: str) -> Secret:
        """A handle on one secret (NoSuchSecret if there is none)."""
        self.secret_info(uuid)
        return Secret(self, uuid)

    def job(self, job_id: str) -> Job:
        """A handle on a job of any process on this host."""
        return Job(self, self.job_info(job_id))

    def define_pool(self, xml: str) -> Pool:
        """Define a persistent pool from libvirt XML (``pool-define``)."""
        return Pool(self, self.pool_define_xml(xml))

    def define_secret(self, xml: str) -> Secret:
        """Define a secret from libvirt XML (``secret-define``)."""
        return Secret(self, self.secret_define_xml(xml))

    def volume_disk_xml(self, pool: str, name: str, *, target_dev: str = "vda",
                        bus: str = "virtio", source: str = "path") -> str:
        """libvirt's domain ``<disk>`` element for the volume, to put in a guest's
        ``<devices>``: by its file or device (``source="path"``) or by pool and volume
        name (``source="volume"``), with the driver type from its format. An encrypted
        volume's passphrase secret is the one its XML names, else the secret whose usage
        is its path."""
        from virtstore.errors import VirtstoreError
        from virtstore.xml.disk import disk_xml

        def secret_for(path: str) -> str | None:
            try:
                return self.secret_lookup_by_usage("volume", path)
            except VirtstoreError:
                return None

        return disk_xml(self.volume_info(pool, name), self.volume_xml(pool, name),
                        target_dev=target_dev, bus=bus, source=source, secret_for=secret_for)

    def volume_by_path_or_key(self, ident: str) -> VolumeInfo:
        """virsh's rule for a volume given without --pool: a path or a key."""
        try:
            return self.volume_lookup_by_key(ident)
        except Exception:
            return self.volume_lookup_by_path(ident)
