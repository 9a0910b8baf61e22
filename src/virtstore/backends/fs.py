"""The fs pool: a block device with a filesystem, mounted on the target directory.

Volumes are files in the mounted directory, exactly as in a dir pool (this backend
is the dir backend plus mkfs, mount and umount). Building writes a filesystem with
libvirt's overwrite rules (see ``_block_utils.check_overwrite``); starting mounts with
libvirt's Linux options ``nodev,nosuid,noexec`` plus the pool's ``fs:mount_opts``.
"""

from __future__ import annotations

import os

from virtstore.backends import _block_utils as bu
from virtstore.backends.base import BackendCaps
from virtstore.backends.dir import FILE_FORMATS, DirBackend
from virtstore.errors import InvalidArgument, OperationInvalid, Unsupported
from virtstore.host import devices, loop, mounts
from virtstore.host.runner import run, which
from virtstore.xml import PoolDef

# What libvirt adds on Linux to every fs/netfs mount.
DEFAULT_MOUNT_OPTS = ("nodev", "nosuid", "noexec")

# mkfs per filesystem: (program, force flag, quiet flags)
MKFS = {
    "ext2": ("mkfs.ext2", ["-F"], ["-q"]),
    "ext3": ("mkfs.ext3", ["-F"], ["-q"]),
    "ext4": ("mkfs.ext4", ["-F"], ["-q"]),
    "xfs": ("mkfs.xfs", ["-f"], ["-q"]),
    "btrfs": ("mkfs.btrfs", ["-f"], ["-q"]),
    "vfat": ("mkfs.vfat", ["-I"], []),
    "gfs2": ("mkfs.gfs2", ["-O"], ["-q"]),
    "ocfs2": ("mkfs.ocfs2", ["-F"], ["-q"]),
}
# A pool is mounted by one host: gfs2 without a cluster lock manager, ocfs2 without
# its cluster stack (both then refuse a second host's mount).
MKFS_ARGS = {
    "gfs2": ["-p", "lock_nolock", "-j", "1"],
    "ocfs2": ["-M", "local"],
}


def mount_options(pool: PoolDef) -> list[str]:
    """The -o list libvirt uses for this pool on Linux."""
    opts = list(DEFAULT_MOUNT_OPTS)
    for opt in pool.mount_opts:
        if opt not in opts:
            opts.append(opt)
    return opts


def mount_argv(pool: PoolDef, device: str) -> list[str]:
    """The mount command starting the pool runs (the reference argv libvirt prints)."""
    argv = ["mount", "-o", ",".join(mount_options(pool))]
    fmt = pool.source.format
    if fmt and fmt != "auto":
        argv += ["-t", fmt]
    return [*argv, device, pool.target.path or ""]


def kernel_filesystems() -> set[str]:
    try:
        with open("/proc/filesystems", encoding="ascii") as fh:
            return {line.split()[-1] for line in fh if line.strip()}
    except OSError:
        return set()


def kernel_can_mount(fstype: str) -> bool:
    """Whether the kernel mounts ``fstype``: registered now, or a module it loads on
    mount (the ``fs-TYPE`` alias), as on any host with loadable modules."""
    if fstype in kernel_filesystems():
        return True
    base = f"/lib/modules/{os.uname().release}"
    try:
        with open(os.path.join(base, "modules.alias"), encoding="utf-8",
                  errors="replace") as fh:
            return any(line.startswith(f"alias fs-{fstype} ") for line in fh)
    except OSError:
        return False


class FsBackend(DirBackend):
    caps = BackendCaps(pool_type="fs", vol_formats=FILE_FORMATS, default_vol_format="raw",
                       shared=False, file_based=True, volume_type="file")

    def host_problem(self) -> str | None:
        for tool in ("mount", "umount", "blkid"):
            if which(tool) is None:
                return f"'{tool}' is not installed (Debian util-linux / mount)"
        return None

    # -- build -----------------------------------------------------------------
    def build(self, pool: PoolDef, overwrite: bool | None) -> None:
        super().build(pool, overwrite)  # the target directory, with its permissions
        source = bu.first_device(pool)
        if not os.path.exists(source):
            raise InvalidArgument(f"device path '{source}' doesn't exist")
        device, attached = bu.build_device(source)
        try:
            self._make_fs(pool, device, overwrite)
        finally:
            if attached:
                loop.detach(attached)

    def _make_fs(self, pool: PoolDef, device: str, overwrite: bool | None) -> None:
        fmt = pool.source.format or "auto"
        if mounts.mount_points_of(device):
            raise OperationInvalid(f"device '{device}' is mounted: will not build a "
                                   "filesystem on it")
        if fmt == "auto":
            found = bu.describe(devices.probe(device))
            if overwrite is None and found is not None and \
                    devices.probe(device).get("USAGE", "filesystem") == "filesystem":
                return  # any filesystem will do: already built
            raise InvalidArgument("cannot build a filesystem of format 'auto': set the "
                                  "pool's <format type=.../> to ext4, xfs, ...")
        if fmt not in MKFS:
            raise Unsupported(f"unsupported configuration: cannot make a '{fmt}' filesystem "
                              f"(supported: {', '.join(sorted(MKFS))})")
        if not bu.check_overwrite(device, fmt, overwrite):
            return
        prog, force, quiet = MKFS[fmt]
        if which(prog) is None:
            raise Unsupported(f"'{prog}' is not installed: cannot make a '{fmt}' filesystem")
        if overwrite:
            # Old signatures (a partition table, another filesystem) must not linger
            # next to the new one where blkid would see both.
            run(["wipefs", "-a", "-q", device], timeout=120)
        run([prog, *force, *quiet, *MKFS_ARGS.get(fmt, []), device], timeout=600)

    # -- start / stop ----------------------------------------------------------
    def start(self, pool: PoolDef) -> None:
        target = self._target(pool)
        if not os.path.isdir(target):
            raise OperationInvalid(f"cannot mount on '{target}': the target directory does "
                                   "not exist (build the pool first)")
        source = bu.first_device(pool)
        if not os.path.exists(source):
            raise InvalidArgument(f"device path '{source}' doesn't exist")
        device = bu.resolve_device(source)
        current = mounts.mounted_at(target)
        if current is not None:
            if mounts.same_device(current, device):
                return  # already mounted: libvirt treats the pool as started
            raise OperationInvalid(f"Target '{target}' is already mounted by "
                                   f"'{current.source}'")
        fmt = pool.source.format
        if fmt and fmt != "auto" and fmt != "vfat" and not kernel_can_mount(fmt):
            raise Unsupported(f"this kernel cannot mount '{fmt}' filesystems")
        mounts.mount(device, target, fstype=fmt if fmt and fmt != "auto" else None,
                     options=mount_options(pool))

    def stop(self, pool: PoolDef) -> None:
        target = self._target(pool)
        current = mounts.mounted_at(target)
        if current is None:
            return
        try:
            device = bu.resolve_device(bu.first_device(pool))
        except OperationInvalid:
            device = bu.first_device(pool)
        if not mounts.same_device(current, device):
            return  # something else is mounted there: not ours to undo
        mounts.umount(target)
