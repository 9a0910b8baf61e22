"""Header parsers for other hypervisors' formats: vmdk, vdi, vpc (VHD) and vhdx.

Layouts: VMware "Virtual Disk Format 1.1", VirtualBox VDI 1.1, Microsoft "Virtual
Hard Disk Image Format" (VHD) and [MS-VHDX]; qemu's block/vmdk.c, vdi.c, vpc.c and
vhdx.c show what qemu reads from them.
"""

from __future__ import annotations

import re
import struct

from virtstore.formats._types import ImageInfo, Source, Truncated, cstring

MAX_DESCRIPTOR = 64 * 1024
_EXTENT = re.compile(r"^(?:RW|RDONLY|NOACCESS)\s+(\d+)\s+(\w+)")
_KEY = re.compile(r'^\s*(createType|parentFileNameHint)\s*=\s*"([^"]*)"')


def is_vmdk_descriptor(head: bytes) -> bool:
    """qemu's rule: the first line that is not a comment or blank is "version=1|2|3"."""
    for raw in head.split(b"\n"):
        line = raw.strip(b" \r")
        if not line or line.startswith(b"#"):
            continue
        return line in (b"version=1", b"version=2", b"version=3") and b"createType" in head
    return False


def _descriptor(text: bytes, info: ImageInfo) -> int:
    """Fill create type and parent from a descriptor; return its extents' sectors."""
    sectors = 0
    for line in text.decode("utf-8", "replace").splitlines():
        key = _KEY.match(line)
        if key and key.group(1) == "createType":
            info.subformat = key.group(2)
        elif key and key.group(2):
            # A vmdk's parent is always a vmdk (qemu says so too).
            info.backing_file = key.group(2)
            info.backing_format = "vmdk"
        extent = _EXTENT.match(line.strip())
        if extent:
            sectors += int(extent.group(1))
    return sectors


def parse_vmdk_descriptor(src: Source, info: ImageInfo) -> None:
    info.format = "vmdk"
    text = cstring(src.read_upto(0, MAX_DESCRIPTOR))
    info.virtual_size = _descriptor(text, info) * 512


def parse_vmdk_sparse(src: Source, info: ImageInfo) -> None:
    info.format = "vmdk"
    (version, _flags, capacity, grain, desc_offset,
     desc_size) = struct.unpack_from("<IIQQQQ", src.read(4, 40))
    info.virtual_size = capacity * 512
    if not 1 <= version <= 3 or grain == 0:
        raise Truncated
    info.cluster_size = grain * 512
    info.subformat = "monolithicSparse"
    if desc_offset and desc_size:
        length = min(desc_size * 512, MAX_DESCRIPTOR)
        _descriptor(cstring(src.read_upto(desc_offset * 512, length)), info)


def parse_vmdk3(src: Source, info: ImageInfo) -> None:
    info.format = "vmdk"
    _version, _flags, sectors, granularity = struct.unpack_from("<IIII", src.read(4, 16))
    info.virtual_size = sectors * 512
    info.cluster_size = granularity * 512 or None


def parse_vdi(src: Source, info: ImageInfo) -> None:
    info.format = "vdi"
    version, _hsize, image_type = struct.unpack_from("<III", src.read(68, 12))
    size, block_size = struct.unpack_from("<QI", src.read(368, 12))
    info.virtual_size = size
    info.cluster_size = block_size or None
    info.subformat = {1: "dynamic", 2: "static"}.get(image_type)
    if version != 0x00010001:
        raise Truncated


# Creator applications whose VHDs are sized by current_size, not by CHS geometry.
_VPC_SIZED_BY_FOOTER = (b"win ", b"qem2", b"d2v ", b"CTXS", b"tap\0")
_VPC_MAX_GEOMETRY = 65535 * 16 * 255
_VPC_TYPES = {2: "fixed", 3: "dynamic", 4: "differencing"}


def _vpc_checksum_ok(footer: bytes) -> bool:
    stored: int = struct.unpack_from(">I", footer, 64)[0]
    return (~(sum(footer[:64]) + sum(footer[68:])) & 0xFFFFFFFF) == stored


def is_vpc_footer(tail: bytes) -> bool:
    """A fixed VHD has only a footer; insist on its checksum, raw data could say conectix."""
    return tail[:8] == b"conectix" and _vpc_checksum_ok(tail)


def parse_vpc(src: Source, info: ImageInfo) -> None:
    info.format = "vpc"
    footer = src.read(0, 512)
    if footer[:8] != b"conectix":
        footer = src.read(src.size - 512, 512)
    (data_offset, _ts, creator, _cver, _cos, _orig, current, cyls, heads, secs,
     disk_type) = struct.unpack_from(">QI4sIIQQHBBI", footer, 16)
    info.subformat = _VPC_TYPES.get(disk_type)
    # qemu's rule: Virtual PC (and qemu's default) size disks by CHS geometry,
    # other creators by current_size.
    sectors = cyls * heads * secs
    if creator in _VPC_SIZED_BY_FOOTER or sectors == _VPC_MAX_GEOMETRY:
        info.virtual_size = current
    else:
        info.virtual_size = sectors * 512
    if not _vpc_checksum_ok(footer):
        info.corrupt = True
    if disk_type in (3, 4) and data_offset < src.size:
        dyn = src.read(data_offset, 36)
        if dyn[:8] != b"cxsparse":
            raise Truncated
        info.cluster_size = struct.unpack_from(">I", dyn, 32)[0]


_VHDX_REGION_TABLE = 192 * 1024
_VHDX_METADATA_REGION = bytes.fromhex("06a27c8b90479a4bb8fe575f050f886e")
_VHDX_VIRTUAL_DISK_SIZE = bytes.fromhex("2442a52f1bcd7648b2115dbed83bf4b8")
_VHDX_FILE_PARAMETERS = bytes.fromhex("3767a1ca36fa434db3b633f0aa44e76b")


def parse_vhdx(src: Source, info: ImageInfo) -> None:
    """Size and block size from the metadata region: four small reads past the head."""
    info.format = "vhdx"
    regions = src.read(_VHDX_REGION_TABLE, 4096)
    if regions[:4] != b"regi":
        raise Truncated
    count = min(struct.unpack_from("<I", regions, 8)[0], (4096 - 16) // 32)
    meta_offset = None
    for i in range(count):
        guid, offset, _length = struct.unpack_from("<16sQI", regions, 16 + 32 * i)
        if guid == _VHDX_METADATA_REGION:
            meta_offset = offset
    if meta_offset is None:
        raise Truncated
    table = src.read(meta_offset, 4096)
    if table[:8] != b"metadata":
        raise Truncated
    count = min(struct.unpack_from("<H", table, 10)[0], (4096 - 32) // 32)
    for i in range(count):
        guid, offset, length = struct.unpack_from("<16sII", table, 32 + 32 * i)
        if guid == _VHDX_VIRTUAL_DISK_SIZE and length >= 8:
            info.virtual_size = struct.unpack("<Q", src.read(meta_offset + offset, 8))[0]
        elif guid == _VHDX_FILE_PARAMETERS and length >= 8:
            block_size, flags = struct.unpack("<II", src.read(meta_offset + offset, 8))
            info.cluster_size = block_size
            info.subformat = "differencing" if flags & 2 else None

