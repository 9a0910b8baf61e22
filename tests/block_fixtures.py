"""Real block devices for the block backend tests: loop devices on sparse files this
test made, unique VG and zpool names, and a zfs-fuse daemon when none runs.

Cleanup touches only what a test made: the loop devices backed by its own files
(found through sysfs, also those the engine attached for nested pools), mounts of
those devices or under its temporary directory, and the VGs and zpools it named.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

CONFORMANCE_DIR = Path(os.environ.get(
    "VIRTSTORE_CONFORMANCE",
    Path(__file__).resolve().parent.parent.parent / "shared" / "conformance" / "libvirt"))
LVM_ENV = {**os.environ, "LVM_SUPPRESS_FD_WARNINGS": "1", "LC_ALL": "C"}

requires_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (loop devices)")


def unique(prefix: str) -> str:
    return f"{prefix}{secrets.token_hex(4)}"


def sh(*argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(argv), capture_output=True, text=True, check=check,
                          env=LVM_ENV)


def lvm(*argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    from virtstore.host.lvm import device_mapper_available

    extra = [] if device_mapper_available() else ["--driverloaded", "n"]
    return sh("lvm", argv[0], *extra, *argv[1:], check=check)


class BlockLab:
    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.files: list[Path] = []
        self.vgs: list[str] = []
        self.zpools: list[str] = []

    def file(self, size: int = 256 << 20, name: str | None = None) -> Path:
        path = self.tmp / (name or unique("disk-") + ".img")
        with open(path, "wb") as fh:
            fh.truncate(size)
        self.files.append(path)
        return path

    def track(self, path: Path | str) -> None:
        """A file made elsewhere (a volume of a pool) whose loop devices we clean up."""
        self.files.append(Path(path))

    def loop(self, size: int = 256 << 20) -> str:
        path = self.file(size)
        return sh("losetup", "--find", "--show", str(path)).stdout.strip()

    def vg(self, prefix: str = "vstest") -> str:
        name = unique(prefix)
        self.vgs.append(name)
        return name

    def zpool(self, prefix: str = "vstestz") -> str:
        name = unique(prefix)
        self.zpools.append(name)
        return name

    def our_loops(self) -> list[str]:
        from virtstore.host import loop

        devs: list[str] = []
        for f in self.files:
            for dev in loop.devices_of(str(f)):
                if dev not in devs:
                    devs.append(dev)
        return devs

    def cleanup(self) -> None:
        from virtstore.host import mounts

        loops = self.our_loops()
        names = {os.path.basename(d) for d in loops}
        for m in reversed(mounts.mounts()):
            base = os.path.basename(m.source)
            ours = any(base == n or (base.startswith(n + "p") and base[len(n) + 1:].isdigit())
                       for n in names)
            if ours or m.target.startswith(str(self.tmp) + "/"):
                sh("umount", "-l", m.target, check=False)
        for name in self.zpools:
            if shutil.which("zpool"):
                sh("zpool", "destroy", "-f", name, check=False)
        for name in self.vgs:
            lvm("vgremove", "-f", name, check=False)
        for dev in self.our_loops():
            sh("partx", "-d", dev, check=False)
            for _ in range(10):
                if sh("losetup", "-d", dev, check=False).returncode == 0:
                    break
                time.sleep(0.2)


@pytest.fixture(name="lab")
def lab_fixture(tmp_path: Path) -> Iterator[BlockLab]:
    if os.geteuid() != 0:
        pytest.skip("needs root (loop devices)")
    b = BlockLab(tmp_path)
    try:
        yield b
    finally:
        b.cleanup()


@pytest.fixture(scope="session", name="zfs_daemon")
def zfs_daemon_fixture(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """zfs-fuse running (started here, and stopped again, if it was not)."""
    from virtstore.host import zfs

    if os.geteuid() != 0:
        pytest.skip("needs root")
    if shutil.which("zpool") is None:
        pytest.skip("the ZFS tools are not installed (Debian zfs-fuse or zfsutils-linux)")
    proc: subprocess.Popen[bytes] | None = None
    if zfs.flavour() == "fuse" and not zfs.daemon_running():
        pidfile = tmp_path_factory.mktemp("zfs") / "zfs-fuse.pid"
        proc = subprocess.Popen(["zfs-fuse", "--no-daemon", "--no-kstat-mount",
                                 "--pidfile", str(pidfile)],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        for _ in range(100):
            if zfs.daemon_running():
                break
            time.sleep(0.1)
        else:
            proc.terminate()
            pytest.skip("zfs-fuse did not come up")
    try:
        yield
    finally:
        if proc is not None:
            proc.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=20)
            if proc.poll() is None:
                proc.kill()
