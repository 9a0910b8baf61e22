"""Host block devices from sysfs, blkid and mountinfo, on real loop devices."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from block_fixtures import BlockLab, lab_fixture, sh  # noqa: F401
from virtstore.api.embedded import EmbeddedConnection
from virtstore.cli.main import main
from virtstore.host import devices, mounts

MiB = 1 << 20

BLKID_SAMPLE = """DEVNAME=/dev/loop3p1
UUID=0b1f5d4e-8a51-4b0e-9d87-3c1a1f7e2b11
BLOCK_SIZE=4096
TYPE=ext4
PART_ENTRY_SCHEME=gpt
PART_ENTRY_NAME=data
PART_ENTRY_NUMBER=1

DEVNAME=/dev/loop3
PTUUID=51f26cb0-ec58-4b92-9923-d95520084b71
PTTYPE=gpt
"""

MOUNTINFO_SAMPLE = ("24 1 254:0 / / rw,relatime shared:1 - ext4 /dev/vda rw\n"
                    "99 24 259:5 / /mnt/with\\040space rw,nosuid,nodev - xfs /dev/loop3p1 rw\n")


def test_parsers() -> None:
    found = devices.parse_blkid_export(BLKID_SAMPLE)
    assert found["/dev/loop3p1"]["TYPE"] == "ext4"
    assert found["/dev/loop3"]["PTTYPE"] == "gpt"
    ms = mounts.parse_mountinfo(MOUNTINFO_SAMPLE)
    assert ms[1].target == "/mnt/with space" and ms[1].devno == "259:5"
    assert ms[1].fstype == "xfs" and "nosuid" in ms[1].options
    props, links = devices.parse_udev_db("S:disk/by-id/wwn-0x5000c500a1b2c3d4\n"
                                         "E:ID_MODEL=ST4000NM0035\nE:ID_BUS=ata\n")
    assert props["ID_MODEL"] == "ST4000NM0035"
    assert links == ["/dev/disk/by-id/wwn-0x5000c500a1b2c3d4"]


def test_loop_disk_with_partitions(lab: BlockLab, conn: EmbeddedConnection,
                                   tmp_path: Path, capsys: pytest.CaptureFixture[str]
                                   ) -> None:
    dev = lab.loop(64 * MiB)
    sh("parted", "-s", dev, "mklabel", "gpt", "unit", "MiB", "mkpart", "data", "1", "33")
    sh("partx", "-u", dev)
    part = dev + "p1"
    sh("mkfs.ext4", "-q", "-F", "-L", "vstlabel", part)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    sh("mount", part, str(mnt))
    try:
        by_path = {d["path"]: d for d in conn.host_devices()}
        disk = by_path[dev]
        assert disk["type"] == "loop" and disk["transport"] == "loop"
        assert disk["size"] == 64 * MiB and disk["logical_sector_size"] == 512
        assert disk["partition_table"] == "gpt" and disk["partitions"] == [part]
        assert disk["backing_file"] == str(lab.files[-1])
        assert disk["rotational"] is False and disk["read_only"] is False
        p = by_path[part]
        assert p["type"] == "part" and p["parent"] == dev and p["partition_number"] == 1
        assert p["start"] == MiB and p["size"] == 32 * MiB
        assert p["fs_type"] == "ext4" and p["fs_label"] == "vstlabel" and p["fs_uuid"]
        assert p["part_name"] == "data"
        assert p["mount_points"] == [str(mnt)]
        assert devices.users(part) == [f"mounted on {mnt}"]
        assert main(["--root", str(tmp_path / "st"), "host-list", "--json"]) == 0
        listed = {d["path"]: d for d in json.loads(capsys.readouterr().out)}
        assert listed[part]["fs_type"] == "ext4"
        assert main(["--root", str(tmp_path / "st"), "host-list"]) == 0
        out = capsys.readouterr().out
        assert part in out and str(mnt) in out
        assert main(["--root", str(tmp_path / "st"), "find-storage-pool-sources", "disk"]) == 0
        out = capsys.readouterr().out
        assert f"<device path='{dev}'/>" in out and "<format type='gpt'/>" in out
    finally:
        sh("umount", str(mnt))
    assert devices.users(part) == []


def test_read_only_loop(lab: BlockLab) -> None:
    path = lab.file(8 * MiB)
    dev = sh("losetup", "--find", "--show", "--read-only", str(path)).stdout.strip()
    d = devices.device(dev)
    assert d is not None and d.read_only and d.size == 8 * MiB
    assert os.path.basename(dev) == d.name
