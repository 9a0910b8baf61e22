"""LVM2 physical volumes inside a volume: the logical volumes whose extents all lie on
it (linear segments), as regions to probe. The text metadata is parsed here; a VG
spanning other disks, or a striped/thin/raid LV, is named but not read."""

from __future__ import annotations

import re
import struct

from virtstore.inspect.parts import SECTOR, Region
from virtstore.inspect.source import Concat, GuestDataError, Slice, Source

MDA_MAGIC = b" LVM2 x[5A%r0N*>"
MAX_METADATA = 4 << 20
MAX_DEPTH = 16

Value = str | int | list["Value"] | dict[str, "Value"]


def _label(src: Source) -> tuple[bytes, int]:
    head = src.pread(0, 4 * SECTOR)
    for s in range(4):
        if head[s * SECTOR:s * SECTOR + 8] == b"LABELONE":
            return head[s * SECTOR:(s + 1) * SECTOR], s
    raise GuestDataError("no LVM label")


def metadata(src: Source) -> tuple[str, dict[str, Value]]:
    """The PV's UUID (without dashes) and its newest VG metadata."""
    label, _sector = _label(src)
    (offset,) = struct.unpack_from("<I", label, 20)
    if offset > SECTOR - 40:
        raise GuestDataError("the LVM label is malformed")
    pv_uuid = label[offset:offset + 32].decode("ascii", "replace")
    pos = offset + 40
    areas: list[list[tuple[int, int]]] = [[], []]
    for which in (0, 1):
        while pos + 16 <= SECTOR:
            a, b = struct.unpack_from("<QQ", label, pos)
            pos += 16
            if a == 0:
                break
            areas[which].append((a, b))
    for mda_offset, mda_size in areas[1]:
        hdr = src.pread(mda_offset, SECTOR)
        if hdr[4:20] != MDA_MAGIC:
            continue
        (start,) = struct.unpack_from("<Q", hdr, 24)
        raw_offset, raw_size = struct.unpack_from("<QQ", hdr, 40)
        if not raw_size or raw_size > MAX_METADATA or raw_offset >= mda_size:
            continue
        first = min(raw_size, mda_size - raw_offset)
        text = src.pread(mda_offset + raw_offset, first)
        if first < raw_size:  # the circular buffer wraps after its header sector
            text += src.pread(mda_offset + SECTOR, raw_size - first)
        del start
        return pv_uuid, parse(text.split(b"\0", 1)[0].decode("utf-8", "replace"))
    raise GuestDataError("the PV has no readable metadata area")


TOKEN = re.compile(r'\s*(?:(#[^\n]*)|("(?:[^"\\]|\\.)*")|([\w.+-]+)|([{}\[\]=,]))', re.S)


def parse(text: str) -> dict[str, Value]:
    """LVM's metadata text format: ``name { key = value ... }`` with lists."""
    tokens = [m.group(2) or m.group(3) or m.group(4)
              for m in TOKEN.finditer(text) if not m.group(1)]
    tokens = [t for t in tokens if t]
    pos = 0

    def value(depth: int) -> Value:
        nonlocal pos
        if depth > MAX_DEPTH:
            raise GuestDataError("LVM metadata nests too deep")
        t = tokens[pos]
        pos += 1
        if t == "[":
            items: list[Value] = []
            while tokens[pos] != "]":
                if tokens[pos] == ",":
                    pos += 1
                    continue
                items.append(value(depth + 1))
            pos += 1
            return items
        if t.startswith('"'):
            return t[1:-1].replace('\\"', '"')
        try:
            return int(t)
        except ValueError:
            return t

    def section(depth: int) -> dict[str, Value]:
        nonlocal pos
        out: dict[str, Value] = {}
        while pos < len(tokens) and tokens[pos] != "}":
            key = tokens[pos]
            pos += 1
            if tokens[pos] == "{":
                pos += 1
                if depth > MAX_DEPTH:
                    raise GuestDataError("LVM metadata nests too deep")
                out[key] = section(depth + 1)
                pos += 1
            elif tokens[pos] == "=":
                pos += 1
                out[key] = value(depth)
            else:
                raise GuestDataError(f"unexpected '{tokens[pos]}' in LVM metadata")
        return out

    return section(0)


def logical_volumes(pv: Region) -> list[Region]:
    pv_uuid, meta = metadata(pv.source)
    vg_name, vg = next(((k, v) for k, v in meta.items() if isinstance(v, dict)),
                       ("", {}))
    if not isinstance(vg, dict):
        return []
    extent = _int(vg.get("extent_size", 0)) * SECTOR
    pvs = vg.get("physical_volumes", {})
    lvs = vg.get("logical_volumes", {})
    if extent <= 0 or not isinstance(pvs, dict) or not isinstance(lvs, dict):
        raise GuestDataError("the VG metadata lacks extents or volumes")
    here = None
    for key, p in pvs.items():
        if isinstance(p, dict) and str(p.get("id", "")).replace("-", "") == pv_uuid:
            here = (key, _int(p.get("pe_start", 0)) * SECTOR)
    if here is None:
        raise GuestDataError("this PV is not in its own VG's metadata")
    out = []
    for lv_name, lv in lvs.items():
        if not isinstance(lv, dict):
            continue
        device = f"/dev/{vg_name}/{lv_name}"
        region = Region(device, pv.source, 0, 0)
        try:
            pieces = _segments(lv, here, extent, pv.source)
        except GuestDataError as exc:
            region.notes.append(str(exc))
            region.source = Slice(pv.source, 0, 0)
            out.append(region)
            continue
        region.source = Concat(pieces)
        region.size = region.source.size
        first = pieces[0] if pieces else None
        region.offset = pv.offset + (first.offset if isinstance(first, Slice) else 0)
        out.append(region)
    return out


def _segments(lv: dict[str, Value], here: tuple[str, int], extent: int,
              src: Source) -> list[Source]:
    segs = sorted((v for k, v in lv.items() if k.startswith("segment") and
                   isinstance(v, dict)), key=lambda s: _int(s.get("start_extent", 0)))
    pieces: list[Source] = []
    for seg in segs:
        stripes = seg.get("stripes")
        if seg.get("type") != "striped" or _int(seg.get("stripe_count", 0)) != 1 or \
                not isinstance(stripes, list) or len(stripes) != 2:
            raise GuestDataError(f"segment type {seg.get('type')} is not read")
        if stripes[0] != here[0]:
            raise GuestDataError("the LV lies on another physical volume")
        count = _int(seg.get("extent_count", 0))
        pieces.append(Slice(src, here[1] + _int(stripes[1]) * extent, count * extent))
    return pieces


def _int(v: Value | None) -> int:
    if not isinstance(v, int) or v < 0:
        raise GuestDataError(f"LVM metadata has {v!r} where a count belongs")
    return v
