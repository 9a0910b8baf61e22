"""LVM through its JSON reports: volume groups, physical and logical volumes.

Every command runs through the runner. Reports use ``--reportformat json --units b
--nosuffix`` so sizes are exact byte counts. On a kernel without device-mapper every
command gets ``--driverloaded n``: LVM then changes metadata only (no activation, no
/dev/VG/LV nodes), which is all such a host can do.
"""

from __future__ import annotations

import json
import logging
import os
import re
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from virtstore.errors import CommandFailed
from virtstore.host.runner import run, which

# lvm complains about every inherited descriptor otherwise.
_ENV = {"LVM_SUPPRESS_FD_WARNINGS": "1"}
log = logging.getLogger("virtstore")

VG_FIELDS = "vg_name,vg_uuid,vg_size,vg_free,vg_extent_size,vg_extent_count,vg_free_count," \
            "pv_count,lv_count,vg_attr,vg_lock_type"
PV_FIELDS = "pv_name,vg_name,pv_uuid,pv_size,pv_free,dev_size,pv_fmt"
LV_FIELDS = "lv_name,vg_name,lv_uuid,lv_path,lv_size,lv_attr,segtype,stripes,stripe_size," \
            "seg_start,seg_size,seg_pe_ranges,devices,origin,pool_lv,lv_active,data_percent," \
            "lv_tags"


def device_mapper_available() -> bool:
    """Whether the running kernel has device-mapper (needed to activate LVs)."""
    # Not /dev/mapper/control: lvm creates that node itself even where the kernel has no
    # driver behind it.
    if os.path.exists("/sys/class/misc/device-mapper"):
        return True
    try:
        with open("/proc/misc", encoding="ascii", errors="replace") as fh:
            if any(line.split()[-1:] == ["device-mapper"] for line in fh):
                return True
    except OSError:
        pass
    # Not loaded yet but loadable: lvm loads dm_mod itself on a normal host.
    release = os.uname().release
    for base in (f"/lib/modules/{release}", f"/usr/lib/modules/{release}"):
        try:
            with open(os.path.join(base, "modules.builtin"), encoding="ascii") as fh:
                if any(line.rstrip().endswith("/dm-mod.ko") for line in fh):
                    return True
        except OSError:
            pass
        for ext in ("", ".xz", ".zst", ".gz"):
            if os.path.exists(os.path.join(base, "kernel/drivers/md/dm-mod.ko" + ext)):
                return True
    return False


SHARED_LOCK_TYPES = ("sanlock", "dlm")

NO_DM_MESSAGE = ("device-mapper is not available in this kernel: logical volumes cannot "
                 "be activated")


def tool_problem() -> str | None:
    if which("lvm") is None:
        return "the LVM tools are not installed (lvm, from Debian's lvm2)"
    return None


def lvm(args: Sequence[str], *, check: bool = True, timeout: float = 120.0) -> str:
    """Run ``lvm ARGS...`` (``--driverloaded n`` without device-mapper); its stdout."""
    argv = ["lvm", *args]
    if not device_mapper_available():
        argv.insert(2, "--driverloaded")
        argv.insert(3, "n")
    return run(argv, env=_ENV, check=check, timeout=timeout).stdout


def _report(text: str, *kinds: str) -> list[dict[str, str]]:
    """The rows of some kinds ("vg", "pv", "lv", "seg") of an lvm JSON report."""
    if not text.strip():
        return []
    # A report may be followed by log lines on some versions: take the JSON object.
    start = text.find("{")
    doc = json.loads(text[start:]) if start >= 0 else {}
    rows: list[dict[str, str]] = []
    for part in doc.get("report", []):
        for kind in kinds:
            rows.extend(part.get(kind, []))
    return rows


def _int(value: str | None) -> int:
    try:
        return int(value or 0)
    except ValueError:
        return 0


