"""Pool backends, one module per pool type, looked up by type name."""

from __future__ import annotations

from virtstore.backends.base import Backend, UnavailableBackend

POOL_TYPES = ("dir", "fs", "netfs", "logical", "disk", "iscsi", "iscsi-direct", "scsi",
              "mpath", "rbd", "gluster", "zfs", "vstorage")

_cache: dict[str, Backend] = {}

# Network and SAN pool types: module and class, imported on first use.
_NETWORK = {
    "rbd": ("virtstore.backends.rbd", "RbdBackend"),
    "netfs": ("virtstore.backends.netfs", "NetfsBackend"),
    "gluster": ("virtstore.backends.gluster", "GlusterBackend"),
    "iscsi-direct": ("virtstore.backends.iscsi_direct", "IscsiDirectBackend"),
    "iscsi": ("virtstore.backends.iscsi", "IscsiBackend"),
    "scsi": ("virtstore.backends.scsi", "ScsiBackend"),
    "mpath": ("virtstore.backends.mpath", "MpathBackend"),
}


def backend_for(pool_type: str) -> Backend:
    """The backend of a pool type; types without one yet get an 'unsupported' stand-in."""
    be = _cache.get(pool_type)
    if be is None:
        if pool_type == "dir":
            from virtstore.backends.dir import DirBackend

            be = DirBackend()
        elif pool_type == "fs":
            from virtstore.backends.fs import FsBackend

            be = FsBackend()
        elif pool_type == "disk":
            from virtstore.backends.disk import DiskBackend

            be = DiskBackend()
        elif pool_type == "logical":
            from virtstore.backends.logical import LogicalBackend

            be = LogicalBackend()
        elif pool_type == "zfs":
            from virtstore.backends.zfs import ZfsBackend

            be = ZfsBackend()
        elif pool_type == "btrfs":
            from virtstore.backends.btrfs import BtrfsBackend

            be = BtrfsBackend()
        elif pool_type in _NETWORK:
            import importlib

            module, cls = _NETWORK[pool_type]
            be = getattr(importlib.import_module(module), cls)()
        else:
            be = UnavailableBackend(pool_type)
        _cache[pool_type] = be
    return be
