"""Throughput of the data functions on this host: ``python -m virtstore.data.bench``.

Files are made in ``--dir`` (default /var/tmp) and removed afterwards; the page cache
is warm (the numbers are the code's cost, not the disk's). ``--reflink-gib N`` also
times a reflink copy of an N GiB file on a loop-mounted xfs made for it (root only).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator

from virtstore.data.convert import convert
from virtstore.data.copy import copy_file, copy_sparse
from virtstore.data.monitor import Monitor
from virtstore.data.stream import decode_sparse, download, encode_sparse, upload
from virtstore.data.wipe import wipe

MiB = 1 << 20
GiB = 1 << 30


def _make(path: str, size: int, chunks: int, chunk: int) -> None:
    piece = os.urandom(min(chunk, 16 * MiB))
    with open(path, "wb") as f:
        f.truncate(size)
        step = size // chunks
        for i in range(chunks):
            f.seek(i * step)
            left = chunk
            while left:
                left -= f.write(piece[:min(left, len(piece))])


def _fresh(path: str) -> int:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
    return os.open(path, os.O_RDWR | os.O_CREAT, 0o600)


def _timed(name: str, logical: int, data: int, fn: Callable[[], object]) -> None:
    start = time.perf_counter()
    fn()
    dt = time.perf_counter() - start
    print(f"{name:48s} {dt:7.3f} s  {logical / dt / GiB:8.2f} GiB/s logical  "
          f"{data / dt / MiB:8.0f} MiB/s of data")


def _copy(src: str, dst: str, **kw: bool) -> None:
    s, d = os.open(src, os.O_RDONLY), _fresh(dst)
    try:
        copy_sparse(s, d, monitor=Monitor(), **kw)
    finally:
        os.close(s)
        os.close(d)


def _upload_file(src: str, dst: str) -> None:
    d = _fresh(dst)
    try:
        with open(src, "rb") as f:
            upload(f, d, monitor=Monitor())
    finally:
        os.close(d)


def _upload_pipe(src: str, dst: str) -> None:
    d = _fresh(dst)
    try:
        with subprocess.Popen(["cat", src], stdout=subprocess.PIPE) as proc:
            assert proc.stdout is not None
            upload(proc.stdout, d, monitor=Monitor())
    finally:
        os.close(d)


def _download_file(src: str, dst: str) -> None:
    s = os.open(src, os.O_RDONLY)
    try:
        with open(dst, "wb") as f:
            download(s, f, monitor=Monitor())
    finally:
        os.close(s)


def _download_pipe(src: str) -> None:
    s = os.open(src, os.O_RDONLY)
    try:
        with subprocess.Popen(["cat"], stdin=subprocess.PIPE,
                              stdout=subprocess.DEVNULL) as proc:
            assert proc.stdin is not None
            download(s, proc.stdin, monitor=Monitor())
            proc.stdin.close()
    finally:
        os.close(s)


def _codec(src: str, dst: str) -> None:
    s, d = os.open(src, os.O_RDONLY), _fresh(dst)
    try:
        decode_sparse(encode_sparse(s, 0, os.path.getsize(src), Monitor()), d, 0, Monitor())
    finally:
        os.close(s)
        os.close(d)


@contextlib.contextmanager
def _xfs(workdir: str, size: int) -> Iterator[str]:
    image, mnt = os.path.join(workdir, "xfs.img"), os.path.join(workdir, "xfs")
    with open(image, "wb") as f:
        f.truncate(size)
    subprocess.run(["mkfs.xfs", "-q", "-m", "reflink=1", image], check=True)
    dev = subprocess.run(["losetup", "-f", "--show", image], check=True,
                         capture_output=True, text=True).stdout.strip()
    try:
        os.mkdir(mnt)
        subprocess.run(["mount", dev, mnt], check=True)
        try:
            yield mnt
        finally:
            subprocess.run(["umount", mnt], check=False)
    finally:
        subprocess.run(["losetup", "-d", dev], check=False)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m virtstore.data.bench")
    parser.add_argument("--dir", default="/var/tmp")
    parser.add_argument("--reflink-gib", type=int, default=0)
    args = parser.parse_args(argv)
    work = tempfile.mkdtemp(prefix="virtstore-bench-", dir=args.dir)
    try:

        def j(name: str) -> str:
            return os.path.join(work, name)

        _make(j("s16"), GiB, 16, 4 * MiB)
        _make(j("half"), GiB, 8, 64 * MiB)
        _make(j("full"), GiB, 1, GiB)
        print(f"in {work} ({os.uname().release}, {os.cpu_count()} CPUs)")
        modes: list[tuple[str, dict[str, bool]]] = [
            ("copy_file_range", {}), ("pread/pwrite", {"allow_clone": False}),
            ("detect_zeroes", {"detect_zeroes": True})]
        for name, kw in modes:
            _timed(f"copy_sparse 1 GiB, 16 chunks, {name}", GiB, 64 * MiB,
                   functools.partial(_copy, j("s16"), j("out"), **kw))
            _timed(f"copy_sparse 1 GiB fully allocated, {name}", GiB, GiB,
                   functools.partial(_copy, j("full"), j("out"), **kw))
        _timed("upload 1 GiB, 50% holes, from a file", GiB, GiB // 2,
               lambda: _upload_file(j("half"), j("out")))
        _timed("upload 1 GiB, 50% holes, from a pipe", GiB, GiB // 2,
               lambda: _upload_pipe(j("half"), j("out")))
        _timed("download 1 GiB, 50% holes, to a file", GiB, GiB // 2,
               lambda: _download_file(j("half"), j("out")))
        _timed("download 1 GiB, 50% holes, to a pipe", GiB, GiB // 2,
               lambda: _download_pipe(j("half")))
        _timed("encode_sparse | decode_sparse 1 GiB, 50% holes", GiB, GiB // 2,
               lambda: _codec(j("half"), j("out")))
        _timed("convert raw -> qcow2 1 GiB, 16 chunks", GiB, 64 * MiB,
               lambda: convert(j("s16"), "raw", _reset(j("out.qcow2")), "qcow2", None,
                               monitor=Monitor()))
        _timed("wipe zero 1 GiB, 50% holes", GiB, GiB // 2,
               lambda: wipe(j("half"), "zero", monitor=Monitor()))
        if args.reflink_gib:
            size = args.reflink_gib * GiB
            with _xfs(work, size + size // 8 + GiB) as mnt:
                src = os.path.join(mnt, "src")
                # Allocated (unwritten) extents with some written data among them: a
                # clone's cost is in the extent maps, and this spares the host disk
                # N GiB of writes to the loop image.
                with open(src, "wb") as f:
                    os.posix_fallocate(f.fileno(), 0, size)
                    block = os.urandom(MiB)
                    for off in range(0, size, 64 * MiB):
                        os.pwrite(f.fileno(), block, off)
                    os.fsync(f.fileno())
                _timed(f"copy_file reflink {args.reflink_gib} GiB on xfs", size, size,
                       lambda: copy_file(src, os.path.join(mnt, "clone"), reflink="always",
                                         monitor=Monitor()))
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _reset(path: str) -> str:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
    return path


if __name__ == "__main__":
    main()