@dataclass(frozen=True)
class VolumeGroup:
    name: str
    uuid: str
    size: int
    free: int
    extent_size: int
    extent_count: int
    free_count: int
    pv_count: int
    lv_count: int
    attr: str
    # "sanlock" or "dlm" for a shared VG (``vgcreate --shared``, lvmlockd); "" if local.
    lock_type: str = ""

    @property
    def shared(self) -> bool:
        return self.lock_type in SHARED_LOCK_TYPES


@dataclass(frozen=True)
class PhysicalVolume:
    name: str
    vg_name: str
    uuid: str
    size: int
    free: int
    dev_size: int
    fmt: str


@dataclass(frozen=True)
class Segment:
    start: int
    size: int
    stripes: int
    stripe_size: int
    segtype: str
    # (device, first extent, last extent) per stripe, from seg_pe_ranges
    pe_ranges: list[tuple[str, int, int]] = field(default_factory=list)


@dataclass
class LogicalVolume:
    name: str
    vg_name: str
    uuid: str
    path: str
    size: int
    attr: str
    origin: str
    pool_lv: str
    active: str
    segments: list[Segment] = field(default_factory=list)
    # Of a thin LV or thin pool: the share of its size written ("" in older reports).
    data_percent: float | None = None
    tags: tuple[str, ...] = ()

    @property
    def used(self) -> int | None:
        """Bytes written to a thin LV or thin pool, from its data percent."""
        if self.data_percent is None:
            return None
        return min(self.size, round(self.size * self.data_percent / 100))

    @property
    def is_thin_pool(self) -> bool:
        return self.attr[:1] == "t"

    @property
    def is_thin(self) -> bool:
        return self.attr[:1] == "V"

    @property
    def is_snapshot(self) -> bool:
        return self.attr[:1] in ("s", "S")

    @property
    def skips_activation(self) -> bool:
        """Left inactive by ``vgchange -ay`` (LVM's default for thin snapshots)."""
        return self.attr[9:10] == "k"

    @property
    def hidden(self) -> bool:
        # Internal LVs (thin pool data/metadata, mirror logs) are shown in brackets.
        return self.name.startswith("[")


def parse_vgs(text: str) -> list[VolumeGroup]:
    return [VolumeGroup(name=r.get("vg_name", ""), uuid=r.get("vg_uuid", ""),
                        size=_int(r.get("vg_size")), free=_int(r.get("vg_free")),
                        extent_size=_int(r.get("vg_extent_size")),
                        extent_count=_int(r.get("vg_extent_count")),
                        free_count=_int(r.get("vg_free_count")),
                        pv_count=_int(r.get("pv_count")), lv_count=_int(r.get("lv_count")),
                        attr=r.get("vg_attr", ""),
                        lock_type=r.get("vg_lock_type", "") or "")
            for r in _report(text, "vg")]


def parse_pvs(text: str) -> list[PhysicalVolume]:
    return [PhysicalVolume(name=r.get("pv_name", ""), vg_name=r.get("vg_name", ""),
                           uuid=r.get("pv_uuid", ""), size=_int(r.get("pv_size")),
                           free=_int(r.get("pv_free")), dev_size=_int(r.get("dev_size")),
                           fmt=r.get("pv_fmt", ""))
            for r in _report(text, "pv")]


def _pe_ranges(text: str) -> list[tuple[str, int, int]]:
    """``/dev/sdb1:0-9 /dev/sdc1:0-9`` -> [(device, first, last), ...]."""
    out: list[tuple[str, int, int]] = []
    for item in text.split():
        dev, _, rng = item.rpartition(":")
        first, _, last = rng.partition("-")
        if dev and first.isdigit() and last.isdigit():
            out.append((dev, int(first), int(last)))
    return out


def _percent(value: str | None) -> float | None:
    try:
        return float(value) if value else None
    except ValueError:
        return None


