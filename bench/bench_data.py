"""The data-operation benchmarks, virtstore side by side with libvirt.

    .venv/bin/python bench/bench_data.py [--quick] [--cache cold|warm|both]

Clone of a sparse raw volume, reflink clone on xfs, sparse upload and download, zero
wipe of an allocated volume. Both sides work on the same files in the same directories;
every result is checked (same bytes, allocation). Prints one table (workload, virtstore,
libvirt, ratio, goal, met?) and writes it as JSON to bench/results/data.json.
Measurement only: a missed goal is reported, never raised. See bench/README.md.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import signal
import sys
import time
import traceback
import xml.etree.ElementTree as ET
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

# The helpers sit next to this file (bench/ is not a package).
sys.path.insert(0, str(Path(__file__).resolve().parent))

import virtstore
from _data import (
    GiB,
    LoopXfs,
    MiB,
    allocated,
    can_drop_caches,
    content_digest,
    dir_pool_xml,
    fill,
    free_bytes,
    fs_type,
    make_workdir,
    mounts_under,
    settle_cache,
    volume_xml,
    write_spread,
    written_and_shared,
    zeros_digest,
)
from _libvirt import DEFAULT_URI, Libvirt
from bench_core import (
    Report,
    Row,
    describe,
    finish_report,
    open_libvirt,
    print_table,
    run_command,
    timed,
    write_json,
)
from virtstore.api import JOB_DONE, Connection, JobInfo
from virtstore.errors import NoSuchVolume

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results" / "data.json"
TITLE = "virtstore vs libvirt: data operations"
DATA = "data"  # the virtstore pool on the work directory's filesystem
REFLINK = "reflink"  # the virtstore pool on the loop-mounted xfs
WORKLOADS = ("clone", "reflink", "upload", "download", "wipe")
MARGIN = 1 * GiB  # free space left over on top of what the largest workload writes
ALLOC_SLACK = 0.02  # "about" an allocation: within 2% (plus 1 MiB of metadata)


def size_text(n: int) -> str:
    return f"{n / GiB:.4g} GiB" if n >= GiB else f"{n / MiB:.4g} MiB"


def about(actual: int, expected: int) -> bool:
    return abs(actual - expected) <= expected * ALLOC_SLACK + MiB


# -- settings ------------------------------------------------------------------------
@dataclass
class Settings:
    clone_size: int = 2 * GiB
    clone_chunks: int = 16
    clone_chunk: int = 64 * MiB
    reflink_size: int = 10 * GiB
    reflink_chunks: int = 16
    reflink_chunk: int = 4 * MiB
    # Room for a second full copy: libvirt preallocates the target before it clones.
    xfs_size: int = 22 * GiB
    stream_size: int = 1 * GiB
    stream_chunks: int = 32
    stream_chunk: int = 16 * MiB
    wipe_size: int = 1 * GiB
    repeats: int = 3
    caches: tuple[str, ...] = ("cold", "warm")
    workloads: tuple[str, ...] = WORKLOADS
    uri: str = DEFAULT_URI

    @classmethod
    def quick(cls) -> Settings:
        return cls(clone_size=256 * MiB, clone_chunk=8 * MiB, reflink_size=1 * GiB,
                   reflink_chunk=1 * MiB, xfs_size=4 * GiB, stream_size=128 * MiB,
                   stream_chunk=2 * MiB, wipe_size=128 * MiB, repeats=1)

    def disk_needed(self) -> int:
        """Bytes the largest workload writes under the work directory at once (each one
        removes its files before the next starts), plus a margin. The xfs image is sparse:
        only its metadata and the data written into it count."""
        clone = 3 * self.clone_chunks * self.clone_chunk  # source and one clone per side
        stream = 6 * self.stream_chunks * self.stream_chunk  # sources, targets, downloads
        wipe = 2 * self.wipe_size
        reflink = 2 * self.reflink_chunks * self.reflink_chunk + 256 * MiB
        need = {"clone": clone, "upload": stream, "download": stream, "wipe": wipe,
                "reflink": reflink}
        return max(need[w] for w in self.workloads) + MARGIN


# -- measuring -----------------------------------------------------------------------
@dataclass
class Trial:
    """One side of a workload: ``setup`` (untimed) before every run, then ``run`` timed;
    ``warm`` are the files read into the page cache before a warm run; ``flush`` are
    files whose fsync after the run is timed on its own (the run + fsync is kept apart)."""

    setup: Callable[[], object]
    run: Callable[[], object]
    warm: list[Path] = field(default_factory=list)
    flush: list[Path] = field(default_factory=list)


Side = Trial | str  # a trial, or why there is none


def compare(report: Report, row: Row, cold: bool, repeats: int,
            sides: dict[str, Side]) -> dict[str, list[float]]:
    """Best of ``repeats`` for each side, alternating the sides; the page cache settled
    the same way before every run. An exception becomes the side's note. Returns the
    times of run + fsync of the sides that have files to ``flush``."""
    samples: dict[str, list[float]] = {side: [] for side in sides}
    flushed: dict[str, list[float]] = {}
    failed: dict[str, str] = {s: t for s, t in sides.items() if isinstance(t, str)}
    for attempt in range(repeats):
        for side, trial in sides.items():
            if side in failed or isinstance(trial, str):
                continue
            try:
                trial.setup()
                settle_cache(cold, trial.warm)
                elapsed = timed(trial.run)
                if trial.flush:
                    flushed.setdefault(side, []).append(
                        elapsed + timed(partial(fsync_files, trial.flush)))
            except Exception as exc:
                print(f"\n{side} failed in '{row.workload}':", file=sys.stderr)
                traceback.print_exc()
                failed[side] = f"error: {type(exc).__name__}: {exc}"
                continue
            samples[side].append(elapsed)
            print(f"  {row.workload}: {side} run {attempt + 1}: {elapsed:.3f} s",
                  file=sys.stderr)
    for side in sides:
        if samples[side]:
            setattr(row, side, min(samples[side]))
        else:
            setattr(row, f"{side}_note", failed.get(side, "not run"))
    report.meta.setdefault("samples", {})[row.workload] = samples
    if flushed:
        report.meta["samples"][f"{row.workload}, until on disk"] = flushed
    return flushed


def fsync_files(paths: list[Path]) -> None:
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@dataclass
class Check:
    """What one side's result looks like; ``ok`` against the workload's expectation."""

    ok: bool
    text: str


def check_row(report: Report, workload: str, goal: str,
              checks: dict[str, Check | str]) -> None:
    """A row of checks: met when virtstore's passes; libvirt's is shown beside it."""
    row = report.add(Row(workload, "check", goal, 1.0))
    for side, check in checks.items():
        if isinstance(check, str):
            setattr(row, f"{side}_note", check)
            continue
        if side == "virtstore":
            row.virtstore = 1.0 if check.ok else 0.0
        setattr(row, f"{side}_note", check.text if check.ok else f"FAILED: {check.text}")
    report.meta.setdefault("checks", {})[workload] = {
        side: (c if isinstance(c, str) else {"ok": c.ok, "text": c.text})
        for side, c in checks.items()}


def bytes_verdict(path: Path, expected: str, size: int,
                  same: str = "same bytes") -> tuple[bool, str]:
    """Whether ``path`` holds the bytes whose content_digest is ``expected``, in words."""
    actual = path.stat().st_size
    if actual != size:
        return False, f"bytes DIFFER: size {actual:,} B, not {size:,}"
    if content_digest(path) != expected:
        return False, "bytes DIFFER"
    return True, same


NO_RESULT = Check(False, "nothing to check: the runs failed")


def guarded(fn: Callable[[], Check]) -> Check | str:
    try:
        return fn()
    except Exception as exc:
        return f"error: {type(exc).__name__}: {exc}"


# -- the two sides -------------------------------------------------------------------
class Bench:
    """The run's state: settings, report, the virtstore connection, libvirt (or why it
    is missing) and the pools both sides see on the same directories."""

    def __init__(self, s: Settings, report: Report, work: Path, conn: Connection,
                 lv: Libvirt | str) -> None:
        self.s = s
        self.report = report
        self.work = work
        self.conn = conn
        self.lv = lv if isinstance(lv, Libvirt) else None
        self.lv_missing = "libvirt not available" if self.lv is None else ""
        self.tag = f"vsbench-{os.getpid()}"
        self.data_dir = work / "data"
        self.lv_data: Any = None

    # -- pools -----------------------------------------------------------------
    def start_data_pools(self) -> None:
        self.data_dir.mkdir()
        self.conn.pool_define_xml(dir_pool_xml(DATA, self.data_dir))
        self.conn.pool_start(DATA)
        if self.lv is not None:
            try:
                self.lv_data = self.lv.define_started_pool(
                    dir_pool_xml(f"{self.tag}-data", self.data_dir))
            except Exception as exc:
                traceback.print_exc()
                self.lv_missing = f"error: libvirt pool: {exc}"

    def lv_pool_name(self, pool: Any) -> str:
        return str(pool.name())

    def remove_data(self, src: Path, *targets: str) -> None:
        """Remove a workload's source and targets from the data pool's directory."""
        for path in (src, *(self.data_dir / t for t in targets)):
            path.unlink(missing_ok=True)
        with contextlib.suppress(Exception):
            self.refresh(DATA, self.lv_data)

    def refresh(self, vs_pool: str, lv_pool: Any) -> None:
        """Both sides rescan after files were made or removed behind their back."""
        self.conn.pool_refresh(vs_pool)
        if lv_pool is not None:
            lv_pool.refresh(0)

    # -- virtstore -------------------------------------------------------------
    def vs_wait(self, job: JobInfo) -> JobInfo:
        info = self.conn.job_wait(job.id)
        if info.state != JOB_DONE:
            raise RuntimeError(f"{info.kind} job {info.state}: {info.error}")
        return info

    def vs_delete(self, pool: str, name: str) -> None:
        with contextlib.suppress(NoSuchVolume):
            self.conn.volume_delete(pool, name)

    # -- libvirt ---------------------------------------------------------------
    def lv_side(self, pool: Any, make: Callable[[], Trial]) -> Side:
        """libvirt's trial, or why there is none."""
        if self.lv is None or pool is None:
            return self.lv_missing or "libvirt not available"
        try:
            return make()
        except Exception as exc:
            traceback.print_exc()
            return f"error: {type(exc).__name__}: {exc}"

    def lv_delete(self, pool: Any, name: str) -> None:
        assert self.lv is not None
        try:
            vol = pool.storageVolLookupByName(name)
        except self.lv.lv.libvirtError:
            return
        vol.delete(0)

    def lv_check(self, pool: Any, fn: Callable[[], Check]) -> Check | str:
        if self.lv is None or pool is None:
            return self.lv_missing or "libvirt not available"
        return guarded(fn)

    def virsh(self, *args: str) -> list[str]:
        return ["virsh", "-q", "-c", self.s.uri, *args]

    def cache_rows(self, name: str, goal: str, target: float | None, *,
                   absolute: bool = False) -> list[tuple[bool, Row]]:
        return [(cache == "cold",
                 self.report.add(Row(f"{name}, {cache} cache", "s", goal, target,
                                     absolute=absolute)))
                for cache in self.s.caches]


