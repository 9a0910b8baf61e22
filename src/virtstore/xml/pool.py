"""libvirt's storage pool XML (<pool>) and pool-source listings (<sources>)."""

from __future__ import annotations

from virtstore.errors import XMLError
from virtstore.xml.adapter import validate_adapter
from virtstore.xml.model import PoolDef, PoolSource, PoolTarget
from virtstore.xml.perms import format_permissions, parse_permissions
from virtstore.xml.pooltypes import (
    FS_NS,
    LVM_NS,
    RBD_NS,
    PoolType,
    Src,
    pool_type_info,
)
from virtstore.xml.safe import parse_document
from virtstore.xml.source import check_source_name, format_source, parse_source
from virtstore.xml.units import parse_size
from virtstore.xml.values import check_name, parse_uuid, parse_yes_no, sanitize_path, shown, text_of
from virtstore.xml.writer import Writer, esc


def _lv_name_ok(name: str) -> bool:
    import re  # only where a pool XML is parsed: read commands never load re

    return re.fullmatch(r"[A-Za-z0-9+_.-]{1,120}", name) is not None


TYPE_CHECKING = False
if TYPE_CHECKING:
    from lxml import etree

REFRESH_ALLOCATION = ("default", "capacity")


def _parse_cow(root: etree._Element, ptype: PoolType) -> bool | None:
    node = root.find("features/cow")
    if node is None:
        return None
    state = parse_yes_no(node, "state")
    if state is not None and ptype.name not in ("fs", "dir"):
        raise XMLError("cow feature may only be used for 'fs' and 'dir' pools")
    return state


def _parse_target(root: etree._Element, ptype: PoolType, source: PoolSource) -> PoolTarget:
    if not ptype.has_target:
        return PoolTarget()  # network pools have no local target; libvirt ignores one
    if ptype.name == "logical":
        path = f"/dev/{source.name}"
    elif ptype.name == "zfs":
        path = f"/dev/zvol/{source.name}"
    else:
        given = text_of(root, "target/path")
        if given is None:
            raise XMLError("missing storage pool target path")
        path = given
    return PoolTarget(path=sanitize_path(path),
                      permissions=parse_permissions(root.find("target/permissions")))


def _parse_refresh(root: etree._Element) -> str | None:
    node = root.find("refresh/volume")
    value = node.get("allocation") if node is not None else None
    if not value:
        return None
    if value not in REFRESH_ALLOCATION:
        raise XMLError(f"unknown storage pool volume refresh allocation type {shown(value)}")
    return value


def _parse_namespaces(root: etree._Element, pool: PoolDef, ptype: PoolType) -> None:
    if ptype.namespace is None:
        return
    prefix, href = ptype.namespace
    if prefix == "fs":
        for opt in root.findall(f"{{{href}}}mount_opts/{{{href}}}option"):
            name = opt.get("name")
            if not name:
                raise XMLError("no fs mount option name specified")
            pool.mount_opts.append(name)
    elif prefix == "lvm":
        _parse_thin_pool(root, pool, href)
    else:
        for opt in root.findall(f"{{{href}}}config_opts/{{{href}}}option"):
            name, value = opt.get("name"), opt.get("value")
            if not name:
                raise XMLError("no rbd option name specified")
            if value is None:
                raise XMLError("no rbd option value specified")
            pool.rbd_config_opts.append((name, value))


def _parse_thin_pool(root: etree._Element, pool: PoolDef, href: str) -> None:
    nodes = root.findall(f"{{{href}}}thin_pool")
    if not nodes:
        return
    if len(nodes) > 1:
        raise XMLError("a logical pool has at most one lvm:thin_pool")
    node = nodes[0]
    name = node.get("name")
    if not name or not _lv_name_ok(name) or name.startswith("-"):
        raise XMLError(f"invalid lvm:thin_pool name {shown(name or '')}: a logical volume "
                       "name of letters, digits and '+_.-'")
    pool.thin_pool = name
    size = node.get("size")
    if size is not None:
        pool.thin_pool_size = parse_size(size, node.get("unit"), element="lvm:thin_pool size")
        if pool.thin_pool_size == 0:
            raise XMLError("lvm:thin_pool size must be above 0")


def _check_source(pool: PoolDef, ptype: PoolType) -> None:
    src = pool.source
    if ptype.flags & Src.HOST and not src.hosts:
        raise XMLError("missing storage pool source host name")
    if ptype.flags & Src.DIR and src.dir is None:
        raise XMLError("missing storage pool source path")
    if ptype.flags & Src.NAME and src.name is None:
        src.name = pool.name  # the source name defaults to the pool name
    if ptype.flags & Src.ADAPTER:
        validate_adapter(src.adapter)
    if ptype.flags == Src.DEVICE and not src.devices and not ptype.device_optional:
        raise XMLError("missing storage pool source device name")
    check_source_name(src, ptype)


