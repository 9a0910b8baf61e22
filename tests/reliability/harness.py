"""The kill harness and the invariant checks of the reliability suite.

A trial starts a child process (``CHILD``: a small script on EmbeddedConnection) that
runs one operation on a state root, SIGKILLs it at a chosen point (a random delay, or
once the job has reported N bytes of progress), then opens the root again as the next
process would and checks what must hold after any crash:

- pool definition files parse and validate;
- no ``.virtstore-staging-*`` (or other ``.virtstore-``) file is left in the pool;
- every listed volume is one we expect, complete, with the bytes we recorded for it;
  the volume the killed operation was writing is absent or complete;
- the killed job is ``failed`` and says it was interrupted (or finished before the kill);
- no helper program (qemu-img) of the dead process is still running;
- no lock is left: the volumes can be written and deleted.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from multiprocessing.synchronize import Event as EventType
from pathlib import Path

from virtstore.api import Connection
from virtstore.api.embedded import EmbeddedConnection
from virtstore.xml import parse_pool_xml, validate

from . import summary

MiB = 1 << 20
BLOCK = 4096
STAGING_PREFIX = ".virtstore-"

# File creation in /tmp and /var/tmp is far slower than under /var/lib on the CI hosts.
BASE = Path(os.environ.get("VIRTSTORE_RELIABILITY_DIR", "/var/lib"))


@contextlib.contextmanager
def work_area() -> Iterator[Path]:
    """A fresh ``/var/lib/virtstore-reliability-XXXX``, removed afterwards."""
    base = BASE if os.access(BASE, os.W_OK) else Path(tempfile.gettempdir())
    d = Path(tempfile.mkdtemp(prefix="virtstore-reliability-", dir=base))
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


def pattern(seed: int, size: int) -> bytes:
    """``size`` bytes, different for every seed and in every 4 KiB block (cheap)."""
    out = bytearray()
    h = hashlib.sha256(seed.to_bytes(8, "little")).digest()
    while len(out) < size:
        h = hashlib.sha256(h).digest()
        out += h * (BLOCK // len(h))
    for off in range(0, size, BLOCK):
        out[off:off + 16] = seed.to_bytes(8, "little") + off.to_bytes(8, "little")
    return bytes(out[:size])


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def file_sha(path: Path | str) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def zeros_sha(size: int) -> str:
    h = hashlib.sha256()
    chunk = bytes(MiB)
    left = size
    while left:
        n = min(left, MiB)
        h.update(chunk[:n])
        left -= n
    return h.hexdigest()


def one_line(message: str) -> bool:
    return bool(message) and "\n" not in message and "\r" not in message


# -- the child ---------------------------------------------------------------------------

CHILD = r"""
import json, os, sys, time
from virtstore.api import VolumeCreateArgs
from virtstore.api.embedded import EmbeddedConnection

spec = json.loads(sys.argv[1])
def say(*words):
    # One write per line, whole: under PYTHONUNBUFFERED, print() writes each word and
    # separator by itself, and a kill between them leaves a torn line.
    sys.stdout.write(" ".join(map(str, words)) + "\n")
    sys.stdout.flush()

c = EmbeddedConnection(spec["root"])
pool, op = spec["pool"], spec["op"]
say("ready")
bw = spec.get("bandwidth")
if op == "create":
    for name in spec["names"]:
        c.volume_create(pool, VolumeCreateArgs(name, spec["capacity"],
                                               allocation=spec.get("allocation"),
                                               format=spec["format"]))
        say("created", name)
    say("finished")
    sys.exit(0)
keep = None
if op == "clone":
    job = c.volume_clone(pool, spec["src"], spec["dst"], format=spec.get("format"),
                         bandwidth=bw)
elif op == "create-from":
    job = c.volume_create_from(pool, spec["xml"], pool, spec["src"], bandwidth=bw)
elif op == "upload":
    keep = open(spec["file"], "rb")
    job = c.volume_upload(pool, spec["name"], keep, bandwidth=bw)