def renamed_volume_xml(xml: str, name: str) -> str:
    """The source volume's XML with another name: what ``virsh vol-clone`` sends."""
    root = ET.fromstring(xml)
    node = root.find("name")
    if node is None:
        raise ValueError("volume XML without <name>")
    node.text = name
    return ET.tostring(root, encoding="unicode")


# -- workloads -----------------------------------------------------------------------
def bench_clone(b: Bench) -> None:
    s = b.s
    src = b.data_dir / "clone-src.img"
    targets = {"virtstore": "clone-vs.img", "libvirt": "clone-lv.img"}
    try:
        data = write_spread(src, s.clone_size, s.clone_chunks, s.clone_chunk)
        b.refresh(DATA, b.lv_data)
        expected = content_digest(src)
        sides: dict[str, Side] = {"virtstore": Trial(
            setup=lambda: b.vs_delete(DATA, targets["virtstore"]),
            run=lambda: b.vs_wait(b.conn.volume_clone(DATA, src.name, targets["virtstore"])),
            warm=[src])}

        def libvirt_trial() -> Trial:
            pool = b.lv_data
            src_vol = pool.storageVolLookupByName(src.name)
            xml = renamed_volume_xml(src_vol.XMLDesc(0), targets["libvirt"])
            return Trial(setup=lambda: b.lv_delete(pool, targets["libvirt"]),
                         run=lambda: pool.createXMLFrom(xml, src_vol, 0), warm=[src])

        sides["libvirt"] = b.lv_side(b.lv_data, libvirt_trial)
        name = f"clone {size_text(s.clone_size)} raw, {size_text(data)} data"
        for cold, row in b.cache_rows(name, "≤ 0.5×", 0.5):
            compare(b.report, row, cold, s.repeats, sides)

        def check(side: str) -> Check:
            path = b.data_dir / targets[side]
            if not path.exists():
                return NO_RESULT
            same, verdict = bytes_verdict(path, expected, s.clone_size)
            alloc = allocated(path)
            return Check(same and about(alloc, data), f"{verdict}, {size_text(alloc)} allocated")

        check_row(b.report, "clone: same bytes as the source, allocation",
                  f"same, ~{size_text(data)}",
                  {"virtstore": guarded(lambda: check("virtstore")),
                   "libvirt": b.lv_check(b.lv_data, lambda: check("libvirt"))})
    finally:
        b.remove_data(src, *targets.values())


