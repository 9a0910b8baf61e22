"""Sparse copies, reflinks and their failures on real filesystems."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from data_fixtures import (
    GiB,
    MiB,
    allocated,
    block,
    chunks_layout,
    digest,
    free_bytes,
    loop_fs,
    make_sparse,
    needs_root,
    tmpfs,
)
from virtstore.data.copy import copy_file, copy_sparse, filesystem_type, reflink
from virtstore.data.extents import data_extents, is_zero, punch_hole, zero_runs
from virtstore.data.monitor import Monitor
from virtstore.errors import Cancelled, InvalidArgument, NoSpace, Unsupported

LAYOUT = chunks_layout(GiB, 16, 4 * MiB)  # 1 GiB, 16 data chunks, 64 MiB of data


@pytest.fixture(scope="module")
def sparse_src(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("copy") / "src.img"
    make_sparse(path, GiB, LAYOUT)
    return path


@pytest.fixture(scope="module")
def xfs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    with loop_fs(tmp_path_factory.mktemp("xfs"), "xfs", "512M") as mnt:
        yield mnt


@pytest.fixture(scope="module")
def btrfs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    with loop_fs(tmp_path_factory.mktemp("btrfs"), "btrfs", "512M") as mnt:
        yield mnt


def open_pair(src: Path, dst: Path) -> tuple[int, int]:
    return (os.open(src, os.O_RDONLY),
            os.open(dst, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600))


# -- extents ---------------------------------------------------------------------------

def test_data_extents_finds_the_chunks(sparse_src: Path) -> None:
    fd = os.open(sparse_src, os.O_RDONLY)
    try:
        assert list(data_extents(fd, 0, GiB)) == LAYOUT
        # Clipped to the range asked for; past the end of the file is a hole.
        first_off = LAYOUT[0][0]
        assert list(data_extents(fd, first_off + MiB, first_off + 2 * MiB)) == [
            (first_off + MiB, MiB)]
        assert list(data_extents(fd, GiB, 2 * GiB)) == []
    finally:
        os.close(fd)


def test_is_zero_and_zero_runs() -> None:
    assert is_zero(bytes(10 << 20))
    assert is_zero(memoryview(bytearray(4096)))
    assert is_zero(b"")
    data = bytearray(10 << 20)
    data[-1] = 1
    assert not is_zero(data)
    buf = bytearray(16 * 4096)
    buf[4096 * 3 + 5] = 1
    buf[4096 * 4] = 2
    buf[4096 * 9] = 3
    assert list(zero_runs(buf)) == [(0, 3 * 4096, True), (3 * 4096, 5 * 4096, False),
                                    (5 * 4096, 9 * 4096, True), (9 * 4096, 10 * 4096, False),
                                    (10 * 4096, 16 * 4096, True)]


def test_punch_hole(tmp_path: Path) -> None:
    path = tmp_path / "f"
    path.write_bytes(block(1, 8 * MiB))
    fd = os.open(path, os.O_RDWR)
    try:
        punch_hole(fd, MiB, 2 * MiB)
        assert list(data_extents(fd, 0, 8 * MiB)) == [(0, MiB), (3 * MiB, 5 * MiB)]
    finally:
        os.close(fd)
    data = path.read_bytes()
    assert len(data) == 8 * MiB
    assert is_zero(data[MiB:3 * MiB])
    assert data[3 * MiB:] == block(1, 8 * MiB)[3 * MiB:]


# -- copy_sparse -------------------------------------------------------------------------

@pytest.mark.parametrize("allow_clone,detect_zeroes", [(True, False), (False, False),
                                                       (False, True)])
def test_copy_sparse_copies_only_data(sparse_src: Path, tmp_path: Path, allow_clone: bool,
                                      detect_zeroes: bool) -> None:
    dst = tmp_path / "dst.img"
    progress: list[tuple[int, int]] = []
    m = Monitor(on_progress=lambda d, t: progress.append((d, t)))
    src_fd, dst_fd = open_pair(sparse_src, dst)
    try:
        written = copy_sparse(src_fd, dst_fd, monitor=m, allow_clone=allow_clone,
                              detect_zeroes=detect_zeroes)
    finally:
        os.close(src_fd)
        os.close(dst_fd)
    assert written == 64 * MiB
    assert os.path.getsize(dst) == GiB
    assert digest(dst) == digest(sparse_src)
    src_alloc = allocated(sparse_src)
    assert 64 * MiB <= src_alloc <= 65 * MiB  # ext4 may add an extent tree block
    assert 64 * MiB <= allocated(dst) <= 65 * MiB
    assert m.done == m.total == GiB
    assert progress[-1] == (GiB, GiB)


def test_copy_sparse_offsets_and_length(sparse_src: Path, tmp_path: Path) -> None:
    first, _ = LAYOUT[0]
    src_offset = first + 123  # inside the first chunk
    length = (LAYOUT[1][0] - first) + MiB  # to 1 MiB into the second chunk
    dst_offset = 5 * MiB + 7
    dst = tmp_path / "dst.img"
    src_fd, dst_fd = open_pair(sparse_src, dst)
    try:
        copy_sparse(src_fd, dst_fd, src_offset=src_offset, dst_offset=dst_offset,
                    length=length, monitor=Monitor())
    finally:
        os.close(src_fd)
        os.close(dst_fd)
    assert os.path.getsize(dst) == dst_offset + length
    assert digest(dst, dst_offset, length) == digest(sparse_src, src_offset, length)
    assert is_zero(dst.read_bytes()[:dst_offset])
    # Only the two pieces of data were written (and the hole between them was not).
    assert allocated(dst) <= 4 * MiB + MiB + 2 * MiB


def test_copy_sparse_length_past_the_source_end(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.write_bytes(block(3, MiB))
    dst = tmp_path / "dst"
    src_fd, dst_fd = open_pair(src, dst)
    try:
        copy_sparse(src_fd, dst_fd, length=3 * MiB, monitor=Monitor())
    finally:
        os.close(src_fd)
        os.close(dst_fd)
    data = dst.read_bytes()
    assert len(data) == 3 * MiB
    assert data[:MiB] == block(3, MiB) and is_zero(data[MiB:])


def test_detect_zeroes_skips_written_zeros(tmp_path: Path) -> None:
    src = tmp_path / "src"
    data = bytearray(block(4, 16 * MiB))
    data[2 * MiB:10 * MiB] = bytes(8 * MiB)  # allocated zeros
    src.write_bytes(data)
    assert allocated(src) >= 16 * MiB
    for detect, expect_max in ((True, 8 * MiB + MiB), (False, 17 * MiB)):
        dst = tmp_path / f"dst-{detect}"
        src_fd, dst_fd = open_pair(src, dst)
        try:
            copy_sparse(src_fd, dst_fd, monitor=Monitor(), detect_zeroes=detect)
        finally:
            os.close(src_fd)
            os.close(dst_fd)
        assert dst.read_bytes() == data
        assert allocated(dst) <= expect_max
        if not detect:
            assert allocated(dst) >= 16 * MiB


def test_holes_are_zeroed_in_a_target_with_old_data(sparse_src: Path, tmp_path: Path) -> None:
    dst = tmp_path / "old.img"
    make_sparse(dst, GiB, [(0, 128 * MiB), (GiB - 16 * MiB, 16 * MiB)])
    src_fd = os.open(sparse_src, os.O_RDONLY)
    dst_fd = os.open(dst, os.O_RDWR)
    try:
        copy_sparse(src_fd, dst_fd, monitor=Monitor())
    finally:
        os.close(src_fd)
        os.close(dst_fd)
    assert digest(dst) == digest(sparse_src)
    assert allocated(dst) <= 64 * MiB + MiB


def test_negative_offsets_are_refused(tmp_path: Path) -> None:
    with pytest.raises(InvalidArgument):
        copy_sparse(0, 1, src_offset=-1, monitor=Monitor())


def test_cancel_stops_the_copy(tmp_path: Path) -> None:
    src = tmp_path / "src"
    make_sparse(src, 512 * MiB, [(0, 256 * MiB)])
    dst = tmp_path / "dst"
    m: Monitor
    m = Monitor(should_cancel=lambda: m.done >= 16 * MiB)
    src_fd, dst_fd = open_pair(src, dst)
    try:
        with pytest.raises(Cancelled):
            copy_sparse(src_fd, dst_fd, monitor=m, allow_clone=False)
    finally:
        os.close(src_fd)
        os.close(dst_fd)
    assert 16 * MiB <= m.done < 256 * MiB
    assert allocated(dst) < 256 * MiB


def test_cancel_from_another_caller_stops_copy_file(tmp_path: Path) -> None:
    src = tmp_path / "src"
    make_sparse(src, 256 * MiB, [(0, 256 * MiB)])
    m = Monitor()
    m.cancel()
    with pytest.raises(Cancelled):
        copy_file(str(src), str(tmp_path / "dst"), reflink="never", monitor=m)
    assert m.done == 0


# -- copy_file and reflink ----------------------------------------------------------------

@needs_root
@pytest.mark.parametrize("fs", ["xfs", "btrfs"])
def test_reflink_shares_extents(fs: str, request: pytest.FixtureRequest,
                                tmp_path: Path) -> None:
    mnt: Path = request.getfixturevalue(fs)
    src = mnt / "src.img"
    make_sparse(src, GiB, LAYOUT)
    dst = mnt / "clone.img"
    before = free_bytes(mnt)
    m = Monitor()
    assert copy_file(str(src), str(dst), reflink="always", monitor=m) == "reflink"
    after = free_bytes(mnt)
    assert digest(dst) == digest(src)
    assert os.path.getsize(dst) == GiB
    assert m.done == m.total == GiB
    # A real copy would take 64 MiB; a clone shares the data extents.
    assert before - after < 8 * MiB
    frag = subprocess.run(["filefrag", "-v", str(dst)], capture_output=True, text=True)
    if frag.returncode == 0:
        assert "shared" in frag.stdout
    # Copy on write: changing the clone leaves the source alone.
    src_hash = digest(src)
    with open(dst, "r+b") as f:
        f.seek(LAYOUT[0][0])
        f.write(b"changed")
    assert digest(src) == src_hash
    # "never" really copies the data, without copy_file_range's implicit clone.
    before = free_bytes(mnt)
    assert copy_file(str(src), str(mnt / "copy.img"), reflink="never",
                     monitor=Monitor()) == "copy"
    assert before - free_bytes(mnt) >= 60 * MiB
    assert digest(mnt / "copy.img") == src_hash
    for p in (src, dst, mnt / "copy.img"):
        p.unlink()


def test_reflink_on_ext4(sparse_src: Path, tmp_path: Path) -> None:
    if filesystem_type(str(tmp_path)) != "ext4":
        pytest.skip(f"{tmp_path} is not on ext4")
    dst = tmp_path / "dst.img"
    with pytest.raises(Unsupported, match="ext4"):
        copy_file(str(sparse_src), str(dst), reflink="always", monitor=Monitor())
    m = Monitor()
    assert copy_file(str(sparse_src), str(dst), reflink="auto", monitor=m) == "copy"
    assert digest(dst) == digest(sparse_src)
    assert allocated(dst) <= 65 * MiB
    src_fd, dst_fd = open_pair(sparse_src, dst)
    try:
        assert reflink(src_fd, dst_fd) is False
    finally:
        os.close(src_fd)
        os.close(dst_fd)


@needs_root
def test_reflink_on_tmpfs(tmp_path: Path) -> None:
    with tmpfs(tmp_path) as mnt:
        src = mnt / "src.img"
        make_sparse(src, GiB, LAYOUT[:4])
        dst = mnt / "dst.img"
        with pytest.raises(Unsupported, match="tmpfs"):
            copy_file(str(src), str(dst), reflink="always", monitor=Monitor())
        assert copy_file(str(src), str(dst), reflink="auto", monitor=Monitor()) == "copy"
        assert digest(dst) == digest(src)
        assert allocated(dst) <= allocated(src) + MiB
        dst.unlink()
        src.unlink()


@needs_root
def test_reflink_across_filesystems(xfs: Path, tmp_path: Path) -> None:
    src = tmp_path / "src.img"
    make_sparse(src, 64 * MiB, [(0, MiB)])
    with pytest.raises(Unsupported, match="different filesystems"):
        copy_file(str(src), str(xfs / "x.img"), reflink="always", monitor=Monitor())
    (xfs / "x.img").unlink()


def test_copy_file_refuses_unknown_mode(tmp_path: Path) -> None:
    with pytest.raises(InvalidArgument, match="auto, always, never"):
        copy_file("/dev/null", str(tmp_path / "x"), reflink="sometimes", monitor=Monitor())


def test_copy_file_empties_an_existing_target(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.write_bytes(b"new")
    dst = tmp_path / "dst"
    dst.write_bytes(block(5, 3 * MiB))
    copy_file(str(src), str(dst), reflink="never", monitor=Monitor())
    assert dst.read_bytes() == b"new"


@needs_root
def test_no_space(tmp_path: Path) -> None:
    src = tmp_path / "src.img"
    make_sparse(src, 256 * MiB, chunks_layout(256 * MiB, 4, 16 * MiB))
    with loop_fs(tmp_path, "ext4", "32M") as mnt:
        for mode in ("auto", "never"):
            with pytest.raises(NoSpace):
                copy_file(str(src), str(mnt / f"dst-{mode}"), reflink=mode, monitor=Monitor())
            (mnt / f"dst-{mode}").unlink()


def test_copy_file_into_a_target_it_keeps(sparse_src: Path, tmp_path: Path) -> None:
    dst = tmp_path / "kept.img"
    make_sparse(dst, GiB, [(0, GiB // 2)])  # old data everywhere in the first half
    inode = os.stat(dst).st_ino
    copy_file(str(sparse_src), str(dst), reflink="never", monitor=Monitor(),
              keep_target=True)
    assert os.stat(dst).st_ino == inode
    assert digest(dst) == digest(sparse_src)
