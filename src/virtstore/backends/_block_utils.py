"""What the block backends (fs, disk, logical, zfs, btrfs) share.

* A pool's source device may be a regular file (a volume of another pool): while the
  pool runs, the engine attaches it to a loop device and the backends work on that.
* Building over existing data needs consent: libvirt's overwrite rules, probed with
  ``blkid -p``.
"""

from __future__ import annotations

import os
import stat

from virtstore.errors import InvalidArgument, OperationInvalid
from virtstore.host import devices, loop
from virtstore.xml import PoolDef


def source_paths(pool: PoolDef) -> list[str]:
    return [d.path for d in pool.source.devices]


def first_device(pool: PoolDef) -> str:
    if not pool.source.devices:
        raise InvalidArgument("missing storage pool source device name")
    return pool.source.devices[0].path


def is_regular_file(path: str) -> bool:
    try:
        return stat.S_ISREG(os.stat(path).st_mode)
    except OSError:
        return False


def resolve_device(path: str) -> str:
    """The block device to use for source ``path``: the path itself, or, for a regular
    file, the loop device it is attached to while its pool runs."""
    if not is_regular_file(path):
        return path
    devs = loop.devices_of(path)
    if not devs:
        raise OperationInvalid(f"source file '{path}' is not attached to a loop device: "
                               "start the pool to attach it")
    return devs[0]


def build_device(path: str) -> tuple[str, str | None]:
    """A device to build on: (device, loop device attached for the build or None).

    Building a pool whose source is a file that is not attached yet attaches it for
    the duration of the build; the caller detaches the returned loop device.
    """
    if not is_regular_file(path):
        return path, None
    devs = loop.devices_of(path)
    if devs:
        return devs[0], None
    dev = loop.attach(path)
    return dev, dev


def describe(info: dict[str, str]) -> str | None:
    """What blkid found, in a word: a filesystem or other signature, or a table type."""
    return info.get("TYPE") or info.get("PTTYPE") or None


def check_overwrite(device: str, wanted: str | None, overwrite: bool | None) -> bool:
    """libvirt's rules for building over existing data. Returns whether to write.

    * ``overwrite=True``: always write.
    * ``overwrite=False`` (--no-overwrite): write only on an empty device; anything
      found is an error.
    * ``None``: write on an empty device; a device that already holds ``wanted`` is
      left as it is (already built); anything else needs --overwrite.
    """
    if overwrite:
        return True
    found = describe(devices.probe(device))
    if found is None:
        return True
    same = wanted is not None and found.lower() in _aliases(wanted)
    if same and overwrite is None:
        return False
    if same:
        raise OperationInvalid(f"Storage pool already built: Device '{device}' already "
                               f"formatted using '{found}'")
    raise OperationInvalid(f"Storage pool already built: Format of device '{device}' does "
                           f"not match the expected format '{wanted or 'auto'}' (found "
                           f"'{found}'), forced overwrite is necessary")


def _aliases(fmt: str) -> tuple[str, ...]:
    fmt = fmt.lower()
    return {"dos": ("dos", "msdos"), "vfat": ("vfat", "fat", "msdos"),
            "lvm2": ("lvm2_member", "lvm2"), "zfs": ("zfs_member", "zfs")}.get(fmt, (fmt,))
