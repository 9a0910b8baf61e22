"""Two cluster members in network namespaces of their own, each reaching etcd over its
own veth pair: a member whose link goes down loses its lease within the TTL and refuses
new ones while the other member takes the volume over; it catches up on the cluster's
pool definitions once its link is back."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

import virtstore
from cluster_fixtures import _healthy
from net_fixtures import free_port, spawn, stop_pid, wait_for
from server_fixtures import start_daemon

TTL = 3
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}


def ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=30)


@dataclass
class Side:
    ns: str  # the namespace
    host_if: str  # its veth end in the host's namespace
    host_addr: str  # the address etcd listens on for it
    endpoint: str = ""

    def run(self, *argv: str) -> list[str]:
        return ["ip", "netns", "exec", self.ns, *argv]


@dataclass
class Net:
    a: Side
    b: Side
    etcd: list[str]  # client URLs: the host side of each veth, and loopback


@pytest.fixture
def net(tmp_path: Path) -> Iterator[Net]:
    if os.geteuid() != 0 or shutil.which("ip") is None or shutil.which("etcd") is None:
        pytest.skip("needs root, iproute2 and etcd")
    tag = f"{os.getpid() % 100000}"
    octet = os.getpid() % 250 + 1  # 198.18.0.0/15: addresses set aside for tests
    sides = []
    made: list[str] = []
    try:
        for i, name in enumerate("ab"):
            ns, host_if, ns_if = f"vsc{tag}{name}", f"vsc{tag}{name}0", f"vsc{tag}{name}1"
            ip("netns", "add", ns)
            made.append(ns)
            ip("link", "add", host_if, "type", "veth", "peer", "name", ns_if)
            made.append(host_if)
            ip("link", "set", ns_if, "netns", ns)
            host_addr, ns_addr = f"198.18.{octet}.{4 * i + 1}", f"198.18.{octet}.{4 * i + 2}"
            ip("addr", "add", f"{host_addr}/30", "dev", host_if)
            ip("link", "set", host_if, "up")
            ip("-n", ns, "addr", "add", f"{ns_addr}/30", "dev", ns_if)
            ip("-n", ns, "link", "set", ns_if, "up")
            ip("-n", ns, "link", "set", "lo", "up")
            sides.append(Side(ns, host_if, host_addr))
        port, peer = free_port(), free_port()
        urls = [f"http://{s.host_addr}:{port}" for s in sides] + [f"http://127.0.0.1:{port}"]
        for s, url in zip(sides, urls, strict=False):
            s.endpoint = url
        (tmp_path / "etcd").mkdir()
        proc = spawn(["etcd", "--name", "e0", "--data-dir", str(tmp_path / "etcd" / "data"),
                      "--listen-client-urls", ",".join(urls),
                      "--advertise-client-urls", urls[-1],
                      "--listen-peer-urls", f"http://127.0.0.1:{peer}",
                      "--initial-advertise-peer-urls", f"http://127.0.0.1:{peer}",
                      "--initial-cluster", f"e0=http://127.0.0.1:{peer}",
                      "--heartbeat-interval", "100", "--election-timeout", "1000"],
                     tmp_path / "etcd" / "log")
        try:
            wait_for("etcd", lambda: _healthy(urls[-1]), 60, 0.2)
            yield Net(sides[0], sides[1], urls)
        finally:
            stop_pid(proc.pid)
    finally:
        for thing in reversed(made):
            with contextlib.suppress(subprocess.CalledProcessError):
                if thing.endswith("0"):
                    ip("link", "del", thing)
                else:
                    ip("netns", "del", thing)


HOLDER = textwrap.dedent("""
    import json, sys, time
    from virtstore.engine.cluster import Cluster, ClusterConfig
    from virtstore.errors import ClusterUnavailable
    from virtstore.xml import PoolDef, PoolSource
    endpoint, member, vol, ttl = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
    c = Cluster(ClusterConfig((endpoint,), member, ttl=ttl, timeout=1.0))
    pool = PoolDef(type="rbd", name="p", source=PoolSource(name="rbd"))
    ls = c.acquire("p", pool, vol, op="upload")
    lost_at = []
    ls.on_lost(lambda: lost_at.append(time.time()))
    print(json.dumps({"ready": True}), flush=True)
    sys.stdin.readline()  # the link is down from now on
    t0 = time.monotonic()
    lost = ls.lost.wait(3 * ttl)
    out = {"lost": lost, "after": time.monotonic() - t0, "lost_at": lost_at[0] if lost_at
           else None}
    try:
        c.acquire("p", pool, vol + "-new", op="upload")
        out["refused"] = None
    except ClusterUnavailable as exc:
        out["refused"] = str(exc)
    print(json.dumps(out), flush=True)
