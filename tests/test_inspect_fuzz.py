"""Hostile guest filesystems: mutated superblocks and metadata give an error (or a
plain "unknown") for that filesystem, within a time limit, and nothing else."""

from __future__ import annotations

import random
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from inspect_fixtures import build_plain, can_build
from virtstore.errors import OperationInvalid
from virtstore.inspect import run
from virtstore.inspect.guest import find_boot, inspect_guest
from virtstore.inspect.parts import Region, regions
from virtstore.inspect.source import FileSource, GuestDataError
from virtstore.inspect.worker import found_list, probe

MiB = 1 << 20


class Mem:
    """``data`` followed by zeros up to ``size`` bytes (an image whose tail is empty)."""

    def __init__(self, data: bytearray, size: int | None = None) -> None:
        self.data = data
        self._size = len(data) if size is None else size

    @property
    def size(self) -> int:
        return self._size

    def pread(self, offset: int, length: int) -> bytes:
        piece = bytes(self.data[offset:offset + length])
        return piece + bytes(min(length, self._size - offset) - len(piece))


def _image(tmp: Path, kind: str) -> tuple[bytearray, int]:
    p = tmp / f"{kind}.img"
    with open(p, "wb") as fh:
        fh.truncate((300 if kind == "xfs" else 160 if kind == "btrfs" else 40) * MiB)
    argv = {"ext4": ["mkfs.ext4", "-q", "-F"], "xfs": ["mkfs.xfs", "-q", "-f"],
            "btrfs": ["mkfs.btrfs", "-q", "-f"], "vfat": ["mkfs.vfat", "-F", "32"],
            "swap": ["mkswap"]}[kind]
    subprocess.run([*argv, str(p)], check=True, capture_output=True)
    # Only the first 1 MiB matters to the superblock parsers (btrfs: up to 68 KiB); the
    # rest reads as zeros.
    with open(p, "rb") as fh:
        head = fh.read(MiB)
    return bytearray(head), p.stat().st_size


def _mutate(rng: random.Random, data: bytearray, span: int) -> bytearray:
    out = bytearray(data)
    for _ in range(rng.randint(1, 16)):
        pos = rng.randrange(span)
        out[pos] = rng.choice((0, 0xFF, rng.randrange(256), out[pos] ^ (1 << rng.randrange(8))))
    return out


@pytest.mark.skipif(any(shutil.which(t) is None for t in ("mkfs.ext4", "mkfs.xfs",
                                                           "mkfs.btrfs", "mkfs.vfat")),
                    reason="mkfs tools are not installed")
def test_mutated_superblocks_never_escape(tmp_path: Path) -> None:
    rng = random.Random(20240607)
    spans = {"ext4": 2048 + 4096, "xfs": 512, "btrfs": 0x10000 + 4096, "vfat": 1024,
             "swap": 4096}
    started = time.monotonic()
    outcomes: dict[str, int] = {}
    for kind, span in spans.items():
        clean, size = _image(tmp_path, kind)
        assert probe(Region("/dev/sda", Mem(clean, size), 0, size))[0].type == kind
        for _ in range(80):
            data = _mutate(rng, clean, span)
            t0 = time.monotonic()
            info, err = probe(Region("/dev/sda", Mem(data, size), 0, size))
            assert time.monotonic() - t0 < 5
            key = "error" if err else info.type
            outcomes[key] = outcomes.get(key, 0) + 1
            if info.size is not None:
                assert 0 <= info.size and (info.used or 0) >= 0 and (info.available or 0) >= 0
    assert sum(outcomes.values()) == 400
    assert outcomes.get("error", 0) > 0  # the checks did refuse some
    assert time.monotonic() - started < 120


def test_mutated_partition_tables_never_escape() -> None:
    rng = random.Random(7)
    import struct
    import uuid
    import zlib

    disk = bytearray(4 * MiB)
    disk[446 + 4] = 0xEE
    struct.pack_into("<II", disk, 446 + 8, 1, 8191)
    disk[510:512] = b"\x55\xaa"
    entries = bytearray(128 * 128)
    entries[:16] = uuid.uuid4().bytes_le
    struct.pack_into("<QQ", entries, 32, 2048, 4095)
    disk[1024:1024 + len(entries)] = entries
    hdr = bytearray(92)
    hdr[:8] = b"EFI PART"
    struct.pack_into("<IIIIQQQQ16sQIII", hdr, 8, 0x10000, 92, 0, 0, 1, 8191, 34, 8158,
                     uuid.uuid4().bytes_le, 2, 128, 128, zlib.crc32(entries))
    struct.pack_into("<I", hdr, 16, zlib.crc32(hdr))
    disk[512:604] = hdr
    assert regions(Mem(disk))[0] == "gpt"
    for _ in range(200):
        data = _mutate(rng, disk, 2048)
        try:
            _table, regs = regions(Mem(data))
        except GuestDataError:
            continue
        for r in regs:
            assert r.offset + r.size <= len(data)


