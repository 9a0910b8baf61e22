"""virtstored under load, side by side with libvirtd: concurrent clients, and memory.

    .venv/bin/python bench/bench_load.py [--clients 1,4,16] [--seconds 3] [--volumes 1000]
                                         [--memory-volumes 10000] [--no-libvirt]

Throughput: N client processes at once (each with its own connection) against
virtstored's read-write unix socket, then the same against libvirtd's RPC
(``qemu:///system``), on one dir pool over the same directory of ``--volumes`` files:

- lookup by name: ``volume_info(pool, name)`` / ``pool.storageVolLookupByName(name)``;
- listing: ``list_volumes(pool)`` / ``pool.listAllVolumes()``, which returns handles
  only; "with sizes" also calls ``info()`` on each (as ``vol-list --details`` does),
  which is what virtstore's one answer holds;
- create: ``volume_create_xml`` / ``pool.createXML`` of a 1 MiB sparse raw volume
  (each client deletes its volumes after the timed window).

Each client times every call; the table gives requests per second over all clients and
the p50/p99 latency of a call. Memory: a fresh virtstored and libvirtd each start a pool
of ``--memory-volumes`` volumes (70% sparse raw, 30% qcow2) and list it once; their
VmRSS from /proc/PID/status, with the RSS before the pool for reference.

Prints a table and writes bench/results/load.json. Goals: one client's lookups at least
libvirt's rate (and 7,600/s, libvirt's rate measured here before), virtstored's RSS
below libvirtd's. Measurement only: a missed goal is reported, never raised.
"""

from __future__ import annotations

import argparse
import array
import json
import multiprocessing as mp
import os
import platform
import random
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from multiprocessing.connection import Connection as Pipe
from pathlib import Path
from typing import Any

# The helpers sit next to this file (bench/ is not a package).
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _data import MiB, dir_pool_xml, make_templates, make_workdir, populate, volume_xml
from _libvirt import DEFAULT_URI, Libvirt, libvirtd_pids

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results" / "load.json"
POOL = "load"
MEMORY_POOL = "load-memory"
LOOKUP_GOAL = 7600.0  # libvirt's lookups per second for one client, measured here before
WORKLOADS = ("lookup", "vol-info", "lookup-path", "list", "list-sizes", "create", "mix")
DEFAULT_WORKLOADS = ("lookup", "lookup-path", "list", "list-sizes", "create")
LABELS = {"lookup": "lookup by name", "vol-info": "vol-info", "lookup-path": "lookup by path",
          "list": "list volumes", "list-sizes": "list with sizes",
          "create": "create raw 1 MiB", "mix": "mix 90/10"}
CREATE_SIZE = 1 * MiB
CLIENT_START_TIMEOUT = 120.0


# -- the clients (each in a process of its own) ------------------------------------------


