"""virtstore vs libvirt on network storage: RBD images on a one-node Ceph, iSCSI LUNs.

Starts its own servers on 127.0.0.1 (the test suite's recipes in tests/net_fixtures.py):
a one-node Ceph (mon, mgr, an OSD on memstore) and tgtd. virtstore's rbd and iscsi-direct
pools and libvirt's, defined on the same cluster and the same target, do the same work:

* RBD: create, copy-on-write clone, resize and delete of 1 GiB images, per second; the
  clone of a 2 GiB image full of data (copy-on-write, and virtstore's independent copy);
* iSCSI: refresh of an iscsi-direct pool of 16 LUNs.

Run as root from the repository: ``.venv/bin/python bench/bench_net.py`` (``--quick``:
fewer images). The servers and the pools are removed at the end.
"""

from __future__ import annotations

import argparse
import base64
import os
import shutil
import signal
import sys
import tempfile
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))  # the server recipes
sys.path.insert(0, str(HERE))

import net_fixtures as nf  # noqa: E402
import virtstore  # noqa: E402
from _libvirt import DEFAULT_URI, Libvirt  # noqa: E402
from bench_core import (  # noqa: E402
    Report,
    Row,
    describe,
    finish_report,
    measure,
    open_libvirt,
    print_table,
    timed,
    write_json,
)
from virtstore.api import Connection  # noqa: E402

GiB = 1 << 30
MiB = 1 << 20
RESULTS = HERE / "results" / "net.json"
SECRET_USAGE = "bench client.admin"
INITIATOR = "iqn.2024-01.bench.local:virtstore"
LUN_TARGET = "iqn.2024-01.bench.local:luns"
BIG = 2 * GiB
LV_RBD = f"vsbench-{os.getpid()}-rbd"
LV_LUNS = f"vsbench-{os.getpid()}-luns"
# The OSD holds everything in memory: the 2 GiB source, its independent copy, headroom.
MEMSTORE = 6 * GiB


@dataclass
class Settings:
    images: int
    luns: int
    repeats: int
    uri: str


def secret_xml(uid: str) -> str:
    return (f"<secret ephemeral='no' private='yes'><uuid>{uid}</uuid>"
            f"<usage type='ceph'><name>{SECRET_USAGE}</name></usage></secret>")


def rbd_pool_xml(name: str, mon_port: int) -> str:
    return (f"<pool type='rbd'><name>{name}</name><source><name>rbd</name>"
            f"<host name='127.0.0.1' port='{mon_port}'/>"
            f"<auth username='admin' type='ceph'><secret usage='{SECRET_USAGE}'/></auth>"
            "</source></pool>")


def lun_pool_xml(name: str, port: int) -> str:
    return (f"<pool type='iscsi-direct'><name>{name}</name><source>"
            f"<host name='127.0.0.1' port='{port}'/><device path='{LUN_TARGET}'/>"
            f"<initiator><iqn name='{INITIATOR}'/></initiator></source></pool>")


def vol_xml(name: str, capacity: int) -> str:
    return (f"<volume><name>{name}</name><capacity unit='bytes'>{capacity}</capacity>"
            "<target><format type='raw'/></target></volume>")


# -- servers ---------------------------------------------------------------------------
def add_lun_target(tgt: nf.Server, luns: int) -> None:
    """A third target with ``luns`` sparse 64 MiB LUNs, for the refresh timing."""
    def tgtadm(*args: str) -> None:
        nf.sh("tgtadm", "-C", str(tgt.info["control"]), "--lld", "iscsi", *args)

    tgtadm("--op", "new", "--mode", "target", "--tid", "3", "-T", LUN_TARGET)
    for n in range(1, luns + 1):
        path = tgt.dir / f"bench-lun{n}.img"
        with open(path, "wb") as fh:
            fh.truncate(64 * MiB)
        tgtadm("--op", "new", "--mode", "logicalunit", "--tid", "3", "--lun", str(n),
               "-b", str(path))
    tgtadm("--op", "bind", "--mode", "target", "--tid", "3", "-I", "ALL")


