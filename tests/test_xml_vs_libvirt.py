"""pool-dumpxml and vol-dumpxml side by side with libvirt's, on the same storage.

libvirtd is started here when none runs (and stopped again); without libvirt the tests
skip and say why. Each pool type is run by virtstore, then by libvirt, on the same
device and target, with the same volumes; the documents must be the same except for
what must differ: the pool's UUID (each side makes its own) and the values of the
timestamps (reading a file moves its atime). Element order is not normalized.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from block_fixtures import BlockLab, lab_fixture, sh  # noqa: F401
from virtstore.api import VolumeCreateArgs
from virtstore.api.embedded import EmbeddedConnection


def _libvirtd_pids() -> set[int]:
    pids = set()
    for entry in os.listdir("/proc"):
        try:
            if entry.isdigit() and Path(f"/proc/{entry}/comm").read_text().strip() == "libvirtd":
                pids.add(int(entry))
        except OSError:
            continue
    return pids


@pytest.fixture(scope="module")
def libvirt() -> Iterator[Any]:
    """A libvirt connection to qemu:///system; libvirtd is started if none runs."""
    lv = pytest.importorskip("libvirt", reason="python3-libvirt is not installed")
    lv.registerErrorHandler(lambda _ctx, _err: None, None)
    started = None
    if not _libvirtd_pids():
        if shutil.which("libvirtd") is None or os.geteuid() != 0:
            pytest.skip("libvirtd is not installed or we are not root")
        before = _libvirtd_pids()
        subprocess.run(["libvirtd", "-d"], check=True)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and started is None:
            new = _libvirtd_pids() - before
            started = new.pop() if len(new) == 1 else None
            time.sleep(0.1)
    conn = None
    deadline = time.monotonic() + 20
    while conn is None:
        try:
            conn = lv.open("qemu:///system")
        except lv.libvirtError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)
    try:
        yield conn
    finally:
        conn.close()
        if started is not None:
            os.kill(started, signal.SIGTERM)


def normalize(xml: str) -> str:
    """Only what must differ: the UUID, and the timestamps' values."""
    xml = re.sub(r"<uuid>[^<]*</uuid>", "<uuid/>", xml)
    xml = re.sub(r"<([amcb]time)>[^<]*</\1>", r"<\1/>", xml)
    return xml if xml.endswith("\n") else xml + "\n"


def _fill(ours: EmbeddedConnection, pool: str) -> list[str]:
    ours.volume_create(pool, VolumeCreateArgs("base.qcow2", 64 << 20, format="qcow2"))
    ours.volume_create(pool, VolumeCreateArgs("top.qcow2", 128 << 20, format="qcow2",
                                              backing_vol="base.qcow2",
                                              backing_vol_format="qcow2"))
    ours.volume_create(pool, VolumeCreateArgs("disk.raw", 8 << 20, format="raw"))
    return ["base.qcow2", "disk.raw", "top.qcow2"]


def _side_by_side(ours: EmbeddedConnection, libvirt: Any, pool_xml: str,
                  name: str) -> None:
    ours.pool_define_xml(pool_xml)
    ours.pool_start(name)
    vols = _fill(ours, name)
    ours.pool_refresh(name)
    mine = {"pool": ours.pool_xml(name), "pool-inactive": ours.pool_xml(name, inactive=True)}
    for vol in vols:
        mine[vol] = ours.volume_xml(name, vol)
    ours.pool_stop(name)
    mine["stopped"] = ours.pool_xml(name, inactive=True)

    lv = libvirt.storagePoolDefineXML(pool_xml, 0)
    try:
        lv.create(0)
        lv.refresh(0)
        theirs = {"pool": lv.XMLDesc(0), "pool-inactive": lv.XMLDesc(1)}
        for vol in vols:
            theirs[vol] = lv.storageVolLookupByName(vol).XMLDesc(0)
        lv.destroy()
        theirs["stopped"] = lv.XMLDesc(1)
    finally:
        if lv.isActive():
            lv.destroy()
        lv.undefine()
    for key in mine:
        assert normalize(mine[key]) == normalize(theirs[key]), key


def test_dir_pool_as_libvirt(libvirt: Any, lab: BlockLab, root: Path) -> None:
    # On a filesystem of its own, so that its sizes hold still between the two runs.
    mnt = lab.tmp / "mnt"
    mnt.mkdir()
    dev = lab.loop(128 << 20)
    sh("mkfs.ext4", "-q", dev)
    sh("mount", dev, str(mnt))
    target = mnt / "images"
    target.mkdir(mode=0o750)
    xml = f"<pool type='dir'><name>vsdir</name><target><path>{target}</path></target></pool>"
    with EmbeddedConnection(str(root)) as ours:
        _side_by_side(ours, libvirt, xml, "vsdir")


def test_fs_pool_on_a_loop_device_as_libvirt(libvirt: Any, lab: BlockLab,
                                            root: Path) -> None:
    dev = lab.loop(128 << 20)
    sh("mkfs.ext4", "-q", dev)
    target = lab.tmp / "fs"
    target.mkdir()
    xml = (f"<pool type='fs'><name>vsfs</name><source><device path='{dev}'/>"
           f"<format type='ext4'/></source><target><path>{target}</path></target></pool>")
    with EmbeddedConnection(str(root)) as ours:
        _side_by_side(ours, libvirt, xml, "vsfs")
