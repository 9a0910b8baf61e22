"""upload, download and the sparse framing: 1 GiB with 50% holes, files and pipes."""

from __future__ import annotations

import io
import os
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from data_fixtures import GiB, MiB, allocated, block, chunks_layout, digest, make_sparse
from virtstore.data.monitor import Monitor
from virtstore.data.stream import (
    END,
    HOLE,
    MAGIC,
    RECORD,
    decode_sparse,
    download,
    encode_sparse,
    upload,
)
from virtstore.errors import Cancelled, InvalidArgument

LAYOUT = chunks_layout(GiB, 8, 64 * MiB)  # 1 GiB, half data, half holes
DATA = 512 * MiB


@pytest.fixture(scope="module")
def volume(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("stream") / "vol.img"
    make_sparse(path, GiB, LAYOUT)
    return path


def fresh(path: Path) -> int:
    return os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)


def assert_same_sparse(copy: Path, volume: Path) -> None:
    assert os.path.getsize(copy) == GiB
    assert digest(copy) == digest(volume)
    assert DATA <= allocated(copy) <= DATA + 2 * MiB


# -- upload --------------------------------------------------------------------------

def test_upload_from_a_file_reads_only_data(volume: Path, tmp_path: Path) -> None:
    dst = tmp_path / "up.img"
    fd = fresh(dst)
    m = Monitor()
    try:
        with open(volume, "rb") as src:
            assert upload(src, fd, monitor=m) == GiB
            assert src.tell() == GiB
    finally:
        os.close(fd)
    assert_same_sparse(dst, volume)
    assert m.done == m.total == GiB


def test_upload_from_a_pipe_keeps_holes(volume: Path, tmp_path: Path) -> None:
    dst = tmp_path / "up.img"
    fd = fresh(dst)
    try:
        with subprocess.Popen(["cat", str(volume)], stdout=subprocess.PIPE) as proc:
            assert proc.stdout is not None
            assert upload(proc.stdout, fd, monitor=Monitor()) == GiB
    finally:
        os.close(fd)
    assert_same_sparse(dst, volume)


def test_upload_from_a_pipe_without_sparse_writes_everything(tmp_path: Path) -> None:
    src = tmp_path / "src.img"
    make_sparse(src, 64 * MiB, [(0, MiB)])
    dst = tmp_path / "up.img"
    fd = fresh(dst)
    try:
        with subprocess.Popen(["cat", str(src)], stdout=subprocess.PIPE) as proc:
            assert proc.stdout is not None
            upload(proc.stdout, fd, sparse=False, monitor=Monitor())
    finally:
        os.close(fd)
    assert digest(dst) == digest(src)
    assert allocated(dst) >= 64 * MiB


def test_upload_at_an_offset_into_a_volume_with_old_data(tmp_path: Path) -> None:
    dst = tmp_path / "vol.img"
    dst.write_bytes(block(1, 16 * MiB))
    payload = bytes(4 * MiB) + block(2, MiB)  # zeros, then data
    fd = os.open(dst, os.O_RDWR)
    try:
        n = upload(io.BytesIO(payload), fd, offset=2 * MiB, length=len(payload),
                   monitor=Monitor())
    finally:
        os.close(fd)
    assert n == len(payload)
    data = dst.read_bytes()
    assert len(data) == 16 * MiB
    assert data[:2 * MiB] == block(1, 16 * MiB)[:2 * MiB]
    assert data[2 * MiB:7 * MiB] == payload  # the zeros replaced the old data
    assert data[7 * MiB:] == block(1, 16 * MiB)[7 * MiB:]
    assert allocated(dst) <= 12 * MiB + MiB  # and were punched, not written


def test_upload_of_a_short_source(tmp_path: Path) -> None:
    fd = fresh(tmp_path / "x")
    try:
        with pytest.raises(InvalidArgument, match="ended after 10 of 100 bytes"):
            upload(io.BytesIO(b"x" * 10), fd, length=100, monitor=Monitor())
        src = tmp_path / "short"
        src.write_bytes(b"y" * 10)
        with open(src, "rb") as f, pytest.raises(InvalidArgument):
            upload(f, fd, length=100, monitor=Monitor())
    finally:
        os.close(fd)


