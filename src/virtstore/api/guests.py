"""A guest's disks as a whole: guest-clone, guest-backup and migrate-check over any
Connection.

Built only on the Connection's methods (volume lookups, ``volume_clone``,
``volume_backup``, jobs), so they work the same on the embedded engine and a remote
one. The guest is described by its libvirt domain XML; virtstore does not talk to
libvirt, and the guest should not be running (its images would be locked by qemu).
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from virtstore.api import Connection
from virtstore.errors import InvalidArgument, NoSuchVolume, OperationInvalid, VirtstoreError
from virtstore.types import JobInfo, VolumeInfo
from virtstore.xml.disk import driver_type
from virtstore.xml.domain import (
    DomainDisk,
    NewSource,
    cloned_domain_xml,
    domain_disks,
    domain_name,
)

# Waits for a job and returns it finished; may raise (a CLI shows progress here).
JobWaiter = Callable[[JobInfo, str], JobInfo]


def _default_wait(conn: Connection) -> JobWaiter:
    return lambda job, _label: conn.job_wait(job.id)


@dataclass(frozen=True)
class GuestDisk:
    disk: DomainDisk
    volume: VolumeInfo


def pool_disks(conn: Connection, xml: str) -> list[GuestDisk]:
    """The guest's writable disks, each with the pool volume it uses. A writable disk
    that is no volume of any pool is an error: the clone would share it with the
    original, and a backup would miss it."""
    out = []
    for d in domain_disks(xml):
        if not d.copied_by_clone:
            continue
        vol = _source_volume(conn, d)
        if vol is None:
            where = d.path or (f"{d.pool}/{d.volume}" if d.volume else d.type)
            raise InvalidArgument(f"disk '{d.target}' ({where}) is not a volume of any "
                                  "pool: it can only be handled through a pool")
        out.append(GuestDisk(d, vol))
    return out


def clone_name(old: str, old_domain: str, new_domain: str, target: str) -> str:
    """virt-clone's rule where it can: the old guest's name in the volume's name (as a
    word of it) becomes the new one's; otherwise NEWNAME-TARGET with the old name's
    extension."""
    word = re.compile(rf"(?<![A-Za-z0-9]){re.escape(old_domain)}(?![A-Za-z0-9])")
    if old_domain and word.search(old):
        return word.sub(new_domain.replace("\\", "\\\\"), old, count=1)
    m = re.search(r"\.[A-Za-z0-9]{1,8}$", old)
    return f"{new_domain}-{target}{m.group(0) if m else ''}"


def _finished(job: JobInfo, what: str) -> JobInfo:
    if job.state != "done":
        raise OperationInvalid(f"{what} {job.state}: {job.error or 'no reason given'}")
    return job


def guest_clone(conn: Connection, xml: str, new_name: str, *, linked: bool = False,
                wait: JobWaiter | None = None) -> tuple[str, list[VolumeInfo]]:
    """Clone every writable pool disk of the domain (linked: the pool's own linked
    clone, a qcow2 overlay or a storage clone) and return the new domain XML and the new
    volumes. All or none: when one disk fails, the volumes already made are deleted."""
    waiter = wait or _default_wait(conn)
    old_name = domain_name(xml)
    if new_name == old_name:
        raise InvalidArgument("the clone needs a name other than the original's")
    disks = pool_disks(conn, xml)
    made: list[VolumeInfo] = []
    sources: dict[int, NewSource] = {}
    try:
        for gd in disks:
            vol = gd.volume
            name = clone_name(vol.name, old_name, new_name, gd.disk.target)
            job = conn.volume_clone(vol.pool, vol.name, name, linked=linked)
            _finished(waiter(job, f"clone {gd.disk.target}"),
                      f"cloning disk '{gd.disk.target}' ({vol.pool}/{vol.name}):")
            new = conn.volume_info(vol.pool, name)
            made.append(new)
            sources[gd.disk.index] = _new_source(gd.disk, new)
    except BaseException:
        for vol in reversed(made):
            try:
                conn.volume_delete(vol.pool, vol.name)
            except VirtstoreError:
                pass  # reported by the original error's caller: nothing more to do here
        raise
    return cloned_domain_xml(xml, new_name, sources), made


def _new_source(disk: DomainDisk, vol: VolumeInfo) -> NewSource:
    drv = driver_type(vol.format, vol.type)
    if disk.type == "volume" or vol.type in ("network", "netdir"):
        return NewSource("volume", pool=vol.pool, volume=vol.name, driver_type=drv)
    return NewSource("block" if vol.type == "block" else "file", path=vol.path,
                     driver_type=drv)


@dataclass(frozen=True)
class DiskBackup:
    target: str
    pool: str
    volume: str
    directory: str
    job: JobInfo


def guest_backup(conn: Connection, xml: str, directory: str, *, incremental: bool = False,
                 wait: JobWaiter | None = None) -> list[DiskBackup]:
    """vol-backup of each writable pool disk into DIRECTORY/TARGET (one chain per disk),
    one after the other; on the embedded engine the domain XML is kept beside them as
    domain.xml."""
    waiter = wait or _default_wait(conn)
    disks = pool_disks(conn, xml)
    if not disks:
        raise InvalidArgument("the domain has no writable disk in a pool")
    done: list[DiskBackup] = []
    for gd in disks:
        sub = os.path.join(directory, gd.disk.target)
        job = conn.volume_backup(gd.volume.pool, gd.volume.name, sub, incremental=incremental)
        job = _finished(waiter(job, f"backup {gd.disk.target}"),
                        f"backup of disk '{gd.disk.target}' "
                        f"({gd.volume.pool}/{gd.volume.name}):")
        done.append(DiskBackup(gd.disk.target, gd.volume.pool, gd.volume.name, sub, job))
    if conn.uri.startswith("embedded://"):
        # Beside the chains, where they are on this host, to know what to restore.
        from virtstore.host.files import atomic_write

        atomic_write(os.path.join(directory, "domain.xml"), xml, 0o644)
    return done


@dataclass(frozen=True)
class DiskCheck:
    target: str  # the guest's device name
    source: str  # POOL/VOLUME on the source host, or the disk's path
    verdict: str  # shared, copy, no, unknown
    pool: str | None  # the target's pool that sees it or would take the copy
    required: int  # bytes a copy takes on the target (qemu-img measure; 0: shared)
    reason: str

    def to_dict(self) -> dict[str, Any]:
        return {"target": self.target, "source": self.source, "verdict": self.verdict,
                "pool": self.pool, "required": self.required, "reason": self.reason}


def _source_volume(conn: Connection, d: DomainDisk) -> VolumeInfo | None:
    try:
        if d.type == "volume" and d.pool and d.volume:
            return conn.volume_info(d.pool, d.volume)
        if d.path:
            return conn.volume_lookup_by_path(d.path)
    except NoSuchVolume:
        pass
    return None


def migrate_check(conn: Connection, xml: str, target: Connection, *,
                  pool: str | None = None) -> tuple[str, list[DiskCheck]]:
    """Before migrating the guest to the host of ``target``: per disk, whether that host
    sees the same storage, or which of its pools (``pool``, or the first that fits)
    would take a copy with room for it and its format and features, or why none can;
    and the overall verdict ("yes", "no", or "unknown" when a disk is in no pool here).
    Room is counted for all the disks together: two copies into one pool need both."""
    out: list[DiskCheck] = []
    planned: dict[str, int] = {}
    for d in domain_disks(xml):
        if not (d.path or d.volume):
            continue  # an empty CD-ROM drive
        vol = _source_volume(conn, d)
        if vol is None:
            out.append(DiskCheck(d.target, d.path or f"{d.pool}/{d.volume}", "unknown", None,
                                 0, "not a volume of any pool here: not checked"))
            continue
        info = conn.volume_migrate_info(vol.pool, vol.name)
        ans = target.migrate_target_check(info["storage"], info["format"],
                                          int(info["capacity"]), int(info["required"]),
                                          backing=bool(info["backing"]),
                                          encrypted=bool(info["encrypted"]), pool=pool)
        verdict, tpool, reason = ans["verdict"], ans.get("pool"), str(ans["reason"])
        required = int(ans.get("needed", info["required"]))
        if verdict == "copy" and tpool:
            need = planned.get(tpool, 0) + required
            if need > int(ans["available"]):
                verdict = "no"
                reason = (f"pool '{tpool}' has {ans['available']} bytes free; with the "
                          f"disks placed there before this one, {need} are needed")
            else:
                planned[tpool] = need
        if info.get("note"):
            reason += f" ({info['note']})"
        out.append(DiskCheck(d.target, f"{vol.pool}/{vol.name}", verdict, tpool, required,
                             reason))
    verdicts = {c.verdict for c in out}
    overall = "no" if "no" in verdicts else "unknown" if "unknown" in verdicts else "yes"
    return overall, out
