"""A pool's <source>: parsed and printed per pool type, also for <sources> listings."""

from __future__ import annotations

import re

from virtstore.errors import XMLError
from virtstore.xml.adapter import format_adapter, parse_adapter
from virtstore.xml.auth import format_auth, parse_auth
from virtstore.xml.model import PoolSource, SourceDevice, SourceHost
from virtstore.xml.pooltypes import PoolType, Src
from virtstore.xml.values import attr_of, parse_int, parse_yes_no, sanitize_path, shown, text_of
from virtstore.xml.writer import Writer, esc

TYPE_CHECKING = False
if TYPE_CHECKING:
    from lxml import etree

_PROTOCOL_VER = re.compile(r"[0-9]+(\.[0-9]+)*")
# LVM volume group names, as lvm(8) accepts them.
_VG_NAME = re.compile(r"[A-Za-z0-9+_.][A-Za-z0-9+_.-]*")


def _parse_host(node: etree._Element) -> SourceHost:
    name = node.get("name")
    if not name:
        raise XMLError("missing storage pool host name")
    port: int | None = None
    raw = node.get("port")
    if raw is not None:
        port = parse_int(raw)
        if port is None or not -1 <= port <= 65535:
            raise XMLError(f"Invalid value for attribute 'port' in element 'host': "
                           f"'{shown(raw)}'. Expected integer value")
        if port == 0:
            port = None
    return SourceHost(name=name, port=port)


def _parse_device(node: etree._Element) -> SourceDevice:
    path = node.get("path")
    if not path:
        raise XMLError("missing storage pool source device path")
    # <freeExtent> children are refresh results, not configuration: libvirt ignores them.
    return SourceDevice(path=path, part_separator=parse_yes_no(node, "part_separator"))


def parse_source(node: etree._Element | None, ptype: PoolType) -> PoolSource:
    """libvirt's virStoragePoolDefParseSource; node None means no <source> at all."""
    source = PoolSource()
    if node is None:
        source.format = ptype.default_pool_format
        return source
    source.name = text_of(node, "name")
    if ptype.name == "rbd" and source.name is None:
        raise XMLError("element 'name' is mandatory for RBD pool")
    if ptype.pool_formats:
        fmt = attr_of(node, "format", "type")
        if fmt is None:
            source.format = ptype.default_pool_format
        elif fmt in ptype.pool_formats:
            source.format = fmt
        else:
            raise XMLError(f"unknown pool format type {shown(fmt)}")
    source.hosts = [_parse_host(h) for h in node.findall("host")]
    source.initiator_iqn = attr_of(node, "initiator/iqn", "name")
    source.devices = [_parse_device(d) for d in node.findall("device")]
    directory = attr_of(node, "dir", "path")
    if directory is not None:
        source.dir = sanitize_path(directory)
    elif ptype.name == "gluster":
        source.dir = "/"
    adapter = node.find("adapter")
    if adapter is not None:
        source.adapter = parse_adapter(adapter)
    auth = node.find("auth")
    if auth is not None:
        source.auth = parse_auth(auth)
    source.protocol_ver = attr_of(node, "protocol", "ver")
    if source.protocol_ver is not None:
        _check_protocol_ver(source, ptype)
    source.vendor = attr_of(node, "vendor", "name")
    source.product = attr_of(node, "product", "name")
    return source


def _check_protocol_ver(source: PoolSource, ptype: PoolType) -> None:
    ver = source.protocol_ver or ""
    if ptype.name != "netfs" or source.format not in ("nfs", "auto"):
        shown_type = source.format if ptype.name == "netfs" else ptype.name
        raise XMLError(f"storage pool protocol ver unsupported for pool type '{shown_type}'")
    if "," in ver:
        raise XMLError(f"storage pool protocol ver '{shown(ver)}' must not contain ','")
    if not _PROTOCOL_VER.fullmatch(ver):
        raise XMLError(f"storage pool protocol ver '{shown(ver)}' is malformed")


def check_source_name(source: PoolSource, ptype: PoolType) -> None:
    """The source name becomes a device path for logical and zfs pools: keep it one."""
    name = source.name or ""
    if ptype.name == "logical":
        if not _VG_NAME.fullmatch(name) or name in (".", "..") or len(name) > 127:
            raise XMLError(f"invalid volume group name '{shown(name)}'")
    elif ptype.name == "zfs":
        parts = name.split("/")
        if any(p in ("", ".", "..") for p in parts) or name.startswith("-") \
                or not name.isprintable():
            raise XMLError(f"invalid zfs pool or dataset name '{shown(name)}'")


def format_source(out: Writer, ptype: PoolType, src: PoolSource, *,
                  with_extents: bool = True) -> None:
    out.open("<source>")
    if ptype.flags & Src.HOST:
        for host in src.hosts:
            port = f" port='{host.port}'" if host.port else ""
            out.line(f"<host name='{esc(host.name)}'{port}/>")
    if ptype.flags & Src.DEVICE:
        for dev in src.devices:
            head = f"<device path='{esc(dev.path)}'"
            if dev.part_separator is not None:
                head += f" part_separator='{'yes' if dev.part_separator else 'no'}'"
            if dev.free_extents and with_extents:
                out.open(head + ">")
                for ext in dev.free_extents:
                    out.line(f"<freeExtent start='{ext.start}' end='{ext.end}'/>")
                out.close("</device>")
            else:
                out.line(head + "/>")
    if ptype.flags & Src.DIR and src.dir is not None:
        out.line(f"<dir path='{esc(src.dir)}'/>")
    if ptype.flags & Src.ADAPTER and src.adapter is not None:
        format_adapter(out, src.adapter)
    if ptype.flags & Src.NAME and src.name is not None:
        out.line(f"<name>{esc(src.name)}</name>")
    if ptype.flags & Src.INITIATOR_IQN and src.initiator_iqn is not None:
        out.open("<initiator>")
        out.line(f"<iqn name='{esc(src.initiator_iqn)}'/>")
        out.close("</initiator>")
    if ptype.pool_formats:
        out.line(f"<format type='{esc(src.format or ptype.default_pool_format)}'/>")
    if src.auth is not None:
        format_auth(out, src.auth)
    out.empty("protocol", "ver", src.protocol_ver)
    out.empty("vendor", "name", src.vendor)
    out.empty("product", "name", src.product)
    out.close("</source>")
