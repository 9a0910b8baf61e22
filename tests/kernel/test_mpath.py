"""mpath pools over dm-multipath: two iSCSI sessions (two initiator interfaces) to the
same tgtd target make two paths to each LUN, which ``multipath`` joins into one map per
LUN; the pool lists the maps, bytes written through a map reach the LUN's file, and
with one session logged out the map stays and still reads through the other path.

No udevd or multipathd runs in the VM: ``multipath`` makes the maps itself, with
``DM_DISABLE_UDEV=1`` so libdevmapper makes the /dev/mapper nodes."""

from __future__ import annotations

import mmap
import os
import shutil
import subprocess
import time
from collections.abc import Iterator

import pytest
from test_iscsi import iscsid  # noqa: F401

from net_fixtures import ISCSI_STORAGE, Server, iscsi_fixture  # noqa: F401
from virtstore.api.embedded import EmbeddedConnection
from virtstore.host import sysfs_scsi

MiB = 1 << 20
IFACE = "klabmp"
CONF = """defaults {
  user_friendly_names no
  find_multipaths no
}
blacklist {
  devnode "^(ram|loop|nbd|vd|zram|dm-)"
  device {
    vendor "QEMU"
    product ".*"
  }
}
"""
ENV = {**os.environ, "DM_DISABLE_UDEV": "1"}


def run(*argv: str, check: bool = True) -> str:
    return subprocess.run(argv, capture_output=True, text=True, check=check, env=ENV,
                          timeout=120).stdout


def iet_disks() -> list[str]:
    out = []
    for name in os.listdir("/sys/block"):
        try:
            with open(f"/sys/block/{name}/device/vendor") as fh:
                if fh.read().strip() == "IET":
                    out.append(name)
        except OSError:
            pass
    return out


@pytest.fixture
def two_paths(iscsid: None, iscsi_fixture: Server) -> Iterator[str]:  # noqa: F811
    """Both sessions logged in and the maps made; the portal as 'host:port'."""
    if shutil.which("multipath") is None:
        pytest.skip("multipath is not installed (Debian multipath-tools)")
    subprocess.run(["modprobe", "dm_multipath"], check=True)
    with open("/etc/multipath.conf", "w") as fh:  # the guest's /etc is its own overlay
        fh.write(CONF)
    portal = f"127.0.0.1:{iscsi_fixture.info['port']}"
    run("iscsiadm", "-m", "iface", "-I", IFACE, "-o", "new", check=False)
    try:
        run("iscsiadm", "-m", "discovery", "-t", "st", "-p", portal, "-I", "default",
            "-I", IFACE)
        run("iscsiadm", "-m", "node", "-T", ISCSI_STORAGE, "-p", portal, "--login")
        deadline = time.monotonic() + 60
        while len(iet_disks()) < 4 and time.monotonic() < deadline:
            time.sleep(0.5)
        assert len(iet_disks()) == 4, iet_disks()  # two LUNs, two paths each
        # The disks show in sysfs before the kernel has read their size: multipath
        # leaves such a path out, so it runs (reloading the maps) until both maps
        # have both paths.
        out = ""
        for _ in range(20):
            res = subprocess.run(["multipath", "-r", "-v2"], capture_output=True,
                                 text=True, env=ENV, timeout=120)
            out += res.stdout + res.stderr
            maps = sysfs_scsi.multipath_maps()
            if len(maps) == 2 and all(len(m.slaves) == 2 for m in maps):
                break
            time.sleep(1)
        assert len(maps) == 2 and all(len(m.slaves) == 2 for m in maps), \
            out + run("multipath", "-ll", check=False)
        yield portal
    finally:
        run("multipath", "-F", check=False)
        run("iscsiadm", "-m", "node", "-T", ISCSI_STORAGE, "-p", portal, "--logout",
            check=False)
        run("iscsiadm", "-m", "node", "-T", ISCSI_STORAGE, "-p", portal, "-o", "delete",
            check=False)
        run("iscsiadm", "-m", "iface", "-I", IFACE, "-o", "delete", check=False)


def test_one_map_two_paths_and_a_path_taken_away(two_paths: str,
                                                 iscsi_fixture: Server,  # noqa: F811
                                                 conn: EmbeddedConnection) -> None:
    conn.pool_define_xml("<pool type='mpath'><name>mp</name>"
                         "<target><path>/dev/mapper</path></target></pool>")
    conn.pool_start("mp")
    vols = sorted(conn.list_volumes("mp"), key=lambda v: v.capacity)
    assert [v.capacity for v in vols] == [64 * MiB, 128 * MiB]
    maps = {m.dm: m for m in sysfs_scsi.multipath_maps()}
    small = maps[vols[0].name]
    assert len(small.slaves) == 2 and all(s in iet_disks() for s in small.slaves)
    assert vols[0].path == f"/dev/mapper/{small.name}"

    payload = os.urandom(MiB)
    fd = os.open(vols[0].path, os.O_WRONLY | os.O_DIRECT | os.O_SYNC)
    try:
        buf = mmap.mmap(-1, MiB)  # page aligned, as O_DIRECT wants
        buf.write(payload)
        os.pwrite(fd, buf, 3 * MiB)
    finally:
        os.close(fd)
    with open(iscsi_fixture.info["luns"][0], "rb") as fh:
        fh.seek(3 * MiB)
        assert fh.read(MiB) == payload

    # One session goes: the map stays, and reads go through the other path.
    run("iscsiadm", "-m", "node", "-T", ISCSI_STORAGE, "-p", two_paths, "-I", IFACE,
        "--logout")
    fd = os.open(vols[0].path, os.O_RDONLY | os.O_DIRECT)
    try:
        buf = mmap.mmap(-1, MiB)
        assert os.preadv(fd, [buf], 3 * MiB) == MiB
        assert buf[:] == payload
    finally:
        os.close(fd)
    conn.pool_refresh("mp")
    assert sorted(v.name for v in conn.list_volumes("mp")) == sorted(v.name for v in vols)
    status = run("dmsetup", "status", small.name).split()
    # Per path "MAJOR:MINOR STATE ...": both paths still in the map, one of them active
    # (the other is marked failed (F) once an I/O has gone to it).
    states = [status[i + 1] for i, tok in enumerate(status) if tok.count(":") == 1
              and tok.replace(":", "").isdigit()]
    assert len(states) == 2 and "A" in states, status
    conn.pool_stop("mp")