elif op == "wipe":
    job = c.volume_wipe(pool, spec["name"], spec["algorithm"], bandwidth=bw)
elif op == "resize":
    job = c.volume_resize(pool, spec["name"], spec["capacity"], shrink=spec["shrink"],
                          allocate=spec["allocate"])
else:
    raise SystemExit("unknown op " + op)
say("job", job.id)
info = c.job_wait(job.id)
say("end", info.state, info.error or "")
c.close()
"""


@dataclass
class Kill:
    """When to kill: ``delay`` seconds after the child said ``after`` ("ready" or "job";
    "start": after it was started, so during its start-up too), or, with ``progress``,
    once the job has reported that many bytes done."""

    after: str = "ready"
    delay: float = 0.0
    progress: int | None = None

    def describe(self) -> str:
        if self.progress is not None:
            return f"after {self.progress} bytes of progress"
        return f"{self.delay * 1000:.0f} ms after '{self.after}'"


@dataclass
class Outcome:
    lines: list[str] = field(default_factory=list)
    killed: bool = False  # the SIGKILL reached a live child
    returncode: int | None = None
    stderr: str = ""

    def words(self, first: str) -> list[list[str]]:
        return [ln.split()[1:] for ln in self.lines if ln.split()[:1] == [first]]

    @property
    def job_id(self) -> str | None:
        found = self.words("job")
        return found[0][0] if found else None

    @property
    def job_end(self) -> str | None:
        found = self.words("end")
        return found[0][0] if found and found[0] else None


def child_env(path: str | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("VIRTSTORE_")}
    src = str(Path(__file__).resolve().parents[2] / "src")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (src, env.get("PYTHONPATH")) if p)
    if path is not None:
        env["PATH"] = path
    return env


def _read_lines(proc: subprocess.Popen[bytes], out: Outcome, until: str,
                deadline: float) -> bool:
    """Read the child's lines until one starts with ``until``; False if it ended first.
    The pipe is unbuffered (a raw file reads a line byte by byte): nothing is read ahead
    of that line, so communicate() later gets every byte after it."""
    assert proc.stdout is not None
    while time.monotonic() < deadline:
        line = proc.stdout.readline().decode()
        if not line:
            return False
        out.lines.append(line.strip())
        if line.split()[:1] == [until]:
            return True
    return False


def run_and_kill(spec: dict[str, object], kill: Kill, *, timeout: float = 20.0) -> Outcome:
    """Run CHILD with ``spec``, SIGKILL it as ``kill`` says, reap it, return what it said."""
    out = Outcome()
    proc = subprocess.Popen([sys.executable, "-c", CHILD, json.dumps(spec)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, bufsize=0,
                            env=child_env())
    deadline = time.monotonic() + timeout
    try:
        reached = kill.after == "start" or _read_lines(proc, out, kill.after, deadline)
        if reached:
            if kill.progress is not None and out.job_id is not None:
                _wait_progress(str(spec["root"]), out.job_id, kill.progress, proc, deadline)
            elif kill.delay > 0:
                time.sleep(kill.delay)
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
    finally:
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGKILL)
        rest, err = proc.communicate(timeout=timeout)
    out.lines.extend(x.strip() for x in rest.decode().splitlines() if x.strip())
    out.returncode = proc.returncode
    out.stderr = err.decode()
    out.killed = proc.returncode == -signal.SIGKILL
    if not out.killed and proc.returncode != 0:
        raise AssertionError(f"child failed on its own ({proc.returncode}): {err.strip()}")
    if out.killed:
        summary.add("kills")
    _wait_helpers_gone(str(spec["root"]))
    return out


def _wait_progress(root: str, job_id: str, want: int, proc: subprocess.Popen[bytes],
                   deadline: float) -> None:
    import sqlite3

    # Read the job row directly (read-only): opening a connection would run recovery.
    db = sqlite3.connect(f"file:{root}/state.db?mode=ro", uri=True, timeout=5)
    try:
        while proc.poll() is None and time.monotonic() < deadline:
            row = db.execute("SELECT bytes_done, state FROM jobs WHERE id=?",
                             (job_id,)).fetchone()
            if row is None or row[0] >= want or row[1] != "running":
                return
            time.sleep(0.005)
    finally:
        db.close()


def processes_with(text: str) -> list[int]:
    pids = []
    me = os.getpid()
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == me:
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                cmd = f.read().replace(b"\0", b" ").decode("utf-8", "replace")
            with open(f"/proc/{entry}/stat", encoding="utf-8") as f:
                zombie = f.read().rsplit(")", 1)[1].split()[0] == "Z"
        except OSError:
            continue
        if text in cmd and not zombie and "-c" not in cmd.split()[1:2]:
            pids.append(int(entry))
    return pids


def _wait_helpers_gone(root: str, limit: float = 5.0) -> None:
    """Tools started by the dead child (qemu-img) die with it (pdeathsig)."""
    pool_hint = str(Path(root).parent)
    deadline = time.monotonic() + limit
    while True:
        left = processes_with(pool_hint)
        if not left:
            return
        if time.monotonic() > deadline:
            summary.lost(f"helper processes outlived their parent: {left}")
            raise AssertionError(f"processes still running on {pool_hint}: {left}")
        time.sleep(0.02)


# -- what a volume should hold -------------------------------------------------------------


@dataclass
class Expect:
    """What a volume must be if it is listed: ``check(path)`` returns a complaint or None."""

    what: str
    check: Callable[[Path], str | None]


def raw_bytes(*shas: str, size: int | None = None) -> Expect:
    allowed = set(shas)

    def check(path: Path) -> str | None:
        if size is not None and path.stat().st_size != size:
            return f"size {path.stat().st_size}, expected {size}"
        got = file_sha(path)
        return None if got in allowed else f"content {got[:12]} is none of the expected"

    return Expect(f"raw content ({len(allowed)} choice(s))", check)


def zero_raw(size: int) -> Expect:
    return raw_bytes(zeros_sha(size), size=size)


def qemu_img(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["qemu-img", *args], capture_output=True, text=True, check=False)


def qcow2_header(path: Path) -> tuple[int, int] | None:
    """(version, virtual size) from a qcow2 header, read here independently of the
    engine's parser; None if the file is not qcow2."""
    with open(path, "rb") as f:
        head = f.read(32)
    if len(head) < 32 or head[:4] != b"QFI\xfb":
        return None
    return int.from_bytes(head[4:8], "big"), int.from_bytes(head[24:32], "big")


