"""Pool and volume XML from command arguments (pool-define-as, vol-create-as).

The element order and the conditions under which an element appears are virsh's
(virshBuildPoolXML, cmdVolCreateAs), so ``--print-xml`` prints what virsh prints for
the same arguments. Unlike virsh, values are escaped: a name or path with ``&`` or
``<`` yields well-formed XML. The tree is built with lxml and written in libvirt's
layout (two-space indent, single-quoted attributes).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from lxml import etree

_ATTR_ESCAPES = str.maketrans({"&": "&amp;", "<": "&lt;", ">": "&gt;", "'": "&apos;",
                               '"': "&quot;"})
_TEXT_ESCAPES = str.maketrans({"&": "&amp;", "<": "&lt;", ">": "&gt;"})


def _s(value: str | bytes) -> str:
    return value if isinstance(value, str) else value.decode()


def format_libvirt(el: etree._Element, indent: int = 0) -> str:
    """Serialize as libvirt does: nested elements on their own lines, indented by two."""
    pad = " " * indent
    attrs = "".join(f" {_s(k)}='{_s(v).translate(_ATTR_ESCAPES)}'" for k, v in el.attrib.items())
    children = list(el)
    if not children:
        if el.text:
            return f"{pad}<{el.tag}{attrs}>{el.text.translate(_TEXT_ESCAPES)}</{el.tag}>\n"
        return f"{pad}<{el.tag}{attrs}/>\n"
    inner = "".join(format_libvirt(c, indent + 2) for c in children)
    return f"{pad}<{el.tag}{attrs}>\n{inner}{pad}</{el.tag}>\n"


def pool_xml(name: str, pool_type: str, *, source_host: str | None = None,
             source_path: str | None = None, source_dev: str | None = None,
             source_name: str | None = None, target: str | None = None,
             source_format: str | None = None, auth_type: str | None = None,
             auth_username: str | None = None, secret_usage: str | None = None,
             secret_uuid: str | None = None, adapter_name: str | None = None,
             adapter_wwnn: str | None = None, adapter_wwpn: str | None = None,
             adapter_parent: str | None = None, adapter_parent_wwnn: str | None = None,
             adapter_parent_wwpn: str | None = None,
             adapter_parent_fabric_wwn: str | None = None,
             source_protocol_ver: str | None = None,
             source_initiator: str | None = None) -> str:
    from lxml import etree

    E = etree.SubElement
    pool = etree.Element("pool", type=pool_type)
    E(pool, "name").text = name
    fc = bool(adapter_wwnn and adapter_wwpn)
    if (source_host or source_path or source_dev or source_initiator or source_format
            or source_name or fc or adapter_name):
        src = E(pool, "source")
        if source_host:
            E(src, "host", name=source_host)
        if source_path:
            E(src, "dir", path=source_path)
        if source_dev:
            E(src, "device", path=source_dev)
        if fc:
            adapter = E(src, "adapter", type="fc_host")
            if adapter_parent:
                adapter.set("parent", adapter_parent)
            elif adapter_parent_wwnn and adapter_parent_wwpn:
                adapter.set("parent_wwnn", adapter_parent_wwnn)
                adapter.set("parent_wwpn", adapter_parent_wwpn)
            elif adapter_parent_fabric_wwn:
                adapter.set("parent_fabric_wwn", adapter_parent_fabric_wwn)
            adapter.set("wwnn", adapter_wwnn or "")
            adapter.set("wwpn", adapter_wwpn or "")
        elif adapter_name:
            E(src, "adapter", type="scsi_host", name=adapter_name)
        if source_initiator:
            E(E(src, "initiator"), "iqn", name=source_initiator)
        if auth_type and auth_username and (secret_usage or secret_uuid):
            auth = E(src, "auth", type=auth_type, username=auth_username)
            if secret_usage:
                E(auth, "secret", usage=secret_usage)
            else:
                E(auth, "secret", uuid=secret_uuid or "")
        if source_format:
            E(src, "format", type=source_format)
        if source_name:
            E(src, "name").text = source_name
        if source_protocol_ver:
            E(src, "protocol", ver=source_protocol_ver)
    if target:
        E(E(pool, "target"), "path").text = target
    return format_libvirt(pool)


def volume_xml(name: str, capacity: int, *, allocation: int | None = None,
               fmt: str | None = None, backing_path: str | None = None,
               backing_format: str | None = None) -> str:
    from lxml import etree

    E = etree.SubElement
    vol = etree.Element("volume")
    E(vol, "name").text = name
    E(vol, "capacity").text = str(capacity)
    if allocation is not None:
        E(vol, "allocation").text = str(allocation)
    if fmt:
        E(E(vol, "target"), "format", type=fmt)
    if backing_path:
        backing = E(vol, "backingStore")
        E(backing, "path").text = backing_path
        if backing_format:
            E(backing, "format", type=backing_format)
    return format_libvirt(vol)


def xpath_dump(xml: str, expr: str, *, wrap: bool = False) -> str:
    """``*-dumpxml --xpath EXPR [--wrap]`` as virsh prints it.

    Only node sets are results (virsh refuses ``string(...)`` and ``count(...)``):
    elements are printed pretty, attributes as `` name="value"``, text as it is, one
    per line; ``--wrap`` puts them all under one ``<nodes>`` element.
    """
    import copy

    from lxml import etree

    from virtstore.errors import InvalidArgument

    parser = etree.XMLParser(remove_blank_text=True, resolve_entities=False, no_network=True)
    doc = etree.fromstring(xml.encode(), parser)
    try:
        result = doc.xpath(expr)
    except etree.XPathError:
        raise InvalidArgument(f"Incorrect xpath '{expr}'") from None
    if not isinstance(result, list):
        raise InvalidArgument(f"Incorrect xpath '{expr}'")
    if wrap:
        nodes = etree.Element("nodes")
        for item in result:
            if isinstance(item, etree._Element):
                nodes.append(copy.deepcopy(item))
            elif getattr(item, "is_attribute", False):
                nodes.set(str(getattr(item, "attrname", "")), str(item))
            elif len(nodes):
                nodes[-1].tail = (nodes[-1].tail or "") + str(item)
            else:
                nodes.text = (nodes.text or "") + str(item)
        return etree.tostring(nodes, pretty_print=True, encoding="unicode")
    lines = []
    for item in result:
        if isinstance(item, etree._Element):
            lines.append(etree.tostring(item, pretty_print=True, with_tail=False,
                                        encoding="unicode").rstrip("\n"))
        elif getattr(item, "is_attribute", False):
            value = str(item).replace("&", "&amp;").replace('"', "&quot;").replace("<", "&lt;")
            lines.append(f' {getattr(item, "attrname", "")}="{value}"')
        else:
            lines.append(str(item))
    return "".join(line + "\n" for line in lines)