@pytest.mark.skipif(can_build() is not None, reason=str(can_build()))
def test_mutated_images_in_the_worker(tmp_path: Path) -> None:
    """Metadata blocks of a filled ext4 mutated, read by The Sleuth Kit in the worker:
    each run ends in a result or one error, inside its time limit."""
    img, _k, _i = build_plain(tmp_path / "src")
    clean = bytearray(img.read_bytes())
    rng = random.Random(99)
    started = time.monotonic()
    results = {"ok": 0, "error": 0}
    for i in range(25):
        data = _mutate(rng, clean, 2 * MiB)
        bad = tmp_path / f"bad{i}.raw"
        bad.write_bytes(data)
        t0 = time.monotonic()
        found = run.df(str(bad), timeout=20)
        assert len(found["filesystems"]) == 1
        try:
            run.single("boot", str(bad), "", timeout=20)
            results["ok"] += 1
        except OperationInvalid:
            results["error"] += 1
        assert time.monotonic() - t0 < 45
        bad.unlink()
    assert sum(results.values()) == 25
    assert time.monotonic() - started < 300


class Recorder:
    """A source that notes every read: the metadata a clean run parses."""

    def __init__(self, inner: FileSource) -> None:
        self.inner = inner
        self.reads: list[tuple[int, int]] = []

    @property
    def size(self) -> int:
        return self.inner.size

    def pread(self, offset: int, length: int) -> bytes:
        self.reads.append((offset, length))
        return self.inner.pread(offset, length)


def _metadata_reads(path: Path) -> list[tuple[int, int]]:
    """The small reads (metadata, not file contents) past the partition table that a
    clean inspection and boot file search make."""
    rec = Recorder(FileSource(str(path)))
    _table, found = found_list(rec)
    find_boot(inspect_guest(found))
    rec.inner.close()
    return sorted({(o, n) for o, n in rec.reads if n <= 64 << 10 and o >= MiB})


@pytest.mark.skipif(can_build() is not None, reason=str(can_build()))
def test_mutated_xfs_and_btrfs_in_the_worker(tmp_path: Path) -> None:
    """A Fedora-like disk (xfs /boot, btrfs root with subvolumes) with the metadata that
    a clean run reads mutated, then inspected and its boot files looked for (libfsxfs
    and dissect.btrfs in the worker): each run ends in a result or one error, inside its
    time limit."""
    import os

    from inspect_fixtures import build_fedora

    disk = build_fedora(tmp_path / "src").raw
    reads = _metadata_reads(disk)
    assert len(reads) > 10
    rng = random.Random(1234)
    started = time.monotonic()
    results = {"ok": 0, "error": 0}
    for i in range(30):
        bad = tmp_path / f"bad{i}.raw"
        subprocess.run(["cp", "--sparse=always", str(disk), str(bad)], check=True)
        fd = os.open(bad, os.O_RDWR)
        try:
            for offset, length in rng.sample(reads, rng.randint(1, 4)):
                for _ in range(rng.randint(1, 16)):
                    os.pwrite(fd, bytes([rng.randrange(256)]), offset + rng.randrange(length))
        finally:
            os.close(fd)
        t0 = time.monotonic()
        assert len(run.df(str(bad), timeout=20)["filesystems"]) == 3
        for op, extra in (("inspect", ()), ("boot", ("",))):
            try:
                run.single(op, str(bad), *extra, timeout=20)
                results["ok"] += 1
            except OperationInvalid as exc:
                assert str(exc) and "\n" not in str(exc)
                # The xfs is /boot: a broken one costs its own entry, not the OS that
                # inspect finds on the btrfs.
                assert op == "boot" or "xfs" not in str(exc), exc
                results["error"] += 1
        assert time.monotonic() - t0 < 70
        bad.unlink()
    assert sum(results.values()) == 60
    assert time.monotonic() - started < 600
