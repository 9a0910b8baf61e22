"""Remote lookups per second from one client, through virtstored's unix socket.

    .venv/bin/python bench/bench_remote.py [--volumes 1000] [--seconds 5]

Starts a virtstored on a temporary root, makes a dir pool with N volumes, then one
client (``virtstore.connect("unix:///...")``) looks volumes up by name and by path for
a few seconds each, and prints the rates. libvirt's RPC did 7,600 lookups/s here.
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import virtstore
from virtstore.api import VolumeCreateArgs

GOAL = 7600


def _start(root: Path, sock_dir: Path) -> subprocess.Popen[bytes]:
    exe = Path(sys.executable).parent / "virtstored"
    argv = [str(exe)] if exe.exists() else [sys.executable, "-m", "virtstore.server.main"]
    proc = subprocess.Popen([*argv, "--root", str(root), "--socket-dir", str(sock_dir),
                             "--log-level", "warning"], stdout=subprocess.DEVNULL)
    sock = sock_dir / "virtstored-ro.sock"
    deadline = time.monotonic() + 30
    while not sock.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise SystemExit("virtstored did not start")
        time.sleep(0.05)
    return proc


def _cpu(pid: int) -> float:
    """User + system CPU seconds of a process."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _rate(fn: object, args: list[tuple[str, ...]], seconds: float,
          server: int) -> tuple[float, float, float]:
    """Calls per second, and the client's and the server's CPU microseconds per call
    (which, unlike the rate, do not depend on what else the machine is doing)."""
    call = fn  # a bound method
    n = 0
    c0, s0 = time.process_time(), _cpu(server)
    t0 = time.perf_counter()
    end = t0 + seconds
    while True:
        for a in args:
            call(*a)  # type: ignore[operator]
        n += len(args)
        if time.perf_counter() >= end:
            rate = n / (time.perf_counter() - t0)
            return (rate, (time.process_time() - c0) / n * 1e6,
                    (_cpu(server) - s0) / n * 1e6)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--volumes", type=int, default=1000)
    ap.add_argument("--seconds", type=float, default=5.0)
    opts = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="vsbench-"))
    proc = _start(work / "state", work)
    try:
        conn = virtstore.connect(f"unix://{work}/virtstored.sock")
        target = work / "pool"
        conn.pool_define_xml(f"<pool type='dir'><name>bench</name><target><path>{target}"
                             "</path></target></pool>")
        conn.pool_start("bench", build=True)
        names = [f"vol-{i:06d}.img" for i in range(opts.volumes)]
        for name in names:
            (target / name).write_bytes(b"")
        conn.pool_refresh("bench")
        pick = random.Random(1).choices(names, k=200)
        by_name = [("bench", n) for n in pick]
        by_path = [(str(target / n),) for n in pick]
        _rate(conn.volume_info, by_name, 0.5, proc.pid)  # warm up
        results = [("lookup by name (vol-info)",
                    _rate(conn.volume_info, by_name, opts.seconds, proc.pid)),
                   ("lookup by path",
                    _rate(conn.volume_lookup_by_path, by_path, opts.seconds, proc.pid))]
        conn.volume_create("bench", VolumeCreateArgs("x.img", 1024))
        conn.close()
        print(f"virtstored, one client, unix socket, {opts.volumes} volumes "
              f"(load average {os.getloadavg()[0]:.2f})")
        for label, (rate, ccpu, scpu) in results:
            print(f"  {label:<27} {rate:8.0f}/s  goal {GOAL}/s "
                  f"{'met' if rate >= GOAL else 'MISSED':<6}  CPU per lookup: client "
                  f"{ccpu:.0f} us, server {scpu:.0f} us "
                  f"(at most {1e6 / (ccpu + scpu):.0f}/s on an idle machine)")
    finally:
        os.kill(proc.pid, signal.SIGTERM)
        proc.wait(10)
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