def bench_reflink(b: Bench) -> None:
    s = b.s
    name = f"reflink clone {size_text(s.reflink_size)} preallocated raw, xfs"
    free = free_bytes(b.work)
    if free < s.xfs_size + MARGIN:
        for _, row in b.cache_rows(name, "< 0.1 s", 0.1, absolute=True):
            row.virtstore_note = row.libvirt_note = (
                f"skipped: the {size_text(s.xfs_size)} xfs image needs that much free, "
                f"{size_text(free)} left")
        return
    try:
        xfs = LoopXfs.make(b.work / "xfs.img", b.work / "xfs", s.xfs_size)
    except Exception as exc:
        traceback.print_exc()
        for _, row in b.cache_rows(name, "< 0.1 s", 0.1, absolute=True):
            row.virtstore_note = row.libvirt_note = f"error: xfs on a loop device: {exc}"
        return
    b.report.meta["reflink_fs"] = {"type": "xfs reflink=1", "size": s.xfs_size,
                                   "device": xfs.device}
    lv_pool: Any = None
    try:
        src = xfs.mountpoint / "big.img"
        targets = {"virtstore": "big-vs.img", "libvirt": "big-lv.img"}
        data = write_spread(src, s.reflink_size, s.reflink_chunks, s.reflink_chunk,
                            preallocate=True)
        b.conn.pool_define_xml(dir_pool_xml(REFLINK, xfs.mountpoint))
        b.conn.pool_start(REFLINK)
        lv_error = ""
        if b.lv is not None and b.lv_data is not None:
            try:
                lv_pool = b.lv.define_started_pool(
                    dir_pool_xml(f"{b.tag}-reflink", xfs.mountpoint))
            except Exception as exc:
                traceback.print_exc()
                lv_error = f"error: libvirt pool: {exc}"
        expected = content_digest(src)
        sides: dict[str, Side] = {"virtstore": Trial(
            setup=lambda: b.vs_delete(REFLINK, targets["virtstore"]),
            run=lambda: b.vs_wait(b.conn.volume_clone(REFLINK, src.name,
                                                      targets["virtstore"], reflink=True)),
            warm=[src])}

        def libvirt_trial() -> Trial:
            assert b.lv is not None
            flags = b.lv.lv.VIR_STORAGE_VOL_CREATE_REFLINK
            src_vol = lv_pool.storageVolLookupByName(src.name)
            xml = renamed_volume_xml(src_vol.XMLDesc(0), targets["libvirt"])
            return Trial(setup=lambda: b.lv_delete(lv_pool, targets["libvirt"]),
                         run=lambda: lv_pool.createXMLFrom(xml, src_vol, flags), warm=[src])

        sides["libvirt"] = lv_error or b.lv_side(lv_pool, libvirt_trial)
        for cold, row in b.cache_rows(name, "< 0.1 s", 0.1, absolute=True):
            compare(b.report, row, cold, s.repeats, sides)
            if row.libvirt is not None:
                row.libvirt_note = "createXMLFrom, VIR_STORAGE_VOL_CREATE_REFLINK"

        def check(side: str) -> Check:
            path = xfs.mountpoint / targets[side]
            if not path.exists():
                return NO_RESULT
            same, verdict = bytes_verdict(path, expected, s.reflink_size)
            written, shared = written_and_shared(path)
            return Check(same and written >= data and shared == written,
                         f"{verdict}, "
                         f"{size_text(allocated(path))} allocated (source "
                         f"{size_text(allocated(src))}), {size_text(shared)} of it shared")

        check_row(b.report, "reflink clone: same bytes, extents shared",
                  "same, all shared",
                  {"virtstore": guarded(lambda: check("virtstore")),
                   "libvirt": lv_error or b.lv_check(lv_pool, lambda: check("libvirt"))})
    finally:
        with contextlib.suppress(Exception):
            b.conn.pool_stop(REFLINK)
        with contextlib.suppress(Exception):
            b.conn.pool_undefine(REFLINK)
        if lv_pool is not None and b.lv is not None:
            b.report.notes.extend(b.lv.drop_pool(lv_pool))
        b.report.notes.extend(xfs.close())


