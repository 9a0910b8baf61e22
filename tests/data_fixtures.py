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


_digests: dict[tuple[str, int, int, int, int | None], str] = {}
_ZERO_BLOCK = bytes(4096)


def _data_ranges(fd: int, start: int, end: int) -> Iterator[tuple[int, int]]:
    # Written here rather than taken from virtstore.data, so that a bug there cannot
    # hide itself from the comparison.
    pos = start
    while pos < end:
        try:
            data = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError:
            return
        if data >= end:
            return
        hole = min(os.lseek(fd, data, os.SEEK_HOLE), end)
        yield data, hole
        pos = hole


def digest(path: Path | str, offset: int = 0, length: int | None = None) -> str:
    """A hash of the bytes of [offset, offset+length) that does not read holes.

    It covers the length and every non-zero 4 KiB block (on a grid from ``offset``)
    with its position, so two ranges have the same digest exactly when they hold the
    same bytes, whatever their holes. SHA-1: these tests compare copies, they do not
    defend against forgery. Cached while the file is unchanged.
    """
    st = os.stat(path)
    key = (str(path), st.st_ino, st.st_mtime_ns, offset, length)
    if key in _digests:
        return _digests[key]
    end = st.st_size if length is None else min(st.st_size, offset + length)
    h = hashlib.sha1(usedforsecurity=False)
    h.update(str(st.st_size - offset if length is None else length).encode())
    bs = len(_ZERO_BLOCK)
    fd = os.open(path, os.O_RDONLY)
    try:
        done = offset  # blocks before this were hashed; always on the grid
        for data, hole in _data_ranges(fd, offset, end):
            pos = max(done, offset + (data - offset) // bs * bs)
            while pos < hole:
                chunk = os.pread(fd, min(8 * MiB, end - pos), pos)
                if not chunk:
                    break
                for i in range(0, len(chunk), bs):
                    blk = chunk[i:i + bs]
                    if blk != _ZERO_BLOCK[:len(blk)]:
                        h.update((pos + i - offset).to_bytes(8, "little"))
                        h.update(blk)
                pos += len(chunk)
            done = pos
    finally:
        os.close(fd)
    _digests[key] = h.hexdigest()
    return _digests[key]


def allocated(path: Path | str) -> int:
    return os.stat(path).st_blocks * 512


def free_bytes(path: Path | str) -> int:
    """Free space of the filesystem at ``path`` once its dirty data is on disk (that
    filesystem only: a global sync would wait for every test on the host)."""
    subprocess.run(["sync", "-f", str(path)], check=True)
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
    with loop_device(image) as dev, _mounted(mnt, fstype, dev):
        yield mnt


@contextlib.contextmanager
def tmpfs(workdir: Path, size: str = "256M") -> Iterator[Path]:
    mnt = workdir / "tmpfs-mnt"
    with _mounted(mnt, "tmpfs", "-t", "tmpfs", "-o", f"size={size}", "tmpfs"):
        yield mnt


@contextlib.contextmanager
def _mounted(mnt: Path, what: str, *source: str | Path) -> Iterator[None]:
    """``mount SOURCE... mnt`` on a new directory (the test skipped if it fails)."""
    mnt.mkdir()
    try:
        _run("mount", *source, mnt)
    except subprocess.CalledProcessError as exc:
        pytest.skip(f"cannot mount {what}: {exc.stderr.strip()}")
    try:
        yield
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