def parse_lvs(text: str) -> list[LogicalVolume]:
    """One LogicalVolume per LV, its segments in order (lvs prints a row per segment)."""
    by_uuid: dict[str, LogicalVolume] = {}
    for r in _report(text, "lv", "seg"):
        uuid = r.get("lv_uuid", "")
        lv = by_uuid.get(uuid)
        if lv is None:
            lv = LogicalVolume(name=r.get("lv_name", ""), vg_name=r.get("vg_name", ""),
                               uuid=uuid, path=r.get("lv_path", ""),
                               size=_int(r.get("lv_size")), attr=r.get("lv_attr", ""),
                               origin=r.get("origin", ""), pool_lv=r.get("pool_lv", ""),
                               active=r.get("lv_active", ""),
                               data_percent=_percent(r.get("data_percent")),
                               tags=tuple(t for t in r.get("lv_tags", "").split(",") if t))
            by_uuid[uuid] = lv
        if "seg_start" in r:
            lv.segments.append(Segment(start=_int(r.get("seg_start")),
                                       size=_int(r.get("seg_size")),
                                       stripes=_int(r.get("stripes")) or 1,
                                       stripe_size=_int(r.get("stripe_size")),
                                       segtype=r.get("segtype", ""),
                                       pe_ranges=_pe_ranges(r.get("seg_pe_ranges", ""))))
    return list(by_uuid.values())


_REPORT_OPTS = ("--reportformat", "json", "--units", "b", "--nosuffix")


def vgs(names: Sequence[str] = ()) -> list[VolumeGroup]:
    return parse_vgs(lvm(["vgs", *_REPORT_OPTS, "-o", VG_FIELDS, *names]))


class NeedsLvmlockd(CommandFailed):
    """A shared VG, and this host's LVM is not set up for lvmlockd (``use_lvmlockd``)."""


def vg(name: str) -> VolumeGroup | None:
    """The volume group ``name``, or None when no such VG is visible."""
    try:
        found = vgs([name])
    except CommandFailed as exc:
        text = f"{exc} {exc.stderr}"
        if "requires lvmlockd" in text:
            # "Cannot access VG X with lock type sanlock that requires lvmlockd."
            raise NeedsLvmlockd(_summary(exc.stderr) or str(exc), argv=exc.argv,
                                returncode=exc.returncode, stderr=exc.stderr) from exc
        if "not found" in text or "does not exist" in text or "Cannot process volume" in text:
            return None
        raise
    return found[0] if found else None


def pvs(names: Sequence[str] = ()) -> list[PhysicalVolume]:
    return parse_pvs(lvm(["pvs", *_REPORT_OPTS, "-o", PV_FIELDS, *names]))


def lvs(vg_name: str) -> list[LogicalVolume]:
    return parse_lvs(lvm(["lvs", *_REPORT_OPTS, "-a", "--segments", "-o", LV_FIELDS,
                          vg_name]))


def pv_of(device: str) -> PhysicalVolume | None:
    """The PV on ``device`` (with its VG name, "" if none), or None if it is not a PV."""
    real = os.path.realpath(device)
    try:
        found = pvs()
    except CommandFailed:
        return None
    for pv in found:
        if os.path.realpath(pv.name) == real:
            return pv
    return None


def size_arg(nbytes: int) -> str:
    """A size for -L: bytes, rounded up to whole KiB (LVM's smallest unit here)."""
    return f"{(nbytes + 1023) // 1024}k"


# -- shared VGs: lvmlockd ---------------------------------------------------------

def _summary(stderr: str) -> str:
    """lvm's error lines, without its warnings and notices, joined on one line."""
    lines = [ln.strip() for ln in stderr.splitlines() if ln.strip()]
    errors = [ln for ln in lines if not ln.startswith("WARNING")]
    return " ".join(errors or lines)


def error_summary(exc: CommandFailed) -> str:
    """What an lvm command that failed said, on one line."""
    return _summary(exc.stderr) or str(exc)


# The LV in which sanlock keeps a shared VG's leases (lvm's fixed name).
SANLOCK_LV = "lvmlock"


def dm_node(vg_name: str, lv_name: str) -> str:
    """An active LV's device-mapper node (dm doubles the hyphens in either name)."""
    return f"/dev/mapper/{vg_name.replace('-', '--')}-{lv_name.replace('-', '--')}"


