"""The core benchmarks, virtstore side by side with libvirt.

    .venv/bin/python bench/bench_core.py [--volumes 10000] [--creates 500] [--quick]

Refresh of a large dir pool, ``vol-list --details`` as a user runs it, volume creation,
lookups by name and by path, and the CLI's start-up time. Prints one table (workload,
virtstore, libvirt, ratio, goal, met?) and writes it as JSON to bench/results/core.json.
Measurement only: a missed goal is reported, never raised. See bench/README.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shutil
import signal
import subprocess
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import Any, Protocol

# The helpers sit next to this file (bench/ is not a package).
sys.path.insert(0, str(Path(__file__).resolve().parent))

import virtstore
from _data import (
    GiB,
    PoolContents,
    dir_pool_xml,
    make_templates,
    make_workdir,
    populate,
    volume_xml,
)
from _libvirt import DEFAULT_URI, Libvirt
from virtstore.api import Connection

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results" / "core.json"
POOL = "bench"
CREATE_POOL = "bench-create"
QCOW2_CHECK_SAMPLE = 20


# -- results -------------------------------------------------------------------------
@dataclass
class Row:
    """One workload: both measurements, and the goal on virtstore / libvirt (or, when
    ``absolute``, on virtstore's own value)."""

    workload: str
    unit: str  # "s" (lower is better), "/s" (higher is better) or "check" (count passed)
    goal: str
    target: float | None  # the ratio the goal asks for; None: for the record
    virtstore: float | None = None
    libvirt: float | None = None
    virtstore_note: str = ""
    libvirt_note: str = ""
    absolute: bool = False  # target is a time or rate for virtstore, not a ratio

    @property
    def higher_is_better(self) -> bool:
        return self.unit == "/s"

    @property
    def ratio(self) -> float | None:
        if self.virtstore is None or not self.libvirt:
            return None
        return self.virtstore / self.libvirt

    @property
    def met(self) -> bool | None:
        if self.unit == "check":  # target: how many must pass
            return None if self.virtstore is None else self.virtstore == self.target
        if self.absolute:
            if self.virtstore is None or self.target is None:
                return None
            return (self.virtstore >= self.target if self.higher_is_better
                    else self.virtstore <= self.target)
        ratio = self.ratio
        if ratio is None or self.target is None:
            return None
        return ratio >= self.target if self.higher_is_better else ratio <= self.target

    def to_dict(self) -> dict[str, Any]:
        return {"workload": self.workload, "unit": self.unit,
                "virtstore": self.virtstore, "libvirt": self.libvirt,
                "virtstore_note": self.virtstore_note or None,
                "libvirt_note": self.libvirt_note or None,
                "ratio": self.ratio, "goal": self.goal, "met": self.met}


@dataclass
class Report:
    rows: list[Row] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    meta: dict[str, Any] = field(default_factory=dict)

    def add(self, row: Row) -> Row:
        self.rows.append(row)
        return row


# -- timing --------------------------------------------------------------------------
def timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def best_of(runs: int, fn: Callable[[], object]) -> float:
    return min(timed(fn) for _ in range(runs))


def rate(count: int, fn: Callable[[], object]) -> float:
    return count / timed(fn)


def run_command(argv: Sequence[str]) -> None:
    """Run as a user would, output thrown away; a failure is an error, not a timing."""
    res = subprocess.run(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                         check=False)
    if res.returncode != 0:
        last = res.stderr.strip().splitlines()[-1:] or ["(no message)"]
        raise RuntimeError(f"{' '.join(argv[:3])} ... exited {res.returncode}: {last[0]}")


def measure(row: Row, side: str, fn: Callable[[], float]) -> None:
    """Fill one column of ``row``; an exception becomes the column's note."""
    try:
        value: float | None = fn()
        note = ""
    except Exception as exc:
        print(f"\n{side} failed in '{row.workload}':", file=sys.stderr)
        traceback.print_exc()
        value, note = None, f"error: {type(exc).__name__}: {exc}"
    setattr(row, side, value)
    setattr(row, f"{side}_note", note)


# -- the two sides -------------------------------------------------------------------
class VirtstoreSide:
    """The embedded engine on a state root under the work directory."""

    def __init__(self, work: Path) -> None:
        self.work = work
        self.root: Path | None = None
        self._conn: Connection | None = None

    @property
    def conn(self) -> Connection:
        if self._conn is None:
            raise RuntimeError("no virtstore connection (the pool scan before failed)")
        return self._conn

    def cold_refresh(self, contents: PoolContents, attempt: int) -> float:
        """A fresh state root: pool_start scans the directory into an empty index."""
        if self._conn is not None:
            self._conn.close()
            self._conn = None
        self.root = self.work / f"vs-root-{attempt}"
        conn = virtstore.connect(root=str(self.root))
        conn.pool_define_xml(dir_pool_xml(POOL, contents.path))
        elapsed = timed(lambda: conn.pool_start(POOL))
        self._conn = conn
        return elapsed

    def warm_refresh(self) -> None:
        self.conn.pool_refresh(POOL)

    def count(self) -> int:
        return len(self.conn.list_volumes(POOL))

    def vol_list_argv(self) -> list[str]:
        return [virtstore_command(), "--root", str(self.root), "vol-list", POOL, "--details"]

    def lookup_by_name(self, names: Sequence[str]) -> None:
        info = self.conn.volume_info
        for name in names:
            info(POOL, name)

    def lookup_by_path(self, paths: Sequence[str]) -> None:
        lookup = self.conn.volume_lookup_by_path
        for path in paths:
            lookup(path)

    def start_create_pool(self, path: Path) -> None:
        self.conn.pool_define_xml(dir_pool_xml(CREATE_POOL, path))
        self.conn.pool_start(CREATE_POOL, build=True)

    def create(self, xmls: Sequence[str]) -> None:
        create = self.conn.volume_create_xml
        for xml in xmls:
            create(CREATE_POOL, xml)

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None


class LibvirtSide:
    """libvirt's storage driver through python3-libvirt, on the same directories."""

    def __init__(self, lv: Libvirt) -> None:
        self.lv = lv
        self.tag = f"vsbench-{os.getpid()}"
        self.pool: Any = None
        self.create_pool: Any = None

    def start_pool(self, contents: PoolContents) -> None:
        self.pool = self.lv.define_started_pool(dir_pool_xml(self.tag, contents.path))

    def refresh(self) -> None:
        self.pool.refresh(0)

    def count(self) -> int:
        return int(self.pool.numOfVolumes())

    def vol_list_argv(self, uri: str) -> list[str]:
        return ["virsh", "-c", uri, "vol-list", self.tag, "--details"]

    def lookup_by_name(self, names: Sequence[str]) -> None:
        lookup = self.pool.storageVolLookupByName
        for name in names:
            lookup(name)

    def lookup_by_path(self, paths: Sequence[str]) -> None:
        lookup = self.lv.conn.storageVolLookupByPath
        for path in paths:
            lookup(path)

    def start_create_pool(self, path: Path) -> None:
        path.mkdir(parents=True, exist_ok=True)
        self.create_pool = self.lv.define_started_pool(
            dir_pool_xml(f"{self.tag}-create", path))

    def create(self, xmls: Sequence[str]) -> None:
        create = self.create_pool.createXML
        for xml in xmls:
            create(xml, 0)


def virtstore_command() -> str:
    """The `virtstore` next to this interpreter (the venv's), else the one on PATH."""
    beside = Path(sys.executable).parent / "virtstore"
    if beside.exists():
        return str(beside)
    found = shutil.which("virtstore")
    if found is None:
        raise RuntimeError("the virtstore command is not installed")
    return found


# -- workloads -----------------------------------------------------------------------
@dataclass
class Settings:
    volumes: int
    creates: int
    lookups: int
    repeats: int
    startup_runs: int
    uri: str


def bench_refresh(report: Report, s: Settings, contents: PoolContents, vs: VirtstoreSide,
                  lvs: LibvirtSide | None) -> None:
    n = f"{s.volumes:,}"
    cold = report.add(Row(f"refresh {n} vols, cold", "s", "≤ 0.5×", 0.5))
    warm = report.add(Row(f"refresh {n} vols, warm", "s", "≤ 0.5×", 0.5))
    measure(cold, "virtstore",
            lambda: min(vs.cold_refresh(contents, i) for i in range(s.repeats)))
    measure(warm, "virtstore", lambda: best_of(s.repeats, vs.warm_refresh))
    if lvs is not None:
        def libvirt_refresh() -> float:
            lvs.start_pool(contents)
            return best_of(s.repeats, lvs.refresh)

        measure(cold, "libvirt", libvirt_refresh)
        warm.libvirt, warm.libvirt_note = cold.libvirt, cold.libvirt_note
    check_counts(report, s.volumes, vs, lvs)


def check_counts(report: Report, expected: int, vs: VirtstoreSide,
                 lvs: LibvirtSide | None) -> None:
    """Both sides must see every volume, or the comparison means little."""
    seen: dict[str, int | str] = {"expected": expected}
    counters: dict[str, Callable[[], int]] = {"virtstore": vs.count}
    if lvs is not None:
        counters["libvirt"] = lvs.count
    for side, count in counters.items():
        try:
            seen[side] = count()
        except Exception as exc:
            seen[side] = f"error: {exc}"
        if seen[side] != expected:
            report.notes.append(f"{side} lists {seen[side]} volumes, expected {expected}")
    report.meta["volumes_seen"] = seen


def bench_vol_list(report: Report, s: Settings, contents: PoolContents, vs: VirtstoreSide,
                   lvs: LibvirtSide | None) -> None:
    row = report.add(Row(f"vol-list --details, {s.volumes:,} vols", "s", "≤ 0.1×", 0.1))
    names = set(contents.names)

    def timing(argv: list[str], side: str) -> float:
        listed = listed_volumes(argv, names)
        if listed != len(names):
            report.notes.append(f"{side} vol-list shows {listed} of {len(names)} volumes")
        return best_of(3, lambda: run_command(argv))

    measure(row, "virtstore", lambda: timing(vs.vol_list_argv(), "virtstore"))
    if lvs is not None:
        measure(row, "libvirt", lambda: timing(lvs.vol_list_argv(s.uri), "libvirt"))


def listed_volumes(argv: Sequence[str], names: set[str]) -> int:
    """How many of ``names`` start a line of the command's output (an untimed run)."""
    res = subprocess.run(argv, capture_output=True, text=True, check=False)
    first_words = (line.split(maxsplit=1) for line in res.stdout.splitlines())
    return sum(1 for words in first_words if words and words[0] in names)


def bench_lookups(report: Report, s: Settings, contents: PoolContents, vs: VirtstoreSide,
                  lvs: LibvirtSide | None) -> None:
    rng = random.Random(2)
    names = [contents.names[i % len(contents.names)] for i in range(s.lookups)]
    rng.shuffle(names)
    paths = [contents.volume_path(name) for name in names]
    by_name = report.add(Row(f"lookup by name, {s.lookups:,}", "/s", "≥ 1×", 1.0))
    by_path = report.add(Row(f"lookup by path, {s.lookups:,}", "/s", "≥ 1×", 1.0))
    measure(by_name, "virtstore", lambda: rate(len(names), lambda: vs.lookup_by_name(names)))
    measure(by_path, "virtstore", lambda: rate(len(paths), lambda: vs.lookup_by_path(paths)))
    if lvs is not None:
        measure(by_name, "libvirt",
                lambda: rate(len(names), lambda: lvs.lookup_by_name(names)))
        measure(by_path, "libvirt",
                lambda: rate(len(paths), lambda: lvs.lookup_by_path(paths)))


def create_xmls(count: int, fmt: str) -> list[str]:
    if fmt == "qcow2":
        return [volume_xml(f"new{i:05d}.qcow2", "qcow2", GiB) for i in range(count)]
    return [volume_xml(f"new{i:05d}.img", "raw", GiB, allocation=0) for i in range(count)]


class Creator(Protocol):
    def start_create_pool(self, path: Path) -> None: ...

    def create(self, xmls: Sequence[str]) -> None: ...


def bench_creates(report: Report, s: Settings, work: Path, vs: VirtstoreSide,
                  lvs: LibvirtSide | None) -> None:
    n = f"{s.creates:,}"
    qcow2 = report.add(Row(f"create {n} qcow2 1 GiB", "/s", "≥ 10×", 10.0))
    raw = report.add(Row(f"create {n} raw 1 GiB, alloc 0", "/s", "≥ 2×", 2.0))
    sides: dict[str, Creator] = {"virtstore": vs}
    if lvs is not None:
        sides["libvirt"] = lvs
    for side, impl in sides.items():
        try:
            impl.start_create_pool(work / f"{side}-create")
        except Exception as exc:
            traceback.print_exc()
            for row in (qcow2, raw):
                setattr(row, f"{side}_note", f"error: create pool: {exc}")
            continue
        measure(qcow2, side, partial(create_rate, impl, s.creates, "qcow2"))
        measure(raw, side, partial(create_rate, impl, s.creates, "raw"))
    report.add(check_qcow2_images(work / "virtstore-create", s.creates))


def create_rate(impl: Creator, count: int, fmt: str) -> float:
    xmls = create_xmls(count, fmt)
    return rate(len(xmls), lambda: impl.create(xmls))


def check_qcow2_images(path: Path, count: int) -> Row:
    """qemu-img check and info on a sample of the qcow2 images virtstore made."""
    step = max(1, count // QCOW2_CHECK_SAMPLE)
    sample = [path / f"new{i:05d}.qcow2" for i in range(0, count, step)][:QCOW2_CHECK_SAMPLE]
    row = Row(f"qemu-img check of {len(sample)} created qcow2", "check", "all pass",
              float(len(sample)))
    failures = [f"{p.name}: {why}" for p in sample if (why := qcow2_problem(p))]
    row.virtstore = float(len(sample) - len(failures))
    row.virtstore_note = (f"{len(sample) - len(failures)}/{len(sample)} pass"
                          + (f"; {'; '.join(failures[:3])}" if failures else ""))
    row.libvirt_note = "-"
    return row


def qcow2_problem(path: Path) -> str:
    """Why ``path`` is not a sound 1 GiB qcow2 image ("" if it is)."""
    if not path.exists():
        return "missing"
    check = subprocess.run(["qemu-img", "check", "-q", str(path)], capture_output=True,
                           text=True, check=False)
    if check.returncode != 0:
        return f"qemu-img check exited {check.returncode}: {check.stderr.strip()[:200]}"
    info = subprocess.run(["qemu-img", "info", "--output=json", str(path)],
                          capture_output=True, text=True, check=False)
    if info.returncode != 0:
        return f"qemu-img info exited {info.returncode}"
    data = json.loads(info.stdout)
    if data.get("format") != "qcow2" or data.get("virtual-size") != GiB:
        return f"format {data.get('format')}, virtual size {data.get('virtual-size')}"
    return ""


def bench_startup(report: Report, s: Settings) -> None:
    row = report.add(Row(f"virtstore --help start-up, best of {s.startup_runs}", "s",
                         "record", None))
    measure(row, "virtstore",
            lambda: best_of(s.startup_runs, lambda: run_command([virtstore_command(),
                                                                 "--help"])))
    if shutil.which("virsh"):
        measure(row, "libvirt",
                lambda: best_of(s.startup_runs, lambda: run_command(["virsh", "--help"])))
        row.libvirt_note = "virsh --help"
    else:
        row.libvirt_note = "virsh not installed"


# -- output --------------------------------------------------------------------------
def shorten(text: str, width: int = 60) -> str:
    return text if len(text) <= width else text[:width - 1] + "…"


def fmt_value(value: float | None, unit: str, note: str) -> str:
    if value is None:
        return shorten(note) or "-"
    if unit == "/s":
        return f"{value:,.0f}/s"
    if unit == "s":
        return f"{value * 1000:,.1f} ms" if value < 1 else f"{value:,.2f} s"
    return note or f"{value:g}"


def table_cells(row: Row) -> list[str]:
    ratio = "-" if row.ratio is None else f"{row.ratio:,.3g}×"
    met = {True: "yes", False: "NO", None: "-"}[row.met]
    return [row.workload, fmt_value(row.virtstore, row.unit, row.virtstore_note),
            fmt_value(row.libvirt, row.unit, row.libvirt_note), ratio, row.goal, met]


HEADERS = ["workload", "virtstore", "libvirt", "ratio", "goal", "met?"]


def print_table(report: Report, title: str = "virtstore vs libvirt: core benchmarks") -> None:
    cells = [table_cells(r) for r in report.rows]
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:
        print_plain(cells)
    else:
        table = Table(title=title)
        for i, head in enumerate(HEADERS):
            table.add_column(head, justify="left" if i in (0, 4) else "right",
                             overflow="fold")
        for c in cells:
            table.add_row(*c)
        Console(width=max(120, shutil.get_terminal_size().columns)).print(table)
    for note in report.notes:
        print(f"note: {note}")


def print_plain(cells: list[list[str]]) -> None:
    widths = [max(len(r[i]) for r in [HEADERS, *cells]) for i in range(len(HEADERS))]
    for r in [HEADERS, *cells]:
        print("  ".join(c.ljust(w) if i in (0, 4) else c.rjust(w)
                        for i, (c, w) in enumerate(zip(r, widths, strict=True))))


def write_json(report: Report, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    doc = {"meta": report.meta, "rows": [r.to_dict() for r in report.rows],
           "notes": report.notes}
    path.write_text(json.dumps(doc, indent=2, ensure_ascii=False) + "\n")


# -- running -------------------------------------------------------------------------
def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--volumes", type=int, default=10_000, help="volumes in the refresh pool")
    p.add_argument("--creates", type=int, default=500, help="volumes created per format")
    p.add_argument("--lookups", type=int, default=10_000, help="lookups by name and by path")
    p.add_argument("--quick", action="store_true",
                   help="a smoke run: 1,000 volumes, 50 creates, 1,000 lookups")
    # /var/lib, where libvirt and virtstore keep images; on this workplace's machines file
    # creation under /tmp and /var/tmp is some 30x slower than elsewhere on the same disk.
    p.add_argument("--workdir", default="/var/lib", help="where the temporary pools go")
    p.add_argument("--uri", default=DEFAULT_URI, help="libvirt URI of the reference")
    p.add_argument("--no-libvirt", action="store_true", help="measure virtstore only")
    p.add_argument("--keep", action="store_true", help="keep the work directory")
    p.add_argument("--json", type=Path, default=RESULTS, help="where the JSON goes")
    args = p.parse_args(argv)
    if args.quick:
        args.volumes, args.creates, args.lookups = 1000, 50, 1000
    if min(args.volumes, args.creates, args.lookups) < 1:
        p.error("--volumes, --creates and --lookups must be at least 1")
    return args


def describe(report: Report, s: object, lv: Libvirt | str) -> None:
    commit = subprocess.run(["git", "-C", str(HERE), "rev-parse", "--short", "HEAD"],
                            capture_output=True, text=True, check=False).stdout.strip()
    report.meta.update({
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "host": platform.node(), "kernel": platform.release(), "cpus": os.cpu_count(),
        "python": platform.python_version(), "virtstore": virtstore.__version__,
        "commit": commit or None,
        "libvirt": lv.version() if isinstance(lv, Libvirt) else f"not available: {lv}",
        "settings": vars(s),
    })


def note_busy_host(report: Report) -> None:
    """Other work on the machine skews both columns; say so when there was some."""
    cpus = os.cpu_count() or 1
    before = report.meta["load_average_before"][0]
    after = report.meta["load_average_after"][0]
    # The benchmark keeps about one CPU busy itself; more than that is someone else.
    if before > cpus / 2 or after > cpus:
        report.notes.append(f"the host was busy (1-minute load average {before:.2f} before, "
                            f"{after:.2f} after, {cpus} CPUs): timings are noisy")


def finish_report(report: Report, *, libvirt_ran: bool) -> Report:
    """The load after the run, a note if the host was busy, and why libvirt's column is
    empty when it is."""
    report.meta["load_average_after"] = os.getloadavg()
    note_busy_host(report)
    if not libvirt_ran:
        for row in report.rows:
            if row.libvirt is None and not row.libvirt_note:
                row.libvirt_note = "libvirt not available"
    return report


def run(args: argparse.Namespace, work: Path, lv: Libvirt | str) -> Report:
    s = Settings(volumes=args.volumes, creates=args.creates, lookups=args.lookups,
                 repeats=3, startup_runs=10, uri=args.uri)
    report = Report()
    report.meta["load_average_before"] = os.getloadavg()
    describe(report, s, lv)
    if isinstance(lv, str):
        report.notes.append(f"libvirt not available: {lv}")
    print(f"making {s.volumes:,} volumes in {work} ...", file=sys.stderr)
    contents = populate(work / "pool", s.volumes, make_templates(work / "templates"))
    vs = VirtstoreSide(work)
    lvs = LibvirtSide(lv) if isinstance(lv, Libvirt) else None
    steps: list[tuple[str, Callable[[], None]]] = [
        ("refresh", lambda: bench_refresh(report, s, contents, vs, lvs)),
        ("vol-list", lambda: bench_vol_list(report, s, contents, vs, lvs)),
        ("lookups", lambda: bench_lookups(report, s, contents, vs, lvs)),
        ("creates", lambda: bench_creates(report, s, work, vs, lvs)),
        ("start-up", lambda: bench_startup(report, s)),
    ]
    try:
        for name, step in steps:
            print(f"{name} ...", file=sys.stderr)
            step()
    finally:
        vs.close()
    return finish_report(report, libvirt_ran=lvs is not None)


def open_libvirt(uri: str) -> Libvirt | str:
    try:
        return Libvirt.open(uri)
    except Exception as exc:  # whatever goes wrong with libvirt, virtstore is still measured
        return f"{type(exc).__name__}: {exc}"


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so the cleanup below runs
    work = make_workdir(args.workdir)
    lv = "disabled by --no-libvirt" if args.no_libvirt else open_libvirt(args.uri)
    try:
        report = run(args, work, lv)
    finally:
        problems = lv.close() if isinstance(lv, Libvirt) else []
        for problem in problems:
            print(f"cleanup: {problem}", file=sys.stderr)
        if args.keep:
            print(f"kept {work}", file=sys.stderr)
        else:
            shutil.rmtree(work, ignore_errors=True)
    print_table(report)
    write_json(report, args.json)
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