def stream_source(b: Bench, path: Path) -> int:
    return write_spread(path, b.s.stream_size, b.s.stream_chunks, b.s.stream_chunk)


def stream_name(b: Bench, verb: str, data: int) -> str:
    holes = 1 - data / b.s.stream_size
    return f"{verb} {size_text(b.s.stream_size)}, {holes:.0%} holes"


def bench_upload(b: Bench) -> None:
    s = b.s
    src = b.work / "upload-src.img"
    targets = {"virtstore": "up-vs.img", "libvirt": "up-lv.img"}
    try:
        data = stream_source(b, src)
        expected = content_digest(src)

        def vs_setup() -> None:
            b.vs_delete(DATA, targets["virtstore"])
            b.conn.volume_create_xml(DATA, volume_xml(targets["virtstore"], "raw",
                                                      s.stream_size, allocation=0))

        def vs_run() -> None:
            with open(src, "rb") as f:
                b.vs_wait(b.conn.volume_upload(DATA, targets["virtstore"], f))

        sides: dict[str, Side] = {"virtstore": Trial(vs_setup, vs_run, [src])}

        def libvirt_trial() -> Trial:
            pool = b.lv_data
            xml = volume_xml(targets["libvirt"], "raw", s.stream_size, allocation=0)
            argv = b.virsh("vol-upload", "--pool", b.lv_pool_name(pool), "--sparse",
                           targets["libvirt"], str(src))

            def setup() -> None:
                b.lv_delete(pool, targets["libvirt"])
                pool.createXML(xml, 0)

            # virsh returns with the data still in the page cache; virtstore's job ends
            # after an fsync. The fsync of libvirt's volume is timed on its own.
            return Trial(setup, lambda: run_command(argv), [src],
                         flush=[b.data_dir / targets["libvirt"]])

        sides["libvirt"] = b.lv_side(b.lv_data, libvirt_trial)
        for cold, row in b.cache_rows(stream_name(b, "upload", data), "< 1× (faster)", 1.0):
            flushed = compare(b.report, row, cold, s.repeats, sides)
            if row.libvirt is not None:
                row.libvirt_note = "virsh vol-upload --sparse"
            if flushed.get("libvirt"):
                durable = Row(f"{row.workload}, until on disk", "s", "record", None,
                              virtstore=row.virtstore, libvirt=min(flushed["libvirt"]),
                              virtstore_note="the same runs (the job fsyncs)",
                              libvirt_note="virsh vol-upload --sparse, then fsync")
                b.report.rows.insert(b.report.rows.index(row) + 1, durable)
        check_row(b.report, "upload: same bytes, sparse", f"same, ~{size_text(data)}",
                  {"virtstore": guarded(lambda: sparse_check(b.data_dir / targets["virtstore"],
                                                             expected, s.stream_size, data)),
                   "libvirt": b.lv_check(b.lv_data, lambda: sparse_check(
                       b.data_dir / targets["libvirt"], expected, s.stream_size, data))})
    finally:
        b.remove_data(src, *targets.values())


