"""Test pools for the benchmarks: a work directory and directories full of volumes.

A pool is 70% sparse raw files of various sizes and 30% qcow2 images. The qcow2 images
are copies of a few templates made once with ``qemu-img create``: only the non-zero
blocks of a template are written, so each copy stays sparse, like the original, and
10,000 volumes take seconds to make instead of thousands of qemu-img runs.

For the data benchmarks: large files with data spread between holes, a content digest
that does not read holes, allocation and shared-extent counts, the page cache, and a
reflink xfs on a loop device.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import random
import shutil
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

KiB = 1024
MiB = 1024 * KiB
GiB = 1024 * MiB

QCOW2_SHARE = 0.3
RAW_SIZES = (64 * MiB, 512 * MiB, 1 * GiB, 8 * GiB, 20 * GiB, 100 * GiB)
QCOW2_SIZES = (1 * GiB, 10 * GiB, 20 * GiB, 100 * GiB)
BLOCK = 4 * KiB


@dataclass
class Template:
    """A qcow2 image as its length and the offsets of its non-zero blocks."""

    size: int
    blocks: list[tuple[int, bytes]]


@dataclass
class PoolContents:
    path: Path
    names: list[str] = field(default_factory=list)
    raw: int = 0
    qcow2: int = 0

    def volume_path(self, name: str) -> str:
        return str(self.path / name)


def fs_type(path: str) -> str:
    """The filesystem type under ``path``, as df reports it ("" if df cannot tell)."""
    res = subprocess.run(["df", "--output=fstype", path], capture_output=True, text=True,
                         check=False)
    lines = res.stdout.split()
    return lines[-1] if res.returncode == 0 and len(lines) >= 2 else ""


def make_workdir(base: str) -> Path:
    """A fresh directory under ``base``; warns when ``base`` lives in memory."""
    kind = fs_type(base)
    if kind == "tmpfs":
        print(f"warning: {base} is tmpfs: file timings will not reflect a disk",
              file=sys.stderr)
    return Path(tempfile.mkdtemp(prefix="virtstore-bench-", dir=base))


def read_template(path: Path) -> Template:
    data = path.read_bytes()
    chunks = ((off, data[off:off + BLOCK]) for off in range(0, len(data), BLOCK))
    return Template(size=len(data), blocks=[(off, c) for off, c in chunks if any(c)])


def make_templates(where: Path) -> list[Template]:
    """One qcow2 per size in QCOW2_SIZES, made by qemu-img, read back into memory."""
    where.mkdir(parents=True, exist_ok=True)
    templates = []
    for size in QCOW2_SIZES:
        path = where / f"template-{size // GiB}G.qcow2"
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(path), str(size)],
                       check=True)
        templates.append(read_template(path))
        path.unlink()
    return templates


def write_sparse_copy(path: Path, template: Template) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        for off, block in template.blocks:
            os.pwrite(fd, block, off)
        os.ftruncate(fd, template.size)
    finally:
        os.close(fd)


def write_raw(path: Path, size: int, with_data: bool) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        if with_data:  # a few allocated blocks, so allocations differ between volumes
            os.pwrite(fd, b"\xa5" * (16 * KiB), 0)
        os.ftruncate(fd, size)
    finally:
        os.close(fd)


def populate(path: Path, count: int, templates: list[Template], seed: int = 1) -> PoolContents:
    """``count`` volumes in ``path`` (created): 30% qcow2, the rest sparse raw."""
    path.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    qcow2_at = set(rng.sample(range(count), round(count * QCOW2_SHARE)))
    contents = PoolContents(path=path)
    for i in range(count):
        if i in qcow2_at:
            name = f"vol{i:06d}.qcow2"
            write_sparse_copy(path / name, rng.choice(templates))
            contents.qcow2 += 1
        else:
            name = f"vol{i:06d}.img"
            size = rng.choice(RAW_SIZES) + rng.randrange(0, 64) * MiB
            write_raw(path / name, size, with_data=rng.random() < 0.125)
            contents.raw += 1
        contents.names.append(name)
    return contents


def dir_pool_xml(name: str, path: Path) -> str:
    return (f"<pool type='dir'><name>{name}</name>"
            f"<target><path>{path}</path></target></pool>")


def volume_xml(name: str, fmt: str, capacity: int, allocation: int | None = None) -> str:
    alloc = "" if allocation is None else f"<allocation unit='bytes'>{allocation}</allocation>"
    return (f"<volume><name>{name}</name>"
            f"<capacity unit='bytes'>{capacity}</capacity>{alloc}"
            f"<target><format type='{fmt}'/></target></volume>")


# -- large files for the data benchmarks -----------------------------------------------
WRITE_STEP = 16 * MiB
DIGEST_BLOCK = 4 * MiB


def write_spread(path: Path, size: int, chunks: int, chunk: int, *,
                 preallocate: bool = False) -> int:
    """A new file of ``size`` bytes holding ``chunks`` runs of ``chunk`` random bytes, run i
    at i × size / chunks; the rest holes, or with ``preallocate`` allocated (unwritten)
    extents. Fresh random bytes everywhere, so nothing compresses or dedups. Synced to disk;
    returns the bytes of data."""
    step = size // chunks
    if chunk > step:
        raise ValueError(f"{chunks} chunks of {chunk} bytes do not fit in {size} bytes")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.ftruncate(fd, size)
        if preallocate:
            os.posix_fallocate(fd, 0, size)
        for i in range(chunks):
            _write_all(fd, i * step, chunk, None)
        os.fsync(fd)
    finally:
        os.close(fd)
    return chunks * chunk


def fill(path: Path, size: int, piece: bytes) -> None:
    """Write ``piece`` over and over across the first ``size`` bytes (the file exists)."""
    fd = os.open(path, os.O_WRONLY)
    try:
        _write_all(fd, 0, size, piece)
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_all(fd: int, offset: int, length: int, piece: bytes | None) -> None:
    end = offset + length
    while offset < end:
        n = min(WRITE_STEP, end - offset)
        buf = os.urandom(n) if piece is None else piece[:n]
        view = memoryview(buf)
        while view:
            done = os.pwrite(fd, view, offset)
            view, offset = view[done:], offset + done


def data_ranges(fd: int, size: int) -> Iterator[tuple[int, int]]:
    """(start, end) of the file's data, by SEEK_DATA/SEEK_HOLE (unwritten extents on xfs
    and ext4 count as holes)."""
    pos = 0
    while pos < size:
        try:
            start = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError:  # ENXIO: nothing but a hole up to the end
            return
        end = os.lseek(fd, start, os.SEEK_HOLE)
        yield start, end
        pos = end


def content_digest(path: Path | str) -> str:
    """sha256 of the size and of one entry per 4 MiB block: a marker when the block reads
    as zeros, else the block's own sha256. Equal for files with equal bytes, whatever their
    holes, and blocks lying in holes are never read."""
    total = hashlib.sha256()
    zero = bytes(DIGEST_BLOCK)
    with open(path, "rb", buffering=0) as f:
        fd = f.fileno()
        size = os.fstat(fd).st_size
        total.update(size.to_bytes(8, "big"))
        touched: set[int] = set()
        for start, end in data_ranges(fd, size):
            touched.update(range(start // DIGEST_BLOCK, (end - 1) // DIGEST_BLOCK + 1))
        for block in range((size + DIGEST_BLOCK - 1) // DIGEST_BLOCK):
            if block in touched:
                buf = os.pread(fd, DIGEST_BLOCK, block * DIGEST_BLOCK)
                if buf != zero[:len(buf)]:
                    total.update(b"D" + hashlib.sha256(buf).digest())
                    continue
            total.update(b"Z")
    return total.hexdigest()


def zeros_digest(size: int) -> str:
    """content_digest of ``size`` bytes of zeros."""
    total = hashlib.sha256(size.to_bytes(8, "big"))
    total.update(b"Z" * ((size + DIGEST_BLOCK - 1) // DIGEST_BLOCK))
    return total.hexdigest()


def allocated(path: Path | str) -> int:
    """Bytes the file occupies on disk (st_blocks)."""
    return os.stat(path).st_blocks * 512


# struct fiemap and struct fiemap_extent, <linux/fiemap.h>
FS_IOC_FIEMAP = 0xC020660B
_FIEMAP = struct.Struct("=QQIIII")
_FIEMAP_EXTENT = struct.Struct("=QQQQQIIII")
_FIEMAP_FLAG_SYNC = 0x1
_EXTENT_LAST = 0x1
_EXTENT_UNWRITTEN = 0x800
_EXTENT_SHARED = 0x2000


def written_and_shared(path: Path | str) -> tuple[int, int]:
    """Bytes in the file's written extents, and how many of them are shared with another
    file (a reflink), by FIEMAP."""
    written = shared = start = 0
    slots = 256
    with open(path, "rb") as f:
        while True:
            buf = bytearray(_FIEMAP.pack(start, 2**64 - 1, _FIEMAP_FLAG_SYNC, 0, slots, 0)
                            + bytes(_FIEMAP_EXTENT.size * slots))
            fcntl.ioctl(f.fileno(), FS_IOC_FIEMAP, buf)
            mapped = _FIEMAP.unpack_from(buf)[3]
            last = mapped == 0
            for i in range(mapped):
                logical, _, length, _, _, flags, *_ = _FIEMAP_EXTENT.unpack_from(
                    buf, _FIEMAP.size + i * _FIEMAP_EXTENT.size)
                if not flags & _EXTENT_UNWRITTEN:
                    written += length
                    if flags & _EXTENT_SHARED:
                        shared += length
                start = logical + length
                last = last or bool(flags & _EXTENT_LAST)
            if last:
                return written, shared


def free_bytes(path: Path | str) -> int:
    """Space left for files under ``path``, as df's Avail column."""
    return shutil.disk_usage(path).free


