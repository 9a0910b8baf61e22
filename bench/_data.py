"""Test pools for the benchmarks: a work directory and directories full of volumes.

A pool is 70% sparse raw files of various sizes and 30% qcow2 images. The qcow2 images
are copies of a few templates made once with ``qemu-img create``: only the non-zero
blocks of a template are written, so each copy stays sparse, like the original, and
10,000 volumes take seconds to make instead of thousands of qemu-img runs.
"""

from __future__ import annotations

import os
import random
import subprocess
import sys
import tempfile
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
