"""A three-member etcd cluster on 127.0.0.1 (or on addresses given), started once per test
session.

Each member has its own free client and peer ports and data directory; ``etcd_kill``
and ``etcd_restart`` stop one member (SIGKILL, as a crash) and bring it back on its
data, for the tests of a cluster that loses a member.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pytest

from net_fixtures import Server, _session_server, _stop_all, ceph_cmd, free_port, spawn, wait_for
from virtstore.api.embedded import EmbeddedConnection
from virtstore.engine.cluster import ClusterConfig

ETCD_TOOLS = ("etcd",)
MEMBERS = 3


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(url + "/health", timeout=1) as resp:
            return bool(json.loads(resp.read()).get("health") == "true")
    except (OSError, ValueError):
        return False


def _argv(srv: Server, i: int) -> list[str]:
    m = srv.info["members"][i]
    initial = ",".join(f"{x['name']}=http://{x['host']}:{x['peer']}" for x in srv.info["members"])
    return ["etcd", "--name", m["name"], "--data-dir", str(srv.dir / m["name"]),
            "--listen-client-urls", f"http://{m['host']}:{m['client']}",
            "--advertise-client-urls", f"http://{m['host']}:{m['client']}",
            "--listen-peer-urls", f"http://{m['host']}:{m['peer']}",
            "--initial-advertise-peer-urls", f"http://{m['host']}:{m['peer']}",
            "--initial-cluster", initial, "--initial-cluster-token", srv.dir.name,
            "--initial-cluster-state", "new",
            # Small and quick, as a test cluster on a shared machine should be.
            "--heartbeat-interval", "100", "--election-timeout", "1000",
            "--quota-backend-bytes", str(256 << 20), "--logger", "zap",
            "--log-outputs", "stderr"]


def _start_etcd(srv: Server, hosts: tuple[str, ...] = ("127.0.0.1",) * MEMBERS) -> None:
    """Member ``i`` listens (for clients and peers) on ``hosts[i]``."""
    (srv.dir / "log").mkdir()
    srv.info["members"] = [{"name": f"e{i}", "host": host, "client": free_port(),
                            "peer": free_port()} for i, host in enumerate(hosts)]
    for i in range(len(hosts)):
        _spawn_member(srv, i)
    urls = [f"http://{m['host']}:{m['client']}" for m in srv.info["members"]]
    srv.info["endpoints"] = urls
    for url in urls:
        wait_for(f"etcd {url}", lambda u=url: _healthy(u), 60, 0.2)  # type: ignore[misc]


def _spawn_member(srv: Server, i: int) -> None:
    m = srv.info["members"][i]
    proc = spawn(_argv(srv, i), srv.dir / "log" / f"{m['name']}.out")
    m["pid"] = proc.pid
    m["proc"] = proc
    srv.pids.append(proc.pid)


def etcd_kill(srv: Server, i: int) -> None:
    """SIGKILL member ``i`` (a process this fixture started, by its PID)."""
    m = srv.info["members"][i]
    proc: subprocess.Popen[bytes] = m["proc"]
    with contextlib.suppress(ProcessLookupError):
        os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=10)
    srv.pids.remove(proc.pid)


def etcd_restart(srv: Server, i: int) -> None:
    _spawn_member(srv, i)
    url = srv.info["endpoints"][i]
    wait_for(f"etcd {url}", lambda: _healthy(url), 60, 0.2)


@pytest.fixture(scope="session")
def etcd_cluster(request: pytest.FixtureRequest) -> Server:
    """Three etcd members: ``info['endpoints']`` lists their client URLs."""
    request.addfinalizer(_stop_all)
    return _session_server("etcd", _start_etcd, needs=ETCD_TOOLS)



# -- Cluster members on one RBD pool, each engine in processes of its own ------------------
WORKER = str(Path(__file__).with_name("cluster_worker.py"))
WORKER_ENV = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}


def pool_xml(name: str, srv: Server) -> str:
    return (f"<pool type='rbd'><name>{name}</name><source><name>rbd</name>"
            f"<host name='{srv.info['addr']}' port='{srv.info['mon_port']}'/>"
            f"<auth username='admin' type='ceph'><secret usage='client.admin secret'/>"
            f"</auth></source></pool>")


class Member:
    """A cluster member: a state root of its own; ``wrap`` runs its worker processes
    (``ip netns exec NS`` for a member in a network namespace)."""

    def __init__(self, root: Path, name: str, pool: str, endpoints: Sequence[str], ttl: int,
                 wrap: Sequence[str] = ()) -> None:
        self.root, self.name, self.pool, self.endpoints = root, name, pool, list(endpoints)
        self.ttl, self.wrap = ttl, list(wrap)

    def config(self) -> ClusterConfig:
        return ClusterConfig(tuple(self.endpoints), self.name, ttl=self.ttl)

    def connect(self) -> EmbeddedConnection:
        return EmbeddedConnection(str(self.root), cluster=self.config())

    def argv(self, mode: str, *rest: str) -> list[str]:
        return [*self.wrap, sys.executable, WORKER, mode, str(self.root), self.name,
                ",".join(self.endpoints), str(self.ttl), self.pool, *rest]

    def popen(self, mode: str, *rest: str) -> subprocess.Popen[str]:
        return subprocess.Popen(self.argv(mode, *rest), stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, text=True, env=WORKER_ENV)


def define_members(root: Path, ceph: Server, endpoints: Sequence[Sequence[str]], ttl: int,
                   wraps: Sequence[Sequence[str]] = ((), (), ())) -> list[Member]:
    """Members ``host0``... (one per entry of ``endpoints``, the etcd URLs it uses), each
    with the shared Ceph pool defined and started under a name of its own."""
    made = []
    # Pool definitions are cluster-wide, and etcd outlives one test: names of this test.
    tag = f"{os.getpid()}-{time.monotonic_ns()}"
    for i, (urls, wrap) in enumerate(zip(endpoints, wraps, strict=True)):
        m = Member(root / f"m{i}", f"host{i}", f"ceph{i}-{tag}", urls, ttl, wrap)
        conn = m.connect()
        u = conn.secret_define_xml("<secret ephemeral='no' private='yes'><usage type='ceph'>"
                                   "<name>client.admin secret</name></usage></secret>")
        conn.secret_set_value(u, base64.b64decode(ceph.info["admin_key"]))
        conn.pool_define_xml(pool_xml(m.pool, ceph))
        conn.pool_start(m.pool)
        conn.close()
        made.append(m)
    return made


def undefine_members(made: list[Member]) -> None:
    """Delete the test's volumes (named ``cl-``) and the members' pools."""
    conn = made[0].connect()
    conn.pool_refresh(made[0].pool)
    for v in conn.list_volumes(made[0].pool):
        if v.name.startswith("cl-"):
            conn.volume_delete(made[0].pool, v.name)
    conn.pool_stop(made[0].pool)
    for m in made:
        conn.pool_undefine(m.pool)  # from the whole cluster
    conn.close()


def rbd_images(ceph: Server) -> list[str]:
    return ceph_cmd(ceph, "rbd", "ls", "rbd").stdout.split()


def same_names_by_four_clients(members: list[Member], ceph: Server,
                               meanwhile: Callable[[], None] = lambda: None
                               ) -> dict[str, Any]:
    """Four clients on three members (two on the first) create the same 200 names at
    once, each in its own order; ``meanwhile`` runs while they do. Checks that each name
    was made exactly once and nothing else failed; returns the counts."""
    names = [f"cl-n{i:03d}" for i in range(200)]
    clients = [members[0], members[1], members[2], members[0]]
    t0 = time.monotonic()
    procs = [m.popen("create", str(seed), *names) for seed, m in enumerate(clients)]
    meanwhile()
    results = []
    for p in procs:
        out, _ = p.communicate(timeout=180)
        assert p.returncode == 0
        results.append(json.loads(out))
    made = Counter(n for r in results for n in r["created"])
    counts = {"made": len(made), "conflicts": sum(c - 1 for c in made.values() if c > 1),
              "exists": sum(r["exists"] for r in results),
              "busy": sum(r["busy"] for r in results),
              "unavailable": sum(r["unavailable"] for r in results),
              "seconds": time.monotonic() - t0}
    print(f"\n[200 names x 4 clients on 3 members: {counts['made']} made, conflicts "
          f"{counts['conflicts']}, refused {counts['exists'] + counts['busy']} (exists "
          f"{counts['exists']}, busy {counts['busy']}), unavailable {counts['unavailable']}, "
          f"in {counts['seconds']:.1f}s]")
    assert [r["errors"] for r in results] == [[], [], [], []]
    assert counts["conflicts"] == 0 and sorted(made) == names
    # Every client tried every name: the three that did not make it were refused.
    assert counts["exists"] + counts["busy"] + counts["unavailable"] == 3 * len(names)
    images = rbd_images(ceph)
    assert set(names) <= set(images)
    assert not [i for i in images if i.startswith("virtstore-staging-")]
    # What one member made, another member sees once it refreshes.
    conn = members[2].connect()
    conn.pool_refresh(members[2].pool)
    assert {v.name for v in conn.list_volumes(members[2].pool)} >= set(names)
    assert conn.cluster_status()["leases"] == 0  # every create released its claim
    conn.close()
    return counts