def fill_image(ceph: nf.Server, name: str, size: int) -> None:
    """An image of ``size`` bytes, every block written (rbd bench writes its own data)."""
    nf.ceph_cmd(ceph, "rbd", "create", "--size", f"{size // MiB}M", f"rbd/{name}")
    nf.ceph_cmd(ceph, "rbd", "bench", "--io-type", "write", "--io-size", "4M",
                "--io-pattern", "seq", "--io-total", str(size), "--io-threads", "4",
                f"rbd/{name}")


# -- the two sides ---------------------------------------------------------------------
class VirtstoreSide:
    def __init__(self, root: Path, key: bytes, uid: str) -> None:
        self.conn: Connection = virtstore.connect(root=str(root))
        self.conn.secret_define_xml(secret_xml(uid))
        self.conn.secret_set_value(uid, key)

    def pool(self, xml: str, name: str) -> None:
        self.conn.pool_define_xml(xml)
        self.conn.pool_start(name)

    def create(self, pool: str, names: Sequence[str], capacity: int) -> None:
        for n in names:
            self.conn.volume_create_xml(pool, vol_xml(n, capacity))

    def clone(self, pool: str, src: str, names: Sequence[str], *, linked: bool = True) -> None:
        for n in names:
            self.conn.job_wait(self.conn.volume_clone(pool, src, n, linked=linked).id)

    def resize(self, pool: str, names: Sequence[str], capacity: int) -> None:
        for n in names:
            self.conn.job_wait(self.conn.volume_resize(pool, n, capacity).id)

    def delete(self, pool: str, names: Sequence[str]) -> None:
        for n in names:
            self.conn.volume_delete(pool, n)

    def refresh(self, pool: str) -> int:
        self.conn.pool_refresh(pool)
        return len(self.conn.list_volumes(pool))

    def close(self) -> None:
        self.conn.close()  # the images go with the cluster


class LibvirtSide:
    def __init__(self, lv: Libvirt, key: bytes, uid: str) -> None:
        self.lv = lv
        self.secret = lv.conn.secretDefineXML(secret_xml(uid), 0)
        self.secret.setValue(key, 0)
        self.pools: dict[str, Any] = {}

    def pool(self, xml: str, name: str) -> None:
        self.pools[name] = self.lv.define_started_pool(xml)

    def create(self, pool: str, names: Sequence[str], capacity: int) -> None:
        p = self.pools[pool]
        for n in names:
            p.createXML(vol_xml(n, capacity), 0)

    def clone(self, pool: str, src: str, names: Sequence[str]) -> None:
        p = self.pools[pool]
        source = p.storageVolLookupByName(src)
        cap = source.info()[1]
        for n in names:
            p.createXMLFrom(vol_xml(n, cap), source, 0)

    def resize(self, pool: str, names: Sequence[str], capacity: int) -> None:
        p = self.pools[pool]
        for n in names:
            p.storageVolLookupByName(n).resize(capacity, 0)

    def delete(self, pool: str, names: Sequence[str]) -> None:
        p = self.pools[pool]
        # libvirt's clones leave a protected snapshot on their source.
        flags = self.lv.lv.VIR_STORAGE_VOL_DELETE_WITH_SNAPSHOTS
        for n in names:
            p.storageVolLookupByName(n).delete(flags)

    def refresh(self, pool: str) -> int:
        p = self.pools[pool]
        p.refresh(0)
        return int(p.numOfVolumes())

    def close(self) -> None:
        # the images go with the cluster; the pools go in Libvirt.close
        try:
            self.secret.undefine()
        except self.lv.lv.libvirtError as exc:
            print(f"cleanup: libvirt secret: {exc}", file=sys.stderr)


# -- workloads -------------------------------------------------------------------------
Side = VirtstoreSide | LibvirtSide


