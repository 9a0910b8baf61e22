"""vol-backup of a qcow2 volume, full and incremental, against the other ways to do it.

A 4 GiB qcow2 (compat 1.1) in a dir pool gets 1 GiB of random data; a full backup is
taken, 64 MiB of it are overwritten, and an incremental backup follows. The same two
states are copied with ``qemu-img convert`` (a whole-image copy: it has no incremental
mode) and, where it runs, backed up with virtnbdbackup (Debian's package; it needs
libvirt and a defined, here shut-off, domain). Printed: time and bytes written per
tool and step, and the ratios virtstore / other.

    python bench/bench_backup.py [--workdir DIR] [--size 4G] [--data 1G] [--change 64M]
                                 [--keep] [--json PATH]

The image is read once before the measurements, so every tool reads from the page
cache (this machine is shared: the cache is not dropped); virtstore's qemu-nbd reads with
O_DIRECT (``--cache=none``), so its reads go to the disk all the same. Each tool's
time includes making its output durable (virtstore fsyncs every chunk; the outputs of
``qemu-img convert`` and of virtnbdbackup, which do not, are fsynced after them).
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))

from virtstore.api.embedded import EmbeddedConnection

MiB = 1 << 20
GiB = 1 << 30


def size_arg(text: str) -> int:
    units = {"K": 1 << 10, "M": MiB, "G": GiB}
    return int(text[:-1]) * units[text[-1].upper()] if text[-1].upper() in units else int(text)


def allocated(path: Path) -> int:
    """Bytes the files under ``path`` take on disk."""
    if path.is_file():
        return path.stat().st_blocks * 512
    return sum(p.stat().st_blocks * 512 for p in path.rglob("*") if p.is_file())


def random_file(path: Path, size: int) -> None:
    with open(path, "wb") as fh:
        left = size
        while left:
            n = min(left, 64 * MiB)
            fh.write(os.urandom(n))
            left -= n


def sync_tree(path: Path) -> None:
    """fsync every file under ``path`` and the directories holding them."""
    for p in [path, *path.rglob("*")]:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def timed(fn: Any) -> float:
    t = time.monotonic()
    fn()
    return time.monotonic() - t


def run(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(argv), capture_output=True, text=True, check=False)


class VirtNbdBackup:
    """virtnbdbackup on a shut-off libvirt domain whose one disk is the image."""

    def __init__(self, image: Path, work: Path) -> None:
        self.image = image
        self.work = work
        self.domain = "virtstore-bench-" + secrets.token_hex(3)
        self.out = work / "virtnbdbackup"
        self.problem: str | None = None
        if shutil.which("virtnbdbackup") is None:
            self.problem = "virtnbdbackup is not installed"
            return
        xml = work / "domain.xml"
        xml.write_text(
            f"<domain type='kvm'><name>{self.domain}</name><memory unit='MiB'>128</memory>"
            "<os><type arch='x86_64'>hvm</type></os><devices>"
            "<disk type='file' device='disk'><driver name='qemu' type='qcow2'/>"
            f"<source file='{image}'/><target dev='vda' bus='virtio'/></disk>"
            "</devices></domain>")
        r = run("virsh", "-c", "qemu:///system", "define", str(xml))
        if r.returncode != 0:
            self.problem = f"virsh define failed: {r.stderr.strip()}"

    def backup(self, level: str) -> tuple[float, int] | str:
        if self.problem:
            return self.problem
        before = allocated(self.out) if self.out.exists() else 0
        t = time.monotonic()
        r = run("virtnbdbackup", "-U", "qemu:///system", "-d", self.domain, "-l", level,
                "-o", str(self.out))
        if r.returncode == 0:
            sync_tree(self.out)  # it does not fsync what it wrote
        took = time.monotonic() - t
        if r.returncode != 0:
            lines = [ln for ln in (r.stderr + r.stdout).splitlines() if "ERROR" in ln]
            return f"virtnbdbackup -l {level} failed: " + (lines[-1] if lines else
                                                              r.stderr.strip()[-300:])
        return took, allocated(self.out) - before

    def restore(self) -> tuple[float, int] | str:
        """virtnbdrestore of the backup set into a new directory (it restores the newest
        point it has), fsynced as the others' outputs are."""
        if self.problem:
            return self.problem
        out = self.work / "virtnbdrestore"
        t = time.monotonic()
        r = run("virtnbdrestore", "-U", "qemu:///system", "-n", "-i", str(self.out),
                "-o", str(out), "-L", str(self.work / "virtnbdrestore.log"))
        if r.returncode == 0:
            sync_tree(out)
        took = time.monotonic() - t
        if r.returncode != 0:
            lines = [ln for ln in (r.stderr + r.stdout).splitlines() if "ERROR" in ln]
            return "virtnbdrestore failed: " + (lines[-1] if lines else r.stderr.strip()[-300:])
        return took, allocated(out)

    def close(self) -> None:
        if not self.problem:
            run("virsh", "-c", "qemu:///system", "undefine", self.domain,
                "--checkpoints-metadata")


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--workdir", default="/var/lib")
    ap.add_argument("--size", type=size_arg, default=4 * GiB)
    ap.add_argument("--data", type=size_arg, default=GiB)
    ap.add_argument("--change", type=size_arg, default=64 * MiB)
    ap.add_argument("--keep", action="store_true")
    ap.add_argument("--json", default=None)
    a = ap.parse_args()

    work = Path(tempfile.mkdtemp(prefix="virtstore-bench-backup-", dir=a.workdir))
    results: dict[str, Any] = {"size": a.size, "data": a.data, "change": a.change}
    vnb: VirtNbdBackup | None = None
    conn = EmbeddedConnection(str(work / "state"))
    try:
        pooldir = work / "pool"
        pooldir.mkdir()
        conn.pool_define_xml(f"<pool type='dir'><name>bench</name><target><path>{pooldir}"
                             "</path></target></pool>")
        conn.pool_start("bench")
        conn.volume_create_xml("bench", f"<volume><name>vm.qcow2</name><capacity>{a.size}"
                               "</capacity><target><format type='qcow2'/><compat>1.1"
                               "</compat></target></volume>")
        image = pooldir / "vm.qcow2"
        src = work / "data.bin"
        random_file(src, a.data)
        subprocess.run(["qemu-io", "-f", "qcow2", "-c", f"write -s {src} 0 {a.data}",
                        str(image)], check=True, capture_output=True)
        change = work / "change.bin"
        random_file(change, a.change)
        vnb = VirtNbdBackup(image, work)
        bdir = work / "virtstore"

        def virtstore_backup(incremental: bool) -> tuple[float, int, dict[str, int]]:
            before = allocated(bdir) if bdir.exists() else 0
            t = time.monotonic()
            job = conn.volume_backup("bench", "vm.qcow2", str(bdir), incremental=incremental)
            info = conn.job_wait(job.id)
            took = time.monotonic() - t
            if info.state != "done":
                raise SystemExit(f"virtstore backup failed: {info.error}")
            stats = conn.backup_list(str(bdir))[-1]["stats"]
            return took, allocated(bdir) - before, stats

        def convert(name: str) -> tuple[float, int]:
            out = work / name

            def copy_and_sync() -> None:
                subprocess.run(["qemu-img", "convert", "-f", "qcow2", "-O", "qcow2",
                                str(image), str(out)], check=True)
                # On disk, as a backup's chunks are when virtstore reports them done.
                fd = os.open(out, os.O_RDONLY)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)

            return timed(copy_and_sync), allocated(out)

        for step, incremental in (("full", False), ("incremental", True)):
            if incremental:
                subprocess.run(["qemu-io", "-f", "qcow2", "-c",
                                f"write -s {change} {a.data // 2} {a.change}", str(image)],
                               check=True, capture_output=True)
            subprocess.run(["cat", str(image)], stdout=subprocess.DEVNULL, check=True)
            vs_t, vs_b, stats = virtstore_backup(incremental)
            qi_t, qi_b = convert(f"convert-{step}.qcow2")
            vn = vnb.backup("inc" if incremental else "full")
            results[step] = {"virtstore": {"seconds": vs_t, "bytes": vs_b, "stats": stats},
                             "qemu-img convert": {"seconds": qi_t, "bytes": qi_b},
                             "virtnbdbackup": ({"seconds": vn[0], "bytes": vn[1]}
                                               if isinstance(vn, tuple) else {"error": vn})}
        # Restore: the newest point of each tool's backups into a new qcow2 (what
        # virtnbdrestore makes of a qcow2 disk), durable at the end.
        def virtstore_restore() -> tuple[float, int]:
            t = time.monotonic()
            job = conn.volume_restore(str(bdir), "bench", "restored.qcow2", format="qcow2")
            info = conn.job_wait(job.id)
            took = time.monotonic() - t
            if info.state != "done":
                raise SystemExit(f"virtstore restore failed: {info.error}")
            return took, allocated(pooldir / "restored.qcow2")

        vr_t, vr_b = virtstore_restore()
        qi_t, qi_b = convert("convert-restore.qcow2")
        vn = vnb.restore()
        results["restore"] = {"virtstore": {"seconds": vr_t, "bytes": vr_b},
                              "qemu-img convert": {"seconds": qi_t, "bytes": qi_b},
                              "virtnbdbackup": ({"seconds": vn[0], "bytes": vn[1]}
                                                if isinstance(vn, tuple) else {"error": vn})}
        report(results)
        if a.json:
            Path(a.json).write_text(json.dumps(results, indent=1) + "\n")
    finally:
        if vnb is not None:
            vnb.close()
        conn.close()
        if not a.keep:
            shutil.rmtree(work, ignore_errors=True)
        else:
            print(f"kept {work}")
    return 0


