"""Header parsers for qemu's own formats: qcow (v1), qcow2 (v2, v3) and qed.

Layouts: qemu docs/interop/qcow2.txt, block/qcow.c, docs/interop/qed_spec.txt.
Each parser fills ``info`` from the header; a field past the end raises Truncated.
"""

from __future__ import annotations

import os
import struct

from virtstore.formats._types import ImageInfo, Source, Truncated

MAX_BACKING_NAME = 1023  # qemu refuses longer names
EXT_BACKING_FORMAT = 0xE2792ACA
INCOMPAT_CORRUPT = 1 << 1
COMPAT_LAZY_REFCOUNTS = 1 << 0
CRYPT_METHODS = {1: "qcow", 2: "luks"}  # 1 = legacy AES, 2 = LUKS payload
QED_F_BACKING_FILE = 0x01
QED_F_BACKING_FORMAT_NO_PROBE = 0x04


def _name(data: bytes) -> str:
    return os.fsdecode(data)


def _backing_name(src: Source, offset: int, size: int, limit: int) -> str | None:
    if offset == 0 or size == 0:
        return None
    if size > MAX_BACKING_NAME or offset + size > limit:
        raise Truncated
    return _name(src.read(offset, size))


def parse_qcow(src: Source, info: ImageInfo) -> None:
    version = struct.unpack_from(">I", src.read(4, 4))[0]
    if version == 1:
        _parse_qcow1(src, info)
    else:
        info.format = "qcow2"
        if version not in (2, 3):
            raise Truncated
        _parse_qcow2(src, info, version)


def _parse_qcow1(src: Source, info: ImageInfo) -> None:
    info.format = "qcow"
    (bo, bs, _mtime, size, cluster_bits, l2_bits, _pad,
     crypt) = struct.unpack_from(">QIIQBBHI", src.read(8, 32))
    info.virtual_size = size
    if not 9 <= cluster_bits <= 16 or not 6 <= l2_bits <= 16:
        raise Truncated
    info.cluster_size = 1 << cluster_bits
    if crypt:
        info.encrypted = True
        info.encryption_format = CRYPT_METHODS.get(crypt, "unknown")
    info.backing_file = _backing_name(src, bo, bs, src.size)


def _parse_qcow2(src: Source, info: ImageInfo, version: int) -> None:
    info.compat = "0.10" if version == 2 else "1.1"
    (bo, bs, cluster_bits, size, crypt) = struct.unpack_from(">QIIQI", src.read(8, 28))
    info.virtual_size = size
    if crypt:
        info.encrypted = True
        info.encryption_format = CRYPT_METHODS.get(crypt, "unknown")
    if not 9 <= cluster_bits <= 21:
        raise Truncated
    cluster_size = 1 << cluster_bits
    info.cluster_size = cluster_size
    header_len = 72
    if version == 3:
        incompat, compat, _autoclear, _order, header_len = struct.unpack_from(
            ">QQQII", src.read(72, 32))
        info.lazy_refcounts = bool(compat & COMPAT_LAZY_REFCOUNTS)
        if incompat & INCOMPAT_CORRUPT:
            info.corrupt = True
        if header_len < 104 or header_len > cluster_size:
            raise Truncated
    # Header extensions sit between the header and the backing file name, all
    # inside the first cluster.
    if bo > cluster_size:
        raise Truncated
    info.backing_file = _backing_name(src, bo, bs, cluster_size)
    end = bo if bo else cluster_size
    offset = header_len
    while offset + 8 <= end:
        magic, length = struct.unpack_from(">II", src.read(offset, 8))
        offset += 8
        if magic == 0:
            break
        if offset + length > end:
            raise Truncated
        if magic == EXT_BACKING_FORMAT:
            info.backing_format = src.read(offset, length).decode("ascii", "replace")
        offset += (length + 7) & ~7


def parse_qed(src: Source, info: ImageInfo) -> None:
    info.format = "qed"
    (cluster_size, table_size, _hsize, features, _compat, _autoclear, _l1, size, bo,
     bs) = struct.unpack_from("<IIIQQQQQII", src.read(4, 60))
    info.virtual_size = size
    if (cluster_size & (cluster_size - 1) or not 4096 <= cluster_size <= 64 << 20
            or not 1 <= table_size <= 16):
        raise Truncated
    info.cluster_size = cluster_size
    if features & QED_F_BACKING_FILE:
        info.backing_file = _backing_name(src, bo, bs, src.size)
        # qed records only "the backing file is raw, do not probe it".
        if features & QED_F_BACKING_FORMAT_NO_PROBE:
            info.backing_format = "raw"
