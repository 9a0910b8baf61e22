"""The host's block devices: sysfs for the hardware, blkid for contents, udev's database
where there is one, /proc/self/mountinfo for mount points.

One ``blkid -p`` call probes every device at once (low-level probing reads the
device itself, so it also works where udev is absent or stale).
"""

from __future__ import annotations

import contextlib
import logging
import os
import stat
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

from virtstore.errors import CommandFailed
from virtstore.host import mounts as mountsmod
from virtstore.host.files import block_devno
from virtstore.host.files import read_attr as _read
from virtstore.host.runner import run

log = logging.getLogger("virtstore")

SYS_CLASS_BLOCK = "/sys/class/block"
UDEV_DATA = "/run/udev/data"


@dataclass
class HostDevice:
    path: str
    name: str
    type: str  # disk, part, loop, rom
    devno: str  # major:minor
    size: int
    logical_sector_size: int = 512
    physical_sector_size: int = 512
    model: str | None = None
    vendor: str | None = None
    serial: str | None = None
    wwn: str | None = None
    transport: str | None = None  # ata, scsi, usb, nvme, virtio, loop, mmc, ...
    rotational: bool = False
    removable: bool = False
    read_only: bool = False
    parent: str | None = None  # the disk of a partition
    partition_number: int | None = None
    start: int | None = None  # byte offset of a partition on its disk
    partition_table: str | None = None  # dos, gpt, ...
    partition_table_uuid: str | None = None
    partitions: list[str] = field(default_factory=list)
    part_type: str | None = None
    part_name: str | None = None
    part_uuid: str | None = None
    fs_type: str | None = None  # also "LVM2_member", "zfs_member", "swap", ...
    fs_uuid: str | None = None
    fs_label: str | None = None
    fs_version: str | None = None
    holders: list[str] = field(default_factory=list)
    mount_points: list[str] = field(default_factory=list)
    backing_file: str | None = None  # loop devices
    symlinks: list[str] = field(default_factory=list)  # /dev/disk/by-* from udev

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _int(text: str | None, default: int = 0) -> int:
    try:
        return int(text) if text is not None else default
    except ValueError:
        return default


def parse_blkid_export(text: str) -> dict[str, dict[str, str]]:
    """``blkid -p -o export DEV...`` -> {DEVNAME: {KEY: value}}."""
    out: dict[str, dict[str, str]] = {}
    cur: dict[str, str] = {}
    for line in [*text.splitlines(), ""]:
        if not line.strip():
            if cur.get("DEVNAME"):
                out[cur["DEVNAME"]] = cur
            cur = {}
            continue
        key, sep, value = line.partition("=")
        if sep:
            cur[key.strip()] = value.strip()
    return out


def blkid_probe(paths: Iterable[str]) -> dict[str, dict[str, str]]:
    """Low-level probe of devices (contents, not a cache)."""
    devs = list(paths)
    if not devs:
        return {}
    res = run(["blkid", "-p", "-o", "export", *devs], check=False, timeout=120)
    return parse_blkid_export(res.stdout)


def probe(path: str) -> dict[str, str]:
    """What is on one device or file: TYPE, PTTYPE, UUID, ... (empty if nothing)."""
    info = blkid_probe([path])
    if info:
        return next(iter(info.values()))
    return {}


def parse_udev_db(text: str) -> tuple[dict[str, str], list[str]]:
    """A /run/udev/data/bMAJ:MIN file -> (E: properties, S: symlinks)."""
    props: dict[str, str] = {}
    links: list[str] = []
    for line in text.splitlines():
        if line.startswith("E:"):
            key, _, value = line[2:].partition("=")
            props[key] = value
        elif line.startswith("S:"):
            links.append("/dev/" + line[2:])
    return props, links


def _transport(sysdir: str, name: str, udev: dict[str, str]) -> str | None:
    if udev.get("ID_BUS") in ("usb", "ata", "scsi", "ieee1394"):
        bus = udev["ID_BUS"]
        if bus == "scsi" and "/ata" in os.path.realpath(sysdir):
            return "ata"
        return bus
    for prefix, kind in (("loop", "loop"), ("nvme", "nvme"), ("vd", "virtio"),
                         ("xvd", "xen"), ("zram", "zram"), ("ram", "ram"), ("md", "md"),
                         ("dm-", "dm"), ("nbd", "nbd"), ("mmcblk", "mmc"), ("rbd", "rbd"),
                         ("sr", None)):
        if name.startswith(prefix) and kind is not None:
            return kind
    real = os.path.realpath(sysdir)
    for marker, kind in (("/usb", "usb"), ("/nvme", "nvme"), ("/virtio", "virtio"),
                         ("/ata", "ata"), ("/session", "iscsi"), ("/rport-", "fc"),
                         ("/end_device-", "sas"), ("/mmc", "mmc"), ("/host", "scsi")):
        if marker in real:
            return kind
    return None