_LOCKED = re.compile(r"LV locked by other host: ([^/\s]+)/(\S+)")


def locked_elsewhere(stderr: str) -> list[str]:
    """The LVs an lvm command could not lock because another host holds them
    ("LV locked by other host: VG/LV" from lvchange/vgchange -aey on a shared VG)."""
    return [m.group(2) for m in _LOCKED.finditer(stderr)]


@dataclass
class Lockspace:
    """One VG's lockspace in ``lvmlockctl -i``: its lock manager and the locks held here."""
    vg_name: str
    lock_type: str
    # Lock modes by LV UUID ("ex", "sh", "un": known but not held).
    lv_locks: dict[str, str] = field(default_factory=dict)


def parse_lockctl_info(text: str) -> dict[str, Lockspace]:
    """``lvmlockctl -i``: the lockspaces lvmlockd has started, by VG name.

    ``VG vg1 lock_type=sanlock UUID`` opens a VG's block; ``LK LV ex UUID`` lines in it
    are its LV locks (``LS``, ``LK VG``, ``LK GL`` lines are skipped)."""
    spaces: dict[str, Lockspace] = {}
    current: Lockspace | None = None
    for line in text.splitlines():
        words = line.split()
        if len(words) >= 3 and words[0] == "VG" and words[2].startswith("lock_type="):
            current = Lockspace(vg_name=words[1], lock_type=words[2].split("=", 1)[1])
            spaces[current.vg_name] = current
        elif current is not None and len(words) >= 4 and words[:2] == ["LK", "LV"]:
            current.lv_locks[words[3]] = words[2]
    return spaces


def lvmlockd_problem() -> str | None:
    """Why this host cannot use shared VGs, or None: lvmlockd's tools and daemon."""
    if which("lvmlockctl") is None:
        return "lvmlockctl is not installed (Debian lvm2-lockd)"
    return None


def lockspaces() -> dict[str, Lockspace]:
    """The lockspaces this host's lvmlockd has started; CommandFailed when lvmlockd is
    not running."""
    problem = lvmlockd_problem()
    if problem:
        raise CommandFailed(problem, argv=["lvmlockctl", "-i"])
    return parse_lockctl_info(run(["lvmlockctl", "-i"], env=_ENV, timeout=60).stdout)


# -- thin pools' metadata: what thin_delta and thin_dump say ------------------------

THIN_TOOLS = ("dmsetup", "thin_delta", "thin_dump")
# One metadata snapshot per thin pool at a time: the kernel refuses a second one.
_METADATA_SNAPS = threading.Lock()
SECTOR = 512


def thin_tools_problem() -> str | None:
    missing = [t for t in THIN_TOOLS if which(t) is None]
    if missing:
        return (f"{', '.join(missing)} not installed (Debian dmsetup, "
                "thin-provisioning-tools)")
    return None


def thin_ids(vg_name: str, names: Sequence[str]) -> dict[str, int]:
    """The thin device IDs of thin LVs, by name (the IDs the pool's metadata uses)."""
    rows = _report(lvm(["lvs", *_REPORT_OPTS, "-o", "lv_name,thin_id",
                        *(f"{vg_name}/{n}" for n in names)]), "lv")
    return {r["lv_name"]: _int(r.get("thin_id")) for r in rows if r.get("thin_id")}


def _tpool(vg_name: str, pool: str) -> str:
    """The device-mapper name of a thin pool's pool target (``VG-POOL-tpool``)."""
    return dm_node(vg_name, pool).rsplit("/", 1)[1] + "-tpool"


def _held_metadata_snap(tpool: str) -> bool:
    """Whether the pool holds a metadata snapshot (``dmsetup status``: its
    held_metadata_root field, a block number, or "-" when none is held)."""
    words = run(["dmsetup", "status", tpool], timeout=60).stdout.split()
    # start length thin-pool transaction_id used/total used/total held_root ...
    return len(words) > 6 and words[2] == "thin-pool" and words[6] != "-"