def rbd_rates(rows: dict[str, Row], side: str, impl: Side, pool: str, n: int) -> None:
    made = [f"{pool}-img{i}" for i in range(n)]
    clones = [f"{pool}-clone{i}" for i in range(n)]
    base = f"{pool}-base"
    impl.create(pool, [base], GiB)
    measure(rows["create"], side, lambda: n / timed(lambda: impl.create(pool, made, GiB)))
    measure(rows["clone (copy-on-write)"], side,
            lambda: n / timed(lambda: impl.clone(pool, base, clones)))
    measure(rows["resize to 2 GiB"], side,
            lambda: n / timed(lambda: impl.resize(pool, made, 2 * GiB)))
    # clones first: libvirt's source image keeps the snapshot they hang from
    measure(rows["delete"], side,
            lambda: 2 * n / timed(lambda: impl.delete(pool, [*clones, *made])))
    impl.delete(pool, [base])


def bench_rbd(report: Report, s: Settings, ceph: nf.Server, vs: VirtstoreSide,
              lvs: LibvirtSide | None) -> None:
    n = s.images
    rows = {w: report.add(Row(f"rbd {w} ({n} images, 1 GiB)", "/s", "for the record", None))
            for w in ("create", "clone (copy-on-write)", "resize to 2 GiB", "delete")}
    sides: list[tuple[str, Side, str]] = [("virtstore", vs, "vs-rbd")]
    if lvs is not None:
        sides.append(("libvirt", lvs, LV_RBD))
    for side, impl, pool in sides:
        rbd_rates(rows, side, impl, pool, n)
    rows["delete"].workload = f"rbd delete ({2 * n} images: {n} clones, then {n} of 2 GiB)"

    # A 2 GiB image with every block written, cloned; both sides clone the same image
    # (a pool refresh shows it to each).
    print("writing a 2 GiB image ...", file=sys.stderr)
    fill_image(ceph, "big", BIG)
    cow = report.add(Row("rbd clone of a 2 GiB image, copy-on-write", "s", "for the record",
                         None))
    full = report.add(Row("rbd clone of a 2 GiB image, independent copy", "s",
                          "for the record", None))
    cows = [f"big-cow{i}" for i in range(s.repeats)]

    def best_clone(impl: Side, pool: str) -> float:
        impl.refresh(pool)
        times = []
        for c in cows:
            t0 = time.perf_counter()
            impl.clone(pool, "big", [c])
            times.append(time.perf_counter() - t0)
        return min(times)

    measure(cow, "virtstore", lambda: best_clone(vs, "vs-rbd"))
    measure(full, "virtstore", lambda: timed(lambda: vs.clone("vs-rbd", "big", ["big-copy"],
                                                              linked=False)))
    vs.delete("vs-rbd", [*cows, "big-copy"])
    full.libvirt_note = "libvirt clones rbd images copy-on-write only"
    if lvs is not None:
        measure(cow, "libvirt", lambda: best_clone(lvs, LV_RBD))


def bench_luns(report: Report, s: Settings, vs: VirtstoreSide, lvs: LibvirtSide | None) -> None:
    row = report.add(Row(f"iscsi-direct pool refresh ({s.luns} LUNs)", "s", "for the record",
                         None))
    sides: list[tuple[str, Side, str]] = [("virtstore", vs, "vs-luns")]
    if lvs is not None:
        sides.append(("libvirt", lvs, LV_LUNS))
    for side, impl, pool in sides:
        measure(row, side, lambda: best_refresh(report, s, side, impl, pool))  # noqa: B023


def best_refresh(report: Report, s: Settings, side: str, impl: Side, pool: str) -> float:
    times = []
    seen = 0
    for _ in range(s.repeats):
        t0 = time.perf_counter()
        seen = impl.refresh(pool)
        times.append(time.perf_counter() - t0)
        if seen < s.luns:
            raise RuntimeError(f"the refresh listed {seen} LUNs, not {s.luns}")
    if seen > s.luns:
        report.notes.append(f"{side} lists {seen} volumes for {s.luns} disk LUNs "
                            "(the target's controller LUN 0 among them)")
    return min(times)