class _Side:
    """One client's connection and the three workloads' single calls."""

    def __init__(self, side: str, where: str, pool: str, names: list[str],
                 index: int, pool_dir: str) -> None:
        self.side = side
        self.pool = pool
        self.names = names[:]
        random.Random(index).shuffle(self.names)
        self.paths = [os.path.join(pool_dir, n) for n in self.names]
        self.index = index
        self.made: list[Any] = []
        if side == "virtstore":
            import virtstore

            self.conn: Any = virtstore.connect(where)
            self.conn.pool_info(pool)
        else:
            import libvirt  # type: ignore[import-untyped]

            libvirt.registerErrorHandler(lambda _ctx, _err: None, None)
            self.conn = libvirt.open(where)
            self.lvpool = self.conn.storagePoolLookupByName(pool)

    def op(self, workload: str, tag: str) -> Callable[[int], object]:
        names, paths, n = self.names, self.paths, len(self.names)
        if self.side == "virtstore":
            conn, pool = self.conn, self.pool
            if workload == "lookup":
                return lambda i: conn.volume_info(pool, names[i % n])
            if workload == "lookup-path":
                return lambda i: conn.volume_lookup_by_path(paths[i % n])
            if workload in ("list", "list-sizes"):
                return lambda i: conn.list_volumes(pool)
            if workload == "vol-info":  # the lookup answers the info already
                return lambda i: conn.volume_info(pool, names[i % n])
            if workload == "mix":
                def mix_vs(i: int) -> object:
                    if i % 10 != 9:
                        return conn.volume_info(pool, names[i % n])
                    if not self.made:
                        name = f"vs-{tag}-c{self.index}-{i}.img"
                        made = conn.volume_create_xml(pool, volume_xml(name, "raw",
                                                                       CREATE_SIZE, 0))
                        self.made.append(made)
                        return made
                    conn.volume_delete(pool, self.made.pop())
                    return None

                return mix_vs

            def create_vs(i: int) -> object:
                name = f"vs-{tag}-c{self.index}-{i}.img"
                made = conn.volume_create_xml(pool, volume_xml(name, "raw", CREATE_SIZE, 0))
                self.made.append(made)
                return made

            return create_vs
        lvpool, lvconn = self.lvpool, self.conn
        if workload == "lookup":
            return lambda i: lvpool.storageVolLookupByName(names[i % n])
        if workload == "lookup-path":
            return lambda i: lvconn.storageVolLookupByPath(paths[i % n])
        if workload == "list":
            return lambda i: lvpool.listAllVolumes(0)
        if workload == "list-sizes":  # what virtstore's listing answers: types and sizes
            return lambda i: [v.info() for v in lvpool.listAllVolumes(0)]
        if workload == "vol-info":  # what virsh vol-info does: look up, then info()
            return lambda i: lvpool.storageVolLookupByName(names[i % n]).info()
        if workload == "mix":
            def mix_lv(i: int) -> object:
                if i % 10 != 9:
                    return lvpool.storageVolLookupByName(names[i % n])
                if not self.made:
                    name = f"lv-{tag}-c{self.index}-{i}.img"
                    vol = lvpool.createXML(volume_xml(name, "raw", CREATE_SIZE, 0), 0)
                    self.made.append(vol)
                    return vol
                self.made.pop().delete(0)
                return None

            return mix_lv

        def create_lv(i: int) -> object:
            name = f"lv-{tag}-c{self.index}-{i}.img"
            vol = lvpool.createXML(volume_xml(name, "raw", CREATE_SIZE, 0), 0)
            self.made.append(vol)
            return vol

        return create_lv

    def clean(self) -> None:
        """Delete the volumes the create workload made."""
        for made in self.made:
            if self.side == "virtstore":
                self.conn.volume_delete(self.pool, made)
            else:
                made.delete(0)
        self.made.clear()

    def close(self) -> None:
        self.conn.close()


