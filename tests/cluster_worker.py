"""One client of one cluster member, run as its own process by the cluster tests (in a
network namespace for tests/test_cluster_netns_rbd.py) and bench/bench_cluster.py.

    cluster_worker.py create ROOT MEMBER ENDPOINTS TTL POOL SEED NAME...
        create every NAME (in an order shuffled by SEED), bounded to 120 s; print JSON
        counts: created names, refused (exists / busy), unavailable, other errors
    cluster_worker.py churn ROOT MEMBER ENDPOINTS TTL POOL NAME...
        create every NAME, then delete every one; print JSON: how many, and seconds
        each phase took (ENDPOINTS '-': an engine alone, no cluster; bench_cluster.py)
    cluster_worker.py hold ROOT MEMBER ENDPOINTS TTL POOL VOL GUESTVOL
        start a slow upload into VOL and lease GUESTVOL for a guest, print "ready",
        then sleep until killed
    cluster_worker.py refuse ROOT MEMBER ENDPOINTS TTL POOL VOL GUESTVOL
        upload into VOL and GUESTVOL and delete GUESTVOL, print JSON: the refusals; then
        read a member's name from stdin, wait until that member holds no lease, write
        GUESTVOL and print JSON: when its leases were gone and when the write ended
    cluster_worker.py cut ROOT MEMBER ENDPOINTS TTL POOL VOL
        start a slow upload into VOL, print "ready" once it has written; read a line
        (this member is cut off from etcd now), wait for the upload to end, try to
        create a volume; print JSON: when the lease was given up, the upload's end,
        state and error, and the refusal
    cluster_worker.py take ROOT MEMBER ENDPOINTS TTL POOL VOL BYTES
        upload BYTES bytes of "B" into VOL, trying again while it is busy; print JSON:
        when the lease was held, the busy tries, the job's state
"""

from __future__ import annotations

import io
import json
import random
import sys
import time

from virtstore.api.embedded import EmbeddedConnection
from virtstore.engine.cluster import ClusterConfig
from virtstore.errors import AlreadyExists, Busy, ClusterUnavailable, VirtstoreError
from virtstore.types import VolumeCreateArgs

MiB = 1 << 20


class Endless(io.RawIOBase):
    """Zeros without end: an upload from it lasts as long as its bandwidth allows."""

    def readable(self) -> bool:
        return True

    def readinto(self, buf: bytearray) -> int:  # type: ignore[override]
        n = len(buf)
        buf[:n] = b"\1" * n
        return n


def main(argv: list[str]) -> int:
    mode, root, member, endpoints, ttl, pool = argv[:6]
    cfg = (ClusterConfig(tuple(endpoints.split(",")), member, ttl=int(ttl))
           if endpoints != "-" else None)
    conn = EmbeddedConnection(root, cluster=cfg)
    if mode == "churn":
        names = argv[6:]
        t0 = time.monotonic()
        for name in names:
            conn.volume_create(pool, VolumeCreateArgs(name, MiB))
        t1 = time.monotonic()
        for name in names:
            conn.volume_delete(pool, name)
        t2 = time.monotonic()
        conn.close()
        print(json.dumps({"n": len(names), "create_s": t1 - t0, "delete_s": t2 - t1}))
        return 0
    if mode == "create":
        seed, names = int(argv[6]), argv[7:]
        random.Random(seed).shuffle(names)
        out: dict[str, object] = {"created": [], "exists": 0, "busy": 0, "unavailable": 0,
                                  "errors": []}
        deadline = time.monotonic() + 120
        for name in names:
            if time.monotonic() > deadline:
                break
            try:
                conn.volume_create(pool, VolumeCreateArgs(name, MiB))
                out["created"].append(name)  # type: ignore[attr-defined]
            except AlreadyExists:
                out["exists"] += 1  # type: ignore[operator]
            except Busy:
                out["busy"] += 1  # type: ignore[operator]
            except ClusterUnavailable:
                out["unavailable"] += 1  # type: ignore[operator]
            except VirtstoreError as exc:
                out["errors"].append(f"{name}: {type(exc).__name__}: {exc}")  # type: ignore[attr-defined]
        conn.close()
        print(json.dumps(out), flush=True)
        return 0
    conn.pool_refresh(pool)  # another member made the volumes
    if mode == "refuse":
        return refuse(conn, pool, argv[6], argv[7])
    if mode == "cut":
        return cut(conn, pool, argv[6], int(ttl))
    if mode == "take":
        return take(conn, pool, argv[6], int(argv[7]), int(ttl))
    vol, guest = argv[6], argv[7]
    job = conn.volume_upload(pool, vol, Endless(), length=64 * MiB, bandwidth=MiB)
    conn.volume_lease(pool, guest, holder="guest-on-" + member)
    print(json.dumps({"ready": job.id}), flush=True)
    time.sleep(300)
    return 0


