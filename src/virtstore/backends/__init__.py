"""Pool backends, one module per pool type, looked up by type name."""

from __future__ import annotations

from virtstore.backends.base import Backend, UnavailableBackend

# Each pool type's module and class, imported on first use.
_MODULES = {
    "dir": ("virtstore.backends.dir", "DirBackend"),
    "fs": ("virtstore.backends.fs", "FsBackend"),
    "disk": ("virtstore.backends.disk", "DiskBackend"),
    "logical": ("virtstore.backends.logical", "LogicalBackend"),
    "zfs": ("virtstore.backends.zfs", "ZfsBackend"),
    "btrfs": ("virtstore.backends.btrfs", "BtrfsBackend"),
    "rbd": ("virtstore.backends.rbd", "RbdBackend"),
    "netfs": ("virtstore.backends.netfs", "NetfsBackend"),
    "gluster": ("virtstore.backends.gluster", "GlusterBackend"),
    "iscsi-direct": ("virtstore.backends.iscsi_direct", "IscsiDirectBackend"),
    "iscsi": ("virtstore.backends.iscsi", "IscsiBackend"),
    "scsi": ("virtstore.backends.scsi", "ScsiBackend"),
    "mpath": ("virtstore.backends.mpath", "MpathBackend"),
}

# The pool types this build has a backend for.
POOL_TYPES = tuple(_MODULES)


def backend_for(pool_type: str) -> Backend:
    """An instance of a pool type's backend not bound to an engine, for asking what it
    can do; the engine makes and keeps its own (engine/hooks.py)."""
    return new_backend(pool_type)


def new_backend(pool_type: str) -> Backend:
    """A new instance of a pool type's backend; types without one get an 'unsupported'
    stand-in."""
    spec = _MODULES.get(pool_type)
    if spec is None:
        return UnavailableBackend(pool_type)
    import importlib

    cls: type[Backend] = getattr(importlib.import_module(spec[0]), spec[1])
    return cls()