def report(results: dict[str, Any]) -> None:
    print(f"qcow2 of {results['size'] / GiB:g} GiB, {results['data'] / GiB:g} GiB of data, "
          f"then {results['change'] / MiB:g} MiB changed")
    print(f"{'step':<12} {'tool':<18} {'seconds':>8} {'MiB written':>12} "
          f"{'time ratio':>11} {'bytes ratio':>12}")
    for step in ("full", "incremental", "restore"):
        r = results[step]
        vs = r["virtstore"]
        for tool in ("virtstore", "qemu-img convert", "virtnbdbackup"):
            x = r[tool]
            if "error" in x:
                print(f"{step:<12} {tool:<18} {x['error']}")
                continue
            tr = f"{vs['seconds'] / x['seconds']:.2f}" if tool != "virtstore" else ""
            br = (f"{vs['bytes'] / x['bytes']:.3f}" if tool != "virtstore" and x["bytes"]
                  else "")
            print(f"{step:<12} {tool:<18} {x['seconds']:8.2f} {x['bytes'] / MiB:12.1f} "
                  f"{tr:>11} {br:>12}")
        s = vs.get("stats")
        if s is None:
            continue
        print(f"{'':<12} virtstore read {s['chunks_read']} chunks "
              f"({s['bytes_read'] / MiB:.0f} MiB), wrote {s['chunks_written']}")
    print("ratios: virtstore / other (below 1: virtstore is faster or writes less)")


if __name__ == "__main__":
    sys.exit(main())
