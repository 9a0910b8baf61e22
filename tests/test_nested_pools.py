"""Pools on volumes of pools: a raw file in a dir pool is the disk of a disk pool,
whose partition is the physical volume of a logical pool."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from block_fixtures import BlockLab, lab_fixture  # noqa: F401
from virtstore.api import VolumeCreateArgs
from virtstore.api.embedded import EmbeddedConnection
from virtstore.errors import Busy
from virtstore.host import loop, lvm

MiB = 1 << 20


def test_file_disk_partition_vg_chain(lab: BlockLab, conn: EmbeddedConnection,
                                      tmp_path: Path) -> None:
    lower = tmp_path / "lower"
    conn.pool_define_xml(f"<pool type='dir'><name>lower</name><target><path>{lower}</path>"
                         "</target></pool>")
    conn.pool_build("lower")
    conn.pool_start("lower")
    conn.volume_create("lower", VolumeCreateArgs(name="disk.raw", capacity=96 * MiB))
    raw = str(lower / "disk.raw")
    lab.track(raw)

    conn.pool_define_xml(f"<pool type='disk'><name>mid</name><source><device path='{raw}'/>"
                         "<format type='gpt'/></source><target><path>/dev</path></target>"
                         "</pool>")
    conn.pool_build("mid")  # attaches a loop device for the build only
    assert loop.devices_of(raw) == []
    conn.pool_start("mid")
    devs = loop.devices_of(raw)
    assert len(devs) == 1
    dev = devs[0]
    part = os.path.basename(dev) + "p1"
    conn.volume_create("mid", VolumeCreateArgs(name=part, capacity=64 * MiB,
                                               format="linux-lvm"))
    assert os.path.exists("/dev/" + part)

    vg = lab.vg()
    conn.pool_define_xml(f"<pool type='logical'><name>{vg}</name><source>"
                         f"<device path='/dev/{part}'/></source></pool>")
    conn.pool_start(vg, build=True)
    conn.volume_create(vg, VolumeCreateArgs(name="lv", capacity=16 * MiB))
    assert [v.name for v in conn.list_volumes(vg)] == ["lv"]

    # Nothing under a running pool can go away.
    with pytest.raises(Busy, match=f"source of running pool '{vg}'"):
        conn.pool_stop("mid")
    with pytest.raises(Busy, match="source of running pool 'mid'"):
        conn.pool_stop("lower")
    with pytest.raises(Busy, match=f"source of running pool '{vg}'"):
        conn.volume_delete("mid", part)
    with pytest.raises(Busy, match="source of running pool 'mid'"):
        conn.volume_delete("lower", "disk.raw")

    # Top down, everything stops, and the loop device goes with the disk pool.
    conn.pool_stop(vg)
    conn.pool_stop("mid")
    assert loop.devices_of(raw) == []
    assert not os.path.exists(f"/sys/class/block/{part}")
    conn.pool_stop("lower")

    # And comes back in the same order, partition and VG included.
    conn.pool_start("lower")
    conn.pool_start("mid")
    new_part = os.path.basename(loop.devices_of(raw)[0]) + "p1"
    assert [v.name for v in conn.list_volumes("mid")] == [new_part]
    pv = lvm.pv_of("/dev/" + new_part)
    assert pv is not None and pv.vg_name == vg
    conn.pool_stop("mid")
    assert loop.devices_of(raw) == []


def test_loop_attached_by_someone_else_stays(lab: BlockLab, conn: EmbeddedConnection,
                                             tmp_path: Path) -> None:
    raw = lab.file(32 * MiB)
    dev = loop.attach(str(raw))
    conn.pool_define_xml(f"<pool type='disk'><name>d</name><source><device path='{raw}'/>"
                         "<format type='dos'/></source><target><path>/dev</path></target>"
                         "</pool>")
    conn.pool_start("d", build=True)
    assert loop.devices_of(str(raw)) == [dev]
    conn.pool_stop("d")
    assert loop.devices_of(str(raw)) == [dev]  # not ours to detach
