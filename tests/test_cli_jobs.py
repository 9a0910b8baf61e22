"""job-list, job-info, job-wait, job-cancel and event through the real CLI, with jobs run
and cancelled from separate processes on one state root, and Ctrl-C on a terminal."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import select
import signal
import struct
import subprocess
import sys
import termios
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from cli_fixtures import Cli, Result, cli_fixture, error_of, pool_fixture  # noqa: F401

MiB = 1024**2
# Upper bounds for waiting on other processes; never asserted as durations.
PATIENCE = 60.0


def full_volume(cli: Cli, pool: Path, name: str, size: int) -> Path:
    """A volume whose every byte is data (nothing for a sparse copy to skip)."""
    path = pool / name
    with open(path, "wb") as fh:
        for _ in range(size // MiB):
            fh.write(os.urandom(MiB))
    cli("pool-refresh", "images")
    return path


def cli_argv(root: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "virtstore.cli.main", "--root", str(root), *args]


@contextlib.contextmanager
def cli_process(root: Path, *args: str) -> Iterator[subprocess.Popen[str]]:
    """The CLI run in another process, its output kept as text; killed at the end if it
    is still running."""
    proc = subprocess.Popen(cli_argv(root, *args), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def running_job(cli: Cli, kind: str, proc: subprocess.Popen[Any]) -> dict[str, Any]:
    """The running job of ``kind`` another process started, once it is listed."""
    deadline = time.monotonic() + PATIENCE
    while time.monotonic() < deadline:
        jobs = json.loads(cli("job-list", "--json").out)
        running = [j for j in jobs if j["kind"] == kind and j["state"] == "running"]
        if running:
            assert len(running) == 1, jobs
            job: dict[str, Any] = running[0]
            return job
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.05)
    pytest.fail(f"no running {kind} job appeared")


def test_job_list_info_wait_and_cancel_of_finished_jobs(cli: Cli, pool: Path) -> None:
    cli("vol-create-as", "images", "a.img", "4M", "--allocation", "0")
    cli("vol-resize", "a.img", "8M", "--pool", "images")
    cli("vol-clone", "a.img", "b.img", "--pool", "images")

    # Without --all: only jobs still running, and there are none.
    assert cli("job-list").out == (
        " Id   Kind   State   Volume   Progress   Rate\n"
        "-----------------------------------------------\n\n")
    out = cli("job-list", "--all").out.split("\n")
    assert out[0].split() == ["Id", "Kind", "State", "Volume", "Progress", "Rate"]
    rows = [line.split() for line in out[2:] if line]
    assert [r[1:5] for r in rows] == [["resize", "done", "images/a.img", "100%"],
                                      ["clone", "done", "images/a.img", "->"]]
    assert rows[1][5:7] == ["images/b.img", "100%"]
    jobs = json.loads(cli("job-list", "--all", "--json").out)
    assert [(j["kind"], j["state"], j["volume"], j["target_volume"]) for j in jobs] == [
        ("resize", "done", "a.img", None), ("clone", "done", "a.img", "b.img")]
    assert [j["id"] for j in jobs] == [r[0] for r in rows]

    clone_id = jobs[1]["id"]
    info = cli("job-info", clone_id).out
    assert f"Id:             {clone_id}\n" in info
    assert "Kind:           clone\n" in info
    assert "State:          done\n" in info
    assert "Volume:         images/a.img\n" in info
    assert "Target:         images/b.img\n" in info
    assert json.loads(cli("job-info", clone_id, "--json").out) == jobs[1]

    assert cli("job-wait", clone_id).out == f"Job {clone_id} completed\n\n"
    lines = cli("job-wait", clone_id, "--json").out.splitlines()
    assert [json.loads(line)["state"] for line in lines] == ["done"]
    assert error_of(cli("job-cancel", clone_id, ok=False)) == (
        f"Requested operation is not valid: job '{clone_id}' is already done")
    assert "nosuch" in error_of(cli("job-info", "nosuch", ok=False))


@pytest.fixture
def tiny_fs(tmp_path: Path) -> Iterator[Path]:
    """A 1 MiB tmpfs: too small for what is copied into it."""
    d = tmp_path / "tiny"
    d.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1M", "tmpfs", str(d)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    try:
        yield d
    finally:
        subprocess.run(["umount", "-l", str(d)], check=False)


def test_failed_job_gives_its_error_and_is_listed(cli: Cli, pool: Path,
                                                  tiny_fs: Path) -> None:
    full_volume(cli, pool, "big.img", 4 * MiB)
    cli("pool-create-as", "tiny", "dir", "--target", str(tiny_fs))
    result = cli("vol-clone", "big.img", "x.img", "--pool", "images", "--target-pool", "tiny",
                 ok=False)
    msg = error_of(result)
    assert "no space" in msg.lower()
    assert result.out == ""
    assert list(tiny_fs.iterdir()) == []
    assert json.loads(cli("vol-list", "tiny", "--json").out) == []

    jobs = json.loads(cli("job-list", "--all", "--json").out)
    assert [(j["kind"], j["state"], j["error"], j["error_code"]) for j in jobs] == [
        ("clone", "failed", msg, "no-space")]
    row = cli("job-list", "--all").out.split("\n")[2].split()
    assert row[:5] == [jobs[0]["id"], "clone", "failed", "images/big.img", "->"]
    assert row[5] == "tiny/x.img"
    assert f"Error:          {msg}\n" in cli("job-info", jobs[0]["id"]).out
    assert error_of(cli("job-wait", jobs[0]["id"], ok=False)) == msg
    # With --json the last line is the failed job, and the error still goes to stderr.
    result = cli("vol-clone", "big.img", "x.img", "--pool", "images", "--target-pool", "tiny",
                 "--json", ok=False)
    assert error_of(result) == msg
    last = json.loads(result.out.splitlines()[-1])
    assert last["state"] == "failed" and last["error"] == msg


def test_job_cancel_from_another_process(cli: Cli, root: Path, pool: Path) -> None:
    full_volume(cli, pool, "big.img", 64 * MiB)
    with cli_process(root, "vol-clone", "big.img", "copy.img", "--pool", "images",
                     "--bandwidth", "1M") as proc:
        job = running_job(cli, "clone", proc)
        assert job["target_volume"] == "copy.img" and job["bandwidth"] == MiB
        out = cli("job-cancel", job["id"]).out
        assert out in (f"Job {job['id']} cancelled\n\n", f"Job {job['id']} cancel requested\n\n")
        stdout, stderr = proc.communicate(timeout=PATIENCE)
    assert proc.returncode == 1, (stdout, stderr)
    assert stdout == ""
    assert stderr == ("error: Failed to clone vol from big.img\n"
                      f"error: operation aborted: clone job '{job['id']}' was cancelled\n")
    assert json.loads(cli("job-info", job["id"], "--json").out)["state"] == "cancelled"
    # Nothing under the target's name, on disk or in the pool, and no staging left.
    assert not (pool / "copy.img").exists()
    assert sorted(p.name for p in pool.iterdir()) == ["big.img"]
    vols = json.loads(cli("vol-list", "images", "--json").out)
    assert [v["name"] for v in vols] == ["big.img"]
    # The name is free again.
    cli("vol-clone", "big.img", "copy.img", "--pool", "images")
    assert (pool / "copy.img").read_bytes() == (pool / "big.img").read_bytes()


def test_job_wait_from_another_process(cli: Cli, root: Path, pool: Path) -> None:
    full_volume(cli, pool, "src.img", 4 * MiB)
    with cli_process(root, "vol-clone", "src.img", "dst.img", "--pool", "images",
                     "--bandwidth", "1M") as proc:
        job = running_job(cli, "clone", proc)
        lines = [json.loads(line)
                 for line in cli("job-wait", job["id"], "--json").out.splitlines()]
        stdout, stderr = proc.communicate(timeout=PATIENCE)
    assert proc.returncode == 0, stderr
    assert stdout == "Vol dst.img cloned from src.img\n\n"
    assert {line["id"] for line in lines} == {job["id"]}
    assert lines[-1]["state"] == "done"
    assert all(line["state"] == "running" for line in lines[:-1])
    assert (pool / "dst.img").read_bytes() == (pool / "src.img").read_bytes()


_ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


def test_ctrl_c_on_a_terminal_cancels_the_job(cli: Cli, root: Path, pool: Path) -> None:
    """On a terminal a bar shows the copy; SIGINT (Ctrl-C) cancels the job, removes what
    it made and ends with one error line."""
    full_volume(cli, pool, "src.img", 32 * MiB)
    master, slave = os.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 120, 0, 0))
    env = dict(os.environ, TERM="xterm", COLUMNS="120")
    env.pop("NO_COLOR", None)
    proc = subprocess.Popen(cli_argv(root, "vol-clone", "src.img", "dst.img", "--pool",
                                     "images", "--bandwidth", "1M"),
                            stdout=subprocess.PIPE, stderr=slave, env=env)
    os.close(slave)
    seen = b""

    def read_some(limit: float) -> bool:
        nonlocal seen
        ready, _, _ = select.select([master], [], [], limit)
        if not ready:
            return True
        try:
            chunk = os.read(master, 65536)
        except OSError:  # EIO: the other side is closed
            return False
        seen += chunk
        return bool(chunk)

    try:
        deadline = time.monotonic() + PATIENCE
        # The bar, with bytes done of the total once the copy has started.
        while b" MiB" not in seen and time.monotonic() < deadline:
            assert proc.poll() is None, seen
            read_some(0.1)
        assert b"clone src.img" in seen, seen
        proc.send_signal(signal.SIGINT)
        while read_some(1.0) and proc.poll() is None:
            pass
        proc.wait(timeout=PATIENCE)
        while read_some(0.1):
            pass
        stdout = proc.stdout.read() if proc.stdout else b""
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        os.close(master)
        if proc.stdout:
            proc.stdout.close()
    text = _ANSI.sub("", seen.decode(errors="replace")).replace("\r", "\n")
    assert "/32.0 MiB" in text  # bytes done of the total
    errors = [line for line in text.split("\n") if line.startswith("error:")]
    jobs = json.loads(cli("job-list", "--all", "--json").out)
    job_id = jobs[-1]["id"]
    assert errors == ["error: Failed to clone vol from src.img",
                      f"error: operation aborted: clone job '{job_id}' cancelled by the user"]
    assert proc.returncode == 1
    assert stdout == b""
    assert jobs[-1]["state"] == "cancelled"
    assert sorted(p.name for p in pool.iterdir()) == ["src.img"]


# -- events --------------------------------------------------------------------

def test_event_list_and_timeout(cli: Cli, pool: Path) -> None:
    assert cli("event", "--list").out == "lifecycle\nrefresh\njob\n\n"
    result = cli("event", "--timeout", "1", ok=False)
    assert result == Result(1, "event loop timed out\nevents received: 0\n\n", "")
    assert error_of(cli("event", "--timeout", "x", ok=False)) == (
        "Numeric value 'x' for <timeout> option is malformed or out of range")
    # virsh's pool-event: pool events only, and it wants an event type.
    assert cli("pool-event", "--list").out == "lifecycle\nrefresh\n\n"
    assert error_of(cli("pool-event", ok=False)) == (
        "either --list or --event <type> is required")
    assert error_of(cli("pool-event", "--event", "job", ok=False)) == (
        "unknown event type job")


def test_pool_event_loop(cli: Cli, root: Path, pool: Path, tmp_path: Path) -> None:
    (tmp_path / "extra").mkdir()
    cli("pool-define-as", "extra", "dir", "--target", str(tmp_path / "extra"))

    def act(n: int) -> None:
        cli("vol-create-as", "images", f"v{n}.img", "1M")  # not a pool event: ignored
        cli("pool-start" if n % 2 == 0 else "pool-destroy", "extra")

    out = _watch(act, root, "pool-event", "--event", "lifecycle", "--pool", "extra",
                 "--timestamp", "--timeout", "60").split("\n")
    assert re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{3}\+0000: event 'lifecycle' "
                        r"for storage pool extra: (Started|Stopped)", out[0]), out
    assert out[1:] == ["events received: 1", "", ""]


def _watch(act: Callable[[int], None], root: Path, *args: str) -> str:
    """Run the CLI with ``args`` in another process and repeat ``act`` until it has seen
    what it waits for; its output."""
    with cli_process(root, *args) as proc:
        deadline = time.monotonic() + PATIENCE
        n = 0
        while proc.poll() is None and time.monotonic() < deadline:
            act(n)
            n += 1
            time.sleep(0.1)
        stdout, stderr = proc.communicate(timeout=PATIENCE)
    assert proc.returncode == 0, stderr
    return stdout


def test_event_one_shot_sees_a_volume_of_another_process(cli: Cli, root: Path,
                                                         pool: Path) -> None:
    def act(n: int) -> None:
        cli("vol-create-as", "images", f"v{n}.img", "1M")

    out = _watch(act, root, "event", "--pool", "images", "--event", "lifecycle",
                 "--timeout", "60").split("\n")
    assert re.fullmatch(r"event 'lifecycle' for storage vol v\d+\.img in pool images: Created",
                        out[0]), out
    assert out[1:] == ["events received: 1", "", ""]


def test_event_json_for_jobs(cli: Cli, root: Path, pool: Path) -> None:
    cli("vol-create-as", "images", "a.img", "1M", "--allocation", "0")

    def act(n: int) -> None:
        cli("vol-resize", "a.img", f"{n + 2}M", "--pool", "images")

    lines = _watch(act, root, "event", "--event", "job", "--json", "--timeout", "60").splitlines()
    assert len(lines) == 1
    ev = json.loads(lines[0])
    assert ev["kind"] == "job" and ev["action"] == "done"
    assert ev["job"]["kind"] == "resize" and ev["job"]["state"] == "done"
    assert ev["job"]["volume"] == "a.img" and ev["name"] == ev["job"]["id"]
