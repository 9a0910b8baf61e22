"""The gluster pool: a GlusterFS volume (optionally a directory of it); volumes are its files.

As libvirt shows them, volumes are network volumes: path ``gluster://host/vol/dir/name``
(the URL qemu opens with its own gluster client), key ``vol/dir/name``, directories are
``netdir`` volumes. Two ways to the files, the same volumes either way:

* FUSE mode (when the kernel has FUSE and the GlusterFS client is installed): a private
  FUSE mount of the volume under ``/run/virtstore/gluster/``, made when the pool starts
  and removed when it stops (the mount is not the pool's interface: guests use the
  URLs). Everything a file pool does works: every file format, staged create, delete,
  resize, wipe (all algorithms), upload, download, clone, qcow2 internal snapshots.
* libgfapi mode (no FUSE, as libvirt does it): the files through libgfapi from this
  process (``_gluster_utils``): raw and qcow2 create, delete, resize (raw), wipe (zero),
  upload, download, clone, and qcow2 internal snapshots through qemu-img at the URL.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import stat
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Any, BinaryIO, ClassVar

from virtstore.backends._file_volumes import FileVolumes
from virtstore.backends._net_utils import fold_ino
from virtstore.backends._remotefs_utils import RemoteFiles, RemoteFS
from virtstore.backends.base import (
    Backend,
    BackendCaps,
    CloneOptions,
    CreateRequest,
    PoolSizes,
    ScanResult,
    Stamp,
    VolumeRecord,
)
from virtstore.backends.dir import (
    FILE_FORMATS,
    PRIVATE_PREFIX,
    STAGING_PREFIX,
    DirBackend,
    record_from_stat,
)
from virtstore.backends.fs import kernel_filesystems
from virtstore.errors import InvalidArgument, OperationInvalid, Unsupported
from virtstore.host import mounts
from virtstore.host.runner import run, which
from virtstore.xml import PoolDef

if TYPE_CHECKING:
    from virtstore.data.monitor import Monitor
    from virtstore.host.nbd import QemuSource
    from virtstore.types import SnapshotInfo

RUN_DIR = "/run/virtstore/gluster"


def volume_name(pool: PoolDef) -> str:
    if not pool.source.name:
        raise InvalidArgument("missing source volume name for gluster pool")
    return pool.source.name


def subdir(pool: PoolDef) -> str:
    return (pool.source.dir or "/").strip("/")


def url_base(pool: PoolDef) -> str:
    if not pool.source.hosts:
        raise InvalidArgument("missing source host for gluster pool")
    h = pool.source.hosts[0]
    host = f"[{h.name}]" if ":" in h.name else h.name
    if h.port:
        host += f":{h.port}"
    sub = subdir(pool)
    return f"gluster://{host}/{volume_name(pool)}" + (f"/{sub}" if sub else "")


def _host(pool: PoolDef) -> tuple[str, int | None]:
    if not pool.source.hosts:
        raise InvalidArgument("missing source host for gluster pool")
    return pool.source.hosts[0].name, pool.source.hosts[0].port


class _Gfapi(RemoteFiles):
    """The libgfapi mode's file operations (RemoteFiles over a GfapiClient)."""

    staging_tag = "gluster-staging:"
    rf_backing = True
    caps = BackendCaps(pool_type="gluster")  # for the wording of its errors

    def rf_connect(self, pool: PoolDef) -> RemoteFS:
        host, port = _host(pool)
        return self.rf_connect_where({"host": host, "port": port,
                                      "volume": volume_name(pool)})

    def rf_where(self, pool: PoolDef) -> dict[str, Any]:
        host, port = _host(pool)
        return {"host": host, "port": port, "volume": volume_name(pool)}

    def rf_connect_where(self, where: Mapping[str, Any]) -> RemoteFS:
        from virtstore.backends._gluster_utils import client

        return client(str(where["host"]), str(where["volume"]), where.get("port"))

    def rf_dir(self, pool: PoolDef) -> str:
        return subdir(pool)

    def rf_url(self, pool: PoolDef, name: str) -> str:
        return f"{url_base(pool)}/{name}"

    def rf_key(self, pool: PoolDef, name: str) -> str:
        return self.rf_url(pool, name)  # libvirt's key is the URL too


