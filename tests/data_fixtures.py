"""Helpers for the virtstore.data tests: sparse files, hashes, loop-mounted filesystems."""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

MiB = 1 << 20
GiB = 1 << 30

IS_ROOT = os.geteuid() == 0
needs_root = pytest.mark.skipif(not IS_ROOT, reason="loop devices and mounts need root")


def needs_tool(*names: str) -> pytest.MarkDecorator:
    missing = [n for n in names if shutil.which(n) is None]
    return pytest.mark.skipif(bool(missing), reason=f"{', '.join(missing)} not installed")


def block(index: int, size: int = MiB) -> bytes:
    """``size`` pseudo-random bytes that differ for every ``index`` (cheap to make)."""
    seed = hashlib.sha256(index.to_bytes(8, "little")).digest()
    out = bytearray()
    while len(out) < size:
        seed = hashlib.sha256(seed).digest()
        out += seed * 128  # 4 KiB per hash: distinct 4 KiB blocks, cheap
    # Make every 4 KiB block unique: stamp its position and the index into it.
    for off in range(0, size, 4096):
        out[off:off + 16] = index.to_bytes(8, "little") + off.to_bytes(8, "little")
    return bytes(out[:size])


def make_sparse(path: Path | str, size: int, extents: list[tuple[int, int]]) -> None:
    """A file of ``size`` bytes with data at each (offset, length), holes elsewhere."""
    with open(path, "wb") as f:
        f.truncate(size)
        for i, (off, length) in enumerate(extents):
            f.seek(off)
            piece = block(i, min(length, 4 * MiB))
            done = 0
            while done < length:
                n = min(len(piece), length - done)
                f.write(piece[:n])
                done += n


def chunks_layout(size: int, count: int, length: int) -> list[tuple[int, int]]:
    """``count`` data extents of ``length`` bytes spread evenly over ``size``."""
    step = size // count
    return [(i * step + (step - length) // 2, length) for i in range(count)]


def sha256(path: Path | str, offset: int = 0, length: int | None = None) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        f.seek(offset)
        left = length
        while left is None or left > 0:
            data = f.read(8 * MiB if left is None else min(8 * MiB, left))
            if not data:
                break
            h.update(data)
            if left is not None:
                left -= len(data)
    return h.hexdigest()


def allocated(path: Path | str) -> int:
    return os.stat(path).st_blocks * 512


def free_bytes(path: Path | str) -> int:
    os.sync()
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


def _run(*argv: str | Path) -> str:
    return subprocess.run([str(a) for a in argv], check=True, capture_output=True,
                          text=True).stdout


@contextlib.contextmanager
def loop_device(image: Path) -> Iterator[str]:
    """A loop device over ``image``, detached afterwards (only the one made here)."""
    try:
        dev = _run("losetup", "-f", "--show", image).strip()
    except subprocess.CalledProcessError as exc:
        pytest.skip(f"no loop device available: {exc.stderr.strip()}")
    try:
        yield dev
    finally:
        subprocess.run(["losetup", "-d", dev], check=False)


def _umount(mnt: Path) -> None:
    for _ in range(50):
        if subprocess.run(["umount", str(mnt)], check=False,
                          capture_output=True).returncode == 0:
            return
        time.sleep(0.1)
    subprocess.run(["umount", "-l", str(mnt)], check=False)


@contextlib.contextmanager
def loop_fs(workdir: Path, fstype: str, size: str) -> Iterator[Path]:
    """A ``fstype`` filesystem of ``size`` on a loop device, mounted under ``workdir``."""
    mkfs = {"xfs": ["mkfs.xfs", "-q", "-m", "reflink=1"],
            "btrfs": ["mkfs.btrfs", "-q"],
            "ext4": ["mkfs.ext4", "-q", "-F", "-m", "0"]}[fstype]
    if shutil.which(mkfs[0]) is None:
        pytest.skip(f"{mkfs[0]} not installed")
    image = workdir / f"{fstype}.img"
    mnt = workdir / f"{fstype}-mnt"
    _run("truncate", "-s", size, image)
    _run(*mkfs, image)
    with loop_device(image) as dev:
        mnt.mkdir()
        try:
            _run("mount", dev, mnt)
        except subprocess.CalledProcessError as exc:
            pytest.skip(f"cannot mount {fstype}: {exc.stderr.strip()}")
        try:
            yield mnt
        finally:
            _umount(mnt)


@contextlib.contextmanager
def tmpfs(workdir: Path, size: str = "256M") -> Iterator[Path]:
    mnt = workdir / "tmpfs-mnt"
    mnt.mkdir()
    try:
        _run("mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", mnt)
    except subprocess.CalledProcessError as exc:
        pytest.skip(f"cannot mount tmpfs: {exc.stderr.strip()}")
    try:
        yield mnt
    finally:
        _umount(mnt)


def processes_with(text: str) -> list[int]:
    """PIDs of running processes whose command line contains ``text``."""
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmdline = f.read().replace(b"\0", b" ").decode("utf-8", "replace")
        except OSError:
            continue
        if text in cmdline:
            pids.append(int(entry))
    return pids


def alive(pid: int) -> bool:
    """True if ``pid`` exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat", encoding="utf-8") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False
