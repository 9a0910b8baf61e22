"""A guest's disks as a whole: guest-clone against virt-clone, vol-import against
``qemu-img convert``, and the restore rate, on the same files.

    .venv/bin/python bench/bench_guest.py [--workdir /var/lib] [--size 4G] [--data 1G]
                                          [--uri qemu:///system] [--keep] [--json PATH]

- **guest-clone**: a three-disk domain (two qcow2 images and one raw file, each of
  ``--size`` with ``--data``/3 of random data in 8 runs) in a dir pool.
  ``virtstore guest-clone DOMAIN.xml NEW`` (full clones), against ``virt-clone
  --original-xml DOMAIN.xml --name NEW --auto-clone`` through libvirtd, with a libvirt
  dir pool over the same directory (virt-clone then clones each disk with the pool's
  createXMLFrom). Also ``--linked``, which virt-clone has no counterpart for.
- **vol-import**: a raw file of ``--size`` holding ``--data`` of random data in 16 runs,
  imported as a raw and as a qcow2 volume (``virtstore vol-import``), against
  ``qemu-img convert -O raw|qcow2`` of the same file followed by an fsync of the output
  (virtstore's jobs make their result durable before they end).
- **restore**: ``virtstore vol-restore`` of a full ``vol-backup`` of that file into a raw
  volume; its rate (the data's bytes over the time), next to the raw ``qemu-img
  convert`` copy of the same data.

Every command runs whole, as a user types it, best of ``--runs`` (default 3), the output
removed between runs; the sources are read once first (this machine is shared: the page
cache is not dropped). Each result is checked: the same bytes as the source (a digest
that never reads holes, ``qemu-img compare`` for qcow2) and how much of it is allocated.
Goal (a rate at least the peer's): virtstore's time at most the peer's (ratio <= 1).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _data import MiB, allocated, content_digest, free_bytes, make_workdir, write_spread
from _libvirt import DEFAULT_URI, Libvirt

GiB = 1 << 30
HERE = Path(__file__).resolve().parent
VIRTSTORE = str(Path(sys.executable).parent / "virtstore")


def size_arg(text: str) -> int:
    units = {"K": 1 << 10, "M": MiB, "G": GiB}
    return int(text[:-1]) * units[text[-1].upper()] if text[-1].upper() in units else int(text)


def run(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(argv), capture_output=True, text=True, check=False)


def must(*argv: str) -> str:
    r = run(*argv)
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(argv[:3])}... failed: {(r.stderr or r.stdout).strip()}")
    return r.stdout


def fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def read_once(path: Path) -> None:
    """Bring a source's data into the page cache, as every tool then reads it."""
    with open(path, "rb", buffering=0) as f:
        while f.read(16 * MiB):
            pass


def best(runs: int, step: Callable[[], None], reset: Callable[[], None]) -> float:
    """The shortest of ``runs`` timed calls of ``step``, ``reset`` after each but the last."""
    times = []
    for i in range(runs):
        t = time.monotonic()
        step()
        times.append(time.monotonic() - t)
        if i < runs - 1:
            reset()
    return min(times)


def same_image(a: Path, b: Path) -> bool:
    return run("qemu-img", "compare", "-q", str(a), str(b)).returncode == 0


def domain_xml(name: str, disks: list[tuple[Path, str]]) -> str:
    devs = "".join(
        f"<disk type='file' device='disk'><driver name='qemu' type='{fmt}'/>"
        f"<source file='{path}'/><target dev='vd{chr(ord('a') + i)}' bus='virtio'/></disk>"
        for i, (path, fmt) in enumerate(disks))
    return (f"<domain type='qemu'><name>{name}</name><memory unit='MiB'>128</memory>"
            "<os><type arch='x86_64'>hvm</type></os>"
            f"<devices>{devs}</devices></domain>")


