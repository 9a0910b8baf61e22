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


def _rate(fn: object, args: list[tuple[str, ...]], seconds: float) -> float:
    call = fn  # a bound method
    n = 0
    t0 = time.perf_counter()
    end = t0 + seconds
    while True:
        for a in args:
            call(*a)  # type: ignore[operator]
        n += len(args)
        if time.perf_counter() >= end:
            return n / (time.perf_counter() - t0)


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
        _rate(conn.volume_info, by_name, 0.5)  # warm up
        r_name = _rate(conn.volume_info, by_name, opts.seconds)
        r_path = _rate(conn.volume_lookup_by_path, by_path, opts.seconds)
        conn.volume_create("bench", VolumeCreateArgs("x.img", 1024))
        conn.close()
        print(f"virtstored, one client, unix socket, {opts.volumes} volumes")
        print(f"  lookup by name (vol-info)  {r_name:10.0f}/s   goal {GOAL}/s "
              f"{'met' if r_name >= GOAL else 'MISSED'}")
        print(f"  lookup by path             {r_path:10.0f}/s   goal {GOAL}/s "
              f"{'met' if r_path >= GOAL else 'MISSED'}")
        print(f"  load average {os.getloadavg()[0]:.2f}")
    finally:
        os.kill(proc.pid, signal.SIGTERM)
        proc.wait(10)
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