def _client(side: str, where: str, pool: str, names: list[str], pool_dir: str,
            index: int, barrier: Any, pipe: Pipe) -> None:
    """A client process: connect, then run the workloads the parent asks for."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent stops us
    try:
        client = _Side(side, where, pool, names, index, pool_dir)
    except Exception as exc:
        pipe.send(("error", f"{type(exc).__name__}: {exc}"))
        return
    pipe.send(("ready",))
    clock = time.perf_counter_ns
    while True:
        cmd = pipe.recv()
        if cmd[0] == "stop":
            break
        _, workload, seconds, tag = cmd
        try:
            op = client.op(workload, tag)
            if workload not in ("create", "mix"):
                for i in range(20):  # warm up: connection, caches
                    op(i)
            lat = array.array("q")
            barrier.wait()
            cpu0 = time.process_time()
            start = clock()
            end = start + int(seconds * 1e9)
            i = 0
            now = start
            while now < end:
                t0 = now
                op(i)
                now = clock()
                lat.append(now - t0)
                i += 1
            cpu = time.process_time() - cpu0
            pipe.send(("done", i, (now - start) / 1e9, lat.tobytes(), cpu))
            client.clean()
            pipe.send(("clean",))
        except Exception as exc:
            pipe.send(("error", f"{workload}: {type(exc).__name__}: {exc}"))
            return
    client.close()


# -- results -----------------------------------------------------------------------------


@dataclass
class Result:
    side: str
    workload: str
    clients: int
    requests: int = 0
    seconds: float = 0.0
    rate: float = 0.0
    p50_ms: float = 0.0
    p99_ms: float = 0.0
    client_cpu_us: float = 0.0  # per request, the clients' user + system CPU
    server_cpu_us: float | None = None  # per request, the daemon's (all its work)
    error: str | None = None


@dataclass
class Memory:
    side: str
    pid: int | None = None
    volumes: int = 0
    listed: int = 0
    rss_before_kib: int | None = None
    rss_kib: int | None = None
    hwm_kib: int | None = None
    pss_kib: int | None = None
    note: str = ""


@dataclass
class Report:
    started: str
    host: dict[str, Any]
    options: dict[str, Any]
    results: list[Result] = field(default_factory=list)
    memory: list[Memory] = field(default_factory=list)
    libvirt: str = ""
    notes: list[str] = field(default_factory=list)
    goals: dict[str, Any] = field(default_factory=dict)

    def find(self, side: str, workload: str, clients: int) -> Result | None:
        for r in self.results:
            if (r.side, r.workload, r.clients) == (side, workload, clients):
                return r
        return None


def _percentile(sorted_ns: array.array[int], q: float) -> float:
    if not sorted_ns:
        return 0.0
    k = min(len(sorted_ns) - 1, max(0, round(q * (len(sorted_ns) - 1))))
    return sorted_ns[k] / 1e6


# -- running the clients -------------------------------------------------------------------


class Clients:
    """N client processes of one side, kept for every workload of one concurrency."""

    def __init__(self, ctx: Any, side: str, where: str, pool: str, names: list[str],
                 pool_dir: str, n: int, server_pid: int | None) -> None:
        self.side, self.n, self.server_pid = side, n, server_pid
        self.barrier = ctx.Barrier(n + 1)
        self.pipes: list[Pipe] = []
        self.procs: list[Any] = []
        for i in range(n):
            parent, child = ctx.Pipe()
            p = ctx.Process(target=_client, args=(side, where, pool, names, pool_dir, i,
                                                  self.barrier, child), daemon=True)
            p.start()
            child.close()
            self.pipes.append(parent)
            self.procs.append(p)
        for pipe in self.pipes:
            msg = self._recv(pipe, CLIENT_START_TIMEOUT)
            if msg[0] != "ready":
                raise RuntimeError(f"{side} client: {msg[1]}")

    def _recv(self, pipe: Pipe, timeout: float) -> tuple[Any, ...]:
        if not pipe.poll(timeout):
            raise RuntimeError(f"{self.side} client did not answer in {timeout:.0f} s")
        try:
            msg: tuple[Any, ...] = pipe.recv()
        except EOFError:
            raise RuntimeError(f"{self.side} client exited") from None
        return msg

    def run(self, workload: str, seconds: float, tag: str) -> Result:
        res = Result(self.side, workload, self.n)
        for pipe in self.pipes:
            pipe.send(("run", workload, seconds, tag))
        try:
            self.barrier.wait(timeout=CLIENT_START_TIMEOUT)
        except Exception:
            self.barrier.abort()
        server0 = _cpu(self.server_pid)
        lat = array.array("q")
        longest = 0.0
        client_cpu = 0.0
        errors = []
        ran = []
        for pipe in self.pipes:
            msg = self._recv(pipe, seconds + CLIENT_START_TIMEOUT)
            if msg[0] == "error":
                errors.append(str(msg[1]))
                continue
            ran.append(pipe)
            _, count, elapsed, raw, cpu = msg
            client_cpu += cpu
            res.requests += count
            longest = max(longest, elapsed)
            part = array.array("q")
            part.frombytes(raw)
            lat.extend(part)
        server1 = _cpu(self.server_pid)
        for pipe in ran:  # the create workload's clean-up, outside the timing
            msg = self._recv(pipe, 600.0)
            if msg[0] == "error":
                errors.append(str(msg[1]))
        if errors:
            res.error = errors[0]
            return res
        ordered = array.array("q", sorted(lat))
        res.seconds = longest
        res.rate = res.requests / longest if longest else 0.0
        res.p50_ms = _percentile(ordered, 0.50)
        res.p99_ms = _percentile(ordered, 0.99)
        if res.requests:
            res.client_cpu_us = client_cpu / res.requests * 1e6
            if server0 is not None and server1 is not None:
                res.server_cpu_us = (server1 - server0) / res.requests * 1e6
        return res

    def close(self) -> None:
        for pipe in self.pipes:
            try:
                pipe.send(("stop",))
            except OSError:
                pass
        for p in self.procs:
            p.join(10)
            if p.is_alive():
                p.kill()
                p.join(5)


# -- daemons and memory ----------------------------------------------------------------------


def _status(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM of a process and its children (a daemon's workers), summed, and
    their proportional set size (Pss, shared pages divided among their users), in KiB."""
    out = {"VmRSS": 0, "VmHWM": 0, "Pss": 0}
    for p in process_tree(pid):
        try:
            lines = Path(f"/proc/{p}/status").read_text().splitlines()
            lines += Path(f"/proc/{p}/smaps_rollup").read_text().splitlines()
        except OSError:
            continue
        for line in lines:
            key, _, value = line.partition(":")
            if key in out:
                out[key] += int(value.split()[0])
    return out


