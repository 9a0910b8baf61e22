"""Thin LVs' own features, for the logical pool: storage snapshots (thin snapshots
``VOL+SNAP``) and the hidden thin snapshots that backups diff with ``thin_delta``."""

from __future__ import annotations

import os
import re
import time
from contextlib import AbstractContextManager, contextmanager, nullcontext
from typing import TYPE_CHECKING

from virtstore.backends._block_data import BlockClones
from virtstore.backends._lvm_shared import vg_name as _vg_name
from virtstore.backends.base import VolumeRecord
from virtstore.errors import Busy, InvalidArgument, NoSuchVolume, Unsupported
from virtstore.host import devices, lvm
from virtstore.xml import PoolDef

if TYPE_CHECKING:
    from collections.abc import Iterator

    from virtstore.host.nbd import QemuSource
    from virtstore.types import SnapshotInfo

SNAPSHOT_TAG = "virtstore_snapshot"
# A backup's thin snapshot: named BACKUP_SNAP_PREFIX + backup ID (no volume's or user
# snapshot's LV can be: volume names cannot start with "virtstore-"), tagged with this
# and with BACKUP_OF_TAG + its volume's name.
BACKUP_TAG = "virtstore_backup"
BACKUP_OF_TAG = "virtstore_backup_of="
BACKUP_SNAP_PREFIX = "virtstore-backup-"
TRACK_THIN_DELTA = "thin-delta"
CREATED_TAG = "virtstore_created="  # + seconds since the epoch
_SNAP_NAME = re.compile(r"[A-Za-z0-9_.-]+")


