"""Loop devices: attach a file, find the device of a file, detach, and partition nodes.

Lookups read sysfs (``/sys/block/loopN/loop/backing_file``) rather than forking
losetup. Partition nodes of a loop device appear only when something tells the
kernel about them: parted does so itself, ``partx -u`` does it for any table (a kernel
that parses partition tables of loop devices does it on ``losetup -P`` as well).
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping

from virtstore.errors import CommandFailed
from virtstore.host.files import read_attr
from virtstore.host.runner import run

SYS_BLOCK = "/sys/block"


def _read(path: str) -> str | None:
    return read_attr(path, "surrogateescape")  # a backing file's name may be any bytes


def backing_file(dev: str) -> str | None:
    """The file behind loop device ``dev`` (``/dev/loop3`` or ``loop3``), or None."""
    name = os.path.basename(dev)
    value = _read(os.path.join(SYS_BLOCK, name, "loop", "backing_file"))
    if not value:
        return None
    # The kernel appends " (deleted)" when the file was unlinked while attached.
    return value


def is_loop(dev: str) -> bool:
    return os.path.basename(dev).startswith("loop") and \
        os.path.isdir(os.path.join(SYS_BLOCK, os.path.basename(dev), "loop"))


def devices_of(path: str) -> list[str]:
    """Every attached loop device whose backing file is ``path``."""
    target = os.path.realpath(path)
    try:
        st = os.stat(target)
    except OSError:
        st = None
    found: list[str] = []
    try:
        names = sorted(os.listdir(SYS_BLOCK))
    except OSError:
        return found
    for name in names:
        if not name.startswith("loop"):
            continue
        back = backing_file(name)
        if back is None:
            continue
        if back == target:
            found.append("/dev/" + name)
            continue
        if st is not None:
            # Same inode under another name (bind mounts, hard links).
            inode = _read(os.path.join(SYS_BLOCK, name, "loop", "backing_inode"))
            dev = _read(os.path.join(SYS_BLOCK, name, "loop", "backing_dev"))
            if inode == str(st.st_ino) and dev is not None and dev == _devno(st.st_dev):
                found.append("/dev/" + name)
    return found


def _devno(dev: int) -> str:
    return f"{os.major(dev)}:{os.minor(dev)}"


def attach(path: str, *, read_only: bool = False) -> str:
    """Attach ``path`` to a free loop device and return the device."""
    argv = ["losetup", "--find", "--show"]
    if read_only:
        argv.append("--read-only")
    argv.append(path)
    dev = run(argv, timeout=60).stdout.strip()
    if not dev.startswith("/dev/"):
        raise CommandFailed(f"losetup did not name a device for '{path}'", argv=argv)
    sync_partitions(dev)
    return dev


def detach(dev: str) -> None:
    """Detach the loop device ``dev`` and drop its partitions.

    Partitions added with partx or parted (BLKPG) outlive the loop device on a kernel
    that does not scan them itself, so they are deleted first.
    """
    run(["partx", "-d", dev], check=False, timeout=60)
    for attempt in range(5):
        res = run(["losetup", "--detach", dev], check=False, timeout=60)
        if res.returncode == 0 or backing_file(dev) is None:
            return
        if "busy" not in (res.stderr or "").lower() or attempt == 4:
            raise CommandFailed(f"cannot detach loop device '{dev}': "
                                f"{res.stderr.strip() or 'losetup failed'}",
                                argv=res.argv, returncode=res.returncode, stderr=res.stderr)
        time.sleep(0.2)


def kernel_partitions(dev: str) -> dict[int, tuple[int, int]]:
    """The partitions the kernel has for ``dev``: number -> (first byte, size)."""
    base = os.path.join("/sys/class/block", os.path.basename(os.path.realpath(dev)))
    found: dict[int, tuple[int, int]] = {}
    try:
        children = os.listdir(base)
    except OSError:
        return found
    for child in children:
        number = _read(os.path.join(base, child, "partition"))
        start = _read(os.path.join(base, child, "start"))
        size = _read(os.path.join(base, child, "size"))
        if number and start and size and number.isdigit():
            # sysfs counts 512-byte sectors whatever the device's sector size.
            found[int(number)] = (int(start) * 512, int(size) * 512)
    return found


def sync_partitions(dev: str, expected: Mapping[int, tuple[int, int]] | None = None) -> None:
    """Make the kernel's partition nodes of ``dev`` match its partition table.

    ``expected`` is the table (number -> first byte, size) when the caller knows it:
    where the kernel already agrees (it parsed the table, or parted told it) no
    ``partx`` runs.
    """
    if expected is not None and kernel_partitions(dev) == dict(expected):
        return
    # partx -u adds, resizes and removes; it fails only when there is no table at all.
    run(["partx", "-u", dev], check=False, timeout=60)


def partition_node(dev: str, number: int, part_separator: bool | None = None) -> str:
    """The device node of partition ``number`` of ``dev`` as the kernel names it."""
    base = dev.rstrip("/")
    sep = "p" if part_separator or (part_separator is None and base[-1:].isdigit()) else ""
    return f"{base}{sep}{number}"