# -- the page cache ----------------------------------------------------------------------
DROP_CACHES = Path("/proc/sys/vm/drop_caches")


def can_drop_caches() -> bool:
    return os.geteuid() == 0 and os.access(DROP_CACHES, os.W_OK)


def settle_cache(cold: bool, warm: Iterator[Path] | list[Path]) -> None:
    """Write back dirty pages (so no run pays for the one before), then either drop the
    page cache or read the data of ``warm`` into it."""
    os.sync()
    if cold:
        DROP_CACHES.write_text("3\n")
        return
    for path in warm:
        with open(path, "rb", buffering=0) as f:
            fd = f.fileno()
            for start, end in data_ranges(fd, os.fstat(fd).st_size):
                for off in range(start, end, WRITE_STEP):
                    os.pread(fd, min(WRITE_STEP, end - off), off)


# -- a reflink filesystem ----------------------------------------------------------------
class LoopXfs:
    """An xfs with reflink=1 on a loop device over a sparse image file, mounted."""

    def __init__(self, image: Path, device: str, mountpoint: Path) -> None:
        self.image = image
        self.device = device
        self.mountpoint = mountpoint
        self.mounted = True

    @classmethod
    def make(cls, image: Path, mountpoint: Path, size: int) -> LoopXfs:
        with open(image, "xb") as f:
            f.truncate(size)
        try:
            device = _run(["losetup", "--find", "--show", str(image)]).strip()
        except BaseException:
            image.unlink()
            raise
        try:
            _run(["mkfs.xfs", "-q", "-m", "reflink=1", device])
            mountpoint.mkdir()
            _run(["mount", "-t", "xfs", device, str(mountpoint)])
        except BaseException:
            subprocess.run(["losetup", "-d", device], check=False)
            image.unlink()
            raise
        return cls(image, device, mountpoint)

    def used(self) -> int:
        st = os.statvfs(self.mountpoint)
        return (st.f_blocks - st.f_bfree) * st.f_frsize

    def close(self) -> list[str]:
        """Unmount, detach the loop device, remove the image; the problems met. A
        filesystem that stays busy is left mounted (and said so)."""
        problems: list[str] = []
        for attempt in range(10):
            res = subprocess.run(["umount", str(self.mountpoint)], capture_output=True,
                                 text=True, check=False)
            if res.returncode == 0:
                self.mounted = False
                break
            if attempt == 9:
                return [f"umount {self.mountpoint}: {res.stderr.strip()}; left mounted on "
                        f"{self.device}"]
            time.sleep(0.5)
        res = subprocess.run(["losetup", "-d", self.device], capture_output=True, text=True,
                             check=False)
        if res.returncode != 0:
            problems.append(f"losetup -d {self.device}: {res.stderr.strip()}")
        with contextlib.suppress(OSError):
            self.mountpoint.rmdir()
        with contextlib.suppress(FileNotFoundError):
            self.image.unlink()
        return problems


def mounts_under(path: Path) -> list[str]:
    """Mount points at or below ``path`` (from /proc/self/mounts)."""
    prefix = str(path).rstrip("/") + "/"
    found = []
    for line in Path("/proc/self/mounts").read_text().splitlines():
        point = line.split()[1].replace("\\040", " ")
        if point == str(path) or point.startswith(prefix):
            found.append(point)
    return found


def _run(argv: list[str]) -> str:
    res = subprocess.run(argv, capture_output=True, text=True, check=False)
    if res.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} exited {res.returncode}: "
                           f"{res.stderr.strip() or res.stdout.strip()}")
    return res.stdout
