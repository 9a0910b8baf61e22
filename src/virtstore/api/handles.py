"""Handles on pools, volumes, secrets and jobs, as libvirt-python's objects.

They are thin: each holds a name and calls back into its connection, so the embedded
engine and the remote client share them.
"""

from __future__ import annotations

from virtstore.errors import InternalError
from virtstore.types import (
    JOB_CANCELLED,
    JOB_FAILED,
    JobInfo,
    PoolInfo,
    SecretInfo,
    SnapshotInfo,
    VolumeCreateArgs,
    VolumeInfo,
)

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import BinaryIO

    from virtstore.api import Connection


class Job:
    """A handle on one job (long work: clone, resize, wipe, upload, download, ...).

    The call that starts a job returns its handle at once; the work goes on in the
    process that started it (the embedded engine) or in virtstored. ``wait()`` blocks
    until it ends and raises the job's error if it failed.
    """

    def __init__(self, conn: Connection, info: JobInfo) -> None:
        self.conn = conn
        self.id = info.id
        self.last = info

    def info(self) -> JobInfo:
        """The job's current state: bytes done of the total, rate, state, error."""
        self.last = self.conn.job_info(self.id)
        return self.last

    def wait(self, timeout: float | None = None, *, check: bool = True) -> JobInfo:
        """Block until the job ends (or ``timeout`` seconds pass); its latest state.
        With ``check`` (the default) a failed or cancelled job raises its error."""
        self.last = self.conn.job_wait(self.id, timeout)
        if check and self.last.state in (JOB_FAILED, JOB_CANCELLED):
            from virtstore.errors import Cancelled, error_for_code

            job = self.last
            cls = (error_for_code(job.error_code) if job.error_code
                   else Cancelled if job.state == JOB_CANCELLED else InternalError)
            raise cls(job.error or f"{job.kind} job '{job.id}' {job.state}")
        return self.last

    def cancel(self) -> None:
        """Ask the job to stop; what it was making is removed. Returns at once."""
        self.conn.job_cancel(self.id)

    def __repr__(self) -> str:
        return f"<Job {self.id} {self.last.kind} {self.last.state}>"


