"""What is mounted where (from /proc/self/mountinfo), and mount / umount."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass

from virtstore.host.files import block_devno
from virtstore.host.runner import run

MOUNTINFO = "/proc/self/mountinfo"


@dataclass(frozen=True)
class Mount:
    devno: str  # "major:minor" of the mounted filesystem
    root: str
    target: str
    options: tuple[str, ...]
    fstype: str
    source: str
    super_options: tuple[str, ...]


def _unescape(text: str) -> str:
    """mountinfo writes space, tab, newline and backslash as octal escapes."""
    if "\\" not in text:
        return text
    out = []
    i = 0
    while i < len(text):
        if text[i] == "\\" and i + 3 < len(text) + 1 and text[i + 1:i + 4].isdigit():
            out.append(chr(int(text[i + 1:i + 4], 8)))
            i += 4
        else:
            out.append(text[i])
            i += 1
    return "".join(out)


def parse_mountinfo(text: str) -> list[Mount]:
    mounts: list[Mount] = []
    for line in text.splitlines():
        left, sep, right = line.partition(" - ")
        if not sep:
            continue
        f = left.split()
        r = right.split()
        if len(f) < 6 or len(r) < 2:
            continue
        mounts.append(Mount(devno=f[2], root=_unescape(f[3]), target=_unescape(f[4]),
                            options=tuple(f[5].split(",")), fstype=r[0],
                            source=_unescape(r[1]),
                            super_options=tuple(r[2].split(",")) if len(r) > 2 else ()))
    return mounts


def mounts() -> list[Mount]:
    with open(MOUNTINFO, encoding="utf-8", errors="surrogateescape") as fh:
        return parse_mountinfo(fh.read())


def mounted_at(target: str) -> Mount | None:
    """The (topmost) mount on directory ``target``, or None if nothing is mounted there."""
    real = os.path.realpath(target)
    found = None
    for m in mounts():
        if m.target == real:
            found = m
    return found


def same_device(mount: Mount, device: str) -> bool:
    """Whether ``mount`` is a mount of block device ``device``."""
    if os.path.realpath(mount.source) == os.path.realpath(device):
        return True
    devno = block_devno(device)
    return devno is not None and devno == mount.devno


def mount_points_of(device: str) -> list[str]:
    """Every directory where block device ``device`` is mounted."""
    real = os.path.realpath(device)
    devno = block_devno(device)
    return [m.target for m in mounts()
            if os.path.realpath(m.source) == real or (devno is not None and m.devno == devno)]


def mount(source: str, target: str, *, fstype: str | None = None,
          options: Sequence[str] = ()) -> None:
    argv = ["mount"]
    if options:
        argv += ["-o", ",".join(options)]
    if fstype:
        argv += ["-t", fstype]
    argv += [source, target]
    run(argv, timeout=120)


def umount(target: str) -> None:
    run(["umount", target], timeout=120)