""")

TAKER = textwrap.dedent("""
    import json, sys, time
    from virtstore.engine.cluster import Cluster, ClusterConfig
    from virtstore.errors import Busy
    from virtstore.xml import PoolDef, PoolSource
    endpoint, member, vol, ttl = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
    c = Cluster(ClusterConfig((endpoint,), member, ttl=ttl))
    pool = PoolDef(type="rbd", name="p", source=PoolSource(name="rbd"))
    t0, busy = time.monotonic(), 0
    while time.monotonic() - t0 < 4 * ttl:
        try:
            c.release(c.acquire("p", pool, vol, op="upload"))
            print(json.dumps({"taken_after": time.monotonic() - t0, "busy": busy,
                              "taken_at": time.time()}))
            break
        except Busy:
            busy += 1
            time.sleep(0.1)
    else:
        print(json.dumps({"taken_after": None, "busy": busy}))
    c.close()
""")


def netfs_xml(name: str, target: Path) -> str:
    return (f"<pool type='netfs'><name>{name}</name><source><host name='192.0.2.10'/>"
            f"<dir path='/export'/><format type='nfs'/></source>"
            f"<target><path>{target}</path></target></pool>")


def test_a_member_whose_link_goes_down_stops_and_catches_up(net: Net, tmp_path: Path) -> None:
    tag = f"{os.getpid()}-{time.monotonic_ns()}"
    # Each daemon runs in its namespace and reaches etcd only through its veth.
    da = start_daemon(tmp_path / "a", "--cluster", net.a.endpoint, "--cluster-member",
                      "ns-a", "--cluster-ttl", str(TTL), "--workers", "1",
                      wrap=tuple(net.a.run()))
    db = start_daemon(tmp_path / "b", "--cluster", net.b.endpoint, "--cluster-member",
                      "ns-b", "--cluster-ttl", str(TTL), "--workers", "1",
                      wrap=tuple(net.b.run()))
    holder = subprocess.Popen(net.a.run(sys.executable, "-c", HOLDER, net.a.endpoint, "ns-a",
                                        f"v-{tag}", str(TTL)),
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=ENV)
    try:
        a, b = virtstore.connect(da.rw_uri), virtstore.connect(db.rw_uri)
        first = f"p1-{tag}"
        a.pool_define_xml(netfs_xml(first, tmp_path / "m1"))
        wait_for("the first pool on b", lambda: first in {p.name for p in b.list_pools()}, 15,
                 0.05)
        assert holder.stdout is not None and holder.stdin is not None
        assert json.loads(holder.stdout.readline())["ready"]

        ip("link", "set", net.a.host_if, "down")  # a is cut off from etcd
        holder.stdin.write("go\n")
        holder.stdin.flush()
        taker = subprocess.run(net.b.run(sys.executable, "-c", TAKER, net.b.endpoint, "ns-b",
                                         f"v-{tag}", str(TTL)),
                               capture_output=True, text=True, env=ENV, timeout=60)
        took = json.loads(taker.stdout)
        cut = json.loads(holder.stdout.readline())
        second = f"p2-{tag}"
        b.pool_define_xml(netfs_xml(second, tmp_path / "m2"))  # while a cannot know
        time.sleep(0.5)
        assert second not in {p.name for p in a.list_pools()}
        ip("link", "set", net.a.host_if, "up")
        t_up = time.monotonic()
        wait_for("a catching up", lambda: second in {p.name for p in a.list_pools()}, 30, 0.1)
        caught = time.monotonic() - t_up
        print(f"\n[link down: the holder lost its lease after {cut['after']:.1f}s (TTL {TTL}s),"
              f" the other namespace took it after {took['taken_after']:.1f}s ({took['busy']} "
              f"busy tries); link up: the pool defined meanwhile reached a after "
              f"{caught:.1f}s]")
        assert cut["lost"] and cut["refused"] and "takes no new write leases" in cut["refused"]
        assert took["taken_after"] is not None and took["busy"] > 0
        # The cut-off member gave the volume up before the other could have it (one
        # clock: both namespaces are on this host).
        assert cut["lost_at"] < took["taken_at"]
        b.pool_undefine(first)
        b.pool_undefine(second)
        wait_for("the undefine on a", lambda: not {first, second} & {
            p.name for p in a.list_pools()}, 15, 0.05)
        a.close()
        b.close()
    finally:
        holder.kill()
        holder.wait(10)
        da.stop()
        db.stop()
