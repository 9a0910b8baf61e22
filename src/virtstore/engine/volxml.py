"""A volume's XML from the index: the pool's definition is parsed only when its backend
places volumes on the pool's devices (disk partitions, LVs), so a dir pool's
``vol-dumpxml`` loads no XML parser."""

from __future__ import annotations

from typing import TYPE_CHECKING

from virtstore.errors import OperationInvalid
from virtstore.xml.model import BackingStore, Permissions, Timestamps, VolDef, VolTarget
from virtstore.xml.volume import format_volume_xml

if TYPE_CHECKING:
    from virtstore.backends.base import VolumeRecord
    from virtstore.engine.index import VolumeIndex
    from virtstore.engine.state import StateRoot


def _ts(ns: int) -> str:
    return f"{ns // 1_000_000_000}.{ns % 1_000_000_000:09d}"


def to_def(rec: VolumeRecord) -> VolDef:
    # libvirt reports compat, cluster size and features only for qcow2 v3 images.
    v3 = rec.format == "qcow2" and rec.compat not in (None, "0.10")
    target = VolTarget(path=rec.path, format=rec.format,
                       permissions=Permissions(mode=rec.mode, owner=rec.uid, group=rec.gid),
                       compat=rec.compat if v3 else None,
                       cluster_size=rec.cluster_size if v3 else None,
                       lazy_refcounts=rec.lazy_refcounts, has_features=v3)
    if rec.mtime_ns:
        target.timestamps = Timestamps(atime=_ts(rec.atime_ns), mtime=_ts(rec.mtime_ns),
                                       ctime=_ts(rec.ctime_ns), btime="0")
    vol = VolDef(name=rec.name, type=rec.type, key=rec.key, capacity=rec.capacity,
                 allocation=rec.allocation, physical=rec.physical, target=target)
    if rec.backing_path:
        vol.backing_store = BackingStore(path=rec.backing_path, format=rec.backing_format)
    return vol


def volume_xml(state: StateRoot, index: VolumeIndex, pool_name: str, name: str) -> str:
    row = state.row(pool_name)
    if not row.active:
        raise OperationInvalid(f"Requested operation is not valid: storage pool "
                               f"'{pool_name}' is not active")
    backend = state.backend(row.type, row.name)
    vol = to_def(index.get(pool_name, name))
    if not backend.supports("volume_source"):
        return format_volume_xml(vol, row.type)
    pool = state.definition(row)
    source = backend.volume_source(pool, name)
    if isinstance(source, list):
        source = source[0] if source else None
    vol.source = source
    return format_volume_xml(vol, pool)
