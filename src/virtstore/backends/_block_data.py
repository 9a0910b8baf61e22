"""Data operations on volumes that are block device nodes (LVs, partitions).

A file volume's upload is written beside it and swapped in; a block device cannot be
swapped, so these write the device in place, as libvirt does: a failed or cancelled
upload or wipe leaves the volume partly written. Devices are opened exclusively
(O_EXCL) for writing, so a volume that is mounted or claimed by another device
(a PV of a VG, a member of an md array) is refused as busy instead of corrupted.

A backend derives from ``BlockDataOps`` and says where a volume's device node is
(``block_device``); a clone also needs ``create_block_target`` and
``staging_device``, a resize ``vol_resize``.
"""

from __future__ import annotations

import errno
import os
import stat
from typing import TYPE_CHECKING, BinaryIO

from virtstore.backends.base import Backend, CloneOptions
from virtstore.errors import Busy, InvalidArgument, OperationInvalid
from virtstore.host.files import Bounded
from virtstore.xml import PoolDef

if TYPE_CHECKING:
    from virtstore.backends.base import VolumeRecord
    from virtstore.data.monitor import Monitor


def open_device(path: str, *, write: bool) -> int:
    """A descriptor of the block device ``path``; a writer gets it exclusively."""
    flags = os.O_CLOEXEC | (os.O_WRONLY | os.O_EXCL if write else os.O_RDONLY)
    try:
        fd = os.open(path, flags)
    except FileNotFoundError as exc:
        raise OperationInvalid(f"volume device '{path}' does not exist") from exc
    except OSError as exc:
        if exc.errno == errno.EBUSY:
            raise Busy(f"volume device '{path}' is in use (mounted or held by another "
                       "device)") from exc
        raise
    if not stat.S_ISBLK(os.fstat(fd).st_mode):
        os.close(fd)
        raise OperationInvalid(f"'{path}' is not a block device")
    return fd


def device_size(fd: int) -> int:
    return os.lseek(fd, 0, os.SEEK_END)


def check_range(size: int, offset: int, length: int | None, name: str) -> int:
    """The byte count a transfer at ``offset`` may cover on a device of ``size``."""
    if offset < 0 or (length is not None and length < 0):
        raise InvalidArgument("offset and length must not be negative")
    if offset > size or (length is not None and offset + length > size):
        raise InvalidArgument(f"a transfer of {length} bytes at offset {offset} goes past "
                              f"the end of volume '{name}' ({size} bytes)")
    return size - offset if length is None else length


def _left_in(source: BinaryIO) -> int | None:
    """The bytes a seekable source (a file, a buffer) still holds; None for a pipe or a
    socket, whose length shows only at its end."""
    try:
        if not source.seekable():
            return None
        pos = source.tell()
        end = source.seek(0, os.SEEK_END)
        source.seek(pos)
    except (OSError, ValueError, AttributeError):
        return None
    return max(0, end - pos)


def upload_to_device(path: str, name: str, source: BinaryIO, *, offset: int,
                     length: int | None, sparse: bool, monitor: Monitor) -> None:
    """Write ``source`` into the device at ``offset``; more bytes than fit is an error
    (found before writing for a seekable source, at the end for a stream)."""
    from virtstore.data.stream import upload

    fd = open_device(path, write=True)
    try:
        size = device_size(fd)
        limit = check_range(size, offset, length, name)
        left = _left_in(source)
        if length is None and left is not None and left > limit:
            raise InvalidArgument(f"the upload is larger than volume '{name}' "
                                  f"({limit} bytes from offset {offset})")
        if length is not None:
            upload(source, fd, offset=offset, length=length, sparse=sparse, monitor=monitor)
        else:
            upload(Bounded(source, limit), fd, offset=offset,  # type: ignore[arg-type]
                   length=None, sparse=sparse, monitor=monitor)
            if source.read(1):
                raise InvalidArgument(f"the upload is larger than volume '{name}' "
                                      f"({limit} bytes from offset {offset})")
        os.fsync(fd)
    finally:
        os.close(fd)


def download_from_device(path: str, name: str, sink: BinaryIO, *, offset: int,
                         length: int | None, sparse: bool, monitor: Monitor) -> None:
    from virtstore.data.stream import download

    fd = open_device(path, write=False)
    try:
        n = check_range(device_size(fd), offset, length, name)
        download(fd, sink, offset=offset, length=n, sparse=sparse, monitor=monitor)
    finally:
        os.close(fd)


def copy_device(src_path: str, dst_path: str, length: int, monitor: Monitor) -> None:
    """Copy the first ``length`` bytes of one device to another, every byte (a new
    device need not read as zeros, so no range is skipped)."""
    from virtstore.data.copy import copy_sparse

    src = open_device(src_path, write=False)
    try:
        dst = open_device(dst_path, write=True)
        try:
            if device_size(dst) < length:
                raise OperationInvalid(f"'{dst_path}' is smaller than the {length} bytes "
                                       "to copy")
            copy_sparse(src, dst, length=length, monitor=monitor, allow_clone=False)
            os.fsync(dst)
        finally:
            os.close(dst)
    finally:
        os.close(src)


class BlockDataOps(Backend):
    """Upload, download and wipe for volumes whose path is a block device."""

    def block_device(self, pool: PoolDef, rec: VolumeRecord) -> str:
        """The device node holding the volume's bytes (raises when there is none)."""
        return rec.path

    def vol_wipe(self, pool: PoolDef, rec: VolumeRecord, algorithm: str,
                 monitor: Monitor) -> None:
        from virtstore.data.wipe import wipe

        wipe(self.block_device(pool, rec), algorithm, monitor=monitor, is_block=True)

    def vol_upload(self, pool: PoolDef, rec: VolumeRecord, source: BinaryIO, *, offset: int,
                   length: int | None, sparse: bool, monitor: Monitor) -> None:
        upload_to_device(self.block_device(pool, rec), rec.name, source, offset=offset,
                         length=length, sparse=sparse, monitor=monitor)

    def vol_download(self, pool: PoolDef, rec: VolumeRecord, sink: BinaryIO, *, offset: int,
                     length: int | None, sparse: bool, monitor: Monitor) -> None:
        download_from_device(self.block_device(pool, rec), rec.name, sink, offset=offset,
                             length=length, sparse=sparse, monitor=monitor)



class BlockClones(BlockDataOps):
    """Clones of block volumes: a new device under the staging name, every byte copied."""

    def create_block_target(self, pool: PoolDef, staging: str, capacity: int) -> None:
        """Make the device a clone is copied into, under the staging name."""
        raise self.unsupported("volume clone")

    def staging_device(self, pool: PoolDef, staging: str) -> str:
        raise self.unsupported("volume clone")

    def vol_clone(self, pool: PoolDef, src_pool: PoolDef, src: VolumeRecord, staging: str, *,
                  linked: bool, monitor: Monitor,
                  options: CloneOptions = CloneOptions()) -> None:  # noqa: B008 - frozen
        if linked:
            raise self.unsupported("a linked clone")
        src_dev = self.block_device(src_pool, src)
        fd = open_device(src_dev, write=False)
        try:
            size = device_size(fd)
        finally:
            os.close(fd)
        self.create_block_target(pool, staging, size)
        monitor.set_total(size)
        copy_device(src_dev, self.staging_device(pool, staging), size, monitor)
