"""libvirt's <storagepoolCapabilities> document (virsh pool-capabilities)."""

from __future__ import annotations

from virtstore.types import field, record
from virtstore.xml.pooltypes import POOL_TYPES
from virtstore.xml.writer import Writer, esc


@record
class PoolTypeCaps:
    type: str
    supported: bool = False
    default_pool_format: str | None = None
    pool_formats: list[str] = field(default_factory=list)
    default_vol_format: str | None = None
    vol_formats: list[str] = field(default_factory=list)


def default_pool_type_caps() -> list[PoolTypeCaps]:
    """libvirt's format lists for every pool type virtstore knows, in libvirt's order.

    ``supported`` is False everywhere: the caller sets it from what the host can run.
    """
    caps: list[PoolTypeCaps] = []
    for ptype in POOL_TYPES.values():
        caps.append(PoolTypeCaps(
            type=ptype.name,
            default_pool_format=ptype.default_pool_format,
            pool_formats=list(ptype.pool_formats),
            default_vol_format=ptype.default_vol_format,
            vol_formats=list(ptype.vol_formats) if ptype.vol_formats_listed else [],
        ))
    return caps


def pool_capabilities_xml(entries: list[PoolTypeCaps]) -> str:
    """Print the capabilities document; option blocks appear only for types that have a
    default format, as libvirt prints them."""
    out = Writer()
    out.open("<storagepoolCapabilities>")
    for entry in entries:
        out.open(f"<pool type='{esc(entry.type)}' "
                 f"supported='{'yes' if entry.supported else 'no'}'>")
        blocks = (("poolOptions", "sourceFormatType", entry.default_pool_format,
                   entry.pool_formats),
                  ("volOptions", "targetFormatType", entry.default_vol_format,
                   entry.vol_formats))
        for tag, enum_name, default, values in blocks:
            if default is None:
                continue
            out.open(f"<{tag}>")
            out.line(f"<defaultFormat type='{esc(default)}'/>")
            out.open(f"<enum name='{enum_name}'>")
            for value in values:
                out.line(f"<value>{esc(value)}</value>")
            out.close("</enum>")
            out.close(f"</{tag}>")
        out.close("</pool>")
    out.close("</storagepoolCapabilities>")
    return out.text()
