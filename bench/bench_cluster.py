"""The cluster's control plane: how long a pool definition takes to reach every member,
and how long a write lease takes to take and release.

Starts its own three-member etcd on 127.0.0.1 (the test suite's recipe in
tests/cluster_fixtures.py) and three virtstored daemons on state roots of their own.

* propagation: a shared (netfs) pool defined, then undefined, on member a, N times (the
  next step once b and c have seen the last); the time from the call on a until the
  event reaches b and c (each waits on its event stream: no polling interval counted);
* leases: N write leases taken and released by one member (a claim transaction and a
  release transaction each), p50 and p99;
* with ``--rbd``: on a one-node Ceph (tests/net_fixtures.py), 1 MiB RBD images created
  then deleted, each client its own names: an engine alone (no cluster), one member,
  three members at once (a process each), images per second.

Run as root from the repository: ``.venv/bin/python bench/bench_cluster.py [-n 50]``.
Everything it starts is stopped at the end.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))  # the server recipes

import cluster_fixtures as cf  # noqa: E402
import net_fixtures as nf  # noqa: E402
import virtstore  # noqa: E402
from server_fixtures import start_daemon  # noqa: E402
from virtstore.engine.cluster import Cluster, ClusterConfig  # noqa: E402
from virtstore.xml import PoolDef, PoolSource  # noqa: E402


def pct(values: list[float], p: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, round(p / 100 * (len(s) - 1)))]


def line(what: str, ms: list[float]) -> str:
    return (f"{what:<38} n={len(ms):<4} p50 {pct(ms, 50):7.2f} ms   p99 {pct(ms, 99):7.2f} ms"
            f"   max {max(ms):7.2f} ms   mean {statistics.mean(ms):7.2f} ms")


def wait_seen(seen: dict[tuple[str, str, str], float], action: str, name: str) -> None:
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and not all((m, action, name) in seen for m in "bc"):
        time.sleep(0.005)


def bench_propagation(endpoints: list[str], tmp: Path, n: int) -> list[str]:
    daemons = {m: start_daemon(tmp / m, "--cluster", ",".join(endpoints), "--cluster-member",
                               f"bench-{m}", "--workers", "1") for m in "abc"}
    try:
        conns = {m: virtstore.connect(d.rw_uri) for m, d in daemons.items()}
        seen: dict[tuple[str, str, str], float] = {}
        stop = threading.Event()

        def listen(m: str) -> None:
            conn = virtstore.connect(daemons[m].rw_uri)
            last = conn.latest_event_id()
            while not stop.is_set():
                for ev in conn.events_since(last, timeout=1.0):
                    last = ev.id
                    if ev.kind == "pool" and ev.name:
                        seen.setdefault((m, ev.action, ev.name), time.monotonic())
            conn.close()

        threads = [threading.Thread(target=listen, args=(m,), daemon=True) for m in "bc"]
        for t in threads:
            t.start()
        time.sleep(1.0)  # the listeners are waiting
        sent: dict[tuple[str, str], float] = {}
        for i in range(n):
            name = f"bench-{i}"
            sent[("defined", name)] = time.monotonic()
            conns["a"].pool_define_xml(
                f"<pool type='netfs'><name>{name}</name><source><host name='192.0.2.1'/>"
                f"<dir path='/e{i}'/></source><target><path>{tmp / name}</path></target>"
                "</pool>")
            wait_seen(seen, "defined", name)  # else b may find it gone already
            sent[("undefined", name)] = time.monotonic()
            conns["a"].pool_undefine(name)
            wait_seen(seen, "undefined", name)
        deadline = time.monotonic() + 10
        while len(seen) < 4 * n and time.monotonic() < deadline:
            time.sleep(0.1)
        stop.set()
        for t in threads:
            t.join(5)
        out = []
        for action in ("defined", "undefined"):
            lat = [1000 * (seen[(m, action, name)] - t0) for (act, name), t0 in sent.items()
                   if act == action for m in "bc" if (m, action, name) in seen]
            missing = 2 * n - len(lat)
            out.append(line(f"pool {action} on a -> seen on b, c", lat)
                       + (f"   ({missing} never seen)" if missing else ""))
        for c in conns.values():
            c.close()
        return out
    finally:
        for d in daemons.values():
            d.stop()


def bench_leases(endpoints: list[str], n: int) -> list[str]:
    c = Cluster(ClusterConfig(tuple(endpoints), f"bench-lease-{time.monotonic_ns()}", ttl=10))
    pool = PoolDef(type="rbd", name="p", source=PoolSource(name=f"bench{time.monotonic_ns()}"))
    take, release = [], []
    try:
        c.release(c.acquire("p", pool, "warm-up", op="upload"))  # the session
        for i in range(n):
            t0 = time.perf_counter()
            ls = c.acquire("p", pool, f"v{i}", op="upload")
            t1 = time.perf_counter()
            c.release(ls)
            t2 = time.perf_counter()
            take.append(1000 * (t1 - t0))
            release.append(1000 * (t2 - t1))
    finally:
        c.close()
    return [line("lease take (claim transaction)", take),
            line("lease release (release transaction)", release)]


def bench_rbd(endpoints: list[str], tmp: Path, n: int) -> list[str]:
    import base64
    import json
    import subprocess

    from cluster_fixtures import WORKER, pool_xml
    from virtstore.api.embedded import EmbeddedConnection

    ceph = nf.start_server("ceph", nf._start_ceph)
    try:
        roots = []
        for i in range(3):
            conn = EmbeddedConnection(str(tmp / f"m{i}"))
            u = conn.secret_define_xml("<secret ephemeral='no' private='yes'><usage "
                                       "type='ceph'><name>client.admin secret</name></usage>"
                                       "</secret>")
            conn.secret_set_value(u, base64.b64decode(ceph.info["admin_key"]))
            conn.pool_define_xml(pool_xml("ceph", ceph))
            conn.pool_start("ceph")
            conn.close()
            roots.append(tmp / f"m{i}")
        out = []
        for label, eps, members in (("alone (no cluster)", "-", 1),
                                    ("1 member", ",".join(endpoints), 1),
                                    ("3 members at once", ",".join(endpoints), 3)):
            per = n // members
            procs = [subprocess.Popen(
                [sys.executable, WORKER, "churn", str(roots[i]), f"bench-m{i}", eps, "10",
                 "ceph", *[f"bench-{label[0]}{i}-{k}" for k in range(per)]],
                stdout=subprocess.PIPE, text=True) for i in range(members)]
            res = [json.loads(p.communicate(timeout=600)[0]) for p in procs]
            create = max(r["create_s"] for r in res)
            delete = max(r["delete_s"] for r in res)
            total = per * members
            out.append(f"rbd {label:<20} {total} images: create {total / create:6.1f}/s, "
                       f"delete {total / delete:6.1f}/s")
        return out
    finally:
        ceph.stop()


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("-n", type=int, default=50, help="definitions and leases (default 50)")
    p.add_argument("--rbd", action="store_true", help="also RBD create/delete rates "
                   "(starts a one-node Ceph)")
    args = p.parse_args(argv)
    etcd = nf.start_server("etcd", cf._start_etcd)
    try:
        endpoints = list(etcd.info["endpoints"])
        with tempfile.TemporaryDirectory(prefix="vsbench-cluster-") as tmp:
            rows = bench_propagation(endpoints, Path(tmp), args.n)
        rows += bench_leases(endpoints, 4 * args.n)
        if args.rbd:
            with tempfile.TemporaryDirectory(prefix="vsbench-cluster-") as tmp:
                rows += bench_rbd(endpoints, Path(tmp), 3 * args.n)
    finally:
        etcd.stop()
    print("\n".join(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
