"""fs pools built and mounted on a kernel with every filesystem module: ext4, xfs,
btrfs, and the cluster filesystems gfs2 (lock_nolock) and ocfs2 (local mount), which
the CI host's kernel lacks. The modules are not loaded beforehand: the pool's start
must not refuse a filesystem whose module the kernel loads on mount."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from block_fixtures import BlockLab
from virtstore.api import VolumeCreateArgs
from virtstore.api.embedded import EmbeddedConnection
from virtstore.host import mounts

MiB = 1 << 20
MKFS = {"ext4": "mkfs.ext4", "xfs": "mkfs.xfs", "btrfs": "mkfs.btrfs", "gfs2": "mkfs.gfs2",
        "ocfs2": "mkfs.ocfs2"}
PACKAGE = {"gfs2": "gfs2-utils", "ocfs2": "ocfs2-tools", "btrfs": "btrfs-progs",
           "xfs": "xfsprogs", "ext4": "e2fsprogs"}


def fs_xml(name: str, dev: str, target: Path, fmt: str) -> str:
    return (f"<pool type='fs'><name>{name}</name><source><device path='{dev}'/>"
            f"<format type='{fmt}'/></source><target><path>{target}</path></target>"
            f"</pool>")


def blkid_type(dev: str) -> str:
    return subprocess.run(["blkid", "-p", "-o", "value", "-s", "TYPE", dev],
                          capture_output=True, text=True, check=False).stdout.strip()


@pytest.mark.parametrize("fmt", ["ext4", "xfs", "btrfs", "gfs2", "ocfs2"])
def test_build_mount_volumes_restart(fmt: str, lab: BlockLab, root: Path,
                                     conn: EmbeddedConnection, tmp_path: Path) -> None:
    if shutil.which(MKFS[fmt]) is None:
        pytest.skip(f"{MKFS[fmt]} is not installed (Debian {PACKAGE[fmt]}; scripts/setup "
                    "installs it)")
    dev = lab.loop(320 * MiB)  # xfs needs 300 MiB
    target = tmp_path / "mnt"
    if fmt == "btrfs":
        # libvirt's fs pool formats have no btrfs: an 'auto' pool mounts what is there.
        subprocess.run(["mkfs.btrfs", "-q", dev], check=True)
        conn.pool_define_xml(fs_xml("p", dev, target, "auto"))
    else:
        conn.pool_define_xml(fs_xml("p", dev, target, fmt))
    conn.pool_build("p")
    assert blkid_type(dev) == fmt
    conn.pool_start("p")
    mounted = mounts.mounted_at(str(target))
    assert mounted is not None and mounted.fstype == fmt
    assert conn.pool_info("p").capacity > 200 * MiB
    conn.volume_create("p", VolumeCreateArgs(name="v.img", capacity=4 * MiB))
    payload = os.urandom(MiB)
    with open(target / "v.img", "r+b") as fh:
        fh.write(payload)
    conn.pool_stop("p")
    assert mounts.mounted_at(str(target)) is None
    assert not (target / "v.img").exists()
    conn.close()
    again = EmbeddedConnection(str(root))
    try:
        again.pool_start("p")
        # ext4 and ocfs2 make lost+found, a directory volume as in libvirt.
        names = {v.name for v in again.list_volumes("p")} - {"lost+found"}
        assert names == {"v.img"}
        assert (target / "v.img").read_bytes()[:MiB] == payload
        again.pool_stop("p")
    finally:
        again.close()