def _stat(pid: int) -> list[str] | None:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None


def process_tree(pid: int) -> list[int]:
    """``pid`` and its descendants (a daemon's worker processes)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            fields = _stat(int(entry))
            if fields is not None:
                children.setdefault(int(fields[1]), []).append(int(entry))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo += children.get(p, [])
    return out


def _cpu(pid: int | None) -> float | None:
    """User + system CPU seconds of a process and its live children (None: unknown)."""
    if pid is None:
        return None
    total = 0.0
    for p in process_tree(pid):
        fields = _stat(p)
        if fields is None:
            if p == pid:
                return None
            continue
        total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return total


def _pidof_libvirtd() -> int | None:
    res = subprocess.run(["pidof", "libvirtd"], capture_output=True, text=True, check=False)
    pids = [int(p) for p in res.stdout.split()] or sorted(libvirtd_pids())
    return pids[0] if len(pids) == 1 else None


class Virtstored:
    """A virtstored this benchmark started, stopped by its PID."""

    def __init__(self, root: Path, run: Path, workers: int | None = None) -> None:
        exe = Path(sys.executable).parent / "virtstored"
        argv = [str(exe)] if exe.exists() else [sys.executable, "-m", "virtstore.server.main"]
        if workers is not None:
            argv += ["--workers", str(workers)]
        self.sock = run / "virtstored.sock"
        self.uri = f"unix://{self.sock}"
        self.proc = subprocess.Popen([*argv, "--root", str(root), "--socket-dir", str(run),
                                      "--log-level", "warning"], stdout=subprocess.DEVNULL)
        deadline = time.monotonic() + 30
        while not (run / "virtstored-ro.sock").exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError("virtstored did not start")
            time.sleep(0.05)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                os.kill(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)


def memory_virtstore(work: Path, pool_dir: Path, count: int,
                     workers: int | None = None) -> Memory:
    import virtstore

    mem = Memory("virtstore", volumes=count)
    d = Virtstored(work / "mem-state", work / "mem-run", workers)
    try:
        mem.pid = d.pid
        with virtstore.connect(d.uri) as conn:
            conn.pool_info("default")  # the daemon has served a request: its idle size
            mem.rss_before_kib = _status(d.pid)["VmRSS"]
            conn.pool_define_xml(dir_pool_xml(MEMORY_POOL, pool_dir))
            conn.pool_start(MEMORY_POOL)
            mem.listed = len(conn.list_volumes(MEMORY_POOL))
        st = _status(d.pid)
        mem.rss_kib, mem.hwm_kib, mem.pss_kib = st["VmRSS"], st["VmHWM"], st["Pss"]
    finally:
        d.stop()
    return mem


def memory_libvirt(lv: Libvirt, pool_dir: Path, count: int) -> Memory:
    mem = Memory("libvirt", volumes=count)
    pid = lv.started_pid or _pidof_libvirtd()
    if pid is None:
        mem.note = "more than one libvirtd runs: which one serves qemu:///system is unknown"
        return mem
    mem.pid = pid
    mem.note = "started by this benchmark" if lv.started_pid else "already running"
    mem.rss_before_kib = _status(pid)["VmRSS"]
    pool = lv.define_started_pool(dir_pool_xml(f"vsbench-{os.getpid()}-memory", pool_dir))
    mem.listed = len(pool.listAllVolumes(0))
    st = _status(pid)
    mem.rss_kib, mem.hwm_kib, mem.pss_kib = st["VmRSS"], st["VmHWM"], st["Pss"]
    return mem


# -- the table ---------------------------------------------------------------------------------


def _fmt_rate(r: Result | None) -> str:
    if r is None:
        return "-"
    if r.error:
        return "error"
    return f"{r.rate:,.0f}/s"


def _fmt_ms(v: float) -> str:
    return f"{v:.2f}" if v < 10 else f"{v:.1f}"


def table(rep: Report) -> str:
    lines = []
    head = (f"{'workload':<16} {'clients':>7} | {'virtstore':>9} {'p50 ms':>6} {'p99 ms':>6} "
            f"{'cpu us':>9} | {'libvirt':>9} {'p50 ms':>6} {'p99 ms':>6} {'cpu us':>9} "
            f"| {'ratio':>6}")
    lines += [head, "-" * len(head)]
    for wl in WORKLOADS:
        for n in rep.options["clients"]:
            vs, lv = rep.find("virtstore", wl, n), rep.find("libvirt", wl, n)
            if vs is None and lv is None:
                continue
            ratio = (f"{vs.rate / lv.rate:.2f}x" if vs and lv and lv.rate and vs.rate
                     and not (vs.error or lv.error) else "-")

            def lat(r: Result | None) -> str:
                if r is None or r.error:
                    return f"{'-':>6} {'-':>6} {'-':>9}"
                cpu = f"{r.client_cpu_us:.0f}+" + ("?" if r.server_cpu_us is None
                                                   else f"{r.server_cpu_us:.0f}")
                return f"{_fmt_ms(r.p50_ms):>6} {_fmt_ms(r.p99_ms):>6} {cpu:>9}"

            lines.append(f"{LABELS[wl]:<16} {n:>7} | {_fmt_rate(vs):>9} {lat(vs)} "
                         f"| {_fmt_rate(lv):>9} {lat(lv)} | {ratio:>6}")
    for r in rep.results:
        if r.error:
            lines.append(f"  {r.side} {r.workload} x{r.clients}: {r.error}")
    if rep.memory:
        lines.append("")
        lines.append(f"{'memory (VmRSS)':<16} {'volumes':>7} | {'before':>10} {'after':>10} "
                     f"{'peak':>10} {'Pss':>10} | pid")
        for m in rep.memory:
            def mib(k: int | None) -> str:
                return "-" if k is None else f"{k / 1024:.1f} MiB"

            name = "virtstored" if m.side == "virtstore" else "libvirtd"
            lines.append(f"{name:<16} {m.listed:>7} | {mib(m.rss_before_kib):>10} "
                         f"{mib(m.rss_kib):>10} {mib(m.hwm_kib):>10} "
                         f"{mib(m.pss_kib):>10} | {m.pid}"
                         + (f" ({m.note})" if m.note else ""))
    lines.append("")
    for name, goal in rep.goals.items():
        met = {True: "met", False: "MISSED", None: "not measured"}[goal["met"]]
        lines.append(f"goal {name}: {goal['text']}: {met}")
    lines += rep.notes
    return "\n".join(lines)


def clean_up(daemon: Virtstored | None, lv: Libvirt | str, work: Path,
             keep: bool) -> list[str]:
    """Stop our daemon, drop libvirt's pools, remove the work directory; problems met."""
    if daemon is not None:
        daemon.stop()
    problems = []
    if isinstance(lv, Libvirt):
        problems = [f"libvirt clean-up: {p}" for p in lv.close()]
    if not keep:
        shutil.rmtree(work, ignore_errors=True)
    return problems


