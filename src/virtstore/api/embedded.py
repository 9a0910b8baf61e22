"""EmbeddedConnection: the engine in this process, on a state root shared with others."""

from __future__ import annotations

import functools
import os

from virtstore.api import Connection, check_page
from virtstore.api.startup import startup, warn
from virtstore.engine.index import VolumeIndex
from virtstore.engine.poolinfo import PoolReader
from virtstore.engine.state import StateRoot
from virtstore.errors import InvalidArgument, Unsupported, VirtstoreError
from virtstore.types import (
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
)

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable, Iterable
    from typing import Any, BinaryIO

    from virtstore.backup.ops import BackupOps
    from virtstore.engine.cluster import Cluster, ClusterConfig
    from virtstore.engine.clusterpools import ClusterPools
    from virtstore.engine.confine import Confinement
    from virtstore.engine.dataops import DataOps
    from virtstore.engine.events import EventLog
    from virtstore.engine.jobs import JobManager
    from virtstore.engine.pools import PoolManager
    from virtstore.engine.secrets import EphemeralSecrets, SecretStore
    from virtstore.engine.snapshots import SnapshotManager
    from virtstore.engine.volumes import VolumeManager



class EmbeddedConnection(Connection):
    """The engine's parts are made on first use: a command that reads one row imports
    the store, the index and the pool reader, not the XML layer, the lifecycle code,
    the jobs or the data layer (see "Start-up" in docs/engine.md)."""

    def __init__(self, root: str, *, confinement: Confinement | None = None,
                 cluster: ClusterConfig | None = None, default_pool: bool = False,
                 ephemeral_secrets: EphemeralSecrets | None = None,
                 connect: Callable[[str], Connection] | None = None) -> None:
        """``confinement``: what the engine refuses to touch for its callers
        (engine/confine.py); permissive by default, virtstored passes its own.
        ``cluster``: the etcd cluster this engine is a member of (engine/cluster.py).
        ``default_pool``: on the first such start on this state root, define, build and
        autostart a ``default`` dir pool under it (virtstored asks for it; a command or
        a script never gets a pool it did not ask for).
        ``ephemeral_secrets``: where ephemeral secrets are kept (default: in this
        process; virtstored's workers share theirs).
        ``connect``: opens another host's virtstored by its URI (a move there)."""
        self.open_remote = connect
        self.state = StateRoot(root)
        self.uri = "embedded://" + self.state.root
        self.confinement = confinement
        self.ephemeral_secrets = ephemeral_secrets
        self.index = VolumeIndex(self.state.store)
        self.pool_reader = PoolReader(self.state)
        self.state.secret_source = lambda: self.secrets  # pools' auth secrets
        self.cluster: Cluster | None = None
        if cluster is not None:
            from virtstore.engine.cluster import Cluster

            self.cluster = Cluster(cluster)
        startup(self, default_pool)

    @functools.cached_property
    def events(self) -> EventLog:
        from virtstore.engine.events import EventLog

        return EventLog(self.state.store)

    @functools.cached_property
    def secrets(self) -> SecretStore:
        from virtstore.engine.secrets import SecretStore

        return SecretStore(self.state.secrets_dir, self.state.store, self.ephemeral_secrets)

    @functools.cached_property
    def pools(self) -> PoolManager:
        from virtstore.engine.pools import PoolManager

        pools = PoolManager(self.state, self.index, self.events, self.confinement)
        if self.cluster is not None:
            from virtstore.engine.clusterpools import ClusterPools

            pools.cluster_pools = ClusterPools(self.cluster, self.state, pools)
        return pools

    @functools.cached_property
    def volumes(self) -> VolumeManager:
        from virtstore.engine.volumes import VolumeManager

        volumes = VolumeManager(self.state, self.index, self.secrets, self.events,
                                self.confinement)
        volumes.cluster = self.cluster
        return volumes

    @functools.cached_property
    def jobs(self) -> JobManager:
        from virtstore.engine.jobs import JobManager

        return JobManager(self.state.store, self.events,
                          reread=lambda pool, name: self.volumes.reread(pool, name))

    @functools.cached_property
    def dataops(self) -> DataOps:
        from virtstore.engine.dataops import DataOps

        return DataOps(self.volumes, self.index, self.jobs, self.events)

    @functools.cached_property
    def snapshots(self) -> SnapshotManager:
        from virtstore.engine.snapshots import SnapshotManager

        return SnapshotManager(self.volumes, self.index)

    @functools.cached_property
    def backups(self) -> BackupOps:
        from virtstore.backup.ops import BackupOps

        return BackupOps(self.volumes, self.index, self.jobs)

    # -- start-up --------------------------------------------------------------
    def close(self, *, cancel_jobs: bool = False) -> None:
        """Wait for the jobs this process started, then release the state root.

        Jobs run in threads of this process, and the process does not exit before they
        end (nothing else would finish them or clean up after them); this is where a
        caller that did not ``wait()`` waits. ``cancel_jobs=True`` cancels them instead:
        each stops and removes what it was making.
        """
        # Only the parts this connection made (they are made on first use).
        if "jobs" in self.__dict__:
            self.jobs.join_local(cancel=cancel_jobs)
        if "events" in self.__dict__:
            self.events.close()
        if self.cluster is not None:
            if "pools" in self.__dict__ and self.pools.cluster_pools is not None:
                self.pools.cluster_pools.stop()
            self.cluster.close()
        if "backend" in self.state.__dict__:
            self.state.backend.close()
        self.state.store.close()

    def follow_cluster_pools(self) -> None:
        """Keep this engine's pool definitions in step with the cluster's, in a thread
        (one engine per daemon does this; the others publish their changes)."""
        if self.cluster is not None:
            cp = self.pools.cluster_pools
            assert cp is not None
            cp.follow()

    def stop_jobs(self, grace: float) -> int:
        """Give this process's jobs ``grace`` seconds to finish, then cancel the rest and
        wait until they have cleaned up; how many were cancelled (a daemon stopping)."""
        self.jobs.join_local(grace)
        return self.jobs.join_local(cancel=True)

    def stop_waiting(self) -> None:
        """Readers blocked waiting for events return now (before ``close``)."""
        self.events.close()

    # -- pools -----------------------------------------------------------------
    def list_pools(self, flt: PoolFilter | None = None) -> list[PoolInfo]:
        pools = self.pool_reader.list()
        return [p for p in pools if flt is None or flt.matches(p)]

    def pool_info(self, name: str) -> PoolInfo:
        return self.pool_reader.info(name)

    def pool_lookup_by_uuid(self, uuid: str) -> str:
        return self.pool_reader.by_uuid(uuid)

    def pool_lookup_by_target_path(self, path: str) -> str:
        return self.pool_reader.by_target_path(path)

    def pool_define_xml(self, xml: str) -> str:
        return self.pools.define(xml)

    def pool_create_xml(self, xml: str, *, build: bool = False,
                        overwrite: bool | None = None) -> str:
        return self.pools.create(xml, build=build, overwrite=overwrite)

    def pool_xml(self, name: str, *, inactive: bool = False) -> str:
        return self.pools.xml(name, inactive=inactive)

    def pool_build(self, name: str, *, overwrite: bool | None = None) -> None:
        self.pools.build(name, overwrite=overwrite)

    def pool_start(self, name: str, *, build: bool = False,
                   overwrite: bool | None = None) -> None:
        self.pools.start(name, build=build, overwrite=overwrite)

    def pool_stop(self, name: str) -> None:
        self.pools.stop(name)

    def pool_delete(self, name: str) -> None:
        self.pools.delete(name)

    def pool_undefine(self, name: str) -> None:
        self.pools.undefine(name)

    def pool_refresh(self, name: str) -> None:
        self.pools.refresh(name)

    def pool_set_autostart(self, name: str, autostart: bool) -> None:
        self.pools.set_autostart(name, autostart)

    def pool_capabilities_xml(self) -> str:
        from virtstore.backends.table import capabilities_xml

        return capabilities_xml()

    def pool_type_features(self) -> list[dict[str, Any]]:
        from virtstore.backends.table import type_features

        return type_features()

    def import_libvirt_pools(self, config_dir: str = "/etc/libvirt/storage") -> list[str]:
        if not os.path.isdir(config_dir):
            raise InvalidArgument(f"cannot read libvirt storage config: '{config_dir}' "
                                  "is not a directory")
        imported: list[str] = []
        for fn in sorted(os.listdir(config_dir)):
            path = os.path.join(config_dir, fn)
            if not fn.endswith(".xml") or not os.path.isfile(path):
                continue
            with open(path, "rb") as fh:
                data = fh.read()
            try:
                name = self.pools.define(data.decode("utf-8"))
            except VirtstoreError as exc:
                warn("not imported: %s: %s", path, exc)
                continue
            if os.path.lexists(os.path.join(config_dir, "autostart", fn)):
                self.pools.set_autostart(name, True)
            imported.append(name)
        return imported

    # -- volumes ---------------------------------------------------------------
    def _require_active(self, pool: str) -> None:
        row = self.state.row(pool)
        if not row.active:
            from virtstore.errors import OperationInvalid

            raise OperationInvalid(f"Requested operation is not valid: storage pool "
                                   f"'{pool}' is not active")

    def list_volumes(self, pool: str) -> list[VolumeInfo]:
        self._require_active(pool)
        return self.index.list(pool)

    def list_volumes_json(self, pool: str) -> bytes:
        self._require_active(pool)
        return self.index.list_json(pool)

    def list_volumes_page(self, pool: str, *, offset: int = 0, limit: int = 100,
                          sort: str = "name", filter: str = "") -> VolumePage:
        key, desc = check_page(offset, limit, sort)
        self._require_active(pool)
        return self.index.page(pool, offset, limit, key, desc, filter)

    def volume_info(self, pool: str, name: str) -> VolumeInfo:
        found = self.index.info_if_active(pool, name)
        if found is not None:
            return found
        self._require_active(pool)
        return self.index.info(pool, name)

    def volume_lookup_by_key(self, key: str) -> VolumeInfo:
        return self.index.by_key(key)

    def volume_lookup_by_path(self, path: str) -> VolumeInfo:
        return self.index.by_path(path)

    def volume_xml(self, pool: str, name: str) -> str:
        from virtstore.engine.volxml import volume_xml

        return volume_xml(self.state, self.index, pool, name)

    def volume_create_xml(self, pool: str, xml: str, *, prealloc_metadata: bool = False) -> str:
        return self.volumes.create_xml(pool, xml, prealloc_metadata=prealloc_metadata)

    def volume_create(self, pool: str, args: VolumeCreateArgs) -> str:
        return self.volumes.create_args(pool, args)

    def volume_delete(self, pool: str, name: str) -> None:
        self.volumes.delete(pool, name)
        self.snapshots.forget_volume(pool, name)

    # -- jobs and data operations ----------------------------------------------
    def list_jobs(self, *, include_finished: bool = True) -> list[JobInfo]:
        return self.jobs.all(include_finished=include_finished)

    def job_info(self, job_id: str) -> JobInfo:
        return self.jobs.info(job_id)

    def job_wait(self, job_id: str, timeout: float | None = None) -> JobInfo:
        return self.jobs.wait(job_id, timeout)

    def job_cancel(self, job_id: str) -> None:
        self.jobs.cancel(job_id)

    def volume_clone(self, pool: str, name: str, new_name: str, *,
                     target_pool: str | None = None, format: str | None = None,
                     reflink: bool = False, linked: bool = False,
                     prealloc_metadata: bool = False,
                     bandwidth: int | None = None) -> JobInfo:
        return self.dataops.clone(pool, name, new_name, target_pool=target_pool, format=format,
                                  reflink=reflink, linked=linked,
                                  prealloc_metadata=prealloc_metadata, bandwidth=bandwidth)

    def volume_create_from(self, pool: str, xml: str, src_pool: str, src_name: str, *,
                           reflink: bool = False, prealloc_metadata: bool = False,
                           bandwidth: int | None = None) -> JobInfo:
        return self.dataops.create_from(pool, xml, src_pool, src_name, reflink=reflink,
                                        prealloc_metadata=prealloc_metadata,
                                        bandwidth=bandwidth)

    def volume_resize(self, pool: str, name: str, capacity: int, *, delta: bool = False,
                      shrink: bool = False, allocate: bool = False) -> JobInfo:
        return self.dataops.resize(pool, name, capacity, delta=delta, shrink=shrink,
                                   allocate=allocate)

    def volume_wipe(self, pool: str, name: str, algorithm: str = "zero", *,
                    bandwidth: int | None = None) -> JobInfo:
        return self.dataops.wipe(pool, name, algorithm, bandwidth=bandwidth)

    def volume_upload(self, pool: str, name: str, source: BinaryIO, *, offset: int = 0,
                      length: int | None = None, sparse: bool = True,
                      bandwidth: int | None = None) -> JobInfo:
        return self.dataops.upload(pool, name, source, offset=offset, length=length,
                                   sparse=sparse, bandwidth=bandwidth)

    def volume_download(self, pool: str, name: str, sink: BinaryIO, *, offset: int = 0,
                        length: int | None = None, sparse: bool = True,
                        bandwidth: int | None = None) -> JobInfo:
        return self.dataops.download(pool, name, sink, offset=offset, length=length,
                                     sparse=sparse, bandwidth=bandwidth)

    def volume_snapshot_create(self, pool: str, name: str, snapshot: str, *,
                               external: bool = False) -> SnapshotInfo:
        return self.snapshots.create(pool, name, snapshot, external=external)

    def volume_snapshot_list(self, pool: str, name: str) -> list[SnapshotInfo]:
        return self.snapshots.list(pool, name)

    def volume_snapshot_revert(self, pool: str, name: str, snapshot: str) -> None:
        self.snapshots.revert(pool, name, snapshot)

    def volume_snapshot_delete(self, pool: str, name: str, snapshot: str) -> None:
        self.snapshots.delete(pool, name, snapshot)

    def volume_export_nbd(self, pool: str, name: str, *, socket_path: str | None = None,
                          host: str | None = None, port: int | None = None,
                          read_only: bool = False,
                          export_name: str | None = None) -> NbdExport:
        from virtstore.engine.nbd import export_volume

        return export_volume(self, pool, name, socket_path=socket_path, host=host, port=port,
                             read_only=read_only, export_name=export_name)

    def events_since(self, last_id: int = 0, *, timeout: float = 0.0,
                     limit: int = 1000) -> list[Event]:
        return self.events.since(last_id, timeout=timeout, limit=limit)

    def latest_event_id(self) -> int:
        return self.events.latest_id()

    def volume_features(self, pool: str, name: str) -> dict[str, bool]:
        from virtstore.backends.base import FEATURES

        pool_def, backend = self.volumes._active_pool(pool)
        rec = self.index.get(pool, name)
        return {f: backend.has_feature(f, pool_def, rec) for f in FEATURES}

    def volume_df(self, pool: str, name: str) -> dict[str, Any]:
        from virtstore.api import inspection

        return inspection.volume_df(self, pool, name)

    def pool_df(self, pool: str) -> list[dict[str, Any]]:
        from virtstore.api import inspection

        return inspection.pool_df(self, pool)

    def volume_boot_files(self, pool: str, name: str, *,
                          extract_dir: str | None = None) -> dict[str, Any]:
        from virtstore.api import inspection

        return inspection.boot_files(self, pool, name, extract_dir)

    def volume_inspect(self, pool: str, name: str) -> dict[str, Any]:
        from virtstore.api import inspection

        return inspection.inspect(self, pool, name)

    def volume_device(self, pool: str, name: str) -> dict[str, Any]:
        self._require_active(pool)
        self.index.info(pool, name)  # NoSuchVolume as any lookup
        row = self.state.row(pool)
        backend = self.state.backend(row.type, row.name)
        found = backend.device_identity(self.state.definition(row), name)
        if found is None:
            raise Unsupported(f"volume '{name}' of pool '{pool}' is not a SCSI LUN: "
                              "it has no device identity")
        return found

    # -- backups ---------------------------------------------------------------
    def volume_backup(self, pool: str, name: str, directory: str, *,
                      incremental: bool = False, bandwidth: int | None = None) -> JobInfo:
        return self.backups.backup(pool, name, directory, incremental=incremental,
                                   bandwidth=bandwidth)

    def volume_restore(self, directory: str, pool: str, name: str, *,
                       format: str | None = None, point: str | None = None,
                       bandwidth: int | None = None) -> JobInfo:
        return self.backups.restore(directory, pool, name, format=format, point=point,
                                    bandwidth=bandwidth)

    def volume_import(self, source: str, pool: str, name: str, *, format: str | None = None,
                      bandwidth: int | None = None) -> JobInfo:
        return self.backups.import_file(source, pool, name, format=format,
                                        bandwidth=bandwidth)

    def volume_move(self, pool: str, name: str, to_pool: str, *, new_name: str | None = None,
                    format: str | None = None, bandwidth: int | None = None,
                    target: str | None = None) -> JobInfo:
        remote = None
        if target is not None:
            if not target.startswith(("unix:", "https:")) or self.open_remote is None:
                raise InvalidArgument(f"a volume moves to another host's virtstored "
                                      f"(unix:///PATH or https://HOST:PORT), not '{target}'")
            remote = self.open_remote(target)
        return self.backups.move(pool, name, to_pool, new_name=new_name, format=format,
                                 bandwidth=bandwidth, target=remote)

    def volume_receive_check(self, pool: str, name: str, capacity: int, *,
                             format: str | None = None, like: str | None = None,
                             required: int = 0) -> dict[str, Any]:
        return self.backups.receive_check(pool, name, capacity, format, like, required,
                                          self.pool_info)

    def volume_receive(self, pool: str, name: str, source: Iterable[tuple[int, bytes]],
                       capacity: int, *, format: str | None = None, like: str | None = None,
                       required: int = 0, bandwidth: int | None = None) -> JobInfo:
        fmt = self.backups.receive_check(pool, name, capacity, format, like, required,
                                         self.pool_info)["format"]
        return self.backups.receive(pool, name, source, capacity, fmt, bandwidth=bandwidth)

    def volume_chunk_hashes(self, pool: str, name: str, *, offset: int = 0,
                            length: int | None = None) -> dict[str, Any]:
        return self.backups.chunk_hashes(pool, name, offset=offset, length=length)

    def backup_verify(self, directory: str) -> JobInfo:
        return self.backups.verify(directory)

    def backup_list(self, directory: str) -> list[dict[str, Any]]:
        from virtstore.backup.ops import list_backups

        return list_backups(directory)

    # -- pre-migration checks --------------------------------------------------
    def volume_migrate_info(self, pool: str, name: str) -> dict[str, Any]:
        from virtstore.backup.migrate import describe

        pdef, backend = self.volumes._active_pool(pool)
        rec = self.index.get(pool, name)
        backend.check_volume(pdef, rec)
        return describe(backend, pdef, rec)

    def migrate_target_check(self, storage: str, format: str, capacity: int,
                             required: int, *,
                             backing: bool = False, encrypted: bool = False,
                             pool: str | None = None) -> dict[str, Any]:
        from virtstore.backup.migrate import Candidate, place

        candidates = []
        for p in self.list_pools():
            if p.state == "running":
                pdef, backend = self.volumes._active_pool(p.name)
                candidates.append(Candidate(pdef, backend, p.available))
        return place(candidates, storage=storage, format=format, capacity=capacity,
                     required=required, backing=backing, encrypted=encrypted, pool=pool)

    # -- host ------------------------------------------------------------------
    def host_devices(self) -> list[dict[str, Any]]:
        from virtstore.host.devices import host_devices

        return [d.to_dict() for d in host_devices()]

    def find_pool_sources(self, pool_type: str, source_xml: str | None = None) -> str:
        from virtstore.engine.discovery import find_pool_sources

        return find_pool_sources(pool_type, source_xml)

    # -- secrets ---------------------------------------------------------------
    def secret_define_xml(self, xml: str) -> str:
        return self.secrets.define(xml)

    def list_secrets(self) -> list[SecretInfo]:
        return self.secrets.list()

    def secret_info(self, uuid: str) -> SecretInfo:
        return self.secrets.info(uuid)

    def secret_lookup_by_usage(self, usage_type: str, usage_id: str) -> str:
        return self.secrets.lookup_by_usage(usage_type, usage_id)

    def secret_xml(self, uuid: str) -> str:
        return self.secrets.xml(uuid)

    def secret_set_value(self, uuid: str, value: bytes) -> None:
        self.secrets.set_value(uuid, value)

    def secret_get_value(self, uuid: str) -> bytes:
        return self.secrets.get_value(uuid)

    def secret_undefine(self, uuid: str) -> None:
        self.secrets.undefine(uuid)

    # -- cluster ---------------------------------------------------------------
    def _clustered(self) -> Cluster:
        if self.cluster is None:
            raise Unsupported("this engine is not a member of a cluster: give it the etcd "
                              "endpoints (VIRTSTORE_CLUSTER, or cluster in virtstored.conf)")
        return self.cluster

    def _shared_pool(self, pool: str) -> tuple[Any, str]:
        """A shared pool's definition and the storage id its leases are keyed on."""
        pool_def, backend = self.volumes._active_pool(pool)
        if not backend.caps.shared:
            raise InvalidArgument(f"pool '{pool}' ({pool_def.type}) is this host's own "
                                  "storage: its volumes take no cluster leases")
        from virtstore.engine.clusterpools import lease_storage

        return pool_def, lease_storage(self.state.store, pool, pool_def)

    def cluster_status(self) -> dict[str, Any]:
        if self.cluster is None:
            return {"clustered": False}
        st = self.cluster.status()
        try:
            st["pools"] = self._cluster_pools().view()
        except VirtstoreError as exc:
            st["pools"] = {"cluster_pools": [], "not_applied": {}, "not_started": {},
                           "error": str(exc)}
        return {"clustered": True, **st}

    def _cluster_pools(self) -> ClusterPools:
        self._clustered()
        cp = self.pools.cluster_pools
        assert cp is not None
        return cp

    def pool_overrides(self, pool: str) -> dict[str, dict[str, str]]:
        return self._cluster_pools().overrides(pool)

    def pool_override(self, pool: str, key: str, value: str | None = None, *,
                      member: str | None = None) -> dict[str, str]:
        return self._cluster_pools().set_overrides(pool, member, {key: value})

    def volume_lease(self, pool: str, name: str, *, holder: str | None = None,
                     ttl: int | None = None) -> dict[str, Any]:
        cluster = self._clustered()
        pool_def, storage = self._shared_pool(pool)
        self.index.info(pool, name)  # NoSuchVolume as any lookup
        if ttl is not None and ttl < 2:
            raise InvalidArgument("a lease's TTL must be at least 2 seconds")
        lease = cluster.acquire(pool, pool_def, name, op="lease", holder=holder or "guest",
                                ttl=ttl or cluster.config.ttl, storage=storage)
        return {"pool": pool, "volume": name, "holder": lease.holder,
                "member": cluster.member, "lease": f"{lease.etcd_lease:x}",
                "ttl": ttl or cluster.config.ttl}

    def volume_unlease(self, pool: str, name: str, *, holder: str | None = None,
                       force: bool = False) -> None:
        cluster = self._clustered()
        pool_def, storage = self._shared_pool(pool)
        cluster.unlease(pool, pool_def, name, holder=holder, force=force, storage=storage)

    def volume_lease_list(self, pool: str | None = None) -> list[dict[str, Any]]:
        cluster = self._clustered()
        if pool is None:
            return cluster.leases()
        return cluster.leases(self._shared_pool(pool)[1])
