"""The rbd pool: a Ceph RADOS pool (optionally a namespace of it); volumes are RBD images.

Through librados/librbd (Debian's python3-rados, python3-rbd), as libvirt's rbd backend:
volume paths and keys are ``pool/image`` (``pool/namespace/image``), the format is raw,
capacity comes from the cluster (``rados_cluster_stat``); an image's allocation is all
its objects (its size rounded up to whole objects) unless the pool says
``<refresh><volume allocation='default'/>``, then its allocated objects when fast-diff
is on (libvirt 9.0's rule, pinned by tests/test_xml_vs_libvirt.py).

Beyond libvirt:

* volume creation is staged (an image named ``virtstore-staging-*`` renamed on commit,
  and rename refuses to replace);
* a clone is copy-on-write: a hidden snapshot ``virtstore-clone-*`` of the source,
  protected, cloned (the last one is reused while the source has not changed). A
  plain clone is then flattened and the snapshot removed (an independent image, made
  at librbd's speed); a ``linked`` (or ``reflink``) clone keeps
  sharing the source's data, as libvirt's vol-clone does. Deleting a volume flattens
  the clones that still depend on it, so a snapshot never blocks deleting its image;
  deleting the last clone of a hidden snapshot removes the snapshot;
* storage snapshots are RBD snapshots (create, list, rollback, delete);
* wipe (zero or trim), upload and download go through librbd; an upload or a wipe
  takes a hidden snapshot first and rolls back to it if it fails or is cancelled.
"""

from __future__ import annotations

import contextlib
import os
import secrets as pysecrets
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, BinaryIO, ClassVar

from virtstore.backends import _rbd_utils as ru
from virtstore.backends._net_utils import clear_chunks, upload_chunks
from virtstore.backends._rbd_images import (
    BACKUP_SNAP_PREFIX,
    CHUNK,
    CLONE_SNAP_PREFIX,
    PRIVATE_PREFIX,
    STAGING_PREFIX,
    TX_SNAP_PREFIX,
    WIPE_ALGORITHMS,
    WIPE_CHUNK,
    RbdImages,
    _errors,
    _message,
    _rbd,
)
from virtstore.backends.base import (
    BackendCaps,
    CloneOptions,
    CreateRequest,
    PoolSizes,
    ScanResult,
    Stamp,
    VolumeRecord,
)
from virtstore.errors import (
    AlreadyExists,
    InvalidArgument,
    NoSpace,
    NoSuchVolume,
    OperationInvalid,
    Unsupported,
    VirtstoreError,
)
from virtstore.xml import PoolDef

if TYPE_CHECKING:
    import rbd  # type: ignore[import-not-found]

    from virtstore.data.monitor import Monitor
    from virtstore.host.nbd import QemuSource
    from virtstore.types import SnapshotInfo





