"""libvirt's storage volume XML (<volume>), read and printed in the context of its pool."""

from __future__ import annotations

import re

from virtstore.errors import XMLError
from virtstore.xml.encryption import parse_encryption
from virtstore.xml.model import BackingStore, PoolDef, VolDef, VolTarget
from virtstore.xml.perms import parse_permissions
from virtstore.xml.pooltypes import VOL_TYPES, PoolType, pool_type_info
from virtstore.xml.safe import parse_document
from virtstore.xml.units import INT64_MAX, UINT64_MAX, parse_size
from virtstore.xml.values import attr_of, check_name, shown, text_of
from virtstore.xml.volformat import FILE_FEATURES

TYPE_CHECKING = False
if TYPE_CHECKING:
    from lxml import etree

_COMPAT = re.compile(r"[0-9]+\.[0-9]+")


def default_vol_type(pool: PoolDef) -> str:
    """The volume type libvirt's backend reports for volumes of this pool."""
    return pool_type_info(pool.type).default_vol_type


def _parse_format(node: etree._Element, ptype: PoolType) -> str | None:
    if not ptype.vol_formats:
        return None  # pools whose volumes have no format (logical, iscsi, ...)
    fmt = attr_of(node, "format", "type")
    if fmt is None:
        return ptype.default_vol_format
    if not ptype.accepts_vol_format(fmt):
        raise XMLError(f"unknown volume format type {shown(fmt)}")
    return fmt


def _parse_sized(root: etree._Element, tag: str, limit: int) -> int | None:
    value = text_of(root, tag)
    if value is None:
        return None
    return parse_size(value, attr_of(root, tag, "unit"), limit=limit,
                      element=tag.rsplit("/", 1)[-1])


def _parse_features(target: etree._Element, vt: VolTarget) -> None:
    features = target.find("features")
    if features is None:
        return
    vt.has_features = True
    if vt.compat is None:
        vt.compat = "1.1"  # features imply qcow2 v3
    for child in features:
        if not isinstance(child.tag, str):
            continue
        if child.tag not in FILE_FEATURES:
            raise XMLError(f"unsupported feature {shown(str(child.tag))}")
        setattr(vt, child.tag, True)


def _parse_target(root: etree._Element, ptype: PoolType) -> VolTarget:
    node = root.find("target")
    vt = VolTarget()
    if node is None:
        vt.format = ptype.default_vol_format if ptype.vol_formats else None
        return vt
    vt.path = text_of(node, "path")
    vt.format = _parse_format(node, ptype)
    vt.permissions = parse_permissions(node.find("permissions"))
    enc = node.find("encryption")
    if enc is not None:
        vt.encryption = parse_encryption(enc)
    vt.compat = text_of(node, "compat")
    if vt.compat is not None and not _COMPAT.fullmatch(vt.compat):
        raise XMLError("forbidden characters in 'compat' attribute")
    vt.nocow = node.find("nocow") is not None
    size = _parse_sized(node, "clusterSize", UINT64_MAX)
    vt.cluster_size = size if size else None
    _parse_features(node, vt)
    return vt


def _parse_backing(root: etree._Element, ptype: PoolType) -> BackingStore | None:
    path = text_of(root, "backingStore/path")
    if path is None:
        return None
    node = root.find("backingStore")
    assert node is not None
    return BackingStore(path=path, format=_parse_format(node, ptype),
                        permissions=parse_permissions(node.find("permissions")))


def volume_from_element(root: etree._Element, pool: PoolDef, *,
                        capacity_optional: bool = False,
                        capacity_from_backing: bool = False) -> VolDef:
    """Build a VolDef from an already safely parsed <volume> element."""
    ptype = pool_type_info(pool.type)
    name = text_of(root, "name")
    if name is None:
        raise XMLError("missing volume name element")
    check_name(name, "volume")
    kind = root.get("type") or None
    if kind is not None and kind not in VOL_TYPES:
        raise XMLError(f"unknown volume type '{shown(kind)}'")
    vol = VolDef(name=name, type=kind or ptype.default_vol_type, key=text_of(root, "key"))
    vol.backing_store = _parse_backing(root, ptype)
    vol.capacity = _parse_sized(root, "capacity", INT64_MAX)
    if vol.capacity is None:
        vol.capacity_given = False
        if not capacity_optional and not (capacity_from_backing and vol.backing_store):
            raise XMLError("missing capacity element")
    allocation = _parse_sized(root, "allocation", INT64_MAX)
    vol.allocation_given = allocation is not None
    vol.allocation = allocation if allocation is not None else (vol.capacity or 0)
    vol.target = _parse_target(root, ptype)
    return vol


def parse_volume_xml(text: str | bytes, pool: PoolDef, *, capacity_optional: bool = False,
                     capacity_from_backing: bool = False) -> VolDef:
    """Parse a <volume> for ``pool`` as libvirt's virStorageVolDefParseString does.

    ``capacity_optional`` allows a missing <capacity> (libvirt's PARSE_NO_CAPACITY, used
    when cloning); ``capacity_from_backing`` allows it only when a backing store is given
    (PARSE_OPT_CAPACITY). Timestamps, <physical> and <source> extents are refresh
    results and are not read.
    """
    root = parse_document(text, "volume", "(storage_volume_definition)")
    return volume_from_element(root, pool, capacity_optional=capacity_optional,
                               capacity_from_backing=capacity_from_backing)