def qcow2_of(*sizes: int, same_as: Path | None = None, deep: bool = True) -> Expect:
    """A qcow2 image of one of the virtual ``sizes``; with ``deep`` qemu-img checks it
    clean (and, with ``same_as``, that it reads the same bytes as that raw file)."""

    def check(path: Path) -> str | None:
        head = qcow2_header(path)
        if head is None or head[0] not in (2, 3) or head[1] not in sizes:
            return f"qcow2 header says {head}"
        if not deep:
            return None
        info = qemu_img("info", "-U", "--output=json", str(path))
        if info.returncode != 0:
            return f"qemu-img info: {info.stderr.strip()}"
        data = json.loads(info.stdout)
        if data.get("format") != "qcow2" or data.get("virtual-size") not in sizes:
            return f"format {data.get('format')} size {data.get('virtual-size')}"
        chk = qemu_img("check", "-U", "-f", "qcow2", str(path))
        if chk.returncode != 0:
            return f"qemu-img check: {chk.stdout.strip()} {chk.stderr.strip()}"
        if same_as is not None:
            cmp = qemu_img("compare", "-U", "-f", "raw", "-F", "qcow2", str(same_as), str(path))
            if cmp.returncode != 0:
                return f"qemu-img compare: {cmp.stdout.strip()}"
        return None

    return Expect(f"qcow2 of {' or '.join(map(str, sizes))} bytes", check)


