"""<permissions> of pool targets, volume targets and backing stores."""

from __future__ import annotations

from virtstore.errors import XMLError
from virtstore.xml.model import Permissions
from virtstore.xml.values import parse_int, string_value, text_of
from virtstore.xml.writer import Writer

TYPE_CHECKING = False
if TYPE_CHECKING:
    from lxml import etree

_ID_UNSET = 2**32 - 1  # (uid_t) -1: libvirt prints neither -1 nor 4294967295


def _parse_id(node: etree._Element, tag: str, what: str) -> int | None:
    child = node.find(tag)
    if child is None:
        return None
    value = parse_int(string_value(child))
    if value is None or not (-1 <= value <= _ID_UNSET):
        raise XMLError(f"malformed {what} element")
    return None if value in (-1, _ID_UNSET) else value


def parse_permissions(node: etree._Element | None) -> Permissions:
    if node is None:
        return Permissions()
    perms = Permissions()
    mode = text_of(node, "mode")
    if mode is not None:
        value = parse_int(mode, 8)
        if value is None or value & ~0o777:
            raise XMLError("malformed octal mode")
        perms.mode = value
    perms.owner = _parse_id(node, "owner", "owner")
    perms.group = _parse_id(node, "group", "group")
    perms.label = text_of(node, "label")
    return perms


def format_permissions(out: Writer, perms: Permissions) -> None:
    if perms.mode is None and perms.owner is None and perms.group is None \
            and perms.label is None:
        return
    out.open("<permissions>")
    if perms.mode is not None:
        out.line(f"<mode>0{perms.mode:o}</mode>")
    out.elem("owner", perms.owner)
    out.elem("group", perms.group)
    out.elem("label", perms.label)
    out.close("</permissions>")