def bench_download(b: Bench) -> None:
    s = b.s
    src = b.data_dir / "download-src.img"
    sinks = {"virtstore": b.work / "down-vs.img", "libvirt": b.work / "down-lv.img"}
    try:
        data = stream_source(b, src)
        b.refresh(DATA, b.lv_data)
        expected = content_digest(src)

        def vs_run() -> None:
            with open(sinks["virtstore"], "wb") as f:
                b.vs_wait(b.conn.volume_download(DATA, src.name, f))

        sides: dict[str, Side] = {"virtstore": Trial(
            lambda: sinks["virtstore"].unlink(missing_ok=True), vs_run, [src])}

        def libvirt_trial() -> Trial:
            argv = b.virsh("vol-download", "--pool", b.lv_pool_name(b.lv_data), "--sparse",
                           src.name, str(sinks["libvirt"]))
            return Trial(lambda: sinks["libvirt"].unlink(missing_ok=True),
                         lambda: run_command(argv), [src])

        sides["libvirt"] = b.lv_side(b.lv_data, libvirt_trial)
        for cold, row in b.cache_rows(stream_name(b, "download", data), "< 1× (faster)", 1.0):
            compare(b.report, row, cold, s.repeats, sides)
            if row.libvirt is not None:
                row.libvirt_note = "virsh vol-download --sparse"
        check_row(b.report, "download: same bytes, sparse", f"same, ~{size_text(data)}",
                  {"virtstore": guarded(lambda: sparse_check(sinks["virtstore"], expected,
                                                             s.stream_size, data)),
                   "libvirt": b.lv_check(b.lv_data, lambda: sparse_check(
                       sinks["libvirt"], expected, s.stream_size, data))})
    finally:
        for path in (src, *sinks.values()):
            path.unlink(missing_ok=True)
        with contextlib.suppress(Exception):
            b.refresh(DATA, b.lv_data)