class Volume:
    """A handle on one volume, by pool and name (libvirt-python's ``virStorageVol``).

    Methods that start long work (``clone``, ``resize``, ``wipe``, ``upload``,
    ``download``) return a ``Job`` at once; call ``job.wait()`` for the result.
    """

    def __init__(self, conn: Connection, pool: str, name: str) -> None:
        self.conn = conn
        self.pool = pool
        self.name = name

    def info(self) -> VolumeInfo:
        """Type, path, key, format, capacity, allocation, physical size."""
        return self.conn.volume_info(self.pool, self.name)

    def xml(self) -> str:
        """libvirt's volume XML (``vol-dumpxml``)."""
        return self.conn.volume_xml(self.pool, self.name)

    def path(self) -> str:
        """The volume's path (``vol-path``)."""
        return self.info().path

    def key(self) -> str:
        """The volume's key (``vol-key``)."""
        return self.info().key

    def delete(self) -> None:
        """Delete the volume and its storage (``vol-delete``)."""
        self.conn.volume_delete(self.pool, self.name)

    def clone(self, new_name: str, *, target_pool: str | None = None,
              format: str | None = None, reflink: bool = False, linked: bool = False,
              prealloc_metadata: bool = False,
              bandwidth: int | str | None = None) -> Job:
        """Copy into ``new_name`` (in ``target_pool``, default this pool), converted to
        ``format`` if given; ``linked`` makes a qcow2 overlay instead of a copy;
        ``bandwidth`` in bytes per second (``"100M"`` too). Returns the job at once;
        ``Volume(conn, pool, new_name)`` exists once it is done."""
        return Job(self.conn, self.conn.volume_clone(
            self.pool, self.name, new_name, target_pool=target_pool, format=format,
            reflink=reflink, linked=linked, prealloc_metadata=prealloc_metadata,
            bandwidth=_bandwidth(bandwidth)))

    def resize(self, capacity: int | str, *, delta: bool = False, shrink: bool = False,
               allocate: bool = False) -> Job:
        """New capacity (bytes, or ``"10G"``); with ``delta`` it is added (or, with
        ``shrink``, taken away). Shrinking needs ``shrink``. Returns the job at once."""
        return Job(self.conn, self.conn.volume_resize(
            self.pool, self.name, size_arg(capacity, "capacity"), delta=delta,
            shrink=shrink, allocate=allocate))

    def wipe(self, algorithm: str = "zero", *, bandwidth: int | str | None = None) -> Job:
        """Overwrite the contents (``zero``, ``nnsa``, ``dod``, ``random``, ``trim``, ...,
        as virsh's vol-wipe). Returns the job at once."""
        return Job(self.conn, self.conn.volume_wipe(self.pool, self.name, algorithm,
                                                    bandwidth=_bandwidth(bandwidth)))

    def upload(self, source: BinaryIO, *, offset: int | str = 0,
               length: int | str | None = None,
               bandwidth: int | str | None = None) -> Job:
        """Write ``source``'s bytes into the volume at ``offset``. Returns the job at
        once; keep ``source`` open until it is done."""
        return Job(self.conn, self.conn.volume_upload(
            self.pool, self.name, source, offset=size_arg(offset, "offset"),
            length=None if length is None else size_arg(length, "length"),
            bandwidth=_bandwidth(bandwidth)))

    def download(self, sink: BinaryIO, *, offset: int | str = 0,
                 length: int | str | None = None,
                 bandwidth: int | str | None = None) -> Job:
        """Copy the volume's bytes into ``sink`` (holes kept in a regular file). Returns
        the job at once; keep ``sink`` open until it is done."""
        return Job(self.conn, self.conn.volume_download(
            self.pool, self.name, sink, offset=size_arg(offset, "offset"),
            length=None if length is None else size_arg(length, "length"),
            bandwidth=_bandwidth(bandwidth)))

    def snapshots(self) -> list[SnapshotInfo]:
        """The volume's storage snapshots."""
        return self.conn.volume_snapshot_list(self.pool, self.name)

    def snapshot(self, name: str, *, external: bool = False) -> SnapshotInfo:
        """Take a storage snapshot (``external``: a qcow2 overlay on the frozen image)."""
        return self.conn.volume_snapshot_create(self.pool, self.name, name,
                                                external=external)

    def revert(self, snapshot: str) -> None:
        """Back to a snapshot's contents; later writes are lost."""
        self.conn.volume_snapshot_revert(self.pool, self.name, snapshot)

    def delete_snapshot(self, snapshot: str) -> None:
        """Drop a storage snapshot."""
        self.conn.volume_snapshot_delete(self.pool, self.name, snapshot)

    def features(self) -> dict[str, bool]:
        """Which operations this volume offers now (snapshot, clone-linked, resize-grow,
        ...)."""
        return self.conn.volume_features(self.pool, self.name)

    def disk_xml(self, *, target_dev: str = "vda", bus: str = "virtio",
                 source: str = "path") -> str:
        """libvirt's domain ``<disk>`` element for this volume."""
        return self.conn.volume_disk_xml(self.pool, self.name, target_dev=target_dev,
                                         bus=bus, source=source)

    def __repr__(self) -> str:
        return f"<Volume {self.pool!r}/{self.name!r}>"


class Secret:
    """A handle on one secret by UUID (libvirt-python's ``virSecret``)."""

    def __init__(self, conn: Connection, uuid: str) -> None:
        self.conn = conn
        self.uuid = uuid

    def info(self) -> SecretInfo:
        """Usage, ephemeral and private flags."""
        return self.conn.secret_info(self.uuid)

    def xml(self) -> str:
        """libvirt's secret XML (``secret-dumpxml``)."""
        return self.conn.secret_xml(self.uuid)

    def value(self) -> bytes:
        """The secret's value; Forbidden for a private secret."""
        return self.conn.secret_get_value(self.uuid)

    def set_value(self, value: bytes) -> None:
        """Set the secret's value (raw bytes, not base64)."""
        self.conn.secret_set_value(self.uuid, value)

    def undefine(self) -> None:
        """Remove the secret and its value."""
        self.conn.secret_undefine(self.uuid)

    def __repr__(self) -> str:
        return f"<Secret {self.uuid}>"