def pool_from_element(root: etree._Element) -> PoolDef:
    """Build a PoolDef from an already safely parsed <pool> element."""
    ptype = pool_type_info(root.get("type"))
    source_node = root.find("source")
    source = parse_source(source_node, ptype)
    name = text_of(root, "name")
    if name is None and ptype.flags & Src.NAME:
        name = source.name
    if name is None:
        raise XMLError("missing pool source name element")
    check_name(name, "pool")
    uuid: str | None = None
    raw_uuid = text_of(root, "uuid")
    if raw_uuid is not None:
        uuid = parse_uuid(raw_uuid)
        if uuid is None:
            raise XMLError("malformed uuid element")
    pool = PoolDef(type=ptype.name, name=name, uuid=uuid, source=source)
    pool.cow = _parse_cow(root, ptype)
    _check_source(pool, ptype)
    pool.target = _parse_target(root, ptype, pool.source)
    if ptype.name == "iscsi-direct" and not source.initiator_iqn:
        raise XMLError("missing initiator IQN")
    pool.refresh_volume_allocation = _parse_refresh(root)
    _parse_namespaces(root, pool, ptype)
    return pool


def parse_pool_xml(text: str | bytes) -> PoolDef:
    """Parse a <pool> definition as libvirt's virStoragePoolDefParseString does.

    Like libvirt, <capacity>, <allocation>, <available> and <freeExtent> are runtime
    state and are not read: a parsed pool has them at 0 / empty.
    """
    return pool_from_element(parse_document(text, "pool", "(storage_pool_definition)"))


def _format_features(out: Writer, pool: PoolDef) -> None:
    if pool.cow is None:
        return
    out.open("<features>")
    out.line(f"<cow state='{'yes' if pool.cow else 'no'}'/>")
    out.close("</features>")


def _format_namespaces(out: Writer, pool: PoolDef, ptype: PoolType) -> None:
    if ptype.namespace == ("fs", FS_NS) and pool.mount_opts:
        out.open("<fs:mount_opts>")
        for name in pool.mount_opts:
            out.line(f"<fs:option name='{esc(name)}'/>")
        out.close("</fs:mount_opts>")
    if ptype.namespace == ("rbd", RBD_NS) and pool.rbd_config_opts:
        out.open("<rbd:config_opts>")
        for name, value in pool.rbd_config_opts:
            out.line(f"<rbd:option name='{esc(name)}' value='{esc(value)}'/>")
        out.close("</rbd:config_opts>")
    if ptype.namespace == ("lvm", LVM_NS) and pool.thin_pool:
        size = "" if pool.thin_pool_size is None else \
            f" size='{pool.thin_pool_size}' unit='bytes'"
        out.line(f"<lvm:thin_pool name='{esc(pool.thin_pool)}'{size}/>")


def _namespace_attr(pool: PoolDef, ptype: PoolType) -> str:
    if ptype.namespace is None:
        return ""
    prefix, href = ptype.namespace
    used = {"fs": pool.mount_opts, "lvm": pool.thin_pool}.get(prefix, pool.rbd_config_opts)
    return f" xmlns:{prefix}='{href}'" if used else ""


def format_pool_xml(pool: PoolDef, *, inactive: bool = False) -> str:
    """Print a pool as libvirt's virStoragePoolDefFormat.

    ``inactive`` prints the definition of a pool that is not running: capacity,
    allocation and available as 0 and no free extents (they are refresh results).
    """
    ptype = pool_type_info(pool.type)
    check_name(pool.name, "pool")  # printing would silently drop control characters
    out = Writer()
    out.open(f"<pool type='{ptype.name}'{_namespace_attr(pool, ptype)}>")
    out.line(f"<name>{esc(pool.name)}</name>")
    out.elem("uuid", pool.uuid)
    for tag in ("capacity", "allocation", "available"):
        value = 0 if inactive else getattr(pool, tag)
        out.line(f"<{tag} unit='bytes'>{value}</{tag}>")
    _format_features(out, pool)
    format_source(out, ptype, pool.source, with_extents=not inactive)
    if ptype.has_target:
        out.open("<target>")
        if pool.target.path is not None:
            out.line(f"<path>{esc(pool.target.path)}</path>")
        format_permissions(out, pool.target.permissions)
        out.close("</target>")
    if pool.refresh_volume_allocation is not None:
        out.open("<refresh>")
        out.line(f"<volume allocation='{esc(pool.refresh_volume_allocation)}'/>")
        out.close("</refresh>")
    _format_namespaces(out, pool, ptype)
    out.close("</pool>")
    return out.text()


def parse_pool_source_xml(text: str | bytes, pool_type: str) -> PoolSource:
    """A lone <source> document: the search hint of find-storage-pool-sources."""
    ptype = pool_type_info(pool_type)
    root = parse_document(text, "source", "(storage_source_specification)")
    return parse_source(root, ptype)


def parse_pool_sources(text: str | bytes, pool_type: str) -> list[PoolSource]:
    """A <sources> document, as find-storage-pool-sources prints it."""
    ptype = pool_type_info(pool_type)
    root = parse_document(text, "sources", "(storage_source_list)")
    return [parse_source(node, ptype) for node in root.findall("source")]


def format_pool_sources_xml(sources: list[PoolSource], pool_type: str) -> str:
    """libvirt's virStoragePoolSourceListFormat."""
    ptype = pool_type_info(pool_type)
    out = Writer()
    out.open("<sources>")
    for source in sources:
        format_source(out, ptype, source)
    out.close("</sources>")
    return out.text()