@contextmanager
def metadata_snapshot(vg_name: str, pool: str) -> Iterator[str]:
    """A metadata snapshot of an active thin pool (``reserve_metadata_snap``: the
    kernel commits its mappings and keeps that copy unchanged for userland), released
    after, on errors too; yields the metadata device that thin_delta and thin_dump read
    with ``--metadata-snap``. A snapshot a killed reader left held is released first."""
    tpool = _tpool(vg_name, pool)
    with _METADATA_SNAPS:
        try:
            run(["dmsetup", "message", tpool, "0", "reserve_metadata_snap"], timeout=60)
        except CommandFailed:
            if not _held_metadata_snap(tpool):
                raise
            log.warning("thin pool %s/%s held a metadata snapshot no one released: "
                        "releasing it", vg_name, pool)
            run(["dmsetup", "message", tpool, "0", "release_metadata_snap"], timeout=60)
            run(["dmsetup", "message", tpool, "0", "reserve_metadata_snap"], timeout=60)
        try:
            yield dm_node(vg_name, f"{pool}_tmeta")
        finally:
            run(["dmsetup", "message", tpool, "0", "release_metadata_snap"], timeout=60,
                check=False)


Ranges = list[tuple[int, int]]


def _xml_root(text: str) -> Any:
    from lxml import etree

    parser = etree.XMLParser(resolve_entities=False, no_network=True)
    return etree.fromstring(text.encode(), parser)


def _block_bytes(root: Any) -> int:
    size = _int(root.get("data_block_size"))
    if size <= 0:
        raise ValueError("the thin pool metadata names no data block size")
    return size * SECTOR


def parse_thin_delta(text: str) -> tuple[Ranges, Ranges]:
    """``thin_delta``'s XML as byte ranges (offset, length) of the thin devices:
    (changed, unmapped): the blocks mapped differently in the two (``different``) or
    mapped only in the second (``right_only``), and those mapped only in the first
    (``left_only``: holes in the second, reading zeros). Blocks are the pool's data
    blocks (the superblock's ``data_block_size``, in sectors)."""
    root = _xml_root(text)
    block = _block_bytes(root)
    changed: Ranges = []
    unmapped: Ranges = []
    for el in root.iter("different", "right_only", "left_only"):
        # <different begin= length=/>, or with --verbose <different><range begin=...
        for rng in [el] if el.get("begin") is not None else el.iter("range"):
            (unmapped if el.tag == "left_only" else changed).append(
                (_int(rng.get("begin")) * block, _int(rng.get("length")) * block))
    return changed, unmapped


def parse_thin_dump(text: str) -> Ranges:
    """``thin_dump``'s XML of one thin device: its mapped byte ranges."""
    root = _xml_root(text)
    block = _block_bytes(root)
    out: Ranges = []
    for el in root.iter("range_mapping", "single_mapping"):
        if el.tag == "range_mapping":
            out.append((_int(el.get("origin_begin")) * block, _int(el.get("length")) * block))
        else:
            out.append((_int(el.get("origin_block")) * block, block))
    return out


def thin_changes(vg_name: str, pool: str, dev_id: int,
                 since_id: int | None) -> tuple[Ranges, Ranges]:
    """What the pool's metadata says of thin device ``dev_id``: with ``since_id`` (an
    earlier thin snapshot in the same pool) the ranges mapped differently or only in
    ``dev_id`` and those mapped only in ``since_id`` (``thin_delta``), without it every
    mapped range and no holes (``thin_dump``)."""
    with metadata_snapshot(vg_name, pool) as meta:
        if since_id is None:
            out = run(["thin_dump", "--metadata-snap", "--dev-id", str(dev_id), meta],
                      timeout=None).stdout
            return parse_thin_dump(out), []
        out = run(["thin_delta", "--metadata-snap", "--snap1", str(since_id), "--snap2",
                   str(dev_id), meta], timeout=None).stdout
        return parse_thin_delta(out)
