"""Header parsers for LUKS, ISO 9660 and the rarer formats libvirt names.

LUKS: cryptsetup's LUKS1 on-disk format and LUKS2 docs; parallels (libvirt's
"ploop"), bochs, cloop, dmg and UML cow: qemu's block/*.c and libvirt's
storage_file_probe.c.
"""

from __future__ import annotations

import struct

from virtstore.formats._types import ImageInfo, Source, Truncated, cstring

LUKS_MAGIC = b"LUKS\xba\xbe"
LUKS2_JSON_OFFSET = 4096
LUKS2_MAX_JSON = 1 << 20
CLOOP_MAGIC = (b"#!/bin/sh\n#V2.0 Format\n"
               b"modprobe cloop file=$0 && mount -r -t iso9660 /dev/cloop $1\n")
ISO_MAGIC_OFFSET = 32769  # "CD001" in the first volume descriptor (sector 16)


def parse_luks(src: Source, info: ImageInfo) -> None:
    """Virtual size = file size - payload offset, as qemu and libvirt report it."""
    info.format = "luks"
    info.encrypted = True
    info.encryption_format = "luks"
    version = struct.unpack_from(">H", src.read(6, 2))[0]
    if version == 1:
        payload = struct.unpack_from(">I", src.read(104, 4))[0] * 512
    elif version == 2:
        payload = _luks2_payload(src)
    else:
        raise Truncated
    info.virtual_size = max(0, src.size - payload)


def _luks2_payload(src: Source) -> int:
    import json  # only LUKS2 needs it; keep it off the import path of every probe

    hdr_size = struct.unpack_from(">Q", src.read(8, 8))[0]
    length = min(hdr_size - LUKS2_JSON_OFFSET, LUKS2_MAX_JSON)
    if length <= 0:
        raise Truncated
    text = cstring(src.read_upto(LUKS2_JSON_OFFSET, length))
    try:
        meta = json.loads(text)
        offsets = [int(seg["offset"]) for seg in meta["segments"].values()]
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise Truncated from exc
    if not offsets:
        raise Truncated
    return min(offsets)


def parse_ploop(src: Source, info: ImageInfo) -> None:
    info.format = "ploop"
    magic = src.read(0, 16)
    sectors = struct.unpack_from("<Q", src.read(36, 8))[0]
    if magic == b"WithoutFreeSpace":  # the old header has a 32-bit sector count
        sectors &= 0xFFFFFFFF
    info.virtual_size = sectors * 512


def parse_bochs(src: Source, info: ImageInfo) -> None:
    info.format = "bochs"
    version = struct.unpack_from("<I", src.read(64, 4))[0]
    offset = 84 if version == 0x00010000 else 88
    info.virtual_size = struct.unpack_from("<Q", src.read(offset, 8))[0]


def parse_cloop(src: Source, info: ImageInfo) -> None:
    info.format = "cloop"
    block_size, blocks = struct.unpack_from(">II", src.read(128, 8))
    info.virtual_size = block_size * blocks


def parse_cow(src: Source, info: ImageInfo) -> None:
    info.format = "cow"
    name = cstring(src.read(8, 1024))
    info.virtual_size = struct.unpack_from(">Q", src.read(1036, 8))[0]
    if name:
        info.backing_file = name.decode("utf-8", "surrogateescape")


def is_dmg_trailer(tail: bytes) -> bool:
    return tail[:4] == b"koly" and struct.unpack_from(">II", tail, 4) == (4, 512)


def parse_dmg(src: Source, info: ImageInfo) -> None:
    info.format = "dmg"
    koly = src.read(src.size - 512, 512)
    info.virtual_size = struct.unpack_from(">Q", koly, 492)[0] * 512


def parse_iso(src: Source, info: ImageInfo) -> None:
    # libvirt reports an ISO's capacity as its file size; so do we.
    info.format = "iso"
