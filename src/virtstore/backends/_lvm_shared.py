"""Shared volume groups (``vgcreate --shared``) under lvmlockd: finding the VG, its
lockspace, joining it, and activating LVs exclusively, for the logical pool."""

from __future__ import annotations

import logging
import os

from virtstore.errors import Busy, CommandFailed, OperationInvalid
from virtstore.host import lvm
from virtstore.host.files import wait_for_path
from virtstore.xml import PoolDef

log = logging.getLogger("virtstore")


def vg_name(pool: PoolDef) -> str:
    return pool.source.name or pool.name


def find_vg(pool: PoolDef) -> lvm.VolumeGroup | None:
    try:
        return lvm.vg(vg_name(pool))
    except lvm.NeedsLvmlockd as exc:
        raise OperationInvalid(f"pool '{pool.name}' needs lvmlockd: {exc} (set "
                               "global/use_lvmlockd = 1 and local/host_id in LVM's "
                               "configuration, and run lvmlockd)") from exc


def lockspaces(pool: PoolDef, vg: lvm.VolumeGroup) -> dict[str, lvm.Lockspace]:
    try:
        return lvm.lockspaces()
    except CommandFailed as exc:
        raise OperationInvalid(f"pool '{pool.name}' needs lvmlockd: volume group "
                               f"'{vg.name}' is shared (lock type {vg.lock_type}) and "
                               f"lvmlockd does not answer: {exc}") from exc


def lockstart(pool: PoolDef, vg: lvm.VolumeGroup) -> None:
    argv = ["vgchange", "--lockstart", vg.name]
    try:
        lvm.lvm(argv, timeout=300)
        return
    except CommandFailed as exc:
        failure = exc
    # LVM activates the lvmlock LV and lvmlockd looks for its node one second
    # later; where udev is slower than that (a loaded host) the join fails with
    # "invalid parameters for sanlock". The LV stays active: once its node is
    # there, a second try joins.
    node = lvm.dm_node(vg.name, lvm.SANLOCK_LV)
    if vg.lock_type == "sanlock" and not os.path.exists(node):
        log.info("pool '%s': lockspace join failed before %s existed; trying again "
                 "once it does", pool.name, node)
        wait_for_path(node)
        try:
            lvm.lvm(argv, timeout=300)
            return
        except CommandFailed as exc:
            failure = exc
    raise OperationInvalid(f"pool '{pool.name}': cannot start the lockspace of shared "
                           f"volume group '{vg.name}': "
                           f"{lvm.error_summary(failure)}") from failure


def activate_exclusive(pool: PoolDef, vg: str, lv: str | None = None) -> None:
    """``-aey``: activation takes the LV's lock in exclusive mode, which no other host
    can then take."""
    argv = ["lvchange", "-aey", f"{vg}/{lv}"] if lv else ["vgchange", "-aey", vg]
    try:
        lvm.lvm(argv)
    except CommandFailed as exc:
        locked = lvm.locked_elsewhere(exc.stderr)
        if locked:
            names = ", ".join(f"'{n}'" for n in locked)
            what = "volume" if len(locked) == 1 else "volumes"
            raise Busy(f"{what} {names} of pool '{pool.name}' "
                       f"{'is' if len(locked) == 1 else 'are'} locked by another "
                       "host") from exc
        raise
