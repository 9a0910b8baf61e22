"""Volume data through NBD: for volumes only qemu can open (an iSCSI LUN seen through
libiscsi), qemu-nbd serves the volume on a private socket and these methods read and
write it with the NBD client."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from typing import TYPE_CHECKING, BinaryIO

from virtstore.backends._net_utils import CHUNK, clear_chunks, upload_chunks
from virtstore.backends.base import Backend
from virtstore.errors import InvalidArgument, Unsupported
from virtstore.xml import PoolDef

if TYPE_CHECKING:
    from virtstore.backends.base import VolumeRecord
    from virtstore.data.monitor import Monitor
    from virtstore.host.nbd import NbdClient

WIPE_ALGORITHMS = ("zero", "trim")


class NbdDataOps(Backend):
    """Upload, download and wipe for volumes reached through an NBD client."""

    def nbd_open(self, pool: PoolDef, rec: VolumeRecord, *,
                 read_only: bool) -> contextlib.AbstractContextManager[NbdClient]:
        raise self.unsupported("volume data access")

    def vol_upload(self, pool: PoolDef, rec: VolumeRecord, source: BinaryIO, *, offset: int,
                   length: int | None, sparse: bool, monitor: Monitor) -> None:
        with self.nbd_open(pool, rec, read_only=False) as c:
            upload_chunks(source, rec.name, c.size, offset=offset, length=length,
                          sparse=sparse, monitor=monitor, write=c.pwrite, zero=c.zero)
            c.flush()

    def vol_download(self, pool: PoolDef, rec: VolumeRecord, sink: BinaryIO, *, offset: int,
                     length: int | None, sparse: bool, monitor: Monitor) -> None:
        with self.nbd_open(pool, rec, read_only=True) as c:
            end = c.size if length is None else min(c.size, offset + length)
            if offset > c.size:
                raise InvalidArgument(f"offset {offset} is past the end of volume "
                                      f"'{rec.name}'")
            monitor.set_total(end - offset)
            from virtstore.data.extents import is_zero
            from virtstore.data.stream import _regular_fd

            # Into a regular file, all-zero chunks stay holes.
            fd = _regular_fd(sink) if sparse else None
            if fd is not None:
                sink.flush()
            base = sink.tell() if fd is not None else 0
            pos = offset
            while pos < end:
                data = c.pread(pos, min(CHUNK, end - pos))
                if fd is None:
                    sink.write(data)
                elif not is_zero(data):
                    os.pwrite(fd, data, base + pos - offset)
                pos += len(data)
                monitor.advance(len(data))
            if fd is not None:
                if os.fstat(fd).st_size < base + end - offset:
                    os.ftruncate(fd, base + end - offset)
                sink.seek(base + end - offset)
            sink.flush()

    def vol_wipe(self, pool: PoolDef, rec: VolumeRecord, algorithm: str,
                 monitor: Monitor) -> None:
        if algorithm not in WIPE_ALGORITHMS:
            raise Unsupported(f"unsupported flags ({algorithm}) for wiping a "
                              f"'{pool.type}' volume: use one of {', '.join(WIPE_ALGORITHMS)}")
        with self.nbd_open(pool, rec, read_only=False) as c:
            clear_chunks(c.size, 64 << 20, c.trim if algorithm == "trim" else c.zero, monitor)
            c.flush()


@contextlib.contextmanager
def served(image_opts: str, objects: list[str], *, read_only: bool) -> Iterator[NbdClient]:
    """A qemu-nbd on a private socket for these image options, and a client of it."""
    from virtstore.host.nbd import NbdServer

    with NbdServer(image_opts=image_opts, objects=objects, read_only=read_only) as srv, \
            srv.client() as c:
        yield c