def wiped_front_to_back(original: bytes) -> Expect:
    """A raw volume a random wipe was killed on: the same size, the blocks from some
    point on exactly as before (the wipe goes front to back), none after a changed one
    left unchanged before it except by chance (not checked: random data may repeat)."""

    def check(path: Path) -> str | None:
        data = path.read_bytes()
        if len(data) != len(original):
            return f"size {len(data)} changed from {len(original)}"
        first_same = len(data)
        for off in range(len(data) - BLOCK, -1, -BLOCK):
            if data[off:off + BLOCK] != original[off:off + BLOCK]:
                break
            first_same = off
        # Before first_same every block must be changed (random data equal to the old
        # block has probability 2^-32768).
        for off in range(0, first_same, BLOCK):
            if data[off:off + BLOCK] == original[off:off + BLOCK]:
                return f"block at {off} untouched before the wiped block at {first_same - BLOCK}"
        return None

    return Expect("wiped front to back", check)


# -- the invariants after a crash ----------------------------------------------------------


@dataclass
class Trial:
    """One root, one dir pool, and what each of its volumes must be."""

    root: Path
    pooldir: Path
    pool: str = "rel"
    expected: dict[str, Expect] = field(default_factory=dict)

    @classmethod
    def make(cls, base: Path, name: str = "rel") -> Trial:
        root, pooldir = base / "state", base / "pool"
        pooldir.mkdir(parents=True)
        with EmbeddedConnection(str(root)) as c:
            c.pool_define_xml(f"<pool type='dir'><name>{name}</name><target><path>"
                              f"{pooldir}</path></target></pool>")
            c.pool_start(name)
        return cls(root, pooldir, name)

    def spec(self, op: str, **kw: object) -> dict[str, object]:
        return {"root": str(self.root), "pool": self.pool, "op": op, **kw}

    def path(self, name: str) -> Path:
        return self.pooldir / name

    @contextlib.contextmanager
    def fresh(self) -> Iterator[EmbeddedConnection]:
        """The next process's view: a new connection on the root (its start-up recovers
        what the dead one left)."""
        c = EmbeddedConnection(str(self.root))
        try:
            yield c
        finally:
            c.close()

    def check(self, c: EmbeddedConnection, out: Outcome, *,
              in_flight: dict[str, Expect] | None = None) -> list[str]:
        """Check every invariant; the names listed now. ``in_flight``: volumes the killed
        operation was making, each absent or as given (then they join ``expected``)."""
        problems: list[str] = []
        for f in sorted((self.root / "pools").glob("*.xml")):
            try:
                text = f.read_text()
                parse_pool_xml(text)
                validate(text, "pool")
            except Exception as exc:
                problems.append(f"definition {f.name} broken: {exc}")
        leftovers = [n for n in os.listdir(self.pooldir) if n.startswith(STAGING_PREFIX)]
        if leftovers:
            problems.append(f"staging files left: {leftovers}")
        c.pool_refresh(self.pool)
        listed = [v.name for v in c.list_volumes(self.pool)]
        on_disk = sorted(n for n in os.listdir(self.pooldir) if not n.startswith("."))
        if sorted(listed) != on_disk:
            problems.append(f"listing {sorted(listed)} differs from the directory {on_disk}")
        in_flight = dict(in_flight or {})
        for name in listed:
            exp = self.expected.get(name) or in_flight.pop(name, None)
            if exp is None:
                problems.append(f"unexpected volume '{name}'")
                continue
            why = exp.check(self.path(name))
            if why is not None:
                problems.append(f"volume '{name}' ({exp.what}): {why}")
            self.expected[name] = exp
        for name in self.expected:
            if name not in listed:
                problems.append(f"volume '{name}' lost")
                summary.lost(f"volume '{name}' after {out.lines[-1:]}")
        if out.job_id is not None:
            info = c.job_info(out.job_id)
            if out.killed and out.job_end is None:
                if not (info.state == "done" or (info.state == "failed"
                                                 and "interrupted" in (info.error or ""))):
                    problems.append(f"killed job is {info.state}: {info.error}")
            elif info.state != (out.job_end or info.state):
                problems.append(f"job is {info.state}, its process saw {out.job_end}")
            if out.killed and info.state != "done":
                summary.add("kills_mid_op")
        return problems

    def forget(self, c: EmbeddedConnection, name: str) -> None:
        """Delete a volume (this also proves no stale lock holds it)."""
        c.volume_delete(self.pool, name)
        self.expected.pop(name, None)


