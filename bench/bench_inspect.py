"""vol-df and vol-boot-files on qcow2 guest disks, side by side with libguestfs's
virt-df and virt-get-kernel (Debian guestfs-tools), as a user types each command.

    .venv/bin/python bench/bench_inspect.py [--runs 3] [--guestfs-runs 1] [--workdir /var/lib]
        [--pool-volumes 100]

Builds the test suite's guest disks as qcow2 in a dir pool: the nine-partition GPT disk,
and a Fedora-like one (xfs /boot, btrfs root in subvolumes, swap). Compiles the bytecode
first and prints best-of-N wall time for each command, both sides and the ratio
(virtstore / libguestfs; below 1 is faster). Measurement only. ``--guestfs-runs 0``
times virtstore alone.

``pool-df`` runs on a second pool of ``--pool-volumes`` qcow2 overlays of the GPT guest
disk (each one reads its own filesystems through its backing file); libguestfs has no
per-pool command, so that row has virtstore's time only.

libguestfs boots an appliance built by supermin from a host kernel. Where /boot has
none, the kernel lab's Debian kernel serves; supermin only copies modules from
/lib/modules/VERSION, so its commands run in a private mount namespace where the lab's
modules are bind-mounted there (nothing changes on the host). Where KVM cannot run the
appliance (nested: "failed to set MSR"), it runs under TCG; the output says which.
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
        subprocess.run(argv, check=True, stdout=subprocess.DEVNULL,
                       stderr=subprocess.PIPE, env=env)
        times.append(time.perf_counter() - t0)
    return min(times)


def guestfs_wrapper(env: dict[str, str]) -> tuple[list[str] | None, str]:
    """The prefix that runs a libguestfs command here and how it runs, or (None, why
    it cannot)."""
    if shutil.which("virt-df") is None:
        return None, "guestfs-tools is not installed"
    prefix: list[str] = []
    if not list(Path("/boot").glob("vmlinuz-*")):
        lab = sorted(Path("/opt/kernel-lab/root/boot").glob("vmlinuz-*"))
        if not lab:
            return None, "no kernel for libguestfs's appliance (/boot is empty)"
        ver = lab[-1].name[len("vmlinuz-"):]
        mods = f"/opt/kernel-lab/root/lib/modules/{ver}"
        env.update(SUPERMIN_KERNEL=str(lab[-1]), SUPERMIN_MODULES=f"/lib/modules/{ver}")
        prefix = ["unshare", "-m", "sh", "-c",
                  "mount --make-rprivate / && mount -t tmpfs none /lib/modules && "
                  f"mkdir /lib/modules/{ver} && mount --bind {mods} /lib/modules/{ver} && "
                  'exec "$@"', "guestfs"]
    blank = tempfile.NamedTemporaryFile(prefix="guestfs-probe-", suffix=".raw")
    blank.truncate(1 << 20)
    probe = [*prefix, "virt-df", "--format=raw", "-a", blank.name]
    how = "KVM"
    r = subprocess.run(probe, capture_output=True, text=True, env=env)
    if r.returncode != 0:
        env["LIBGUESTFS_BACKEND_SETTINGS"] = "force_tcg"
        how = "TCG (KVM failed: " + (r.stderr.strip().splitlines() or ["?"])[0][:80] + ")"
        r = subprocess.run(probe, capture_output=True, text=True, env=env)
        if r.returncode != 0:
            return None, "the appliance does not start: " + " ".join(r.stderr.split())[:300]
    return prefix, how


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--guestfs-runs", type=int, default=1)
    ap.add_argument("--workdir", default="/var/lib")
    ap.add_argument("--pool-volumes", type=int, default=100)
    opts = ap.parse_args()
    from inspect_fixtures import LUKS_PASSPHRASE, build_fedora, build_guest, can_build

    why = can_build()
    if why:
        print(f"cannot build the guest disks: {why}")
        return 1
    compileall.compile_dir(str(REPO / "src"), quiet=1)
    work = Path(tempfile.mkdtemp(prefix="bench-inspect-", dir=opts.workdir))
    try:
        images = work / "images"
        images.mkdir()
        disks = {"guest.qcow2": build_guest(work / "build").raw,
                 "fedora.qcow2": build_fedora(work / "fedora").raw}
        for name, raw in disks.items():
            subprocess.run(["qemu-img", "convert", "-O", "qcow2", str(raw),
                            str(images / name)], check=True)
        root = work / "state"
        env = dict(os.environ, PYTHONPATH=str(REPO / "src"), LIBGUESTFS_BACKEND="direct")
        if opts.guestfs_runs > 0:
            wrapper, how = guestfs_wrapper(env)
        else:
            wrapper, how = None, "--guestfs-runs 0"
        print(f"libguestfs: {'runs under ' + how if wrapper is not None else 'not run: ' + how}")
        runnable = wrapper is not None
        prefix = wrapper or []
        vs = [sys.executable, "-m", "virtstore.cli.main", "--root", str(root)]
        subprocess.run([*vs, "pool-create-as", "g", "dir", "--target", str(images)],
                       check=True, stdout=subprocess.DEVNULL, env=env)
        many = work / "many"
        many.mkdir()
        for i in range(opts.pool_volumes):
            subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-F", "qcow2", "-b",
                            str(images / "guest.qcow2"), str(many / f"vm{i:03}.qcow2")],
                           check=True)
        subprocess.run([*vs, "pool-create-as", "many", "dir", "--target", str(many)],
                       check=True, stdout=subprocess.DEVNULL, env=env)
        rows: list[tuple[str, list[str], list[str] | None]] = []
        # virt-get-kernel opens every LUKS device before inspecting, asking for its
        # passphrase where none is given.
        keys = {"guest.qcow2": ["--key", f"/dev/sda7:key:{LUKS_PASSPHRASE}"]}
        for vol in disks:
            qcow = str(images / vol)
            out = work / f"k-{vol}"
            (out / "theirs").mkdir(parents=True)
            rows += [
                (f"vol-df {vol}", [*vs, "vol-df", vol, "g"],
                 ["virt-df", "--format=qcow2", "-a", qcow]),
                (f"vol-boot-files {vol}", [*vs, "vol-boot-files", vol, "g", "--extract",
                                           str(out / "ours")],
                 ["virt-get-kernel", "--format=qcow2", "-a", qcow, *keys.get(vol, []),
                  "-o", str(out / "theirs")])]
            (out / "ours").mkdir()
        rows.insert(1, ("vol-df -h guest.qcow2",
                        [*vs, "vol-df", "guest.qcow2", "g", "--human"],
                        ["virt-df", "-h", "--format=qcow2", "-a", str(images / "guest.qcow2")]))
        rows.append((f"pool-df many ({opts.pool_volumes} vols)", [*vs, "pool-df", "many"],
                     None))
        print(f"{'command':<34} {'virtstore':>10} {'libguestfs':>11} {'ratio':>7}")
        for name, ours, theirs in rows:
            t_ours = best(ours, opts.runs, env)
            if not runnable or theirs is None:
                print(f"{name:<34} {t_ours:>9.3f}s {'(not run)':>11} {'-':>7}", flush=True)
                continue
            try:
                t_theirs = best([*prefix, *theirs], opts.guestfs_runs, env)
            except subprocess.CalledProcessError as exc:
                why = (exc.stderr or b"").decode(errors="replace").strip().splitlines()
                print(f"{name:<34} {t_ours:>9.3f}s {'(failed)':>11} {'-':>7}  "
                      f"{why[0] if why else ''}", flush=True)
                continue
            print(f"{name:<34} {t_ours:>9.3f}s {t_theirs:>10.3f}s "
                  f"{t_ours / t_theirs:>7.3f}", flush=True)
        for vol in disks:
            print("\n" + subprocess.run([*vs, "vol-df", vol, "g", "--human"], check=True,
                                        capture_output=True, text=True, env=env).stdout)
            if runnable:
                print(subprocess.run([*prefix, "virt-df", "-h", "--format=qcow2", "-a",
                                      str(images / vol)],
                                     capture_output=True, text=True, env=env).stdout)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
