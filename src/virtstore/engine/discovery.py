"""Pool source discovery (virsh find-storage-pool-sources) for local block storage.

* logical: every volume group with its physical volumes (lvm's JSON reports);
* disk: every disk (or loop device) that carries a partition table;
* fs: every device or partition that holds a filesystem;
* zfs: every zpool ``zpool import`` could import, with its devices.

The answer is libvirt's ``<sources>`` document. A ``<source>`` hint with devices
limits disk and fs results to those devices; a hint with a name limits logical and
zfs results to that VG or zpool.
"""

from __future__ import annotations

import os

from virtstore.errors import Unsupported
from virtstore.xml import PoolSource, SourceDevice, format_pool_sources_xml
from virtstore.xml.pooltypes import FS_FORMATS

# Signatures that are not filesystems an fs pool could mount.
NOT_FILESYSTEMS = ("LVM2_member", "swap", "zfs_member", "crypto_LUKS", "linux_raid_member",
                   "ddf_raid_member", "isw_raid_member", "bcache", "drbd")
DISCOVERABLE = ("logical", "disk", "fs", "zfs")


def _hint(pool_type: str, source_xml: str | None) -> PoolSource | None:
    if not source_xml or not source_xml.strip():
        return None
    from virtstore.xml import parse_pool_source_xml

    return parse_pool_source_xml(source_xml, pool_type)


def _wanted_devices(hint: PoolSource | None) -> set[str] | None:
    if hint is None or not hint.devices:
        return None
    return {os.path.realpath(d.path) for d in hint.devices}


def find_logical(hint: PoolSource | None) -> list[PoolSource]:
    from virtstore.host import lvm

    by_vg: dict[str, list[str]] = {}
    for pv in lvm.pvs():
        if pv.vg_name:
            by_vg.setdefault(pv.vg_name, []).append(pv.name)
    out = []
    for vg in sorted(by_vg):
        if hint is not None and hint.name and hint.name != vg:
            continue
        out.append(PoolSource(name=vg, format="lvm2",
                              devices=[SourceDevice(path=p) for p in by_vg[vg]]))
    return out


def find_disk(hint: PoolSource | None) -> list[PoolSource]:
    from virtstore.host import devices

    wanted = _wanted_devices(hint)
    out = []
    for dev in devices.host_devices():
        if dev.type == "part" or not dev.partition_table:
            continue
        if wanted is not None and os.path.realpath(dev.path) not in wanted:
            continue
        out.append(PoolSource(devices=[SourceDevice(path=dev.path)],
                              format=dev.partition_table))
    return out


def find_fs(hint: PoolSource | None) -> list[PoolSource]:
    from virtstore.host import devices

    wanted = _wanted_devices(hint)
    out = []
    for dev in devices.host_devices():
        if not dev.fs_type or dev.fs_type in NOT_FILESYSTEMS:
            continue
        if wanted is not None and os.path.realpath(dev.path) not in wanted:
            continue
        fmt = dev.fs_type if dev.fs_type in FS_FORMATS else "auto"
        out.append(PoolSource(devices=[SourceDevice(path=dev.path)], format=fmt))
    return out


def find_zfs(hint: PoolSource | None) -> list[PoolSource]:
    from virtstore.host import zfs

    problem = zfs.tool_problem()
    if problem:
        raise Unsupported(problem)
    out = []
    for p in zfs.importable():
        if hint is not None and hint.name and hint.name != p.name:
            continue
        out.append(PoolSource(name=p.name, devices=[SourceDevice(path=d) for d in p.devices]))
    return out


def find_pool_sources(pool_type: str, source_xml: str | None = None) -> str:
    """The <sources> document of ``pool_type`` candidates on this host."""
    finders = {"logical": find_logical, "disk": find_disk, "fs": find_fs, "zfs": find_zfs}
    finder = finders.get(pool_type)
    if finder is None:
        from virtstore.xml import pool_type_info

        pool_type_info(pool_type)  # libvirt's error for an unknown type
        raise Unsupported(f"this function is not supported by the connection driver: "
                          f"pool source discovery is not supported for '{pool_type}' pools "
                          f"here (supported: {', '.join(DISCOVERABLE)})")
    hint = _hint(pool_type, source_xml)
    return format_pool_sources_xml(finder(hint), pool_type)
