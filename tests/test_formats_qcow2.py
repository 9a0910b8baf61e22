"""create_qcow2 against qemu-img: same bytes, same info, clean check, same refusals."""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from virtstore.errors import InvalidArgument
from virtstore.formats.probe import probe_image
from virtstore.formats.qcow2 import create_qcow2

pytestmark = pytest.mark.skipif(
    subprocess.run(["which", "qemu-img"], capture_output=True).returncode != 0,
    reason="qemu-img is not installed")

KIB, MIB, GIB, TIB = 1 << 10, 1 << 20, 1 << 30, 1 << 40
SIZES = [0, 1, 512, MIB, GIB + 1, TIB, 64 * TIB]
CLUSTERS = [512, 1024, 2048, 4096, 8192, 65536, 512 * KIB, 2 * MIB]


def qemu_create(path: Path, size: int, cluster_size: int, compat: str, lazy: bool,
                backing: str | None) -> subprocess.CompletedProcess[str]:
    opts = f"cluster_size={cluster_size},compat={compat},lazy_refcounts={'on' if lazy else 'off'}"
    argv = ["qemu-img", "create", "-q", "-f", "qcow2", "-o", opts]
    if backing:
        argv += ["-b", backing, "-F", "raw"]
    return subprocess.run([*argv, str(path), str(size)], capture_output=True, text=True)


def ours(path: Path, size: int, **kw: Any) -> None:
    path.touch()
    create_qcow2(str(path), size, **kw)


def info(path: Path) -> dict[str, Any]:
    out = subprocess.run(["qemu-img", "info", "--output=json", str(path)], check=True,
                         capture_output=True, text=True).stdout
    d = json.loads(out)
    data = d["format-specific"]["data"]
    return {k: d.get(k) for k in ("format", "virtual-size", "cluster-size", "backing-filename",
                                  "backing-filename-format")} | {
        "compat": data["compat"], "lazy": data.get("lazy-refcounts"),
        "refcount-bits": data.get("refcount-bits")}


def check_clean(path: Path) -> None:
    proc = subprocess.run(["qemu-img", "check", "--output=json", str(path)],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    for key in ("corruptions", "leaks", "check-errors", "leaks-fixed", "corruptions-fixed"):
        assert report.get(key, 0) == 0, report


@pytest.fixture
def base(tmp_path: Path) -> str:
    path = tmp_path / "base.raw"
    path.write_bytes(b"")
    return "base.raw"


@pytest.mark.parametrize("cluster_size", CLUSTERS)
@pytest.mark.parametrize(("compat", "lazy"), [("0.10", False), ("1.1", False), ("1.1", True)])
@pytest.mark.parametrize("with_backing", [False, True])
def test_same_bytes_as_qemu_img(tmp_path: Path, base: str, cluster_size: int, compat: str,
                                lazy: bool, with_backing: bool) -> None:
    backing = str(tmp_path / base) if with_backing else None
    for size in SIZES:
        q, m = tmp_path / "q.qcow2", tmp_path / "m.qcow2"
        for p in (q, m):
            p.unlink(missing_ok=True)
        proc = qemu_create(q, size, cluster_size, compat, lazy, backing)
        kw: dict[str, Any] = {"cluster_size": cluster_size, "compat": compat,
                              "lazy_refcounts": lazy, "backing_file": backing,
                              "backing_format": "raw" if backing else None}
        if proc.returncode != 0:
            assert "too large" in proc.stderr
            with pytest.raises(InvalidArgument, match="too large"):
                ours(m, size, **kw)
            continue
        ours(m, size, **kw)
        assert q.read_bytes() == m.read_bytes(), (size, cluster_size, compat)
        assert info(m) == info(q)
        check_clean(m)
        probed = probe_image(str(m))
        assert (probed.virtual_size, probed.cluster_size, probed.compat,
                probed.lazy_refcounts) == (-(-size // 512) * 512, cluster_size, compat, lazy)


@pytest.mark.parametrize("size", [40 * GIB, 128 * GIB])
def test_multi_cluster_refcount_table_is_valid(tmp_path: Path, size: int) -> None:
    # 512-byte clusters and a huge L1: qemu moves its refcount table, we lay it out
    # compactly. Not the same bytes, but the same image as far as qemu can tell.
    q, m = tmp_path / "q.qcow2", tmp_path / "m.qcow2"
    assert qemu_create(q, size, 512, "1.1", False, None).returncode == 0
    ours(m, size, cluster_size=512)
    check_clean(m)
    assert info(m) == info(q)


def test_relative_backing_and_fd_target(tmp_path: Path, base: str) -> None:
    path = tmp_path / "top.qcow2"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        create_qcow2(fd, 5 * MIB, backing_file=base, backing_format="raw")
        os.fstat(fd)  # still open: the caller owns it
    finally:
        os.close(fd)
    q = tmp_path / "q.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", base, "-F", "raw",
                    str(q), str(5 * MIB)], check=True, cwd=tmp_path)
    assert path.read_bytes() == q.read_bytes()
    check_clean(path)
    assert info(path)["backing-filename"] == "base.raw"


@pytest.mark.parametrize(("kw", "message"), [
    ({"compat": "0.10", "lazy_refcounts": True}, "lazy refcounts"),
    ({"compat": "0.9"}, "compat"),
    ({"cluster_size": 256}, "Cluster size"),
    ({"cluster_size": 3 * 4096}, "Cluster size"),
    ({"cluster_size": 4 * MIB}, "Cluster size"),
    ({"backing_file": "b.raw"}, "backing format"),
    ({"backing_format": "raw"}, "backing file"),
    ({"backing_file": "x" * 1024, "backing_format": "raw"}, "backing file name"),
    ({"cluster_size": 512, "backing_file": "x" * 400, "backing_format": "raw"}, "too long"),
])
def test_refusals(tmp_path: Path, kw: dict[str, Any], message: str) -> None:
    path = tmp_path / "x.qcow2"
    with pytest.raises(InvalidArgument, match=message):
        ours(path, MIB, **kw)
    assert path.stat().st_size == 0  # nothing written before the refusal


def test_size_limits(tmp_path: Path) -> None:
    with pytest.raises(InvalidArgument):
        ours(tmp_path / "neg", -1)
    with pytest.raises(InvalidArgument, match="too large"):
        ours(tmp_path / "huge", 1 << 63, cluster_size=2 * MIB)
    with pytest.raises(InvalidArgument, match="too large"):
        ours(tmp_path / "l1", 128 * GIB + 512, cluster_size=512)


def test_ten_times_faster_than_qemu_img(tmp_path: Path) -> None:
    n = 20
    start = time.perf_counter()
    for i in range(n):
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(tmp_path / f"q{i}"),
                        "10G"], check=True)
    theirs = time.perf_counter() - start
    start = time.perf_counter()
    for i in range(n):
        fd = os.open(tmp_path / f"m{i}", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            create_qcow2(fd, 10 * GIB)
        finally:
            os.close(fd)
    assert (time.perf_counter() - start) * 10 < theirs
