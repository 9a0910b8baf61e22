"""wipe: libvirt's algorithms on real files, a loop device and scrub."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from data_fixtures import (
    GiB,
    MiB,
    alive,
    allocated,
    block,
    chunks_layout,
    loop_device,
    loop_fs,
    make_sparse,
    needs_root,
    processes_with,
)
from virtstore.data.extents import data_extents, is_zero
from virtstore.data.monitor import Monitor
from virtstore.data.wipe import ALGORITHMS, ScrubProgress, wipe
from virtstore.errors import Busy, Cancelled, InvalidArgument

needs_scrub = pytest.mark.skipif(shutil.which("scrub") is None,
                                 reason="scrub (Debian scrub) is not installed")


def blocks(path: Path) -> list[bytes]:
    data = path.read_bytes()
    return [data[i:i + 4096] for i in range(0, len(data), 4096)]


def test_algorithms_are_libvirts() -> None:
    assert set(ALGORITHMS) == {"zero", "nnsa", "dod", "bsi", "gutmann", "schneier",
                               "pfitzner7", "pfitzner33", "random", "trim"}


def test_unknown_algorithm(tmp_path: Path) -> None:
    path = tmp_path / "v"
    path.write_bytes(b"x")
    with pytest.raises(InvalidArgument, match="expected one of zero, nnsa, dod") as err:
        wipe(str(path), "shred", monitor=Monitor())
    assert "'shred'" in str(err.value)
    assert path.read_bytes() == b"x"


def test_zero_keeps_a_sparse_file_sparse(tmp_path: Path) -> None:
    path = tmp_path / "sparse.img"
    layout = chunks_layout(GiB, 16, 4 * MiB)
    make_sparse(path, GiB, layout)
    m = Monitor()
    wipe(str(path), "zero", monitor=m)
    assert os.path.getsize(path) == GiB
    assert allocated(path) < MiB
    assert m.done == m.total == GiB
    fd = os.open(path, os.O_RDONLY)
    try:
        assert list(data_extents(fd, 0, GiB)) == []
        for off, length in layout:
            assert is_zero(os.pread(fd, length, off))
    finally:
        os.close(fd)


def test_zero_keeps_an_allocated_file_allocated(tmp_path: Path) -> None:
    path = tmp_path / "full.img"
    path.write_bytes(block(1, 16 * MiB))
    wipe(str(path), "zero", monitor=Monitor())
    assert is_zero(path.read_bytes())
    assert os.path.getsize(path) == 16 * MiB
    assert allocated(path) >= 16 * MiB


def test_random_changes_every_block(tmp_path: Path) -> None:
    path = tmp_path / "r.img"
    path.write_bytes(block(2, 8 * MiB))
    before = blocks(path)
    m = Monitor()
    wipe(str(path), "random", monitor=m)
    after = blocks(path)
    assert len(after) == len(before)
    assert all(a != b and not is_zero(a) for a, b in zip(after, before, strict=True))
    assert len(set(after)) == len(after)
    assert m.done == m.total == 8 * MiB


def test_random_fills_a_sparse_file(tmp_path: Path) -> None:
    path = tmp_path / "r.img"
    make_sparse(path, 8 * MiB, [])
    wipe(str(path), "random", monitor=Monitor())
    assert allocated(path) >= 8 * MiB
    assert not any(is_zero(b) for b in blocks(path))


def test_trim_deallocates_a_file(tmp_path: Path) -> None:
    path = tmp_path / "t.img"
    path.write_bytes(block(3, 8 * MiB))
    wipe(str(path), "trim", monitor=Monitor())
    assert allocated(path) == 0
    assert os.path.getsize(path) == 8 * MiB
    assert is_zero(path.read_bytes())


@needs_scrub
@pytest.mark.parametrize("algorithm", ["dod", "schneier"])
def test_pattern_algorithm_runs_scrub(tmp_path: Path, algorithm: str) -> None:
    path = tmp_path / "p.img"
    path.write_bytes(block(4, 4 * MiB))
    before = blocks(path)
    progress: list[int] = []
    m = Monitor(on_progress=lambda d, t: progress.append(d))
    wipe(str(path), algorithm, monitor=m)
    after = blocks(path)
    assert os.path.getsize(path) == 4 * MiB
    assert not set(before) & set(after)
    passes = {"dod": 4, "schneier": 7}[algorithm]
    assert m.done == m.total == passes * 4 * MiB
    assert progress == sorted(progress)


def test_scrub_progress_parser() -> None:
    # What scrub 2.6 prints for `-p dod`, cut where stream() cuts it (after "\n" and ".").
    text = ("scrub: using DoD 5220.22-M patterns\n"
            "scrub: scrubbing /v/p.img 4194304 bytes (~4096KB)\n"
            "scrub: random  |" + "." * 48 + "|\n"
            "scrub: 0x00    |" + "." * 24)
    p = ScrubProgress(4)
    pieces: list[str] = []
    start = 0
    for i, ch in enumerate(text):
        if ch in "\n.":
            pieces.append(text[start:i + 1])
            start = i + 1
    pieces.append(text[start:])
    for piece in pieces:
        p.feed(piece)
    assert p.bars == 1
    assert p.fraction == pytest.approx(1.5 / 4)


@needs_scrub
def test_cancel_kills_scrub(tmp_path: Path) -> None:
    path = tmp_path / "big-scrub-target.img"
    make_sparse(path, 512 * MiB, [])
    pids: list[int] = []
    m: Monitor

    def on_progress(done: int, total: int) -> None:
        pids.extend(p for p in processes_with(str(path)) if p not in pids)

    m = Monitor(on_progress=on_progress, should_cancel=lambda: m.done > 0)
    with pytest.raises(Cancelled):
        wipe(str(path), "gutmann", monitor=m)
    assert 0 < m.done < m.total
    assert pids, "scrub was never seen running"
    assert not any(alive(p) for p in pids)


def test_cancel_stops_a_random_wipe(tmp_path: Path) -> None:
    path = tmp_path / "r.img"
    make_sparse(path, 512 * MiB, [])
    m: Monitor
    m = Monitor(should_cancel=lambda: m.done >= 8 * MiB)
    with pytest.raises(Cancelled):
        wipe(str(path), "random", monitor=m)
    assert 8 * MiB <= m.done < 512 * MiB
    assert allocated(path) < 512 * MiB


@needs_root
def test_block_device_zero_and_trim(tmp_path: Path) -> None:
    image = tmp_path / "dev.img"
    image.write_bytes(block(5, 16 * MiB))
    with loop_device(image) as dev:
        m = Monitor()
        wipe(dev, "zero", monitor=m, is_block=True)
        assert m.done == 16 * MiB
        with open(dev, "rb") as f:
            assert is_zero(f.read())
    assert is_zero(image.read_bytes())
    image.write_bytes(block(6, 16 * MiB))
    with loop_device(image) as dev:
        wipe(dev, "trim", monitor=Monitor())
    # A loop device passes discards on as punched holes in its file.
    assert allocated(image) < 16 * MiB


@needs_root
def test_a_mounted_device_is_refused(tmp_path: Path) -> None:
    with loop_fs(tmp_path, "ext4", "32M") as mnt:
        dev = next(line.split()[0] for line in Path("/proc/mounts").read_text().splitlines()
                   if line.split()[1] == str(mnt))
        with pytest.raises(Busy):
            wipe(dev, "zero", monitor=Monitor(), is_block=True)