def _first(*values: str | None) -> str | None:
    for v in values:
        if v:
            return v
    return None


def _disk_info(name: str) -> HostDevice | None:
    sysdir = os.path.join(SYS_CLASS_BLOCK, name)
    size = _int(_read(os.path.join(sysdir, "size"))) * 512
    is_part = os.path.exists(os.path.join(sysdir, "partition"))
    devno = _read(os.path.join(sysdir, "dev")) or ""
    path = "/dev/" + name
    dev = HostDevice(path=path, name=name, type="part" if is_part else "disk", devno=devno,
                     size=size)
    # Queue limits and device attributes belong to the whole disk.
    disk_dir = os.path.dirname(os.path.realpath(sysdir)) if is_part else sysdir
    if is_part:
        dev.parent = "/dev/" + os.path.basename(disk_dir)
        dev.partition_number = _int(_read(os.path.join(sysdir, "partition")))
        dev.start = _int(_read(os.path.join(sysdir, "start"))) * 512
    q = os.path.join(disk_dir, "queue")
    dev.logical_sector_size = _int(_read(os.path.join(q, "logical_block_size")), 512)
    dev.physical_sector_size = _int(_read(os.path.join(q, "physical_block_size")), 512)
    dev.rotational = _read(os.path.join(q, "rotational")) == "1"
    dev.removable = _read(os.path.join(disk_dir, "removable")) == "1"
    dev.read_only = _read(os.path.join(sysdir, "ro")) == "1"
    disk_name = os.path.basename(disk_dir)
    if disk_name.startswith("loop"):
        dev.type = "part" if is_part else "loop"
        dev.backing_file = _read(os.path.join(disk_dir, "loop", "backing_file"))
        dev.rotational = False
    elif disk_name.startswith("sr"):
        dev.type = "rom"
    udev: dict[str, str] = {}
    db = _read(os.path.join(UDEV_DATA, f"b{devno}")) if devno else None
    if db:
        udev, dev.symlinks = parse_udev_db(db)
    devdir = os.path.join(disk_dir, "device")
    dev.model = _first(udev.get("ID_MODEL"), _read(os.path.join(devdir, "model")),
                       _read(os.path.join(disk_dir, "loop", "backing_file"))
                       and "Loopback device")
    dev.vendor = _first(udev.get("ID_VENDOR"), _read(os.path.join(devdir, "vendor")))
    dev.serial = _first(udev.get("ID_SERIAL_SHORT"), _read(os.path.join(devdir, "serial")),
                        _read(os.path.join(disk_dir, "serial")))
    dev.wwn = _first(udev.get("ID_WWN_WITH_EXTENSION"), udev.get("ID_WWN"),
                     _read(os.path.join(disk_dir, "wwid")),
                     _read(os.path.join(devdir, "wwid")))
    dev.transport = _transport(disk_dir, disk_name, udev)
    holders_dir = os.path.join(sysdir, "holders")
    with contextlib.suppress(OSError):
        dev.holders = sorted("/dev/" + h for h in os.listdir(holders_dir))
    if not is_part:
        try:
            children = sorted(
                (e for e in os.listdir(sysdir)
                 if os.path.exists(os.path.join(sysdir, e, "partition"))),
                key=lambda e: _int(_read(os.path.join(sysdir, e, "partition"))))
        except OSError:
            children = []
        dev.partitions = ["/dev/" + c for c in children]
    if udev:
        _apply_probe(dev, {"TYPE": udev.get("ID_FS_TYPE", ""),
                           "UUID": udev.get("ID_FS_UUID", ""),
                           "LABEL": udev.get("ID_FS_LABEL", ""),
                           "VERSION": udev.get("ID_FS_VERSION", ""),
                           "PTTYPE": udev.get("ID_PART_TABLE_TYPE", ""),
                           "PTUUID": udev.get("ID_PART_TABLE_UUID", ""),
                           "PART_ENTRY_TYPE": udev.get("ID_PART_ENTRY_TYPE", ""),
                           "PART_ENTRY_NAME": udev.get("ID_PART_ENTRY_NAME", ""),
                           "PART_ENTRY_UUID": udev.get("ID_PART_ENTRY_UUID", "")})
    return dev


_PTTYPES = {"dos": "dos", "gpt": "gpt", "PMBR": "gpt", "sun": "sun", "sgi": "dvh",
            "mac": "mac", "bsd": "bsd", "atari": "atari"}


