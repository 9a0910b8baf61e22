"""The kernel lab's tests: run as root inside the VM that scripts/test boots with
/work/shared/testenv/kernel-lab.sh (Debian's own kernel with every module). They
exercise what the CI host's kernel cannot: device-mapper (LV activation, raid1, thin
pools), partition scanning of loop devices, gfs2/ocfs2 mounts.

The main suite does not collect this directory (tests/conftest.py); the runner sets
VIRTSTORE_KERNEL_LAB=1 and collects only this directory.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

# The shared fixtures (block_fixtures) live one directory up.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from block_fixtures import BlockLab, lab_fixture, sh  # noqa: F401

# Device-mapper targets up front; filesystems are left to load on mount (test_fs).
# Device-mapper targets up front; filesystems are left to load on mount (test_fs).
MODULES = ("loop", "dm_mod", "dm_raid", "dm_thin_pool", "dm_snapshot")


def _why_not_here() -> str | None:
    if os.environ.get("VIRTSTORE_KERNEL_LAB") != "1":
        return "runs only inside the kernel lab VM (scripts/test boots it)"
    if os.geteuid() != 0:
        return "needs root inside the kernel lab VM"
    return None


@pytest.fixture(scope="session", autouse=True)
def kernel_modules() -> Iterator[None]:
    why = _why_not_here()
    if why:
        pytest.skip(why)
    for mod in MODULES:
        subprocess.run(["modprobe", mod], capture_output=True, check=False)
    yield


def ploop(lab: BlockLab, size: int) -> str:
    """A loop device on a new file, with the kernel scanning its partition table."""
    path = lab.file(size)
    return sh("losetup", "--partscan", "--find", "--show", str(path)).stdout.strip()


def virtstore_cli() -> str:
    """The installed ``virtstore`` command of the interpreter running the tests."""
    return str(Path(sys.executable).parent / "virtstore")


@contextlib.contextmanager
def running_udevd(*, coldplug: bool = True) -> Iterator[None]:
    """udevd, as a host runs it (the VM starts none, so no udev links exist without
    it), stopped by its PID at the end; ``coldplug`` replays the devices already there
    (``udevadm trigger`` and ``settle``: slow under emulation)."""
    udevd = "/lib/systemd/systemd-udevd"
    if not os.path.exists(udevd):
        pytest.skip("systemd-udevd is not installed (Debian udev)")
    proc = subprocess.Popen([udevd], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    try:
        for _ in range(100):
            if os.path.exists("/run/udev/control"):
                break
            time.sleep(0.1)
        if coldplug:
            subprocess.run(["udevadm", "trigger", "--action=add"], check=True)
            subprocess.run(["udevadm", "settle", "--timeout=60"], check=True)
        yield
    finally:
        proc.terminate()
        proc.wait(30)
