"""One client of one cluster member, run as its own process by tests/test_cluster_rbd.py.

    cluster_worker.py create ROOT MEMBER ENDPOINTS TTL POOL SEED NAME...
        create every NAME (in an order shuffled by SEED), bounded to 120 s; print JSON
        counts: created names, refused (exists / busy), unavailable, other errors
    cluster_worker.py churn ROOT MEMBER ENDPOINTS TTL POOL NAME...
        create every NAME, then delete every one; print JSON: how many, and seconds
        each phase took (ENDPOINTS '-': an engine alone, no cluster; bench_cluster.py)
    cluster_worker.py hold ROOT MEMBER ENDPOINTS TTL POOL VOL GUESTVOL
        start a slow upload into VOL and lease GUESTVOL for a guest, print "ready",
        then sleep until killed
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
    vol, guest = argv[6], argv[7]
    conn.pool_refresh(pool)  # another member made them
    job = conn.volume_upload(pool, vol, Endless(), length=64 * MiB, bandwidth=MiB)
    conn.volume_lease(pool, guest, holder="guest-on-" + member)
    print(json.dumps({"ready": job.id}), flush=True)
    time.sleep(300)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
