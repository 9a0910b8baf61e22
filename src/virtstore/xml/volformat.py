"""A volume's XML printed as libvirt prints it, apart from the parser: ``vol-dumpxml``
loads neither lxml nor the parsers' patterns."""

from __future__ import annotations

from virtstore.xml.perms import format_permissions
from virtstore.xml.pooltypes import pool_type_info
from virtstore.xml.values import check_name
from virtstore.xml.writer import Writer, esc

TYPE_CHECKING = False
if TYPE_CHECKING:
    from virtstore.xml.model import PoolDef, Timestamps, VolDef, VolTarget
    from virtstore.xml.pooltypes import PoolType

FILE_FEATURES = ("lazy_refcounts", "extended_l2")


def _format_timestamps(out: Writer, ts: Timestamps | None) -> None:
    if ts is None:
        return
    stamps = [(tag, getattr(ts, tag)) for tag in ("atime", "mtime", "ctime", "btime")]
    stamps = [(tag, value) for tag, value in stamps if value is not None]
    if not stamps:
        return
    out.open("<timestamps>")
    for tag, value in stamps:
        out.line(f"<{tag}>{esc(value)}</{tag}>")
    out.close("</timestamps>")


def _format_target(out: Writer, vt: VolTarget, ptype: PoolType) -> None:
    out.open("<target>")
    if vt.path is not None:
        out.line(f"<path>{esc(vt.path)}</path>")
    if ptype.vol_formats:
        out.line(f"<format type='{esc(vt.format or ptype.default_vol_format)}'/>")
    format_permissions(out, vt.permissions)
    _format_timestamps(out, vt.timestamps)
    if vt.encryption is not None:
        from virtstore.xml.encryption import format_encryption

        format_encryption(out, vt.encryption)
    if vt.compat is not None:
        out.line(f"<compat>{esc(vt.compat)}</compat>")
    if vt.cluster_size:
        out.line(f"<clusterSize unit='B'>{vt.cluster_size}</clusterSize>")
    features = [f for f in FILE_FEATURES if getattr(vt, f)]
    if features:
        out.open("<features>")
        for feature in features:
            out.line(f"<{feature}/>")
        out.close("</features>")
    elif vt.has_features:
        out.line("<features/>")
    out.close("</target>")


def format_volume_xml(vol: VolDef, pool: PoolDef | str) -> str:
    """Print a volume as libvirt's virStorageVolDefFormat does for a volume of ``pool``
    (a definition, or only its type: that is all the format depends on)."""
    ptype = pool_type_info(pool if isinstance(pool, str) else pool.type)
    check_name(vol.name, "volume")  # printing would silently drop control characters
    out = Writer()
    out.open(f"<volume type='{esc(vol.type or ptype.default_vol_type)}'>")
    out.line(f"<name>{esc(vol.name)}</name>")
    if vol.key is not None:
        out.line(f"<key>{esc(vol.key)}</key>")
    if vol.source is not None and vol.source.extents:
        out.open("<source>")
        out.open(f"<device path='{esc(vol.source.device_path or '')}'>")
        for ext in vol.source.extents:
            out.line(f"<extent start='{ext.start}' end='{ext.end}'/>")
        out.close("</device>")
        out.close("</source>")
    capacity = vol.capacity or 0
    allocation = vol.allocation if vol.allocation is not None else capacity
    out.line(f"<capacity unit='bytes'>{capacity}</capacity>")
    out.line(f"<allocation unit='bytes'>{allocation}</allocation>")
    if vol.physical:
        out.line(f"<physical unit='bytes'>{vol.physical}</physical>")
    _format_target(out, vol.target, ptype)
    if vol.backing_store is not None:
        bs = vol.backing_store
        out.open("<backingStore>")
        out.line(f"<path>{esc(bs.path)}</path>")
        if ptype.vol_formats:
            out.line(f"<format type='{esc(bs.format or ptype.default_vol_format)}'/>")
        format_permissions(out, bs.permissions)
        _format_timestamps(out, bs.timestamps)
        out.close("</backingStore>")
    out.close("</volume>")
    return out.text()