def test_upload_cancel(volume: Path, tmp_path: Path) -> None:
    fd = fresh(tmp_path / "x")
    m: Monitor
    m = Monitor(should_cancel=lambda: m.done > 100 * MiB)
    try:
        with subprocess.Popen(["cat", str(volume)], stdout=subprocess.PIPE) as proc:
            assert proc.stdout is not None
            with pytest.raises(Cancelled):
                upload(proc.stdout, fd, monitor=m)
            proc.kill()
    finally:
        os.close(fd)
    assert m.done < GiB


# -- download ------------------------------------------------------------------------

def test_download_to_a_file_keeps_holes(volume: Path, tmp_path: Path) -> None:
    dst = tmp_path / "down.img"
    src = os.open(volume, os.O_RDONLY)
    m = Monitor()
    try:
        with open(dst, "wb") as sink:
            assert download(src, sink, monitor=m) == GiB
            assert sink.tell() == GiB
    finally:
        os.close(src)
    assert_same_sparse(dst, volume)
    assert m.done == m.total == GiB


def test_download_to_a_file_without_sparse_allocates(tmp_path: Path) -> None:
    vol = tmp_path / "vol.img"
    make_sparse(vol, 32 * MiB, [(4 * MiB, MiB)])
    dst = tmp_path / "down.img"
    src = os.open(vol, os.O_RDONLY)
    try:
        with open(dst, "wb") as sink:
            download(src, sink, sparse=False, monitor=Monitor())
    finally:
        os.close(src)
    assert digest(dst) == digest(vol)
    assert allocated(dst) >= 32 * MiB


def _collect(read_fd: int, into: Path) -> threading.Thread:
    """Read a pipe into ``into`` through upload(), i.e. holes back from zeros."""
    def run() -> None:
        out = fresh(into)
        try:
            with os.fdopen(read_fd, "rb") as src:
                upload(src, out, monitor=Monitor())
        finally:
            os.close(out)

    t = threading.Thread(target=run)
    t.start()
    return t


def test_download_to_a_pipe_and_back(volume: Path, tmp_path: Path) -> None:
    dst = tmp_path / "through-pipe.img"
    r, w = os.pipe()
    reader = _collect(r, dst)
    src = os.open(volume, os.O_RDONLY)
    try:
        with os.fdopen(w, "wb") as sink:
            assert download(src, sink, monitor=Monitor()) == GiB
    finally:
        os.close(src)
        reader.join()
    assert_same_sparse(dst, volume)


def test_download_a_range(volume: Path, tmp_path: Path) -> None:
    off = LAYOUT[2][0] - MiB
    length = 66 * MiB
    src = os.open(volume, os.O_RDONLY)
    buf = io.BytesIO()
    try:
        download(src, buf, offset=off, length=length, monitor=Monitor())
    finally:
        os.close(src)
    with open(volume, "rb") as f:
        f.seek(off)
        assert buf.getvalue() == f.read(length)


# -- sparse framing ------------------------------------------------------------------

def test_encode_decode_round_trip(volume: Path, tmp_path: Path) -> None:
    src = os.open(volume, os.O_RDONLY)
    dst_path = tmp_path / "decoded.img"
    dst = fresh(dst_path)
    sent = 0
    holes = 0

    def counted(chunks: Iterator[bytes]) -> Iterator[bytes]:
        nonlocal sent, holes
        for c in chunks:
            sent += len(c)
            if len(c) == RECORD.size and c[:1] == HOLE:
                holes += 1
            yield c

    try:
        total = decode_sparse(counted(encode_sparse(src, 0, GiB, Monitor())), dst, 0,
                              Monitor())
    finally:
        os.close(src)
        os.close(dst)
    assert total == GiB
    assert_same_sparse(dst_path, volume)
    assert sent < DATA + MiB  # the holes did not travel as zeros
    assert holes == 9  # before, between and after the 8 data extents


