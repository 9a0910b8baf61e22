"""Export a volume over NBD (qemu-nbd), for guests, backups and migration tools.

Any volume qemu can open is served: a file (its guest-visible content: a qcow2 volume
is exported as the disk it holds), a block device, an RBD image (qemu's rbd driver with
the pool's cephx key), an iSCSI LUN (qemu's iscsi driver, CHAP included), a file on an
NFS server (the userspace mode's nfs:// URL), a gluster file. The export holds the
volume's lock for its whole life: a read lock for a read-only export, a write lock
otherwise, so no job rewrites a volume a client is reading, and no two writers meet. A
writable export of a shared pool's volume on a cluster member also holds the volume's
cluster-wide write lease (docs/cluster.md): a writer on another host refuses it.

Where: a unix socket (``nbd+unix:///NAME?socket=PATH``) or a TCP port on an address
(``nbd://HOST:PORT/NAME``).
"""

from __future__ import annotations

import contextlib
import secrets as pysecrets
import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from virtstore.engine import locks
from virtstore.errors import InvalidArgument
from virtstore.host.files import refuse_symlink
from virtstore.host.nbd import NbdAddress, NbdServer, QemuSource

if TYPE_CHECKING:
    from virtstore.engine.index import VolumeIndex
    from virtstore.engine.state import StateRoot
    from virtstore.engine.volumes import VolumeManager


class EngineParts(Protocol):
    """What an export needs of the engine (an EngineParts has it)."""

    @property
    def state(self) -> StateRoot: ...

    @property
    def index(self) -> VolumeIndex: ...

    @property
    def volumes(self) -> VolumeManager: ...


@dataclass
class VolumeExport:
    pool: str
    volume: str
    read_only: bool
    server: NbdServer
    _owner: str
    _conn: EngineParts
    _stack: contextlib.ExitStack

    @property
    def address(self) -> NbdAddress:
        return self.server.address

    @property
    def url(self) -> str:
        return self.server.address.url

    @property
    def running(self) -> bool:
        return self.server.running

    def stop(self) -> None:
        try:
            self._stack.close()
        finally:
            locks.release(self._conn.state.store, self._owner)

    def __enter__(self) -> VolumeExport:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def export_volume(conn: EngineParts, pool: str, name: str, *,
                  socket_path: str | None = None, host: str | None = None,
                  port: int | None = None, read_only: bool = False,
                  export_name: str | None = None) -> VolumeExport:
    """Serve volume ``name`` of ``pool`` until ``stop()``; raises if it cannot."""
    if socket_path is not None and host is not None:
        raise InvalidArgument("an NBD export is on a unix socket or a TCP address, not both")
    row = conn.state.row(pool)
    if not row.active:
        raise InvalidArgument(f"storage pool '{pool}' is not active")
    pool_def = conn.state.definition(row)
    backend = conn.state.backend(row.type, row.name)
    rec = conn.index.get(pool, name)
    owner = "nbd-" + pysecrets.token_hex(6)
    with conn.state.store.write() as db:
        locks.acquire(db, [(pool, name, locks.READ if read_only else locks.WRITE)], owner)
    stack = contextlib.ExitStack()
    try:
        lease = None
        if not read_only:
            # A writable export is a writer like any other: on a shared pool of a
            # cluster member it holds the volume's write lease until it stops.
            lease = conn.volumes.write_lease(pool, pool_def, backend, name, "nbd-export")
            stack.callback(conn.volumes.end_lease, lease)
        if rec.type == "file" and backend.local_files(pool_def):
            # qemu-nbd opens the path, and reads through its backing chain, itself.
            refuse_symlink(rec.path)
            conn.volumes.check_chain(rec)
        src: QemuSource = stack.enter_context(backend.qemu_source(pool_def, rec))
        server = NbdServer(src.image, fmt=src.fmt, image_opts=src.image_opts,
                           objects=src.objects, socket_path=socket_path, host=host,
                           port=port, export=export_name if export_name is not None else name,
                           read_only=read_only)
        stack.enter_context(server)
        if lease is not None:
            # Lost (etcd gone past the TTL): no more writes through this export. Not
            # in the keepalive thread itself: stopping waits for qemu-nbd.
            lease.on_lost(lambda: threading.Thread(target=server.stop, name="nbd-lease-lost",
                                                   daemon=True).start())
    except BaseException:
        stack.close()
        locks.release(conn.state.store, owner)
        raise
    return VolumeExport(pool=pool, volume=name, read_only=read_only, server=server,
                        _owner=owner, _conn=conn, _stack=stack)
