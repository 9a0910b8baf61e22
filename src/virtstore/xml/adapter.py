"""<adapter> of scsi pools: scsi_host by name or PCI parent address, or fc_host (NPIV)."""

from __future__ import annotations

import re

from virtstore.errors import XMLError
from virtstore.xml.model import Adapter
from virtstore.xml.values import parse_c_uint, parse_int, parse_yes_no, shown
from virtstore.xml.writer import Writer, esc

TYPE_CHECKING = False
if TYPE_CHECKING:
    from lxml import etree

ADAPTER_TYPES = ("scsi_host", "fc_host")
_WWN = re.compile(r"(0x)?[0-9a-fA-F]{16}")
# (attribute, largest value) of a PCI address
_PCI_FIELDS = (("domain", 0xFFFF_FFFF), ("bus", 0xFF), ("slot", 0x1F), ("function", 7))


def _check_wwn(value: str) -> None:
    if not _WWN.fullmatch(value):
        raise XMLError(f"Malformed wwn: {shown(value)}")


def _parse_pci_address(node: etree._Element) -> tuple[int, int, int, int]:
    values: list[int] = []
    for attr, limit in _PCI_FIELDS:
        raw = node.get(attr)
        if raw is None:
            values.append(0)
            continue
        value = parse_c_uint(raw)
        if value is None or value > limit:
            raise XMLError(f"Cannot parse <address> '{attr}' attribute")
        values.append(value)
    return values[0], values[1], values[2], values[3]


def _parse_legacy(node: etree._Element, adapter: Adapter) -> None:
    # Before 'type' existed only 'name' was known; newer attributes need 'type'.
    if any(node.get(a) is not None for a in ("wwnn", "wwpn", "parent")):
        raise XMLError("Use of 'wwnn', 'wwpn', and 'parent' attributes requires use "
                       "of the adapter 'type'")
    if node.find("parentaddr") is not None:
        raise XMLError("Use of 'parentaddr' element requires use of the adapter 'type'")
    adapter.name = node.get("name")
    if adapter.name is not None:
        adapter.type = "scsi_host"


def parse_adapter(node: etree._Element) -> Adapter:
    adapter = Adapter()
    kind = node.get("type")
    if kind is None:
        _parse_legacy(node, adapter)
        return adapter
    if kind not in ADAPTER_TYPES:
        raise XMLError(f"Invalid value for attribute 'type' in element 'adapter': "
                       f"'{shown(kind)}'.")
    adapter.type = kind
    if kind == "fc_host":
        adapter.managed = parse_yes_no(node, "managed")
        for attr in ("parent", "parent_wwnn", "parent_wwpn", "parent_fabric_wwn",
                     "wwpn", "wwnn"):
            setattr(adapter, attr, node.get(attr))
        return adapter
    adapter.name = node.get("name")
    parentaddr = node.find("parentaddr")
    if parentaddr is not None:
        address = parentaddr.find("address")
        if address is None:
            raise XMLError("Missing scsi_host PCI address element")
        adapter.parent_addr = _parse_pci_address(address)
        unique = parse_int(parentaddr.get("unique_id", ""))
        if unique is None or unique < 0 or unique > 2**31 - 1:
            raise XMLError("Missing or invalid scsi adapter 'unique_id' value")
        adapter.parent_addr_unique_id = unique
    return adapter


def validate_adapter(adapter: Adapter | None) -> None:
    if adapter is None or adapter.type is None:
        raise XMLError("missing storage pool source adapter")
    if adapter.type == "fc_host":
        if not adapter.wwnn or not adapter.wwpn:
            raise XMLError("'wwnn' and 'wwpn' must be specified for adapter type 'fchost'")
        _check_wwn(adapter.wwnn)
        _check_wwn(adapter.wwpn)
        if adapter.parent_wwnn and not adapter.parent_wwpn:
            raise XMLError(f"when providing parent_wwnn='{shown(adapter.parent_wwnn)}', "
                           "the parent_wwpn must also be provided")
        if adapter.parent_wwpn and not adapter.parent_wwnn:
            raise XMLError(f"when providing parent_wwpn='{shown(adapter.parent_wwpn)}', "
                           "the parent_wwnn must also be provided")
        for wwn in (adapter.parent_wwnn, adapter.parent_wwpn, adapter.parent_fabric_wwn):
            if wwn:
                _check_wwn(wwn)
        return
    has_parent = adapter.parent_addr is not None
    if not adapter.name and not has_parent:
        raise XMLError("Either 'name' or 'parent' must be specified for the "
                       "'scsi_host' adapter")
    if adapter.name and has_parent:
        raise XMLError("Both 'name' and 'parent' cannot be specified for the "
                       "'scsi_host' adapter")


def format_adapter(out: Writer, adapter: Adapter) -> None:
    if adapter.type == "fc_host":
        attrs = [f"type='{adapter.type}'"]
        for attr in ("parent", "parent_wwnn", "parent_wwpn", "parent_fabric_wwn"):
            value = getattr(adapter, attr)
            if value is not None:
                attrs.append(f"{attr}='{esc(value)}'")
        if adapter.managed is not None:
            attrs.append(f"managed='{'yes' if adapter.managed else 'no'}'")
        attrs.append(f"wwnn='{esc(adapter.wwnn or '')}' wwpn='{esc(adapter.wwpn or '')}'")
        out.line(f"<adapter {' '.join(attrs)}/>")
        return
    if adapter.type != "scsi_host":
        return
    if adapter.name is not None:
        out.line(f"<adapter type='scsi_host' name='{esc(adapter.name)}'/>")
        return
    domain, bus, slot, function = adapter.parent_addr or (0, 0, 0, 0)
    out.open("<adapter type='scsi_host'>")
    out.open(f"<parentaddr unique_id='{adapter.parent_addr_unique_id or 0}'>")
    out.line(f"<address domain='0x{domain:04x}' bus='0x{bus:02x}' slot='0x{slot:02x}' "
             f"function='0x{function:x}'/>")
    out.close("</parentaddr>")
    out.close("</adapter>")