def sparse_check(path: Path, expected: str, size: int, data: int) -> Check:
    if not path.exists():
        return NO_RESULT
    same, verdict = bytes_verdict(path, expected, size)
    alloc = allocated(path)
    return Check(same and about(alloc, data), f"{verdict}, {size_text(alloc)} allocated")


def bench_wipe(b: Bench) -> None:
    s = b.s
    targets = {"virtstore": b.data_dir / "wipe-vs.img", "libvirt": b.data_dir / "wipe-lv.img"}
    piece = os.urandom(16 * MiB)
    try:
        for path in targets.values():
            with open(path, "xb") as f:
                f.truncate(s.wipe_size)
        b.refresh(DATA, b.lv_data)

        def refill(side: str) -> None:
            """Every run starts from a volume full of data, as the first one did."""
            fill(targets[side], s.wipe_size, piece)
            b.refresh(DATA, b.lv_data if side == "libvirt" else None)

        sides: dict[str, Side] = {"virtstore": Trial(
            lambda: refill("virtstore"),
            lambda: b.vs_wait(b.conn.volume_wipe(DATA, targets["virtstore"].name, "zero")),
            [targets["virtstore"]])}

        def libvirt_trial() -> Trial:
            assert b.lv is not None
            vol = b.lv_data.storageVolLookupByName(targets["libvirt"].name)
            zero = b.lv.lv.VIR_STORAGE_VOL_WIPE_ALG_ZERO
            return Trial(lambda: refill("libvirt"), lambda: vol.wipePattern(zero, 0),
                         [targets["libvirt"]])

        sides["libvirt"] = b.lv_side(b.lv_data, libvirt_trial)
        name = f"zero-wipe {size_text(s.wipe_size)} allocated raw"
        for cold, row in b.cache_rows(name, "record", None):
            compare(b.report, row, cold, s.repeats, sides)
        zeros = zeros_digest(s.wipe_size)

        def check(side: str) -> Check:
            path = targets[side]
            same, verdict = bytes_verdict(path, zeros, s.wipe_size, "reads zeros")
            alloc = allocated(path)
            return Check(same and about(alloc, s.wipe_size),
                         f"{verdict}, {size_text(alloc)} allocated")

        check_row(b.report, "zero-wipe: reads zeros, stays allocated",
                  f"zeros, ~{size_text(s.wipe_size)}",
                  {"virtstore": guarded(lambda: check("virtstore")),
                   "libvirt": b.lv_check(b.lv_data, lambda: check("libvirt"))})
    finally:
        for path in targets.values():
            path.unlink(missing_ok=True)
        with contextlib.suppress(Exception):
            b.refresh(DATA, b.lv_data)