# blkid's names -> HostDevice's fields (a partition table's type goes through _PTTYPES)
_PROBE_FIELDS = (("TYPE", "fs_type"), ("UUID", "fs_uuid"), ("LABEL", "fs_label"),
                 ("VERSION", "fs_version"), ("PTTYPE", "partition_table"),
                 ("PTUUID", "partition_table_uuid"), ("PART_ENTRY_TYPE", "part_type"),
                 ("PART_ENTRY_NAME", "part_name"), ("PART_ENTRY_UUID", "part_uuid"))


def _apply_probe(dev: HostDevice, info: dict[str, str]) -> None:
    for key, attr in _PROBE_FIELDS:
        value = info.get(key)
        if value:
            setattr(dev, attr, _PTTYPES.get(value, value) if key == "PTTYPE" else value)


def host_devices(*, probe_contents: bool = True) -> list[HostDevice]:
    """Every block device of the host with a size (unattached loop devices have none)."""
    try:
        names = sorted(os.listdir(SYS_CLASS_BLOCK))
    except OSError:
        return []
    devs: list[HostDevice] = []
    for name in names:
        dev = _disk_info(name)
        if dev is None or dev.size == 0:
            continue
        devs.append(dev)
    if probe_contents:
        probed = blkid_probe(d.path for d in devs if os.path.exists(d.path))
        for dev in devs:
            info = probed.get(dev.path)
            if info:
                _apply_probe(dev, info)
    all_mounts = mountsmod.mounts()
    for dev in devs:
        dev.mount_points = [m.target for m in all_mounts
                            if m.devno == dev.devno or m.source == dev.path]
        if dev.fs_type is None and dev.mount_points:
            # A mounted filesystem blkid could not open (exclusive use): mountinfo knows it.
            dev.fs_type = next(m.fstype for m in all_mounts
                               if m.devno == dev.devno or m.source == dev.path)
    return devs


def device(path: str) -> HostDevice | None:
    """One device by its path (or a /dev/disk/by-* link to it)."""
    devno = block_devno(os.path.realpath(path))
    if devno is None:
        return None
    name = None
    try:
        for entry in os.listdir(SYS_CLASS_BLOCK):
            if _read(os.path.join(SYS_CLASS_BLOCK, entry, "dev")) == devno:
                name = entry
                break
    except OSError:
        return None
    if name is None:
        return None
    dev = _disk_info(name)
    if dev is None:
        return None
    _apply_probe(dev, probe(dev.path))
    all_mounts = mountsmod.mounts()
    dev.mount_points = [m.target for m in all_mounts
                        if m.devno == dev.devno or m.source == dev.path]
    return dev


def is_block_device(path: str) -> bool:
    try:
        return stat.S_ISBLK(os.stat(path).st_mode)
    except OSError:
        return False


def users(path: str) -> list[str]:
    """Why the block device ``path`` is in use: mounts, holders, partitions in use,
    LVM membership, loop devices on it. Empty when nothing uses it."""
    dev = device(path)
    if dev is None:
        return []
    why = [f"mounted on {m}" for m in dev.mount_points]
    why += [f"held by {h}" for h in dev.holders]
    if dev.fs_type == "LVM2_member":
        from virtstore.host import lvm

        pv = lvm.pv_of(dev.path)
        if pv is not None and pv.vg_name:
            why.append(f"physical volume of volume group '{pv.vg_name}'")
    if dev.fs_type == "zfs_member":
        why.append("member of a ZFS pool")
    return why


UDEV_CONTROL = "/run/udev/control"  # udevd's socket: present while udevd runs


def udev_settle(timeout: int = 120) -> None:
    """Wait until udevd has handled the events queued so far (the ``/dev/disk/by-*``
    links of a disk that just appeared), as libvirt does before it lists a pool's
    devices (udevadm's own timeout, as there). Where no udevd runs, there is nothing to
    wait for; a queue that does not settle in time is waited for no longer, as by
    libvirt: the devices are then named without their links."""
    if not os.path.exists(UDEV_CONTROL):
        return
    try:
        run(["udevadm", "settle", f"--timeout={timeout}"], check=False, timeout=timeout + 30)
    except CommandFailed as exc:
        log.warning("udev did not settle: %s", exc)


def stable_link(directory: str, block: str, root: str = "/") -> str | None:
    """The path in ``directory`` (``/dev/disk/by-path``, ``by-id``...) of a link to the
    block device ``block`` (``sda``), libvirt's stable path of a pool's device; None
    when there is none. ``root`` is where the tree is looked up (tests give a copy)."""
    d = os.path.join(root, directory.lstrip("/"))
    try:
        names = sorted(os.listdir(d))
    except OSError:
        return None
    for name in names:
        link = os.path.join(d, name)
        with contextlib.suppress(OSError):
            if os.path.islink(link) and os.path.basename(os.readlink(link)) == block:
                return os.path.join(directory, name)
    return None