class Pool:
    """A handle on one pool by name (libvirt-python's ``virStoragePool``)."""

    def __init__(self, conn: Connection, name: str) -> None:
        self.conn = conn
        self.name = name

    def info(self) -> PoolInfo:
        """State, sizes, autostart, persistence, target path."""
        return self.conn.pool_info(self.name)

    def xml(self, *, inactive: bool = False) -> str:
        """libvirt's pool XML (``pool-dumpxml``; ``inactive``: ``--inactive``)."""
        return self.conn.pool_xml(self.name, inactive=inactive)

    def build(self, *, overwrite: bool | None = None) -> None:
        """Make the pool's storage (a directory, a filesystem, a volume group);
        ``overwrite`` True/False as virsh's ``--overwrite``/``--no-overwrite``."""
        self.conn.pool_build(self.name, overwrite=overwrite)

    def start(self, *, build: bool = False, overwrite: bool | None = None) -> None:
        """Start the pool (``pool-start``), building it first if ``build``."""
        self.conn.pool_start(self.name, build=build, overwrite=overwrite)

    def stop(self) -> None:
        """Stop the pool (``pool-destroy``); a transient pool disappears."""
        self.conn.pool_stop(self.name)

    def delete(self) -> None:
        """Remove the pool's storage (``pool-delete``); the pool must be inactive."""
        self.conn.pool_delete(self.name)

    def undefine(self) -> None:
        """Forget the pool's definition (``pool-undefine``); it must be inactive."""
        self.conn.pool_undefine(self.name)

    def refresh(self) -> None:
        """Scan the pool's storage again for volumes made or removed outside."""
        self.conn.pool_refresh(self.name)

    def set_autostart(self, autostart: bool = True) -> None:
        """Start the pool when the host starts (``pool-autostart``)."""
        self.conn.pool_set_autostart(self.name, autostart)

    def volumes(self) -> list[VolumeInfo]:
        """Every volume of the running pool, in name order."""
        return self.conn.list_volumes(self.name)

    def volume(self, name: str) -> Volume:
        """A handle on one volume (NoSuchVolume if there is none by that name); its
        ``info()`` is the VolumeInfo."""
        self.conn.volume_info(self.name, name)
        return Volume(self.conn, self.name, name)

    def create_volume(self, name: str, capacity: int | str, *,
                      allocation: int | str | None = None, format: str | None = None,
                      backing_vol: str | None = None,
                      backing_vol_format: str | None = None,
                      prealloc_metadata: bool = False) -> Volume:
        """A new volume (``vol-create-as``); sizes in bytes or as ``"10G"``."""
        made = self.conn.volume_create(self.name, VolumeCreateArgs(
            name, size_arg(capacity, "capacity"),
            allocation=None if allocation is None else size_arg(allocation, "allocation"),
            format=format, backing_vol=backing_vol, backing_vol_format=backing_vol_format,
            prealloc_metadata=prealloc_metadata))
        return Volume(self.conn, self.name, made)

    def create_volume_xml(self, xml: str, *, prealloc_metadata: bool = False) -> Volume:
        """A new volume from libvirt volume XML (``vol-create``)."""
        made = self.conn.volume_create_xml(self.name, xml,
                                           prealloc_metadata=prealloc_metadata)
        return Volume(self.conn, self.name, made)

    def __repr__(self) -> str:
        return f"<Pool {self.name!r}>"


def size_arg(value: int | str, what: str = "size") -> int:
    """A size in bytes, or virsh's scaled integer (``"512M"``, ``"10GiB"``, ``"1GB"``)."""
    from virtstore.xml.units import size_arg as parse

    return parse(value, what)


def _bandwidth(value: int | str | None) -> int | None:
    if value is None:
        return None
    if isinstance(value, str) and value.lower().endswith("/s"):
        value = value[:-2]
    return size_arg(value, "bandwidth")