STEPS: dict[str, Callable[[Bench], None]] = {
    "clone": bench_clone, "reflink": bench_reflink, "upload": bench_upload,
    "download": bench_download, "wipe": bench_wipe,
}


# -- running -------------------------------------------------------------------------
def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--quick", action="store_true",
                   help="a smoke run: volumes of 128 MiB to 1 GiB, one run per side")
    p.add_argument("--repeats", type=int, help="runs per side and cache state (best kept)")
    p.add_argument("--cache", choices=("cold", "warm", "both"), default="both",
                   help="page cache before each run: dropped, warmed with the inputs, or "
                        "one row of each (default)")
    p.add_argument("--only", help=f"comma-separated workloads of {', '.join(WORKLOADS)}")
    # Under /var/lib, where images live; on this workplace's machines file creation under
    # /tmp and /var/tmp is some 30x slower than elsewhere on the same disk.
    p.add_argument("--workdir", default="/var/lib", help="where the temporary pools go")
    p.add_argument("--uri", default=DEFAULT_URI, help="libvirt URI of the reference")
    p.add_argument("--no-libvirt", action="store_true", help="measure virtstore only")
    p.add_argument("--keep", action="store_true", help="keep the work directory")
    p.add_argument("--json", type=Path, default=RESULTS, help="where the JSON goes")
    args = p.parse_args(argv)
    s = Settings.quick() if args.quick else Settings()
    s.uri = args.uri
    if args.repeats is not None:
        if args.repeats < 1:
            p.error("--repeats must be at least 1")
        s.repeats = args.repeats
    s.caches = ("cold", "warm") if args.cache == "both" else (args.cache,)
    if args.only:
        chosen = tuple(w.strip() for w in args.only.split(",") if w.strip())
        unknown = [w for w in chosen if w not in WORKLOADS]
        if unknown or not chosen:
            p.error(f"--only: unknown workload {', '.join(unknown)}; use {', '.join(WORKLOADS)}")
        s.workloads = tuple(w for w in WORKLOADS if w in chosen)
    args.settings = s
    return args


def run(s: Settings, work: Path, lv: Libvirt | str) -> Report:
    report = Report()
    report.meta["load_average_before"] = os.getloadavg()
    describe(report, s, lv)
    report.meta.update({"workdir": str(work), "workdir_fs": fs_type(str(work)),
                        "free_bytes_before": free_bytes(work)})
    if isinstance(lv, str):
        report.notes.append(f"libvirt not available: {lv}")
    if "cold" in s.caches and not can_drop_caches():
        s.caches = tuple(c for c in s.caches if c != "cold") or ("warm",)
        report.notes.append("the page cache cannot be dropped (not root): warm runs only")
    report.meta["caches"] = list(s.caches)
    conn = virtstore.connect(root=str(work / "vs-root"))
    b = Bench(s, report, work, conn, lv)
    try:
        b.start_data_pools()
        for name in s.workloads:
            print(f"{name} ...", file=sys.stderr)
            started = time.monotonic()
            try:
                STEPS[name](b)
            except Exception as exc:  # a broken workload does not stop the others
                traceback.print_exc()
                report.notes.append(f"{name}: {type(exc).__name__}: {exc}")
            print(f"{name}: {time.monotonic() - started:.0f} s", file=sys.stderr)
    finally:
        conn.close()
    return finish_report(report, libvirt_ran=b.lv is not None)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    s: Settings = args.settings
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so the cleanup below runs
    need, free = s.disk_needed(), free_bytes(args.workdir)
    if free < need:
        print(f"{args.workdir} has {size_text(free)} free; these workloads need "
              f"{size_text(need)}", file=sys.stderr)
        return 1
    work = make_workdir(args.workdir)
    lv = "disabled by --no-libvirt" if args.no_libvirt else open_libvirt(args.uri)
    try:
        report = run(s, work, lv)
    finally:
        problems = lv.close() if isinstance(lv, Libvirt) else []
        for problem in problems:
            print(f"cleanup: {problem}", file=sys.stderr)
        left = mounts_under(work)
        if args.keep:
            print(f"kept {work}", file=sys.stderr)
        elif left:
            print(f"cleanup: {', '.join(left)} still mounted: left {work}", file=sys.stderr)
        else:
            shutil.rmtree(work, ignore_errors=True)
    print_table(report, TITLE)
    write_json(report, args.json)
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
