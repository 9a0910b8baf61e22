"""What storage tools need from a libvirt domain document: its disks, and a copy with
the disks pointing at other volumes (for a clone of the guest).

The rewrite follows virt-clone: the new domain gets the new name and a fresh UUID,
its network interfaces lose their MAC addresses (libvirt makes new ones when the
domain is defined), and each cloned disk's ``<source>`` names the new volume.
"""

from __future__ import annotations

import uuid as pyuuid
from collections.abc import Mapping
from dataclasses import dataclass

from lxml import etree

from virtstore.errors import InvalidArgument
from virtstore.xml.safe import parse_document


@dataclass(frozen=True)
class DomainDisk:
    index: int  # position among the domain's <disk> elements
    target: str  # the guest's device name (vda, sdb, ...)
    device: str  # disk, cdrom, floppy, lun
    type: str  # file, block, volume, network, dir
    path: str | None  # file or device path
    pool: str | None  # for type='volume'
    volume: str | None
    driver_type: str | None
    read_only: bool
    shareable: bool

    @property
    def copied_by_clone(self) -> bool:
        """virt-clone leaves read-only and shareable disks (and removable media) shared
        between the original and the clone."""
        return self.device in ("disk", "lun") and not self.read_only and not self.shareable


def domain_name(xml: str) -> str:
    root = parse_document(xml, "domain", "(domain_definition)")
    name = root.findtext("name")
    if not name:
        raise InvalidArgument("the domain XML has no <name>")
    return name.strip()


def domain_disks(xml: str) -> list[DomainDisk]:
    root = parse_document(xml, "domain", "(domain_definition)")
    out: list[DomainDisk] = []
    for i, disk in enumerate(root.iterfind("devices/disk")):
        src = disk.find("source")
        target = disk.find("target")
        driver = disk.find("driver")
        attrs: dict[str, str] = ({str(k): str(v) for k, v in src.attrib.items()}
                                 if src is not None else {})

        def get(k: str, attrs: dict[str, str] = attrs) -> str | None:
            return attrs.get(k)

        out.append(DomainDisk(
            index=i, target=(target.get("dev") if target is not None else None) or f"disk{i}",
            device=disk.get("device", "disk"), type=disk.get("type", "file"),
            path=get("file") or get("dev") or get("dir"), pool=get("pool"),
            volume=get("volume"),
            driver_type=driver.get("type") if driver is not None else None,
            read_only=disk.find("readonly") is not None,
            shareable=disk.find("shareable") is not None))
    return out


@dataclass(frozen=True)
class NewSource:
    """Where a cloned disk now points: a path of the given kind, or pool and volume."""

    type: str  # file, block, volume
    path: str | None = None
    pool: str | None = None
    volume: str | None = None
    driver_type: str | None = None


def cloned_domain_xml(xml: str, new_name: str, sources: Mapping[int, NewSource], *,
                      new_uuid: str | None = None) -> str:
    """The domain as a clone: ``sources`` maps a disk's index to its new source."""
    root = parse_document(xml, "domain", "(domain_definition)")
    name = root.find("name")
    if name is None:
        raise InvalidArgument("the domain XML has no <name>")
    name.text = new_name
    uid = root.find("uuid")
    if uid is None:
        uid = etree.Element("uuid")
        name.addnext(uid)
    uid.text = new_uuid or str(pyuuid.uuid4())
    for iface in root.iterfind("devices/interface"):
        for mac in iface.findall("mac"):
            iface.remove(mac)
    for i, disk in enumerate(root.iterfind("devices/disk")):
        new = sources.get(i)
        if new is None:
            continue
        disk.set("type", new.type)
        src = disk.find("source")
        if src is None:
            src = etree.SubElement(disk, "source")
        for key in ("file", "dev", "dir", "pool", "volume", "protocol", "name"):
            if key in src.attrib:
                del src.attrib[key]
        for host in src.findall("host"):
            src.remove(host)
        if new.type == "volume":
            src.set("pool", new.pool or "")
            src.set("volume", new.volume or "")
        else:
            src.set("dev" if new.type == "block" else "file", new.path or "")
        # A clone's own disk has no backing chain recorded yet: libvirt probes it.
        for bs in disk.findall("backingStore"):
            disk.remove(bs)
        driver = disk.find("driver")
        if driver is not None and new.driver_type:
            driver.set("type", new.driver_type)
    return etree.tostring(root, encoding="unicode", pretty_print=True)
