"""A volume's XML from the index: the pool's definition is parsed only when its backend
places volumes on the pool's devices (disk partitions, LVs), so a dir pool's
``vol-dumpxml`` loads no XML parser."""

from __future__ import annotations

from virtstore.errors import OperationInvalid
from virtstore.host.files import live_stat
from virtstore.xml.model import BackingStore, Permissions, Timestamps, VolDef, VolTarget
from virtstore.xml.volformat import format_volume_xml

TYPE_CHECKING = False
if TYPE_CHECKING:
    from virtstore.backends.base import VolumeRecord
    from virtstore.engine.index import VolumeIndex
    from virtstore.engine.state import StateRoot


def _ts(ns: int) -> str:
    return f"{ns // 1_000_000_000}.{ns % 1_000_000_000:09d}"


def _describe_backing(bs: BackingStore) -> None:
    """The backing file's owner, mode and times, as libvirt reads them when it
    describes a volume; nothing for a backing store that is not a local path."""
    st = live_stat(bs.path)
    if st is None:
        return
    bs.permissions = Permissions(mode=st.st_mode & 0o777, owner=st.st_uid, group=st.st_gid)
    bs.timestamps = Timestamps(atime=_ts(st.st_atime_ns), mtime=_ts(st.st_mtime_ns),
                               ctime=_ts(st.st_ctime_ns), btime="0")


def to_def(rec: VolumeRecord) -> VolDef:
    # libvirt reports the cluster size of every qcow2 image, compat and features only
    # of qcow2 v3 ones.
    v3 = rec.format == "qcow2" and rec.compat not in (None, "0.10")
    target = VolTarget(path=rec.path, format=rec.format,
                       permissions=Permissions(mode=rec.mode, owner=rec.uid, group=rec.gid),
                       compat=rec.compat if v3 else None,
                       cluster_size=rec.cluster_size if rec.format == "qcow2" else None,
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
    if vol.backing_store is not None:
        _describe_backing(vol.backing_store)
    if not backend.supports("volume_source"):
        return format_volume_xml(vol, row.type)
    pool = state.definition(row)
    source = backend.volume_source(pool, name)
    if isinstance(source, list):
        source = source[0] if source else None
    vol.source = source
    return format_volume_xml(vol, pool)