def refuse(conn: EmbeddedConnection, pool: str, vol: str, guest: str) -> int:
    refused, other = [], []
    for what in ("upload " + vol, "upload " + guest, "delete " + guest):
        verb, name = what.split()
        try:
            if verb == "upload":
                conn.volume_upload(pool, name, io.BytesIO(b"x" * MiB))
            else:
                conn.volume_delete(pool, name)
            other.append(f"{what}: not refused")
        except Busy as exc:
            refused.append(f"{what}: {exc}")
        except VirtstoreError as exc:
            other.append(f"{what}: {type(exc).__name__}: {exc}")
    print(json.dumps({"refused": refused, "other": other}), flush=True)
    gone = sys.stdin.readline().strip()
    deadline, expired_at = time.monotonic() + 30, None
    while expired_at is None and time.monotonic() < deadline:
        if not [x for x in conn.volume_lease_list(pool) if x["member"] == gone]:
            expired_at = time.time()
        time.sleep(0.1)
    job = conn.volume_upload(pool, guest, io.BytesIO(b"y" * MiB))
    info = conn.job_wait(job.id, 60)
    print(json.dumps({"expired_at": expired_at, "state": info.state, "ended": info.ended}),
          flush=True)
    conn.close()
    return 0


def cut(conn: EmbeddedConnection, pool: str, vol: str, ttl: int) -> int:
    job = conn.volume_upload(pool, vol, Endless(), length=64 * MiB, bandwidth=MiB)
    while conn.job_info(job.id).bytes_done < MiB:
        time.sleep(0.05)
    print(json.dumps({"ready": job.id}), flush=True)
    sys.stdin.readline()
    assert conn.cluster is not None
    lost_at, deadline = None, time.monotonic() + 4 * ttl
    while time.monotonic() < deadline:  # watched closely: when the lease is given up
        if lost_at is None and conn.cluster.counters["leases_lost"]:
            lost_at = time.time()
        info = conn.job_info(job.id)
        if info.finished:
            break
        time.sleep(0.02)
    out: dict[str, object] = {"state": info.state, "ended": info.ended, "error": info.error,
                              "lost_at": lost_at}
    try:
        conn.volume_create(pool, VolumeCreateArgs(vol + "-new", MiB))
        out["refused"] = None
    except ClusterUnavailable as exc:
        out["refused"] = str(exc)
    print(json.dumps(out), flush=True)
    sys.stdin.readline()  # until the test is done with this member
    return 0


def take(conn: EmbeddedConnection, pool: str, vol: str, size: int, ttl: int) -> int:
    busy = ceph_busy = 0
    deadline = time.monotonic() + 6 * ttl
    out: dict[str, object] = {"taken_at": None}
    while time.monotonic() < deadline:
        try:
            job = conn.volume_upload(pool, vol, io.BytesIO(b"B" * size))
        except Busy:
            busy += 1
            time.sleep(0.1)
            continue
        taken_at = time.time()  # the lease is held by now
        info = conn.job_wait(job.id, 60)
        if info.error_code == "busy":  # Ceph's lock, still held by the other writer
            ceph_busy += 1
            time.sleep(0.1)
            continue
        out = {"taken_at": taken_at, "state": info.state, "error": info.error}
        break
    out.update(busy=busy, ceph_busy=ceph_busy)
    print(json.dumps(out), flush=True)
    conn.close()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