class RbdBackend(RbdImages):
    caps = BackendCaps(pool_type="rbd", vol_formats=("raw",), default_vol_format="raw",
                       shared=True, file_based=False, volume_type="network")
    linked_clones = True  # COW clones of a protected snapshot
    snapshot_kinds: ClassVar[dict[str, tuple[str, ...]]] = {"raw": ("native",)}
    can_shrink = True
    backup_tracking = "rbd-diff"

    def host_problem(self) -> str | None:
        try:
            import rados  # type: ignore[import-not-found]  # noqa: F401
            import rbd  # noqa: F401
        except ImportError:
            return ("rbd pools need librados and librbd for Python (Debian: python3-rados "
                    "python3-rbd), which are not installed")
        return None

    # -- pool lifecycle --------------------------------------------------------
    def start(self, pool: PoolDef) -> None:
        s = self._settings(pool)
        # A restart reconnects: the secret or the monitors may have changed.
        self._clusters.forget(s)
        io = self._clusters.ioctx(s)
        try:
            if s.namespace:
                lib = _rbd()
                with self._clusters.ioctx(s, namespace="") as root:
                    if not lib.RBD().namespace_exists(root, s.namespace):
                        raise OperationInvalid(f"RBD namespace '{s.namespace}' does not "
                                               f"exist in pool '{s.pool}'")
        finally:
            io.close()

    def stop(self, pool: PoolDef) -> None:
        with contextlib.suppress(VirtstoreError):
            self._clusters.forget(self._settings(pool))

    def sizes(self, pool: PoolDef) -> PoolSizes:
        try:
            s = self._settings(pool)
            stats = self._clusters.get(s).get_cluster_stats()
            with self._io(pool) as io:
                used = int(io.get_stats().get("num_bytes", 0))
        except _errors(VirtstoreError):
            return PoolSizes()
        return PoolSizes(capacity=int(stats["kb"]) * 1024, allocation=used,
                         available=int(stats["kb_avail"]) * 1024)


    def scan(self, pool: PoolDef, known: Mapping[str, Stamp]) -> ScanResult:
        res = ScanResult()
        lib = _rbd()
        with self._io(pool) as io:
            for name in self._names(io):
                try:
                    rec = self._record(pool, io, name)
                except (NoSuchVolume, lib.ImageNotFound):
                    continue  # deleted meanwhile
                except _errors() as exc:
                    res.skipped.append((name, _message(exc)))
                    continue
                res.add(rec, known)
        return res

    def read_volume(self, pool: PoolDef, name: str) -> VolumeRecord | None:
        with self._io(pool) as io:
            try:
                return self._record(pool, io, name)
            except NoSuchVolume:
                return None

    # -- volumes: create, commit, delete ---------------------------------------
    def volume_path(self, pool: PoolDef, name: str) -> str:
        return self._path(pool, name)

    def staging_path(self, pool: PoolDef, token: str) -> str:
        return ru.encode_staging(pool, STAGING_PREFIX + token)


    def create_volume(self, pool: PoolDef, staging: str, req: CreateRequest) -> None:
        if req.vol.target.encryption is not None:
            raise Unsupported("storage pool does not support encrypted volumes")
        if req.backing_path:
            raise Unsupported("unsupported configuration: backing storage not supported "
                              "for raw volumes")
        lib = _rbd()
        with self._io(pool) as io:
            try:
                lib.RBD().create(io, self._staging_image(staging), req.capacity,
                                 old_format=False)
            except lib.ImageExists as exc:
                raise AlreadyExists(f"storage volume '{req.vol.name}' exists already") from exc
            except _errors() as exc:
                raise OperationInvalid(f"failed to create volume '{req.vol.name}': "
                                       f"{_message(exc)}") from exc

    def commit_volume(self, pool: PoolDef, staging: str, final: str) -> None:
        lib = _rbd()
        new = os.path.basename(final)
        with self._io(pool) as io:
            if new in lib.RBD().list(io):
                raise AlreadyExists(f"storage volume '{new}' exists already")
            try:
                lib.RBD().rename(io, self._staging_image(staging), new)
            except lib.ImageExists as exc:
                raise AlreadyExists(f"storage volume '{new}' exists already") from exc

    def discard_staging(self, staging: str) -> None:
        decoded = ru.decode_staging(staging)
        if decoded is None:
            return
        pool, image = decoded
        with self._io(pool) as io:
            self._remove_image(io, image)

    def delete_volume(self, pool: PoolDef, rec: VolumeRecord) -> None:
        with self._io(pool) as io:
            self._remove_image(io, rec.name)

    # -- data operations (the contract's verbs) --------------------------------
    def vol_resize(self, pool: PoolDef, rec: VolumeRecord, capacity: int, *,
                   shrink: bool, allocate: bool) -> None:
        if allocate:
            raise Unsupported("unsupported flags (allocate) for rbd volume resize: RBD "
                              "images are always thin")
        with self._io(pool) as io, self._image(io, rec.name) as img, \
                self._writer(img, rec.name):
            if capacity < img.size() and not shrink:
                raise InvalidArgument("Can't shrink capacity below current capacity unless "
                                      "shrink flag explicitly specified")
            try:
                img.resize(capacity, allow_shrink=shrink)
            except _errors() as exc:
                raise OperationInvalid(f"failed to resize volume '{rec.name}': "
                                       f"{_message(exc)}") from exc

    @contextlib.contextmanager
    def _undo_on_failure(self, img: rbd.Image, monitor: Monitor) -> Iterator[None]:
        """Rollback point: a hidden snapshot, rolled back to if the body fails; not when
        the job was fenced (its cluster lease lost: another host may be writing now),
        which leaves the image as a crash would, and the snapshot for a later undo."""
        snap = TX_SNAP_PREFIX + pysecrets.token_hex(6)
        img.create_snap(snap)
        try:
            yield
        except BaseException:
            if monitor.fenced:
                raise
            try:
                img.rollback_to_snap(snap)
            finally:
                img.remove_snap(snap)
            raise
        img.remove_snap(snap)

    def vol_wipe(self, pool: PoolDef, rec: VolumeRecord, algorithm: str,
                 monitor: Monitor) -> None:
        if algorithm not in WIPE_ALGORITHMS:
            raise Unsupported(f"unsupported flags ({algorithm}) for wiping an rbd volume: "
                              f"use one of {', '.join(WIPE_ALGORITHMS)}")
        with self._io(pool) as io, self._image(io, rec.name) as img, \
                self._writer(img, rec.name):
            with self._undo_on_failure(img, monitor):
                # Written zeros, as libvirt's rbd wipe writes them; librbd frees whole
                # zeroed objects of a thin image.
                clear_chunks(int(img.size()), WIPE_CHUNK,
                             img.discard if algorithm == "trim" else img.write_zeroes, monitor)

    def vol_upload(self, pool: PoolDef, rec: VolumeRecord, source: BinaryIO, *, offset: int,
                   length: int | None, sparse: bool, monitor: Monitor) -> None:
        from virtstore.backends._block_data import check_range

        with self._io(pool) as io, self._image(io, rec.name) as img, \
                self._writer(img, rec.name):
            size = int(img.size())
            check_range(size, offset, length, rec.name)  # before the rollback point
            with self._undo_on_failure(img, monitor):
                upload_chunks(source, rec.name, size, offset=offset, length=length,
                              sparse=sparse, monitor=monitor, write=img.write,
                              zero=img.write_zeroes)
                img.flush()

    def vol_download(self, pool: PoolDef, rec: VolumeRecord, sink: BinaryIO, *, offset: int,
                     length: int | None, sparse: bool, monitor: Monitor) -> None:
        with self._io(pool) as io, self._image(io, rec.name, read_only=True) as img:
            size = int(img.size())
            if offset > size:
                raise InvalidArgument(f"offset {offset} is past the end of volume "
                                      f"'{rec.name}' ({size} bytes)")
            end = size if length is None else min(size, offset + length)
            monitor.set_total(end - offset)
            extents: list[tuple[int, int]] = []

            def cb(at: int, n: int, exists: bool) -> int:
                if exists:
                    extents.append((at, n))
                return 0

            img.diff_iterate(offset, end - offset, None, cb, include_parent=True,
                             whole_object=False)
            fd = _regular_fd(sink)
            if fd is not None:
                sink.flush()
            base = sink.tell() if fd is not None else 0
            pos = offset
            for at, n in [*sorted(extents), (end, 0)]:
                at, stop = max(at, pos), min(at + n, end)
                if at > pos:  # a hole
                    self._emit_hole(sink, fd, base + pos - offset, at - pos, sparse, monitor)
                    pos = at
                while pos < stop:
                    k = min(CHUNK, stop - pos)
                    data = img.read(pos, k)
                    if fd is not None:
                        os.pwrite(fd, data, base + pos - offset)
                    else:
                        sink.write(data)
                    pos += k
                    monitor.advance(k)
            if fd is not None:
                if os.fstat(fd).st_size < base + end - offset:
                    os.ftruncate(fd, base + end - offset)
                sink.seek(base + end - offset)
            sink.flush()

    @staticmethod
    def _emit_hole(sink: BinaryIO, fd: int | None, at: int, n: int, sparse: bool,
                   monitor: Monitor) -> None:
        if fd is not None and sparse:
            monitor.skip(n)
            return
        zero = bytes(min(CHUNK, n))
        left = n
        while left:
            k = min(len(zero), left)
            if fd is not None:
                os.pwrite(fd, zero[:k], at + n - left)
            else:
                sink.write(zero[:k])
            left -= k
            monitor.advance(k)

    def vol_clone(self, pool: PoolDef, src_pool: PoolDef, src: VolumeRecord, staging: str, *,
                  linked: bool, monitor: Monitor,
                  options: CloneOptions = CloneOptions()) -> None:  # noqa: B008 - frozen
        lib = _rbd()
        target = self._staging_image(staging)
        if self._settings(src_pool).mon_host != self._settings(pool).mon_host:
            raise Unsupported("a clone between rbd pools of different clusters is not "
                              "supported")
        with self._io(src_pool) as s_io, self._io(pool) as d_io:
            for attempt in range(2):
                with self._image(s_io, src.name) as img:
                    features = int(img.features())
                    snap, made = self._clone_snap(img)
                try:
                    lib.RBD().clone(s_io, src.name, snap, d_io, target, features=features)
                    break
                except (lib.ImageNotFound, lib.InvalidArgument):
                    # the reused snapshot went (or is going: unprotected) with the last
                    # clone of it, deleted meanwhile
                    if made or attempt:
                        raise
                except BaseException:
                    if made:
                        with self._image(s_io, src.name) as img:
                            img.unprotect_snap(snap)
                            img.remove_snap(snap)
                    raise
            if linked:
                return
            self._flatten(d_io, {"pool": d_io.get_pool_name(),
                                 "pool_namespace": d_io.get_namespace(),
                                 "image": target}, monitor)
            self._cleanup_clone_snap(s_io, {"pool_name": s_io.get_pool_name(),
                                            "pool_namespace": s_io.get_namespace(),
                                            "image_name": src.name, "snap_name": snap})

    @staticmethod
    def _clone_snap(img: rbd.Image) -> tuple[str, bool]:
        """A protected hidden snapshot of the image as it is now, to clone from, and
        whether it was made here. The newest one an earlier clone left serves when the
        image has not changed since (libvirt reuses its snapshots so too): making or
        removing a snapshot waits for a monitor commit, about a second on Ceph's
        defaults, while a clone takes milliseconds."""
        hidden = [s for s in img.list_snaps() if s["name"].startswith(CLONE_SNAP_PREFIX)]
        if hidden:
            last = max(hidden, key=lambda s: s["id"])
            if last["size"] == img.size() and img.is_protected_snap(last["name"]) \
                    and not _changed_since(img, last["name"]):
                return str(last["name"]), False
        snap = CLONE_SNAP_PREFIX + pysecrets.token_hex(6)
        img.create_snap(snap)
        img.protect_snap(snap)
        return snap, True

    def qemu_source(self, pool: PoolDef,
                    rec: VolumeRecord) -> contextlib.AbstractContextManager[QemuSource]:
        return self._qemu_image(pool, rec.name)

    def snapshot_source(self, pool: PoolDef, rec: VolumeRecord,
                        snap: str) -> contextlib.AbstractContextManager[QemuSource]:
        return self._qemu_image(pool, rec.name, snap)

    def staging_source(self, pool: PoolDef, staging: str,
                       fmt: str) -> contextlib.AbstractContextManager[QemuSource]:
        return self._qemu_image(pool, self._staging_image(staging))

    @contextlib.contextmanager
    def _qemu_image(self, pool: PoolDef, image: str,
                    snapshot: str | None = None) -> Iterator[QemuSource]:
        """How qemu opens an image (its rbd driver), or one of its snapshots; the cephx
        key goes through a file readable by root only, removed when the caller is done."""
        from virtstore.host.nbd import QemuSource, secret_object

        s = self._settings(pool)
        opts = ["driver=raw", "file.driver=rbd", f"file.pool={s.pool}",
                f"file.image={image}"]
        if snapshot is not None:
            opts.append(f"file.snapshot={snapshot}")
        if s.namespace:
            opts.append(f"file.namespace={s.namespace}")
        for i, h in enumerate(pool.source.hosts):
            opts.append(f"file.server.{i}.host={h.name}")
            opts.append(f"file.server.{i}.port={h.port or 6789}")
        objects: list[str] = []
        with contextlib.ExitStack() as stack:
            if s.key is not None:
                objects.append(stack.enter_context(
                    secret_object("rbdkey0", s.key.encode(), "base64")))
                opts += [f"file.user={s.user}", "file.key-secret=rbdkey0"]
            yield QemuSource(image_opts=",".join(opts), objects=objects)

    # -- change tracking for incremental backups ---------------------------------
    def backup_snapshot(self, pool: PoolDef, rec: VolumeRecord, backup_id: str) -> str:
        snap = BACKUP_SNAP_PREFIX + backup_id
        with self._io(pool) as io, self._image(io, rec.name) as img:
            try:
                img.create_snap(snap)
            except _errors() as exc:
                raise OperationInvalid(f"cannot take snapshot '{snap}' of volume "
                                       f"'{rec.name}': {_message(exc)}") from exc
        return snap

    def backup_snapshot_exists(self, pool: PoolDef, rec: VolumeRecord, snap: str) -> bool:
        with self._io(pool) as io, self._image(io, rec.name, read_only=True) as img:
            return any(s["name"] == snap for s in img.list_snaps())

    def backup_snapshot_drop(self, pool: PoolDef, rec: VolumeRecord, snap: str) -> None:
        lib = _rbd()
        with self._io(pool) as io, self._image(io, rec.name) as img:
            try:
                img.remove_snap(snap)
            except lib.ImageNotFound:
                pass  # gone already: what was asked for

    def backup_extents(self, pool: PoolDef, rec: VolumeRecord, snap: str,
                       since: str | None) -> list[tuple[int, int]]:
        out: list[tuple[int, int]] = []

        def cb(offset: int, length: int, exists: bool) -> int:
            # A discarded extent changed too: it now reads as zeros.
            out.append((offset, length))
            return 0

        with self._io(pool) as io, \
                self._image(io, rec.name, read_only=True, snapshot=snap) as img:
            img.diff_iterate(0, img.size(), since, cb, include_parent=True,
                             whole_object=False)
        return out

    # -- storage snapshots -----------------------------------------------------
    def snap_list(self, pool: PoolDef, rec: VolumeRecord) -> list[SnapshotInfo]:
        from virtstore.types import SnapshotInfo

        out = []
        with self._io(pool) as io, self._image(io, rec.name, read_only=True) as img:
            for s in img.list_snaps():
                if s["name"].startswith(PRIVATE_PREFIX):
                    continue
                try:
                    created = img.get_snap_timestamp(s["id"]).timestamp()
                except _errors(AttributeError):
                    created = 0.0
                out.append(SnapshotInfo(pool="", volume=rec.name, name=s["name"],
                                        kind=self.snapshot_kind, created=created,
                                        size=int(s.get("size", 0))))
        return out

    def _check_snap_name(self, snap: str) -> None:
        if snap.startswith(PRIVATE_PREFIX):
            raise InvalidArgument(f"snapshot names starting with '{PRIVATE_PREFIX}' are "
                                  "reserved")

    def snap_create(self, pool: PoolDef, rec: VolumeRecord, snap: str) -> None:
        self._check_snap_name(snap)
        lib = _rbd()
        with self._io(pool) as io, self._image(io, rec.name) as img:
            try:
                img.create_snap(snap)
            except lib.ImageExists as exc:
                raise AlreadyExists(f"snapshot '{snap}' of volume '{rec.name}' exists "
                                    "already") from exc
            except lib.NoSpace as exc:
                raise NoSpace(f"no space for snapshot '{snap}': {_message(exc)}") from exc

    def _need_snap(self, img: rbd.Image, rec: VolumeRecord, snap: str) -> None:
        if snap.startswith(PRIVATE_PREFIX) or \
                snap not in {s["name"] for s in img.list_snaps()}:
            raise NoSuchVolume(f"no snapshot '{snap}' of volume '{rec.name}'")

    def snap_revert(self, pool: PoolDef, rec: VolumeRecord, snap: str) -> None:
        with self._io(pool) as io, self._image(io, rec.name) as img:
            self._need_snap(img, rec, snap)
            img.rollback_to_snap(snap)

    def snap_delete(self, pool: PoolDef, rec: VolumeRecord, snap: str) -> None:
        with self._io(pool) as io, self._image(io, rec.name) as img:
            self._need_snap(img, rec, snap)
            self._drop_snapshot(io, img, snap, flatten_children=False)


class _Changed(Exception):
    pass


def _changed_since(img: rbd.Image, snap: str) -> bool:
    """Whether any data of ``img`` was written since its snapshot ``snap`` (the object
    map answers at once where fast-diff is on; else librbd compares object lists)."""
    def cb(offset: int, length: int, exists: bool) -> int:
        raise _Changed

    try:
        img.diff_iterate(0, img.size(), snap, cb, include_parent=False, whole_object=True)
    except _Changed:
        return True
    return False


def _regular_fd(obj: object) -> int | None:
    from virtstore.data.stream import _regular_fd as regular

    return regular(obj)