# -- running ---------------------------------------------------------------------------
def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--images", type=int, default=50, help="RBD images per workload")
    p.add_argument("--luns", type=int, default=16, help="LUNs behind the iSCSI target")
    p.add_argument("--repeats", type=int, default=3, help="best of how many (clone, refresh)")
    p.add_argument("--quick", action="store_true", help="10 images, best of 2")
    p.add_argument("--workdir", default="/var/lib", help="where virtstore's state root goes")
    p.add_argument("--uri", default=DEFAULT_URI, help="libvirt URI of the reference")
    p.add_argument("--no-libvirt", action="store_true", help="measure virtstore only")
    p.add_argument("--json", type=Path, default=RESULTS, help="where the JSON goes")
    args = p.parse_args(argv)
    if args.quick:
        args.images, args.repeats = 10, 2
    if min(args.images, args.luns, args.repeats) < 1:
        p.error("--images, --luns and --repeats must be at least 1")
    return args


def run(args: argparse.Namespace, lv: Libvirt | str) -> Report:
    s = Settings(images=args.images, luns=args.luns, repeats=args.repeats, uri=args.uri)
    report = Report()
    report.meta["load_average_before"] = os.getloadavg()
    describe(report, s, lv)
    if isinstance(lv, str):
        report.notes.append(f"libvirt not available: {lv}")
    servers: list[nf.Server] = []
    work = Path(tempfile.mkdtemp(prefix="virtstore-bench-net-", dir=args.workdir))
    vs: VirtstoreSide | None = None
    lvs: LibvirtSide | None = None
    try:
        print("starting Ceph and tgtd on 127.0.0.1 ...", file=sys.stderr)
        ceph = nf.start_server("ceph", lambda srv: nf._start_ceph(srv, MEMSTORE))
        servers.append(ceph)
        tgt = nf.start_server("iscsi", nf._start_tgtd)
        servers.append(tgt)
        add_lun_target(tgt, s.luns)
        key = base64.b64decode(ceph.info["admin_key"])
        uid = str(uuid.uuid4())
        vs = VirtstoreSide(work / "root", key, uid)
        vs.pool(rbd_pool_xml("vs-rbd", ceph.info["mon_port"]), "vs-rbd")
        vs.pool(lun_pool_xml("vs-luns", tgt.info["port"]), "vs-luns")
        if isinstance(lv, Libvirt):
            lvs = LibvirtSide(lv, key, uid)
            lvs.pool(rbd_pool_xml(LV_RBD, ceph.info["mon_port"]), LV_RBD)
            lvs.pool(lun_pool_xml(LV_LUNS, tgt.info["port"]), LV_LUNS)
        print("rbd ...", file=sys.stderr)
        bench_rbd(report, s, ceph, vs, lvs)
        print("iscsi ...", file=sys.stderr)
        bench_luns(report, s, vs, lvs)
    finally:
        if lvs is not None:
            lvs.close()
        if isinstance(lv, Libvirt):
            for problem in lv.close():
                print(f"cleanup: {problem}", file=sys.stderr)
        if vs is not None:
            vs.close()
        for srv in reversed(servers):
            srv.stop()
        shutil.rmtree(work, ignore_errors=True)
    return finish_report(report, libvirt_ran=lvs is not None)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if os.geteuid() != 0:
        print("bench_net.py starts Ceph and tgtd: run it as root", file=sys.stderr)
        return 2
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so the cleanup below runs
    lv = "disabled by --no-libvirt" if args.no_libvirt else open_libvirt(args.uri)
    report = run(args, lv)
    print_table(report, "virtstore vs libvirt: network storage")
    write_json(report, args.json)
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
