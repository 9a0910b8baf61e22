"""A guest's ``<disk>`` element (libvirt's domain XML) for a volume.

What a domain document needs to use a volume: the disk type from the volume's type
(``file``, ``block``, ``dir``), or ``volume`` to name it by pool and volume and let
libvirt resolve it when the guest starts; the driver type from the volume's format;
the encryption of a LUKS or encrypted qcow2 volume, inside ``<source>`` as libvirt
wants it. The volume XML comes from a connection that may be remote, so it is parsed
as any other outside document.
"""

from __future__ import annotations

import re
from collections.abc import Callable

from lxml import etree

from virtstore.errors import InvalidArgument
from virtstore.types import VolumeInfo
from virtstore.xml.safe import parse_document

# libvirt's <target bus=...> values (virDomainDiskBus).
BUSES = ("ide", "fdc", "scsi", "virtio", "xen", "usb", "uml", "sata", "sd")
SOURCES = ("path", "volume")
_DEV = re.compile(r"[A-Za-z0-9_.-]{1,64}")

# Formats qemu's block layer opens by that name; other formats read as raw bytes
# (partition types of disk pools, "none", ISO images, no format at all).
_QEMU_FORMATS = frozenset({"raw", "qcow", "qcow2", "qed", "vmdk", "vpc", "vdi", "vhdx",
                           "bochs", "cloop", "dmg", "parallels"})


def driver_type(fmt: str | None, vol_type: str) -> str:
    """The ``<driver type=...>`` qemu opens a volume of this format with."""
    if vol_type in ("dir", "netdir"):
        return "fat"  # qemu's vvfat: a directory shown as a FAT disk
    if fmt == "vhd":
        return "vpc"
    if fmt in _QEMU_FORMATS:
        return fmt
    return "raw"  # luks volumes too: the encryption goes in <source>


def _source(disk: etree._Element, info: VolumeInfo, source: str) -> etree._Element:
    if source == "volume" or info.type in ("network", "netdir"):
        # A network volume has no local path: libvirt resolves it from the pool.
        disk.set("type", "volume")
        return etree.SubElement(disk, "source", pool=info.pool, volume=info.name)
    if info.type == "block":
        disk.set("type", "block")
        return etree.SubElement(disk, "source", dev=info.path)
    if info.type == "dir":
        disk.set("type", "dir")
        return etree.SubElement(disk, "source", dir=info.path)
    disk.set("type", "file")  # file and ploop volumes
    return etree.SubElement(disk, "source", file=info.path)


def _encryption(info: VolumeInfo, volume_xml: str,
                secret_for: Callable[[str], str | None] | None) -> etree._Element | None:
    """The volume's encryption as a disk source wants it: its format and secret.

    From the volume XML's ``<encryption>`` when it has one; a LUKS volume without one
    gets ``format='luks'``. A secret the XML does not name is the one whose usage is
    the volume's path (libvirt's volume secrets), if ``secret_for`` finds it.
    """
    root = parse_document(volume_xml, "volume", "(storage_volume_definition)")
    enc = root.find("target/encryption")
    fmt = enc.get("format") if enc is not None else ("luks" if info.format == "luks" else None)
    if fmt is None or fmt == "default":
        return None  # not encrypted, or nothing a guest can be told how to open
    out = etree.Element("encryption", format=fmt)
    for secret in enc.findall("secret") if enc is not None else ():
        ref = etree.SubElement(out, "secret")
        for key in ("type", "uuid", "usage"):
            value = secret.get(key)
            if value is not None:
                ref.set(key, value)
    if not len(out) and secret_for is not None:
        uuid = secret_for(info.path)
        if uuid is not None:
            etree.SubElement(out, "secret", type="passphrase", uuid=uuid)
    return out


def disk_xml(info: VolumeInfo, volume_xml: str, *, target_dev: str = "vda",
             bus: str = "virtio", source: str = "path",
             secret_for: Callable[[str], str | None] | None = None) -> str:
    """The ``<disk>`` element for a volume; ``source`` is ``path`` (by its file or
    device) or ``volume`` (by pool and volume name); ``secret_for`` maps a volume's
    path to the UUID of its passphrase secret, or None."""
    if not _DEV.fullmatch(target_dev):
        raise InvalidArgument(f"invalid target device name '{target_dev}'")
    if bus not in BUSES:
        raise InvalidArgument(f"unknown disk bus '{bus}': one of {', '.join(BUSES)}")
    if source not in SOURCES:
        raise InvalidArgument(f"unknown disk source '{source}': path or volume")
    disk = etree.Element("disk", type="file", device="disk")
    etree.SubElement(disk, "driver", name="qemu", type=driver_type(info.format, info.type))
    src = _source(disk, info, source)
    enc = _encryption(info, volume_xml, secret_for)
    if enc is not None:
        src.append(enc)
    etree.SubElement(disk, "target", dev=target_dev, bus=bus)
    return etree.tostring(disk, encoding="unicode", pretty_print=True)