class Bench:
    def __init__(self, a: argparse.Namespace) -> None:
        self.a = a
        self.work = make_workdir(a.workdir)
        self.state = self.work / "state"
        self.pool = self.work / "pool"
        self.pool.mkdir()
        self.rows: list[dict[str, Any]] = []
        self.notes: list[str] = []

    def vs(self, *args: str) -> str:
        return must(VIRTSTORE, "--root", str(self.state), *args)

    def row(self, what: str, ours: float, peer: float | None, peer_name: str,
            check: str) -> None:
        ratio = None if peer is None else ours / peer
        self.rows.append({"workload": what, "virtstore_s": round(ours, 3),
                          "peer": peer_name, "peer_s": None if peer is None else round(peer, 3),
                          "ratio": None if ratio is None else round(ratio, 2),
                          "met": None if ratio is None else ratio <= 1.0, "check": check})

    # -- set-up --------------------------------------------------------------------------
    def setup(self) -> list[tuple[Path, str]]:
        a = self.a
        need = 4 * a.data + 2 * GiB
        if free_bytes(self.work) < need:
            raise RuntimeError(f"{self.work} has less than {need >> 30} GiB free")
        self.vs("pool-define-as", "bench", "dir", "--target", str(self.pool))
        self.vs("pool-start", "bench")
        disks: list[tuple[Path, str]] = []
        per = a.data // 3 // 8
        for i, fmt in enumerate(("qcow2", "raw", "qcow2")):
            raw = self.work / f"src{i}.raw"
            write_spread(raw, a.size, 8, per)
            path = self.pool / f"disk{i}.{'img' if fmt == 'raw' else 'qcow2'}"
            if fmt == "raw":
                shutil.move(raw, path)
            else:
                must("qemu-img", "convert", "-O", "qcow2", str(raw), str(path))
                raw.unlink()
            disks.append((path, fmt))
        self.vs("pool-refresh", "bench")
        return disks

    # -- guest-clone -----------------------------------------------------------------------
    def guest_clone(self, disks: list[tuple[Path, str]]) -> None:
        dom = self.work / "guest.xml"
        dom.write_text(domain_xml("bench-guest", disks))
        for path, _ in disks:
            read_once(path)
        made: list[Path] = []

        def ours(linked: bool) -> Callable[[], None]:
            def step() -> None:
                out = self.work / "clone.xml"
                self.vs("guest-clone", str(dom), "bench-clone", "--output", str(out),
                        *(["--linked"] if linked else []))
                made[:] = [Path(p) for p in _sources(out.read_text())]
            return step

        def drop() -> None:
            for p in made:
                self.vs("vol-delete", "--pool", "bench", p.name)
            made.clear()

        full = best(self.a.runs, ours(False), drop)
        ok = all(same_image(src, new) for (src, _), new in zip(disks, made, strict=True))
        alloc = sum(allocated(p) for p in made)
        drop()
        linked = best(self.a.runs, ours(True), drop)
        lalloc = sum(allocated(p) for p in made)
        drop()
        peer, why = self._virt_clone(dom, disks)
        if why:
            self.notes.append(f"virt-clone: {why}")
        self.row("guest-clone, 3 disks, full", full, peer, "virt-clone",
                 f"{'same' if ok else 'DIFFERENT'} content, {alloc / MiB:.0f} MiB allocated")
        self.row("guest-clone, 3 disks, --linked", linked, None, "-",
                 f"{lalloc / MiB:.1f} MiB allocated")

    def _virt_clone(self, dom: Path, disks: list[tuple[Path, str]]) -> tuple[float | None, str]:
        if shutil.which("virt-clone") is None:
            return None, "not installed (Debian's virtinst)"
        lv = Libvirt.open(self.a.uri)
        if isinstance(lv, str):
            return None, lv
        try:
            lv.define_started_pool(f"<pool type='dir'><name>virtstore-bench-guest</name>"
                                   f"<target><path>{self.pool}</path></target></pool>")
            clones: list[Path] = []

            def step() -> None:
                must("virt-clone", "--connect", self.a.uri, "--original-xml", str(dom),
                     "--name", "virtstore-bench-clone", "--auto-clone")
                clones[:] = [p for p in self.pool.iterdir()
                             if "-clone" in p.name]

            def drop() -> None:
                run("virsh", "-c", self.a.uri, "undefine", "virtstore-bench-clone")
                for p in clones:
                    p.unlink()
                run("virsh", "-c", self.a.uri, "pool-refresh", "virtstore-bench-guest")

            took = best(self.a.runs, step, drop)
            ok = len(clones) == len(disks) and all(
                same_image(src, new) for (src, _), new in zip(
                    disks, sorted(clones, key=lambda p: p.name), strict=True))
            drop()
            return took, "" if ok else "its clones differ from the sources"
        except RuntimeError as exc:
            return None, str(exc)
        finally:
            for problem in lv.close():
                self.notes.append(f"libvirt: {problem}")

    # -- vol-import and restore ------------------------------------------------------------
    def import_and_restore(self) -> None:
        src = self.work / "import-src.raw"
        data = write_spread(src, self.a.size, 16, self.a.data // 16)
        read_once(src)
        want = content_digest(src)
        for fmt in ("raw", "qcow2"):
            name = f"imported.{fmt}"

            def ours(name: str = name, fmt: str = fmt) -> None:
                self.vs("vol-import", str(src), name, "bench", "--format", fmt)

            took = best(self.a.runs, ours,
                        lambda name=name: self.vs("vol-delete", "--pool", "bench", name))
            out = self.pool / name
            ok = (content_digest(out) == want) if fmt == "raw" else same_image(src, out)
            alloc = allocated(out)
            self.vs("vol-delete", "--pool", "bench", name)
            dst = self.work / f"convert.{fmt}"

            def peer(dst: Path = dst, fmt: str = fmt) -> None:
                must("qemu-img", "convert", "-O", fmt, str(src), str(dst))
                fsync(dst)

            ptook = best(self.a.runs, peer, lambda dst=dst: dst.unlink())
            dst.unlink()
            self.row(f"vol-import, {fmt}", took, ptook, "qemu-img convert + fsync",
                     f"{'same' if ok else 'DIFFERENT'} content, "
                     f"{alloc / MiB:.0f} MiB allocated")
        self.vs("vol-import", str(src), "backed.img", "bench", "--format", "raw")
        backup = self.work / "backup"
        self.vs("vol-backup", "backed.img", str(backup), "--pool", "bench")
        took = best(self.a.runs,
                    lambda: self.vs("vol-restore", str(backup), "restored.img", "bench",
                                    "--format", "raw"),
                    lambda: self.vs("vol-delete", "--pool", "bench", "restored.img"))
        out = self.pool / "restored.img"
        ok = content_digest(out) == want
        dst = self.work / "convert.raw"
        ptook = best(self.a.runs, lambda: (must("qemu-img", "convert", "-O", "raw", str(src),
                                                str(dst)), fsync(dst)) and None,
                     lambda: dst.unlink())
        dst.unlink()
        self.row(f"vol-restore, raw ({data / MiB / took:.0f} MiB/s of data)", took, ptook,
                 "qemu-img convert + fsync",
                 f"{'same' if ok else 'DIFFERENT'} content, {allocated(out) / MiB:.0f} MiB "
                 "allocated")

    def close(self) -> None:
        if not self.a.keep:
            run(VIRTSTORE, "--root", str(self.state), "pool-destroy", "bench")
            shutil.rmtree(self.work, ignore_errors=True)


def _sources(xml: str) -> list[str]:
    import xml.etree.ElementTree as ET

    return [s.get("file", "") for s in ET.fromstring(xml).iter("source") if s.get("file")]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--workdir", default="/var/lib")
    ap.add_argument("--size", type=size_arg, default=4 * GiB)
    ap.add_argument("--data", type=size_arg, default=GiB)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--uri", default=DEFAULT_URI)
    ap.add_argument("--keep", action="store_true")
    ap.add_argument("--json", default=str(HERE / "results" / "guest.json"))
    a = ap.parse_args()
    subprocess.run([sys.executable, "-m", "compileall", "-q",
                    str(HERE.parent / "src")], check=False, capture_output=True)
    b = Bench(a)
    load0 = os.getloadavg()[0]
    try:
        disks = b.setup()
        b.guest_clone(disks)
        b.import_and_restore()
    finally:
        b.close()
    print(f"{'workload':46} | {'virtstore':>9} | {'peer':>9} | ratio | met | check")
    print("-" * 110)
    for r in b.rows:
        peer = "-" if r["peer_s"] is None else f"{r['peer_s']:8.2f}s"
        ratio = "-" if r["ratio"] is None else f"{r['ratio']:.2f}x"
        met = "-" if r["met"] is None else ("yes" if r["met"] else "no")
        print(f"{r['workload']:46} | {r['virtstore_s']:8.2f}s | {peer:>9} | {ratio:>5} | "
              f"{met:>3} | {r['check']}")
    print(f"peers: {', '.join(sorted({r['peer'] for r in b.rows if r['peer'] != '-'}))}; "
          f"{a.size / GiB:g} GiB images, {a.data / GiB:g} GiB of data; best of {a.runs}; "
          f"load average {load0:.1f} before, {os.getloadavg()[0]:.1f} after")
    for note in b.notes:
        print("note:", note)
    Path(a.json).parent.mkdir(parents=True, exist_ok=True)
    Path(a.json).write_text(json.dumps({"rows": b.rows, "notes": b.notes,
                                        "size": a.size, "data": a.data}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
