"""Partition tables: read with ``parted -m`` and ``sfdisk --json``, changed with parted.

parted's machine output gives exact byte extents and the free regions (also those
inside a dos extended partition); sfdisk's JSON gives the type code of each entry,
which parted's output lacks. After every change the kernel's partition nodes are
brought in line with ``partx -u`` unless the kernel already shows the new table (a
loop device gets no nodes otherwise on a kernel that does not parse its tables).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from virtstore.errors import CommandFailed, InvalidArgument, NoSpace
from virtstore.host.loop import kernel_partitions, partition_node, sync_partitions
from virtstore.host.runner import run, which

MiB = 1024 * 1024

# libvirt's pool format names -> parted's label names.
LABELS = {"dos": "msdos", "gpt": "gpt", "dvh": "dvh", "mac": "mac", "bsd": "bsd",
          "pc98": "pc98", "sun": "sun", "loop": "loop"}
PARTED_TO_FORMAT = {v: k for k, v in LABELS.items()}
BLKID_PTTYPES = {"dos": "dos", "gpt": "gpt", "sun": "sun", "mac": "mac", "bsd": "bsd",
                 "sgi": "dvh", "PMBR": "gpt"}

DOS_EXTENDED = ("5", "f", "85")
# libvirt's volume formats of a disk pool -> dos type codes they read back from.
_DOS_TYPES = {"83": "linux", "82": "linux-swap", "8e": "linux-lvm", "fd": "linux-raid",
              "1": "fat16", "4": "fat16", "6": "fat16", "e": "fat16", "b": "fat32",
              "c": "fat32", "5": "extended", "f": "extended", "85": "extended"}
_GPT_TYPES = {"0fc63daf-8483-4772-8e79-3d69d8477de4": "linux",
              "0657fd6d-a4ab-43c4-84e5-0933c84b4f4f": "linux-swap",
              "e6d6d379-f507-44c2-a23c-238f2a3df928": "linux-lvm",
              "a19d880f-05fc-4d3b-a006-743f0f84911e": "linux-raid",
              "ebd0a0a2-b9e5-4433-87c0-68b6b72699c7": "fat32"}
# volume format -> (parted fs-type argument, flag to set afterwards)
_CREATE = {"none": (None, None), "linux": ("ext2", None), "fat16": ("fat16", None),
           "fat32": ("fat32", None), "linux-swap": ("linux-swap", None),
           "linux-lvm": (None, "lvm"), "linux-raid": (None, "raid"), "extended": (None, None)}


@dataclass
class Partition:
    number: int
    start: int  # first byte
    end: int  # last byte (inclusive, as parted prints it)
    kind: str  # primary, extended, logical
    type_code: str = ""
    name: str = ""
    flags: tuple[str, ...] = ()
    node: str = ""

    @property
    def size(self) -> int:
        return self.end - self.start + 1

    @property
    def format(self) -> str:
        code = self.type_code.lower()
        return _DOS_TYPES.get(code) or _GPT_TYPES.get(code) or "none"


@dataclass
class FreeRegion:
    start: int
    end: int  # inclusive
    logical: bool = False  # inside a dos extended partition

    @property
    def size(self) -> int:
        return self.end - self.start + 1


@dataclass
class Table:
    device: str
    size: int
    logical_sector: int
    physical_sector: int
    label: str  # libvirt's name: dos, gpt, ...; "unknown" when there is none
    partitions: list[Partition] = field(default_factory=list)
    free: list[FreeRegion] = field(default_factory=list)

    @property
    def extended(self) -> Partition | None:
        return next((p for p in self.partitions if p.kind == "extended"), None)


def tool_problem() -> str | None:
    for tool, pkg in (("parted", "parted"), ("partx", "util-linux"), ("sfdisk", "fdisk")):
        if which(tool) is None:
            return f"'{tool}' is not installed (Debian package {pkg})"
    return None


def _bytes(text: str) -> int:
    return int(text.rstrip("B"))


def parse_parted(text: str) -> tuple[list[str], list[list[str]]]:
    """parted -m output -> (device line fields, partition/free line fields)."""
    lines = [ln.strip().rstrip(";") for ln in text.splitlines() if ln.strip()]
    if not lines or lines[0] != "BYT":
        raise CommandFailed("unexpected output of 'parted -m': no BYT header")
    dev = lines[1].split(":") if len(lines) > 1 else []
    return dev, [ln.split(":") for ln in lines[2:]]


def parse_sfdisk(text: str) -> dict[int, dict[str, str]]:
    """sfdisk --json -> {partition number: {"type": ..., "node": ..., "name": ...}}."""
    doc = json.loads(text) if text.strip() else {}
    out: dict[int, dict[str, str]] = {}
    for part in doc.get("partitiontable", {}).get("partitions", []):
        node = str(part.get("node", ""))
        digits = ""
        for ch in reversed(node):
            if not ch.isdigit():
                break
            digits = ch + digits
        if digits:
            out[int(digits)] = {"type": str(part.get("type", "")), "node": node,
                                "name": str(part.get("name", ""))}
    return out


def build_table(device: str, parted_text: str, sfdisk_text: str,
                part_separator: bool | None = None) -> Table:
    dev, rows = parse_parted(parted_text)
    label = dev[5] if len(dev) > 5 else "unknown"
    table = Table(device=device, size=_bytes(dev[1]) if len(dev) > 1 else 0,
                  logical_sector=int(dev[3]) if len(dev) > 3 and dev[3] else 512,
                  physical_sector=int(dev[4]) if len(dev) > 4 and dev[4] else 512,
                  label=PARTED_TO_FORMAT.get(label, label or "unknown"))
    types = parse_sfdisk(sfdisk_text) if sfdisk_text else {}
    free_rows: list[tuple[int, int]] = []
    for f in rows:
        if len(f) >= 5 and f[4] == "free":
            free_rows.append((_bytes(f[1]), _bytes(f[2])))
            continue
        if len(f) < 4:
            continue
        number = int(f[0])
        info = types.get(number, {})
        code = info.get("type", "")
        if table.label == "dos":
            kind = ("extended" if code.lower() in DOS_EXTENDED
                    else "logical" if number >= 5 else "primary")
            name = ""
        else:
            kind = "primary"
            name = f[5] if len(f) > 5 else ""
        flags = tuple(x.strip() for x in f[6].split(",") if x.strip()) if len(f) > 6 else ()
        table.partitions.append(Partition(
            number=number, start=_bytes(f[1]), end=_bytes(f[2]), kind=kind,
            type_code=code, name=name, flags=flags,
            node=partition_node(device, number, part_separator)))
    ext = table.extended
    for start, end in free_rows:
        inside = ext is not None and ext.start <= start and end <= ext.end
        table.free.append(FreeRegion(start=start, end=end, logical=inside))
    return table


def read_table(device: str, part_separator: bool | None = None) -> Table:
    """The partition table of ``device`` (label "unknown" when it has none)."""
    res = run(["parted", "-s", "-m", device, "unit", "B", "print", "free"], check=False,
              timeout=60)
    if res.returncode != 0:
        if "unrecognised disk label" in res.stderr.lower() or \
                "unrecognized disk label" in res.stderr.lower():
            size = _device_size(device)
            return Table(device=device, size=size, logical_sector=512, physical_sector=512,
                         label="unknown")
        raise CommandFailed(f"cannot read the partition table of '{device}': "
                            f"{res.stderr.strip() or 'parted failed'}", argv=res.argv,
                            returncode=res.returncode, stderr=res.stderr)
    sf = run(["sfdisk", "--json", device], check=False, timeout=60)
    return build_table(device, res.stdout, sf.stdout if sf.returncode == 0 else "",
                       part_separator)


def _device_size(device: str) -> int:
    import os

    try:
        fd = os.open(device, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return 0
    try:
        return os.lseek(fd, 0, os.SEEK_END)
    finally:
        os.close(fd)


def zero_ends(device: str, length: int = MiB) -> None:
    """Zero the first and last ``length`` bytes (old labels, GPT backup header)."""
    import os

    fd = os.open(device, os.O_WRONLY | os.O_CLOEXEC)
    try:
        size = os.lseek(fd, 0, os.SEEK_END)
        n = min(length, size)
        zeros = bytes(n)
        os.pwrite(fd, zeros, 0)
        if size > n:
            os.pwrite(fd, zeros, max(size - n, n))
        os.fsync(fd)
    finally:
        os.close(fd)


def make_label(device: str, fmt: str) -> None:
    """Write an empty partition table of libvirt format ``fmt`` (dos, gpt, ...)."""
    label = LABELS.get(fmt)
    if label is None:
        raise InvalidArgument(f"unsupported configuration: cannot write a '{fmt}' "
                              "partition table")
    zero_ends(device)
    run(["parted", "-s", device, "mklabel", label], timeout=120)
    sync_partitions(device, {})


def _parted(device: str, *args: str) -> None:
    run(["parted", "-s", "-a", "none", device, *args], timeout=120)


def plan_partition(table: Table, size: int, fmt: str) -> tuple[str, int, int]:
    """Where a new partition of ``size`` bytes goes: (kind, first byte, last byte).

    Starts are aligned to 1 MiB (a logical partition leaves room for its EBR); the
    partition gets the first free region it fits in.
    """
    if table.label == "unknown":
        raise InvalidArgument(f"device '{table.device}' has no partition table: build the "
                              "pool first")
    sector = table.logical_sector or 512
    size = (size + sector - 1) // sector * sector
    if size <= 0:
        raise InvalidArgument("a partition needs a capacity of at least one sector")
    dos = table.label == "dos"
    if fmt == "extended":
        if not dos:
            raise InvalidArgument("extended partitions exist only in dos partition tables")
        if table.extended is not None:
            raise InvalidArgument("extended partition already exists")
        kind = "extended"
    elif dos and (table.extended is not None and
                  sum(1 for p in table.partitions if p.kind != "logical") >= 4):
        kind = "logical"
    elif dos and table.extended is not None and not any(
            not r.logical and r.size >= size for r in table.free):
        kind = "logical"
    else:
        kind = "primary"
    if dos and kind != "logical" and \
            sum(1 for p in table.partitions if p.kind != "logical") >= 4:
        raise InvalidArgument("no more primary partitions can be created: the dos table "
                              "has four; create an extended partition first")
    for region in table.free:
        if region.logical != (kind == "logical"):
            continue
        lead = sector if kind == "logical" else 0
        start = (region.start + lead + MiB - 1) // MiB * MiB
        end = start + size - 1
        if end <= region.end:
            return kind, start, end
    raise InvalidArgument(f"no large enough free extent on '{table.device}' for a "
                          f"partition of {size} bytes")


def create_partition(table: Table, size: int, fmt: str, *, name: str = "") -> int:
    """Add a partition; returns its number (the kernel node is made too)."""
    kind, start, end = plan_partition(table, size, fmt)
    before = {p.number for p in table.partitions}
    fs_type, flag = _CREATE.get(fmt, (None, None))
    if table.label == "gpt":
        head = [name or "data"]
    elif table.label == "dos":
        head = [kind]
    else:
        head = ["primary"]
    args = ["unit", "B", "mkpart", *head]
    if fs_type:
        args.append(fs_type)
    args += [f"{start}B", f"{end}B"]
    _parted(table.device, *args)
    after = read_table(table.device)
    new = [p for p in after.partitions if p.number not in before]
    if len(new) != 1:
        raise CommandFailed(f"parted did not add one partition to '{table.device}'")
    number = new[0].number
    if flag:
        _parted(table.device, "set", str(number), flag, "on")
    sync_partitions(table.device, kernel_view(after))
    return number


def kernel_view(table: Table) -> dict[int, tuple[int, int]]:
    """The partitions as the kernel shows them once it knows ``table``."""
    return {p.number: (p.start, p.size) for p in table.partitions}


def delete_partition(device: str, number: int) -> None:
    before = kernel_partitions(device)
    _parted(device, "rm", str(number))
    # Only the removed entry goes (a dos logical partition's removal renumbers the
    # ones after it: then the kernel's view differs and partx brings it in line).
    before.pop(number, None)
    sync_partitions(device, before)


def room_after(table: Table, part: Partition) -> int:
    """Bytes of free space right after ``part`` (what it can grow by)."""
    after = next((r for r in table.free if r.start == part.end + 1
                  and r.logical == (part.kind == "logical")), None)
    return after.size if after is not None else 0


def grow_partition(table: Table, number: int, size: int, *, dry_run: bool = False) -> int:
    """Grow partition ``number`` to ``size`` bytes (whole sectors) into the free space
    right after it; the kernel is told the new size. Returns the new size. ``dry_run``
    only checks that it can."""
    part = next((p for p in table.partitions if p.number == number), None)
    if part is None:
        raise InvalidArgument(f"'{table.device}' has no partition {number}")
    if part.kind == "extended":
        raise InvalidArgument("an extended partition is not resized: it holds the "
                              "logical ones")
    sector = table.logical_sector or 512
    size = (size + sector - 1) // sector * sector
    if size <= part.size:
        return part.size
    room = room_after(table, part)
    if size - part.size > room:
        raise NoSpace(f"Not enough space left after partition {number} of "
                      f"'{table.device}': it can grow by {room} bytes, "
                      f"{size - part.size} asked")
    if dry_run:
        return size
    _parted(table.device, "unit", "B", "resizepart", str(number),
            f"{part.start + size - 1}B")
    sync_partitions(table.device, kernel_view(read_table(table.device)))
    return size


def set_name(device: str, number: int, name: str) -> None:
    """Name a GPT partition (dos partitions have no names)."""
    _parted(device, "name", str(number), name)


def next_partition_number(table: Table, size: int, fmt: str) -> int:
    """The number a new partition of ``size`` bytes will get (libvirt names volumes
    after it)."""
    kind, _, _ = plan_partition(table, size, fmt)
    used = {p.number for p in table.partitions}
    if kind == "logical":
        n = 5
        while n in used:
            n += 1
        return n
    limit = 4 if table.label == "dos" else 128
    for n in range(1, limit + 1):
        if n not in used:
            return n
    raise InvalidArgument(f"no free partition slot on '{table.device}'")