def busy_note(host: dict[str, Any]) -> list[str]:
    """Records the load average after the run; a note when the host was busy."""
    host["load_after"] = os.getloadavg()[0]
    if max(host["load_before"], host["load_after"]) <= 0.5 * (os.cpu_count() or 1):
        return []
    return [f"note: the host was busy (load average {host['load_before']:.2f} before, "
            f"{host['load_after']:.2f} after): rates are low"]


def write_json(path: str, data: object) -> None:
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(data, indent=2) + "\n")
    print(f"\nwritten to {out}", file=sys.stderr)


def _goals(rep: Report) -> None:
    vs, lv = rep.find("virtstore", "lookup", 1), rep.find("libvirt", "lookup", 1)
    want = max(LOOKUP_GOAL, lv.rate if lv and not lv.error else 0.0)
    have = vs.rate if vs and not vs.error else None
    rep.goals["lookups"] = {
        "text": f"one client's lookups >= {want:,.0f}/s (libvirt's here, at least "
                f"{LOOKUP_GOAL:,.0f}/s): {'-' if have is None else f'{have:,.0f}/s'}",
        "met": None if have is None else have >= want}
    mv = next((m for m in rep.memory if m.side == "virtstore"), None)
    ml = next((m for m in rep.memory if m.side == "libvirt"), None)
    met = None
    if mv and ml and mv.rss_kib and ml.rss_kib:
        met = mv.rss_kib < ml.rss_kib
    rep.goals["memory"] = {
        "text": f"virtstored's RSS below libvirtd's with {rep.options['memory_volumes']:,} "
                "volumes", "met": met}


