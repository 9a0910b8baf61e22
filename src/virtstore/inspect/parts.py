"""Partition tables (MBR with logical partitions, GPT) and LVM physical volumes: where
the filesystems of a disk are. Parsed here because they are a few fixed structures;
every offset read from the disk is checked against the disk's size."""

from __future__ import annotations

import struct
import uuid
import zlib
from dataclasses import dataclass, field

from virtstore.inspect.source import GuestDataError, Slice, Source

SECTOR = 512
MAX_PARTITIONS = 256
MAX_LOGICAL = 128  # a chain of extended boot records longer than this is a loop

EXTENDED_TYPES = (0x05, 0x0F, 0x85)
LVM_MBR_TYPE = 0x8E
GPT_PROTECTIVE = 0xEE
LVM_GPT_TYPE = "e6d6d379-f507-44c2-a23c-238f2a3df928"


@dataclass
class Region:
    """A place a filesystem (or a PV, LUKS, swap) may start: a partition or the disk."""

    device: str  # as the guest names it: /dev/sda1, /dev/sda, /dev/VG/LV
    source: Source
    offset: int  # within the volume, for display
    size: int
    partition: int | None = None
    part_type: str | None = None
    part_uuid: str | None = None
    part_label: str | None = None
    notes: list[str] = field(default_factory=list)


def regions(disk: Source, device: str = "/dev/sda") -> tuple[str | None, list[Region]]:
    """The partition table's kind (``gpt``, ``mbr`` or None) and the regions to probe:
    every partition, or the whole disk when it has no table."""
    head = disk.pread(0, min(disk.size, 2 * SECTOR)) if disk.size >= SECTOR else b""
    if len(head) < SECTOR or head[510:512] != b"\x55\xaa" or _looks_like_fs_boot(head):
        return None, [Region(device, disk, 0, disk.size)]
    entries = [struct.unpack_from("<B3sB3sII", head, 446 + 16 * i) for i in range(4)]
    if any(e[2] == GPT_PROTECTIVE for e in entries) and disk.size >= 2 * SECTOR \
            and head[SECTOR:SECTOR + 8] == b"EFI PART":
        return "gpt", _gpt(disk, device)
    if not any(e[2] for e in entries):
        return None, [Region(device, disk, 0, disk.size)]
    return "mbr", _mbr(disk, device, entries)


def _looks_like_fs_boot(head: bytes) -> bool:
    """A FAT or NTFS boot sector also ends in 55 AA: it is a filesystem, not a table."""
    if head[3:11] == b"NTFS    ":
        return True
    if (head[0] in (0xEB, 0xE9) and head[54:59] in (b"FAT12", b"FAT16")) or \
            head[82:87] == b"FAT32":
        return True
    return False


def _region(disk: Source, device: str, number: int, start: int, length: int,
            part_type: str | None = None, part_uuid: str | None = None,
            part_label: str | None = None) -> Region:
    if start + length > disk.size:
        raise GuestDataError(f"partition {number} ({length} bytes at {start}) goes past "
                             f"the end of the disk ({disk.size} bytes)")
    return Region(f"{device}{number}", Slice(disk, start, length), start, length,
                  partition=number, part_type=part_type, part_uuid=part_uuid,
                  part_label=part_label)


def _mbr(disk: Source, device: str,
         entries: list[tuple[int, bytes, int, bytes, int, int]]) -> list[Region]:
    out: list[Region] = []
    extended = None
    for i, (_boot, _chs, ptype, _chs2, lba, count) in enumerate(entries, start=1):
        if not ptype or not count:
            continue
        if ptype in EXTENDED_TYPES:
            extended = (lba, count)
            continue
        out.append(_region(disk, device, i, lba * SECTOR, count * SECTOR,
                           part_type=f"0x{ptype:02x}"))
    if extended is not None:
        base = extended[0]
        ebr = base
        number = 5
        seen: set[int] = set()
        while ebr and len(seen) < MAX_LOGICAL:
            if ebr in seen:
                raise GuestDataError("the chain of logical partitions loops")
            seen.add(ebr)
            sec = disk.pread(ebr * SECTOR, SECTOR)
            if sec[510:512] != b"\x55\xaa":
                break
            _b, _c, ptype, _c2, lba, count = struct.unpack_from("<B3sB3sII", sec, 446)
            if ptype and count:
                out.append(_region(disk, device, number, (ebr + lba) * SECTOR,
                                   count * SECTOR, part_type=f"0x{ptype:02x}"))
                number += 1
            _b, _c, ntype, _c2, nlba, _n = struct.unpack_from("<B3sB3sII", sec, 462)
            ebr = base + nlba if ntype in EXTENDED_TYPES and nlba else 0
    return out


def _gpt(disk: Source, device: str) -> list[Region]:
    hdr = disk.pread(SECTOR, SECTOR)
    (hsize,) = struct.unpack_from("<I", hdr, 12)
    if not 92 <= hsize <= SECTOR:
        raise GuestDataError(f"GPT header size {hsize} is invalid")
    crc = struct.unpack_from("<I", hdr, 16)[0]
    check = hdr[:16] + b"\0\0\0\0" + hdr[20:hsize]
    if zlib.crc32(check) != crc:
        raise GuestDataError("the GPT header's checksum is wrong")
    table_lba, count, esize = struct.unpack_from("<QII", hdr, 72)
    if esize < 128 or esize > 4096 or count > 4096:
        raise GuestDataError(f"GPT entry size {esize} or count {count} is invalid")
    table = disk.pread(table_lba * SECTOR, count * esize)
    if zlib.crc32(table) != struct.unpack_from("<I", hdr, 88)[0]:
        raise GuestDataError("the GPT partition array's checksum is wrong")
    out = []
    for i in range(count):
        e = table[i * esize:(i + 1) * esize]
        if e[:16] == bytes(16):
            continue
        first, last = struct.unpack_from("<QQ", e, 32)
        if last < first:
            raise GuestDataError(f"GPT partition {i + 1} ends before it starts")
        name = e[56:128].decode("utf-16-le", "replace").split("\0", 1)[0]
        out.append(_region(disk, device, i + 1, first * SECTOR, (last - first + 1) * SECTOR,
                           part_type=str(uuid.UUID(bytes_le=e[:16])),
                           part_uuid=str(uuid.UUID(bytes_le=e[16:32])),
                           part_label=name or None))
        if len(out) > MAX_PARTITIONS:
            raise GuestDataError("too many partitions")
    return out
