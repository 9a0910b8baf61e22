"""vol-df and vol-boot-files on a qcow2 guest disk, side by side with libguestfs's
virt-df and virt-get-kernel (Debian guestfs-tools), as a user types each command.

    .venv/bin/python bench/bench_inspect.py [--runs 3] [--workdir /var/lib]

Builds the test suite's guest disk (GPT, nine partitions made by real mkfs) as qcow2 in a
dir pool, compiles the bytecode first, and prints best-of-N wall time for each command,
both sides and the ratio (virtstore / libguestfs; below 1 is faster). Measurement only.
"""

from __future__ import annotations

import argparse
import compileall
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))


def best(argv: list[str], runs: int, env: dict[str, str]) -> float:
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        subprocess.run(argv, check=True, stdout=subprocess.DEVNULL, env=env)
        times.append(time.perf_counter() - t0)
    return min(times)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--workdir", default="/var/lib")
    opts = ap.parse_args()
    from inspect_fixtures import build_guest, can_build

    why = can_build()
    if why:
        print(f"cannot build the guest disk: {why}")
        return 1
    compileall.compile_dir(str(REPO / "src"), quiet=1)
    work = Path(tempfile.mkdtemp(prefix="bench-inspect-", dir=opts.workdir))
    try:
        guest = build_guest(work / "build")
        images = work / "images"
        images.mkdir()
        qcow = images / "guest.qcow2"
        subprocess.run(["qemu-img", "convert", "-O", "qcow2", str(guest.raw), str(qcow)],
                       check=True)
        root = work / "state"
        env = dict(os.environ, PYTHONPATH=str(REPO / "src"), LIBGUESTFS_BACKEND="direct")
        # supermin builds libguestfs's appliance from a host kernel; where /boot has none,
        # the kernel lab's Debian kernel (testenv/kernel-lab.sh) serves.
        lab = sorted(Path("/opt/kernel-lab/root/boot").glob("vmlinuz-*"))
        if not list(Path("/boot").glob("vmlinuz-*")) and lab:
            ver = lab[-1].name[len("vmlinuz-"):]
            env.update(SUPERMIN_KERNEL=str(lab[-1]),
                       SUPERMIN_MODULES=f"/opt/kernel-lab/root/lib/modules/{ver}")
        vs = [sys.executable, "-m", "virtstore.cli.main", "--root", str(root)]
        subprocess.run([*vs, "pool-create-as", "g", "dir", "--target", str(images)],
                       check=True, stdout=subprocess.DEVNULL, env=env)
        rows = [("vol-df", [*vs, "vol-df", "guest.qcow2", "g"],
                 ["virt-df", "--format=qcow2", "-a", str(qcow)]),
                ("vol-df -h", [*vs, "vol-df", "guest.qcow2", "g", "--human"],
                 ["virt-df", "-h", "--format=qcow2", "-a", str(qcow)]),
                ("vol-boot-files --extract", [*vs, "vol-boot-files", "guest.qcow2", "g",
                                              "--extract", str(work / "k1")],
                 ["virt-get-kernel", "--format=qcow2", "-a", str(qcow), "-o",
                  str(work / "k2")])]
        (work / "k2").mkdir()
        print(f"{'command':<28} {'virtstore':>10} {'libguestfs':>11} {'ratio':>7}")
        for name, ours, theirs in rows:
            t_ours = best(ours, opts.runs, env)
            t_theirs = 0.0
            if shutil.which(theirs[0]):
                try:
                    t_theirs = best(theirs, opts.runs, env)
                except subprocess.CalledProcessError:
                    print(f"{name:<28} {t_ours:>9.3f}s {'(failed)':>11} {'-':>7}")
                    continue
                print(f"{name:<28} {t_ours:>9.3f}s {t_theirs:>10.3f}s "
                      f"{t_ours / t_theirs:>7.3f}")
            else:
                print(f"{name:<28} {t_ours:>9.3f}s {'(absent)':>11} {'-':>7}")
        print("\n" + subprocess.run([*vs, "vol-df", "guest.qcow2", "g", "--human"],
                                    check=True, capture_output=True, text=True,
                                    env=env).stdout)
        if shutil.which("virt-df"):
            print(subprocess.run(["virt-df", "-h", "--format=qcow2", "-a", str(qcow)],
                                 capture_output=True, text=True, env=env).stdout)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