def mount_point(pool: PoolDef) -> str:
    ident = hashlib.sha256(f"{pool.uuid or pool.name}".encode()).hexdigest()[:12]
    return os.path.join(RUN_DIR, f"{pool.name}-{ident}")


def _pad_qcow2(path: str) -> None:
    """Extend a new qcow2 image to whole clusters, as qemu-img makes them: qemu's gluster
    driver reads metadata in aligned blocks and takes a read past the end as an error."""
    with open(path, "r+b") as fh:
        header = fh.read(24)
        if len(header) < 24 or header[:4] != b"QFI\xfb":
            return
        cluster = 1 << int.from_bytes(header[20:24], "big")
        size = os.fstat(fh.fileno()).st_size
        if size % cluster:
            os.ftruncate(fh.fileno(), size + (-size % cluster))
            os.fsync(fh.fileno())


class GlusterBackend(FileVolumes):
    caps = BackendCaps(pool_type="gluster", vol_formats=FILE_FORMATS, default_vol_format="raw",
                       shared=True, file_based=False, volume_type="network")
    linked_clones = True  # a qcow2 overlay naming its backing volume relatively
    snapshot_kinds: ClassVar[dict[str, tuple[str, ...]]] = {"qcow2": ("internal",)}
    can_shrink = True

    mode = "auto"  # "fuse", "gfapi", or "auto": FUSE where the kernel has it

    def __init__(self) -> None:
        self._files = DirBackend()
        self._gf = _Gfapi()

    def _fuse_problem(self) -> str | None:
        if which("mount.glusterfs") is None and not os.path.exists("/sbin/mount.glusterfs"):
            return "'mount.glusterfs' is not installed (Debian glusterfs-client)"
        if "fuse" not in kernel_filesystems():
            return "this kernel has no FUSE support ('fuse' is not in /proc/filesystems)"
        return None

    def gfapi(self) -> bool:
        """Whether pools go through libgfapi (else through a private FUSE mount)."""
        if self.mode == "auto":
            return self._fuse_problem() is not None
        return self.mode == "gfapi"

    def host_problem(self) -> str | None:
        from virtstore.backends import _gluster_utils as gu

        if self.gfapi() and not gu.available():
            return (f"gluster pools need FUSE or libgfapi: {self._fuse_problem()}, and "
                    "libgfapi (Debian libgfapi0) is not installed")
        return None

    # -- where things are ------------------------------------------------------
    def _base(self, pool: PoolDef) -> str:
        sub = subdir(pool)
        mp = mount_point(pool)
        return os.path.join(mp, sub) if sub else mp

    def _local(self, pool: PoolDef, name: str) -> str:
        if "/" in name:
            raise InvalidArgument(f"invalid volume name '{name}'")
        return os.path.join(self._base(pool), name)

    def _mounted(self, pool: PoolDef) -> bool:
        return mounts.mounted_at(mount_point(pool)) is not None

    def _need_mount(self, pool: PoolDef) -> None:
        if not self._mounted(pool):
            raise OperationInvalid(f"gluster volume '{volume_name(pool)}' of pool "
                                   f"'{pool.name}' is not mounted: restart the pool")

    # -- pool lifecycle --------------------------------------------------------
    def start(self, pool: PoolDef) -> None:
        url_base(pool)
        if self.gfapi():
            with self._gf.rf_connect(pool) as c:
                st = c.stat("/" + subdir(pool))
                if st is None or not stat.S_ISDIR(st.mode):
                    raise OperationInvalid(f"directory '{subdir(pool)}' does not exist in "
                                           f"gluster volume '{volume_name(pool)}'")
            return
        if "fuse" not in kernel_filesystems():
            raise Unsupported("this kernel has no FUSE support ('fuse' is not in "
                              "/proc/filesystems): the gluster volume cannot be reached")
        mp = mount_point(pool)
        os.makedirs(mp, mode=0o700, exist_ok=True)
        if not self._mounted(pool):
            host = pool.source.hosts[0]
            opts = [f"log-file=/var/log/glusterfs/virtstore-{os.path.basename(mp)}.log"]
            if host.port:
                opts.append(f"server-port={host.port}")
            run(["mount", "-t", "glusterfs", "-o", ",".join(opts),
                 f"{host.name}:/{volume_name(pool)}", mp], timeout=120)
        base = self._base(pool)
        if not os.path.isdir(base):
            self.stop(pool)
            raise OperationInvalid(f"directory '{subdir(pool)}' does not exist in gluster "
                                   f"volume '{volume_name(pool)}'")

    def stop(self, pool: PoolDef) -> None:
        if self.gfapi():
            from virtstore.backends._gluster_utils import forget

            host, port = _host(pool)
            forget(host, volume_name(pool), port)
            return
        mp = mount_point(pool)
        if self._mounted(pool):
            mounts.umount(mp)
        with contextlib.suppress(OSError):
            os.rmdir(mp)

    def sizes(self, pool: PoolDef) -> PoolSizes:
        if self.gfapi():
            return self._gf.rf_sizes(pool)
        if not self._mounted(pool):
            return PoolSizes()
        sv = os.statvfs(self._base(pool))
        capacity = sv.f_frsize * sv.f_blocks
        # As libvirt counts it: free blocks including root's reserve (the bricks' server
        # writes as root), the same as through libgfapi.
        free = sv.f_frsize * sv.f_bfree
        return PoolSizes(capacity=capacity, allocation=capacity - free, available=free)

    # -- volumes ---------------------------------------------------------------
    def _network(self, pool: PoolDef, rec: VolumeRecord, st: os.stat_result) -> VolumeRecord:
        """A record of the FUSE mount's file as libvirt shows the volume through
        libgfapi: its URL, the file's owner and mode, the backing file as named from
        the image's directory."""
        local = rec.path
        rec.mode, rec.uid, rec.gid = stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid
        rec.cluster_size = None  # libvirt's gluster backend does not read it
        rec.type = "netdir" if rec.type == "dir" else "network"
        rec.ino = fold_ino(rec.ino)
        if rec.backing_path and rec.backing_path.startswith(self._base(pool) + "/"):
            rec.backing_path = os.path.relpath(rec.backing_path, os.path.dirname(local))
        rec.path = f"{url_base(pool)}/{rec.name}"
        rec.key = rec.path  # as libvirt
        return rec

    def scan(self, pool: PoolDef, known: Mapping[str, Stamp]) -> ScanResult:
        if self.gfapi():
            return self._gf.rf_scan(pool, known)
        self._need_mount(pool)
        res = ScanResult()
        with os.scandir(self._base(pool)) as entries:
            for de in entries:
                if de.name.startswith(PRIVATE_PREFIX):
                    continue
                try:
                    st = os.stat(de.path)
                except OSError as exc:
                    res.skipped.append((de.name, exc.strerror or str(exc)))
                    continue
                if not (stat.S_ISREG(st.st_mode) or stat.S_ISDIR(st.st_mode)):
                    continue
                old = known.get(de.name)
                if old is not None and old == Stamp(fold_ino(st.st_ino), st.st_size, st.st_mtime_ns,
                                                    st.st_ctime_ns):
                    res.unchanged.append(de.name)
                    continue
                try:
                    res.changed.append(self._network(
                        pool, record_from_stat(de.name, de.path, st), st))
                except Exception as exc:  # an unreadable image is listed as skipped
                    res.skipped.append((de.name, str(exc)))
        return res

    def read_volume(self, pool: PoolDef, name: str) -> VolumeRecord | None:
        if self.gfapi():
            return self._gf.rf_read_volume(pool, name)
        path = self._local(pool, name)
        try:
            st = os.stat(path)
        except FileNotFoundError:
            return None
        return self._network(pool, record_from_stat(name, path, st), st)

    def volume_path(self, pool: PoolDef, name: str) -> str:
        return f"{url_base(pool)}/{name}"

    def staging_path(self, pool: PoolDef, token: str) -> str:
        if self.gfapi():
            return self._gf.rf_staging_path(pool, token)
        self._need_mount(pool)
        return os.path.join(self._base(pool), STAGING_PREFIX + token)

    def create_volume(self, pool: PoolDef, staging: str, req: CreateRequest) -> None:
        if staging.startswith(self._gf.staging_tag):
            self._gf.rf_create(pool, staging, req)
            return
        if req.backing_path and req.backing_path.startswith(url_base(pool) + "/"):
            # A backing volume of this pool, named by its URL: the image records the
            # relative name, which qemu resolves beside the overlay (URL or mount).
            from virtstore.types import replace

            req = replace(req, backing_path=os.path.basename(req.backing_path))
        self._files.create_volume(pool, staging, req)
        if req.format == "qcow2":
            _pad_qcow2(staging)

    def commit_volume(self, pool: PoolDef, staging: str, final: str) -> None:
        if staging.startswith(self._gf.staging_tag):
            self._gf.rf_commit(pool, staging, os.path.basename(final))
            return
        self._files.commit_volume(pool, staging, self._local(pool, os.path.basename(final)))

    def staging_source(self, pool: PoolDef, staging: str,
                       fmt: str) -> contextlib.AbstractContextManager[QemuSource]:
        if staging.startswith(self._gf.staging_tag):
            return contextlib.nullcontext(self._gf.rf_staging_source(pool, staging, fmt))
        return super().staging_source(pool, staging, fmt)

    def discard_staging(self, staging: str) -> None:
        if staging.startswith(self._gf.staging_tag):
            self._gf.rf_discard(staging)
            return
        with contextlib.suppress(OSError):
            self._files.discard_staging(staging)

    def delete_volume(self, pool: PoolDef, rec: VolumeRecord) -> None:
        if self.gfapi():
            self._gf.rf_delete(pool, rec)
            return
        local = self._local(pool, rec.name)
        self._files.delete_volume(pool, VolumeRecord(name=rec.name, path=local, key=local,
                                                     type="dir" if rec.type == "netdir"
                                                     else "file"))

    # -- data operations: FileVolumes on the private mount, or through libgfapi --
    def file_of(self, pool: PoolDef, rec: VolumeRecord) -> str:
        return self._local(pool, rec.name)

    def backing_name(self, pool: PoolDef, src: VolumeRecord) -> str:
        # Relative: qemu resolves it beside the overlay, at its URL or on the mount.
        return src.name

    def local_files(self, pool: PoolDef) -> bool:
        return not self.gfapi()

    def check_clone(self, pool: PoolDef, src_pool: PoolDef, src_backend: Backend,
                    src: VolumeRecord, *, linked: bool, options: CloneOptions,
                    what: str) -> None:
        if linked and src_pool.uuid != pool.uuid:
            raise Unsupported("a linked clone of a gluster volume must be in its pool")
        if what == "volume create-from" and self.gfapi():
            raise self.unsupported(f"{what} through libgfapi")
        check = Backend.check_clone if self.gfapi() else FileVolumes.check_clone
        check(self, pool, src_pool, src_backend, src, linked=linked, options=options,
              what=what)

    def pool_has(self, feature: str, pool: PoolDef) -> bool:
        # Through libgfapi a copy is a plain byte copy: no conversion (create-from).
        return not (feature == "copy" and self.gfapi())

    def check_resize(self, pool: PoolDef, rec: VolumeRecord, capacity: int, *,
                     shrink: bool, allocate: bool) -> None:
        if not self.gfapi():
            FileVolumes.check_resize(self, pool, rec, capacity, shrink=shrink,
                                     allocate=allocate)

    def vol_resize(self, pool: PoolDef, rec: VolumeRecord, capacity: int, *,
                   shrink: bool, allocate: bool) -> None:
        how = self._gf.vol_resize if self.gfapi() else super().vol_resize
        how(pool, rec, capacity, shrink=shrink, allocate=allocate)

    def vol_wipe(self, pool: PoolDef, rec: VolumeRecord, algorithm: str,
                 monitor: Monitor) -> None:
        (self._gf.vol_wipe if self.gfapi() else super().vol_wipe)(pool, rec, algorithm, monitor)

    def vol_upload(self, pool: PoolDef, rec: VolumeRecord, source: BinaryIO, *, offset: int,
                   length: int | None, sparse: bool, monitor: Monitor) -> None:
        how = self._gf.vol_upload if self.gfapi() else super().vol_upload
        how(pool, rec, source, offset=offset, length=length, sparse=sparse, monitor=monitor)

    def vol_download(self, pool: PoolDef, rec: VolumeRecord, sink: BinaryIO, *, offset: int,
                     length: int | None, sparse: bool, monitor: Monitor) -> None:
        how = self._gf.vol_download if self.gfapi() else super().vol_download
        how(pool, rec, sink, offset=offset, length=length, sparse=sparse, monitor=monitor)

    def vol_clone(self, pool: PoolDef, src_pool: PoolDef, src: VolumeRecord, staging: str, *,
                  linked: bool, monitor: Monitor,
                  options: CloneOptions = CloneOptions()) -> None:  # noqa: B008 - frozen
        how = self._gf.vol_clone if self.gfapi() else super().vol_clone
        how(pool, src_pool, src, staging, linked=linked, monitor=monitor, options=options)

    # An external snapshot's overlay would name its backing file by a path on the
    # private mount, which qemu cannot open at the volume's URL.
    snap_create_external = Backend.snap_create_external

    @contextlib.contextmanager
    def qemu_source(self, pool: PoolDef, rec: VolumeRecord) -> Iterator[QemuSource]:
        from virtstore.host.nbd import QemuSource

        image = rec.path if self.gfapi() else self._local(pool, rec.name)
        yield QemuSource(image=image, fmt=rec.format or "raw")

    # -- storage snapshots: qcow2 internal snapshots ---------------------------
    @contextlib.contextmanager
    def _qcow2(self, pool: PoolDef, rec: VolumeRecord) -> Iterator[str]:
        if rec.format != "qcow2":
            raise Unsupported(f"unsupported configuration: snapshots of '{rec.format}' "
                              "volumes of gluster pools are not supported (qcow2 only)")
        # qemu-img reaches the image at its URL with its own gluster client without FUSE.
        yield rec.path if self.gfapi() else self._local(pool, rec.name)

    def snap_list(self, pool: PoolDef, rec: VolumeRecord) -> list[SnapshotInfo]:
        if rec.format != "qcow2":
            return []
        from virtstore.formats.qemuimg import info
        from virtstore.types import SnapshotInfo

        if self.gfapi():
            # Read from the image's snapshot table: every qemu-img run on a gluster URL
            # spends seconds in libgfapi's shutdown.
            from virtstore.backends._remotefs_utils import qcow2_snapshots

            with self._gf.rf_connect(pool) as c, c.open(self._gf._p(pool, rec.name)) as f:
                return [SnapshotInfo(pool="", volume=rec.name, name=n, kind="internal",
                                     created=t, size=vm) for n, t, vm in qcow2_snapshots(f)]
        else:
            data = info(self._local(pool, rec.name), "qcow2")
        return [SnapshotInfo(pool="", volume=rec.name, name=str(s.get("name")),
                             kind="internal",
                             created=float(s.get("date-sec", 0))
                             + float(s.get("date-nsec", 0)) / 1e9,
                             size=int(s.get("vm-state-size", 0)))
                for s in data.get("snapshots", []) or []]

    def snap_create(self, pool: PoolDef, rec: VolumeRecord, snap: str) -> None:
        with self._qcow2(pool, rec) as path:
            run(["qemu-img", "snapshot", "-c", snap, path])

    def snap_revert(self, pool: PoolDef, rec: VolumeRecord, snap: str) -> None:
        with self._qcow2(pool, rec) as path:
            self._need_snap(pool, rec, snap)
            run(["qemu-img", "snapshot", "-a", snap, path])

    def snap_delete(self, pool: PoolDef, rec: VolumeRecord, snap: str) -> None:
        with self._qcow2(pool, rec) as path:
            self._need_snap(pool, rec, snap)
            run(["qemu-img", "snapshot", "-d", snap, path])

    def _need_snap(self, pool: PoolDef, rec: VolumeRecord, snap: str) -> None:
        from virtstore.errors import NoSuchVolume

        if snap not in {s.name for s in self.snap_list(pool, rec)}:
            raise NoSuchVolume(f"no snapshot '{snap}' of volume '{rec.name}'")