def random_kill(rng: random.Random, *, after: str, span: float,
                progress_total: int | None = None) -> Kill:
    """Half the kills at a random delay within ``span``, half (for jobs with a known
    size) after a random amount of progress."""
    if progress_total and rng.random() < 0.5:
        return Kill(after="job", progress=rng.randrange(1, progress_total))
    return Kill(after=after, delay=rng.uniform(0, span))


# -- racing processes ----------------------------------------------------------------------

RACE_OPS = ("create", "clone", "resize", "delete")
RACE_WEIGHTS = (4, 2, 2, 3)
RACE_SIZES = (MiB, 2 * MiB)


def _open(target: str) -> Connection:
    import virtstore

    if target.startswith("unix:"):
        return virtstore.connect(target)
    return EmbeddedConnection(target)


def race_worker(target: str, pool: str, seed: int, n_ops: int,
                names: list[str]) -> list[tuple[str, str, str, str]]:
    """``n_ops`` random operations on overlapping names; (op, name, outcome, detail)
    each, outcome "ok" or an error code ("unexpected" for anything not a
    VirtstoreError)."""
    from virtstore.api import VolumeCreateArgs
    from virtstore.errors import VirtstoreError

    conn = _open(target)
    rng = random.Random(seed)
    done: list[tuple[str, str, str, str]] = []
    try:
        for _ in range(n_ops):
            op = rng.choices(RACE_OPS, RACE_WEIGHTS)[0]
            name = rng.choice(names)
            detail = ""
            try:
                if op == "create":
                    conn.volume_create(pool, VolumeCreateArgs(
                        name, rng.choice(RACE_SIZES), allocation=0))
                elif op == "clone":
                    detail = rng.choice(names)
                    job = conn.volume_clone(pool, detail, name)
                    info = conn.job_wait(job.id, timeout=60)
                    if info.state != "done":
                        done.append((op, name, f"job-{info.error_code}", str(info.error)))
                        continue
                elif op == "resize":
                    size = rng.choice(RACE_SIZES)
                    job = conn.volume_resize(pool, name, size,
                                             shrink=True)
                    info = conn.job_wait(job.id, timeout=60)
                    if info.state != "done":
                        done.append((op, name, f"job-{info.error_code}", str(info.error)))
                        continue
                    detail = str(size)
                else:
                    conn.volume_delete(pool, name)
                done.append((op, name, "ok", detail))
            except VirtstoreError as exc:
                done.append((op, name, exc.code, str(exc)))
            except Exception as exc:
                done.append((op, name, "unexpected", f"{type(exc).__name__}: {exc}"))
    finally:
        conn.close()
    return done


def race_lister(target: str, pool: str, stop: EventType) -> tuple[int, list[str]]:
    """Refresh and list until ``stop`` (a multiprocessing Event) is set: (listings,
    failures)."""
    conn = _open(target)
    count, failures = 0, []
    try:
        while not stop.is_set():
            try:
                conn.pool_refresh(pool)
                conn.list_volumes(pool)
                count += 1
            except Exception as exc:
                failures.append(f"{type(exc).__name__}: {exc}")
    finally:
        conn.close()
    return count, failures