class ThinSnapshots(BlockClones):
    """What the logical backend does with thin LVs (it inherits this)."""

    @staticmethod
    def dm_problem(what: str) -> Unsupported:
        return Unsupported(f"{what} needs device-mapper, which this kernel lacks "
                           f"({lvm.NO_DM_MESSAGE})")

    def _lv(self, pool: PoolDef, name: str) -> lvm.LogicalVolume | None:
        return next((lv for lv in lvm.lvs(_vg_name(pool)) if lv.name == name), None)

    def thin_snapshot(self, vg: str, name: str, origin: str, *, active: bool,
                      tags: tuple[str, ...] = (), read_only: bool = False) -> None:
        """A thin snapshot of thin LV ``origin``: active (a volume of its own) or left
        inactive (a storage snapshot, LVM's default for thin snapshots)."""
        if not lvm.device_mapper_available():
            raise self.dm_problem("a thin snapshot")
        argv = ["lvcreate", "-y", "--snapshot", "--name", name]
        if active:
            argv += ["--setactivationskip", "n"]
        if read_only:
            argv += ["--permission", "r"]
        for tag in tags:
            argv += ["--addtag", tag]
        lvm.lvm([*argv, f"{vg}/{origin}"])

    # -- storage snapshots: thin snapshots VOL+SNAP --------------------------------
    def _thin_volume(self, pool: PoolDef, rec: VolumeRecord) -> lvm.LogicalVolume:
        lv = self._lv(pool, rec.name)
        if lv is None:
            raise NoSuchVolume(f"Storage volume not found: no storage vol with matching "
                               f"name '{rec.name}'")
        if not lv.is_thin:
            raise Unsupported(f"unsupported configuration: storage snapshots of logical "
                              f"volume '{rec.name}' need a thin volume (a pool with "
                              "<lvm:thin_pool>)")
        return lv

    def _snapshots(self, pool: PoolDef, volume: str) -> dict[str, lvm.LogicalVolume]:
        prefix = f"{volume}+"
        return {lv.name[len(prefix):]: lv for lv in lvm.lvs(_vg_name(pool))
                if SNAPSHOT_TAG in lv.tags and lv.name.startswith(prefix)
                and "+" not in lv.name[len(prefix):]}

    def _snapshot(self, pool: PoolDef, rec: VolumeRecord, snap: str) -> lvm.LogicalVolume:
        self._thin_volume(pool, rec)
        lv = self._snapshots(pool, rec.name).get(snap)
        if lv is None:
            raise NoSuchVolume(f"no snapshot '{snap}' of volume '{rec.name}'")
        return lv

    @staticmethod
    def _created(lv: lvm.LogicalVolume) -> float:
        for tag in lv.tags:
            if tag.startswith(CREATED_TAG):
                try:
                    return float(tag[len(CREATED_TAG):])
                except ValueError:
                    pass
        return 0.0

    def snap_list(self, pool: PoolDef, rec: VolumeRecord) -> list[SnapshotInfo]:
        from virtstore.types import SnapshotInfo

        self._thin_volume(pool, rec)
        return [SnapshotInfo(pool=pool.name, volume=rec.name, name=name,
                             kind=self.snapshot_kind, created=self._created(lv),
                             size=lv.used or 0)
                for name, lv in self._snapshots(pool, rec.name).items()]

    def snap_create(self, pool: PoolDef, rec: VolumeRecord, snap: str) -> None:
        if not _SNAP_NAME.fullmatch(snap):
            raise InvalidArgument(f"invalid snapshot name '{snap}': a logical volume's "
                                  "snapshot is named with letters, digits and '_.-'")
        self._thin_volume(pool, rec)
        self.thin_snapshot(_vg_name(pool), f"{rec.name}+{snap}", rec.name, active=False,
                           tags=(SNAPSHOT_TAG, f"{CREATED_TAG}{int(time.time())}"))

    def snap_revert(self, pool: PoolDef, rec: VolumeRecord, snap: str) -> None:
        """A new thin snapshot of the snapshot, made under a staging name, takes the
        volume's name; the old volume is renamed aside first and removed last, so a
        crash in between loses no data (the old bytes stay under ``VOL+virtstore-old``).
        The snapshot and the volume's other snapshots stay."""
        lv = self._snapshot(pool, rec, snap)
        vg = _vg_name(pool)
        if os.path.exists(rec.path):
            why = devices.users(rec.path)
            if why:
                raise Busy(f"volume '{rec.name}' is in use: {'; '.join(why)}")
        old = f"{rec.name}+virtstore-old"
        with self._scratch(pool, rec.name, "revert") as path:
            staging = path.split("/", 1)[1]
            self.thin_snapshot(vg, staging, lv.name, active=True)
            made = self._lv(pool, staging)
            if made is not None and made.tags:
                lvm.lvm(["lvchange", *self._untag(made), f"{vg}/{staging}"])
            lvm.lvm(["lvchange", "-an", f"{vg}/{rec.name}"])
            lvm.lvm(["lvrename", vg, rec.name, old])
            lvm.lvm(["lvrename", vg, staging, rec.name])
        lvm.lvm(["lvremove", "-f", f"{vg}/{old}"])

    def _scratch(self, pool: PoolDef, volume: str, op: str) -> AbstractContextManager[str]:
        """A journalled staging name (discarded at the end, or after a crash)."""
        if self.hooks is not None:
            return self.hooks.scratch(self, pool, volume, op)
        return nullcontext(self.staging_path(pool, os.urandom(8).hex()))

    @staticmethod
    def _untag(lv: lvm.LogicalVolume) -> list[str]:
        return [arg for tag in lv.tags for arg in ("--deltag", tag)]

    def snap_delete(self, pool: PoolDef, rec: VolumeRecord, snap: str) -> None:
        lv = self._snapshot(pool, rec, snap)
        lvm.lvm(["lvremove", "-f", f"{_vg_name(pool)}/{lv.name}"])

    def forget_snapshots(self, pool: PoolDef, rec: VolumeRecord) -> None:
        mine = f"{BACKUP_OF_TAG}{rec.name}"
        backups = [lv for lv in lvm.lvs(_vg_name(pool))
                   if BACKUP_TAG in lv.tags and mine in lv.tags]
        for lv in [*self._snapshots(pool, rec.name).values(), *backups]:
            lvm.lvm(["lvremove", "-f", f"{_vg_name(pool)}/{lv.name}"], check=False)

    # -- change tracking for backups: thin_delta ------------------------------------
    backup_tracking = TRACK_THIN_DELTA

    def backup_tracking_for(self, pool: PoolDef, rec: VolumeRecord) -> str:
        """thin-delta for a thin LV on a host with the thin tools; others read whole."""
        if not lvm.device_mapper_available() or lvm.thin_tools_problem():
            return ""
        lv = self._lv(pool, rec.name)
        return TRACK_THIN_DELTA if lv is not None and lv.is_thin else ""

    def _backup_lv(self, pool: PoolDef, rec: VolumeRecord,
                   snap: str) -> lvm.LogicalVolume | None:
        if not snap.startswith(BACKUP_SNAP_PREFIX):
            raise InvalidArgument(f"'{snap}' is not a backup snapshot")
        lv = self._lv(pool, snap)
        if lv is None or BACKUP_TAG not in lv.tags \
                or f"{BACKUP_OF_TAG}{rec.name}" not in lv.tags:
            return None
        return lv

    def backup_snapshot(self, pool: PoolDef, rec: VolumeRecord, backup_id: str) -> str:
        """An inactive, read-only thin snapshot, hidden from listings."""
        lv = self._thin_volume(pool, rec)
        snap = BACKUP_SNAP_PREFIX + backup_id
        self.thin_snapshot(_vg_name(pool), snap, lv.name, active=False, read_only=True,
                           tags=(BACKUP_TAG, f"{BACKUP_OF_TAG}{rec.name}"))
        return snap

    def backup_snapshot_exists(self, pool: PoolDef, rec: VolumeRecord, snap: str) -> bool:
        return self._backup_lv(pool, rec, snap) is not None

    def backup_snapshot_drop(self, pool: PoolDef, rec: VolumeRecord, snap: str) -> None:
        if self._backup_lv(pool, rec, snap) is not None:
            lvm.lvm(["lvremove", "-f", f"{_vg_name(pool)}/{snap}"])

    def backup_changes(self, pool: PoolDef, rec: VolumeRecord, snap: str, since: str | None
                       ) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
        """From the thin pool's metadata: the blocks of ``snap`` mapped differently
        than in ``since`` or only in ``snap``, and as holes those mapped only in
        ``since`` (now reading zeros); without ``since``, every mapped block."""
        vg = _vg_name(pool)
        names = [snap] if since is None else [snap, since]
        ids = lvm.thin_ids(vg, names)
        lv = self._lv(pool, snap)
        missing = [n for n in names if n not in ids]
        if missing or lv is None:
            raise NoSuchVolume(f"no thin snapshot '{', '.join(missing or names)}' of "
                               f"volume '{rec.name}'")
        return lvm.thin_changes(vg, lv.pool_lv, ids[snap],
                                None if since is None else ids[since])

    @contextmanager
    def snapshot_source(self, pool: PoolDef, rec: VolumeRecord,
                        snap: str) -> Iterator[QemuSource]:
        """The backup's snapshot, activated (read-only, as it was made) for the read
        and deactivated after."""
        from virtstore.host.nbd import QemuSource

        if self._backup_lv(pool, rec, snap) is None:
            raise NoSuchVolume(f"no backup snapshot '{snap}' of volume '{rec.name}'")
        name = f"{_vg_name(pool)}/{snap}"
        lvm.lvm(["lvchange", "-ay", "--ignoreactivationskip", name])
        try:
            yield QemuSource(image=lvm.dm_node(_vg_name(pool), snap), fmt="raw")
        finally:
            lvm.lvm(["lvchange", "-an", name], check=False)