# -- main ---------------------------------------------------------------------------------------


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--clients", default="1,4,16",
                    help="concurrency levels, comma-separated (default 1,4,16)")
    ap.add_argument("--seconds", type=float, default=3.0, help="per workload and level")
    ap.add_argument("--volumes", type=int, default=1000, help="volumes in the load pool")
    ap.add_argument("--memory-volumes", type=int, default=10000,
                    help="volumes in the memory pool (0: no memory measurement)")
    ap.add_argument("--workloads", default=",".join(DEFAULT_WORKLOADS),
                    help=f"of {', '.join(WORKLOADS)} (default {','.join(DEFAULT_WORKLOADS)})")
    ap.add_argument("--workers", type=int,
                    help="virtstored's worker processes (default: the daemon's own)")
    ap.add_argument("--workdir", default="/var/lib",
                    help="where the work directory goes (default /var/lib: file creation "
                         "on this host's /tmp is slow)")
    ap.add_argument("--uri", default=DEFAULT_URI)
    ap.add_argument("--no-libvirt", action="store_true")
    ap.add_argument("--keep", action="store_true", help="leave the work directory")
    ap.add_argument("--json", default=str(RESULTS))
    opts = ap.parse_args()
    levels = [int(x) for x in opts.clients.split(",") if x]
    workloads = [w for w in opts.workloads.split(",") if w]
    unknown = set(workloads) - set(WORKLOADS)
    if unknown:
        ap.error(f"unknown workload(s): {', '.join(sorted(unknown))}")

    rep = Report(started=datetime.now(UTC).isoformat(timespec="seconds"),
                 host={"cpus": os.cpu_count(), "python": platform.python_version(),
                       "load_before": os.getloadavg()[0]},
                 options={"clients": levels, "seconds": opts.seconds,
                          "volumes": opts.volumes, "memory_volumes": opts.memory_volumes,
                          "workloads": workloads, "uri": opts.uri,
                          "workers": opts.workers})
    work = make_workdir(opts.workdir)
    ctx = mp.get_context("spawn")  # no libvirt or socket state shared with the clients
    lv: Libvirt | str = "not asked for" if opts.no_libvirt else Libvirt.open(opts.uri)
    daemon: Virtstored | None = None
    try:
        print(f"work directory {work}; making {opts.volumes:,} volumes", file=sys.stderr)
        templates = make_templates(work / "templates")
        contents = populate(work / "pool", opts.volumes, templates)
        names = contents.names
        daemon = Virtstored(work / "state", work / "run", opts.workers)
        import virtstore

        with virtstore.connect(daemon.uri) as conn:
            conn.pool_define_xml(dir_pool_xml(POOL, contents.path))
            conn.pool_start(POOL)
        sides: list[tuple[str, str, str, int | None]] = [
            ("virtstore", daemon.uri, POOL, daemon.pid)]
        if isinstance(lv, Libvirt):
            rep.libvirt = lv.version()
            lv_pool = lv.define_started_pool(
                dir_pool_xml(f"vsbench-{os.getpid()}-load", contents.path))
            sides.append(("libvirt", opts.uri, lv_pool.name(),
                          lv.started_pid or _pidof_libvirtd()))
        else:
            rep.libvirt = f"libvirt not available: {lv}"
        for n in levels:
            for side, where, pool, pid in sides:
                print(f"{side}: {n} client(s)", file=sys.stderr)
                clients = Clients(ctx, side, where, pool, names, str(contents.path), n, pid)
                try:
                    for wl in workloads:
                        res = clients.run(wl, opts.seconds, f"n{n}")
                        rep.results.append(res)
                        print(f"  {LABELS[wl]}: {_fmt_rate(res)}"
                              + (f" ({res.error})" if res.error else ""), file=sys.stderr)
                finally:
                    clients.close()
        rep.host["virtstored_rss_after_load_kib"] = _status(daemon.pid)["VmRSS"]
        daemon.stop()
        daemon = None

        if opts.memory_volumes:
            print(f"memory: making {opts.memory_volumes:,} volumes", file=sys.stderr)
            mem_dir = work / "memory-pool"
            populate(mem_dir, opts.memory_volumes, templates, seed=2)
            rep.memory.append(memory_virtstore(work, mem_dir, opts.memory_volumes,
                                               opts.workers))
            if isinstance(lv, Libvirt):
                rep.memory.append(memory_libvirt(lv, mem_dir, opts.memory_volumes))
    finally:
        rep.notes += clean_up(daemon, lv, work, opts.keep)
    rep.notes += busy_note(rep.host)
    rep.notes.append("cpu us: CPU per request, clients' + daemon's (a libvirtd that was "
                     "already running counts its other work too).")
    rep.notes.append(f"{os.cpu_count()} CPUs, shared by the clients and the daemon; "
                     f"libvirt {rep.libvirt or '-'}. libvirt's lookup and listing return "
                     "handles (name, key); virtstore's the volumes' type, format and sizes "
                     "too.")
    _goals(rep)
    print(table(rep))
    write_json(opts.json, asdict(rep))
    return 0


if __name__ == "__main__":
    sys.exit(main())