def test_encode_turns_zero_blocks_into_holes(tmp_path: Path) -> None:
    path = tmp_path / "z.img"
    data = bytearray(block(3, 4 * MiB))
    data[MiB:3 * MiB] = bytes(2 * MiB)
    path.write_bytes(data)
    fd = os.open(path, os.O_RDONLY)
    try:
        stream = b"".join(encode_sparse(fd, 0, 4 * MiB, Monitor()))
        plain = b"".join(encode_sparse(fd, 0, 4 * MiB, Monitor(), detect_zeroes=False))
    finally:
        os.close(fd)
    assert len(stream) < 2 * MiB + 100
    assert len(plain) > 4 * MiB
    for s in (stream, plain):
        out = tmp_path / "out.img"
        fd = fresh(out)
        try:
            assert decode_sparse([s], fd, 0, Monitor()) == 4 * MiB
        finally:
            os.close(fd)
        assert out.read_bytes() == data


def test_decode_any_chunking_and_offset(tmp_path: Path) -> None:
    src_path = tmp_path / "s.img"
    make_sparse(src_path, 3 * MiB + 77, [(4096, 5000), (2 * MiB, 12345)])
    fd = os.open(src_path, os.O_RDONLY)
    try:
        stream = b"".join(encode_sparse(fd, 1000, 3 * MiB - 900, Monitor()))
    finally:
        os.close(fd)
    expected = src_path.read_bytes()[1000:1000 + 3 * MiB - 900]
    expected += bytes(3 * MiB - 900 - len(expected))  # past the end of the file: zeros
    for size in (1, 7, 17, 4096):
        out = tmp_path / f"o{size}.img"
        out.write_bytes(block(9, 8 * MiB))  # old data to be replaced in the range
        pieces = [stream[i:i + size] for i in range(0, len(stream), size)]
        ofd = os.open(out, os.O_RDWR)
        try:
            assert decode_sparse(pieces, ofd, 123, Monitor()) == len(expected)
        finally:
            os.close(ofd)
        assert out.read_bytes()[123:123 + len(expected)] == expected


@pytest.mark.parametrize("stream,message", [
    (b"NOTSPARS" + RECORD.pack(END, 0, 0), "bad magic"),
    (MAGIC + RECORD.pack(HOLE, 0, 10), "truncated"),
    (MAGIC + RECORD.pack(b"D", 0, 10) + b"abc", "truncated"),
    (MAGIC + RECORD.pack(b"D", 10, 2) + b"ab" + RECORD.pack(b"D", 5, 2) + b"cd"
     + RECORD.pack(END, 0, 20), "overlaps"),
    (MAGIC + RECORD.pack(b"X", 0, 0), "unknown record kind"),
    (MAGIC + RECORD.pack(HOLE, 0, 10) + RECORD.pack(END, 0, 5), "end record"),
    (MAGIC + RECORD.pack(END, 0, 5) + b"junk", "after the end record"),
])
def test_decode_refuses_malformed_streams(tmp_path: Path, stream: bytes, message: str) -> None:
    fd = fresh(tmp_path / "x")
    try:
        with pytest.raises(InvalidArgument, match=message):
            decode_sparse([stream], fd, 0, Monitor())
    finally:
        os.close(fd)


def test_download_to_a_file_opened_for_appending(tmp_path: Path) -> None:
    vol = tmp_path / "vol.img"
    make_sparse(vol, 8 * MiB, [(2 * MiB, MiB)])
    dst = tmp_path / "log.img"
    dst.write_bytes(b"head")
    src = os.open(vol, os.O_RDONLY)
    try:
        with open(dst, "ab") as sink:
            download(src, sink, monitor=Monitor())
    finally:
        os.close(src)
    assert dst.read_bytes() == b"head" + vol.read_bytes()
