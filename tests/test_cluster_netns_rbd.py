"""Three cluster members, each in a network namespace of its own, on one RBD pool.

The test builds its own network: a bridge without ports in this host's namespace carries
the addresses of a three-member etcd cluster and of a one-node Ceph started for this module
(a dummy interface would do, but this host's kernel has no dummy driver);
each member's namespace reaches them over two veth pairs, one to etcd and one to Ceph
(a storage network apart, so a member cut off from etcd still reaches the storage and
only its lease stops it writing). Addresses are in 198.19.0.0/16 (set aside for tests),
one /24 per run. Everything made here is removed at the end: the processes by PID, the
namespaces and links (named after this process's PID) by name; what a killed run left is
removed by the next.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from cluster_fixtures import (
    ETCD_TOOLS,
    Member,
    _start_etcd,
    define_members,
    etcd_kill,
    etcd_restart,
    same_names_by_four_clients,
)
from net_fixtures import CEPH_TOOLS, STARTUP, Server, _start_ceph, start_server
from virtstore.types import VolumeCreateArgs

MiB = 1 << 20
TTL = 3


def ip(*args: str) -> str:
    return subprocess.run(["ip", *args], check=True, capture_output=True, text=True,
                          timeout=30).stdout


def _reap_stale_network() -> None:
    """Delete the namespaces and links a killed earlier run left (named after its PID)."""
    names = [("netns", line.split()[0]) for line in ip("netns", "list").splitlines()]
    names += [("link", line.split()[0].split("@")[0])
              for line in ip("-br", "link").splitlines()]
    for kind, name in names:
        m = re.fullmatch(r"vsn(\d+)-\w+", name)
        if m and not Path(f"/proc/{m.group(1)}").exists():
            with contextlib.suppress(subprocess.CalledProcessError):
                ip(kind, "del", name)


def _free_net() -> str:
    """A /24 of 198.19.0.0/16 that no address of this host is in."""
    used = ip("-4", "-o", "addr", "show")
    for k in range(250):
        net = f"198.19.{(os.getpid() + k) % 250 + 1}"
        if f" {net}." not in used:
            return net
    raise RuntimeError("no free /24 in 198.19.0.0/16")


@dataclass
class Lab:
    ns: list[str]  # the members' namespaces
    etcd_if: list[str]  # the host's end of each member's link to etcd
    ceph: Server
    etcd: Server
    counts: dict[str, int] = field(default_factory=lambda: {
        "conflicts": 0, "leases lost": 0, "operations refused": 0})

    def wraps(self) -> list[list[str]]:
        return [["ip", "netns", "exec", ns] for ns in self.ns]


def _build_network(tag: str, net: str, made: list[tuple[str, str]]) -> list[str]:
    """The servers' interface with their addresses (``net``.241-243 etcd, .250 Ceph),
    and three namespaces, each with a link to etcd and one to Ceph; returns the host's
    ends of the etcd links. ``made`` records what to remove, as it is made."""
    servers = f"vsn{tag}-s"
    ip("link", "add", servers, "type", "bridge")
    made.append(("link", servers))
    for host in (241, 242, 243, 250):
        ip("addr", "add", f"{net}.{host}/32", "dev", servers)
    ip("link", "set", servers, "up")
    etcd_ifs = []
    for i in range(3):
        ns = f"vsn{tag}-{i}"
        ip("netns", "add", ns)
        made.append(("netns", ns))
        ip("-n", ns, "link", "set", "lo", "up")
        # Link "e" (x.8i+1 | x.8i+2) reaches etcd, link "c" (x.8i+5 | x.8i+6) reaches Ceph.
        for kind, base, dest in (("e", 8 * i, f"{net}.240/29"), ("c", 8 * i + 4, f"{net}.250")):
            host_if, ns_if = f"{ns}{kind}0", f"{ns}{kind}1"
            ip("link", "add", host_if, "type", "veth", "peer", "name", ns_if)
            made.append(("link", host_if))
            ip("link", "set", ns_if, "netns", ns)
            ip("addr", "add", f"{net}.{base + 1}/30", "dev", host_if)
            ip("link", "set", host_if, "up")
            ip("-n", ns, "addr", "add", f"{net}.{base + 2}/30", "dev", ns_if)
            ip("-n", ns, "link", "set", ns_if, "up")
            ip("-n", ns, "route", "add", dest, "via", f"{net}.{base + 1}")
            if kind == "e":
                etcd_ifs.append(host_if)
    return etcd_ifs


@pytest.fixture(scope="module")
def lab() -> Iterator[Lab]:
    tools = ("ip", *CEPH_TOOLS, *ETCD_TOOLS)
    if os.geteuid() != 0 or [t for t in tools if shutil.which(t) is None]:
        pytest.skip(f"needs root and {', '.join(tools)}")
    _reap_stale_network()
    tag, net = str(os.getpid()), _free_net()
    made: list[tuple[str, str]] = []
    servers: list[Server] = []
    try:
        etcd_ifs = _build_network(tag, net, made)
        servers.append(start_server("cephns", lambda srv: _start_ceph(srv, addr=f"{net}.250")))
        servers.append(start_server("etcdns", lambda srv: _start_etcd(
            srv, tuple(f"{net}.{h}" for h in (241, 242, 243)))))
        print(f"\n[servers on the test network up: Ceph in {STARTUP['cephns']:.1f}s, etcd in "
              f"{STARTUP['etcdns']:.1f}s]")
        lab = Lab([ns for kind, ns in made if kind == "netns"], etcd_ifs, servers[0], servers[1])
        yield lab
        print(f"\n[members in network namespaces: conflicts {lab.counts['conflicts']}, "
              f"leases lost {lab.counts['leases lost']}, operations refused "
              f"{lab.counts['operations refused']}]")
    finally:
        for srv in reversed(servers):
            srv.stop()
        for kind, name in reversed(made):
            with contextlib.suppress(subprocess.CalledProcessError):
                ip(kind, "del", name)  # a veth goes with its peer's namespace


def members(lab: Lab, root: Path, ttl: int) -> list[Member]:
    return define_members(root, lab.ceph, [lab.etcd.info["endpoints"]] * 3, ttl, lab.wraps())


def test_same_names_from_namespaces_while_an_etcd_member_dies(lab: Lab, tmp_path: Path) -> None:
    # A longer TTL: the sessions live through the election that may follow the death.
    ms = members(lab, tmp_path, 10)

    def kill_first_etcd() -> None:
        time.sleep(2)
        etcd_kill(lab.etcd, 0)  # the one every client tries first

    try:
        counts = same_names_by_four_clients(ms, lab.ceph, kill_first_etcd)
    finally:
        etcd_restart(lab.etcd, 0)
    lab.counts["conflicts"] += counts["conflicts"]
    lab.counts["operations refused"] += (counts["exists"] + counts["busy"]
                                         + counts["unavailable"])


def test_two_writers_and_a_killed_holder_in_namespaces(lab: Lab, tmp_path: Path) -> None:
    a, b, _ = members(lab, tmp_path, TTL)
    conn = b.connect()
    for vol in ("cl-w", "cl-g"):
        conn.volume_create(b.pool, VolumeCreateArgs(vol, 64 * MiB))
    conn.close()
    holder = a.popen("hold", "cl-w", "cl-g")
    try:
        assert holder.stdout is not None
        assert "ready" in json.loads(holder.stdout.readline())
        other = b.popen("refuse", "cl-w", "cl-g")
        assert other.stdout is not None and other.stdin is not None
        tried = json.loads(other.stdout.readline())
        assert tried["other"] == []
        assert len(tried["refused"]) == 3
        assert all("leased for writing by member 'host0'" in r for r in tried["refused"])
    finally:
        os.kill(holder.pid, signal.SIGKILL)  # the holder dies with its leases
        holder.wait(10)
    killed_at = time.time()
    other.stdin.write("host0\n")
    other.stdin.flush()
    out, _ = other.communicate(timeout=90)
    after = json.loads(out)
    print(f"\n[two writers in namespaces: {len(tried['refused'])} operations refused; "
          f"the SIGKILLed holder's leases gone after {after['expired_at'] - killed_at:.1f}s"
          f" (TTL {TTL}s), its guest's volume written from the other namespace "
          f"{after['ended'] - killed_at:.1f}s after the kill]")
    assert after["expired_at"] is not None and after["state"] == "done"
    lab.counts["operations refused"] += len(tried["refused"])
    lab.counts["leases lost"] += 2  # the killed holder's upload and guest lease


def test_a_member_cut_off_from_etcd_stops_writing(lab: Lab, tmp_path: Path) -> None:
    import rados  # type: ignore[import-not-found]
    import rbd  # type: ignore[import-not-found]

    a, b, _ = members(lab, tmp_path, TTL)
    size = 8 * MiB
    conn = b.connect()
    conn.volume_create(b.pool, VolumeCreateArgs("cl-cut", 64 * MiB))
    conn.close()
    cut = a.popen("cut", "cl-cut")
    try:
        assert cut.stdout is not None and cut.stdin is not None
        assert "ready" in json.loads(cut.stdout.readline())  # a writes, holding the lease
        ip("link", "set", lab.etcd_if[0], "down")  # a still reaches Ceph, not etcd
        down_at = time.time()
        cut.stdin.write("go\n")
        cut.stdin.flush()
        taker = b.popen("take", "cl-cut", str(size))
        out, _ = taker.communicate(timeout=120)
        took = json.loads(out)
        stopped = json.loads(cut.stdout.readline())
        cut.stdin.write("done\n")
        cut.stdin.flush()
    finally:
        ip("link", "set", lab.etcd_if[0], "up")
        cut.kill()
        cut.wait(10)
    cluster = rados.Rados(conffile=lab.ceph.info["conf"])
    cluster.connect(timeout=10)
    try:
        with cluster.open_ioctx("rbd") as ioctx, rbd.Image(ioctx, "cl-cut",
                                                           read_only=True) as img:
            data = img.read(0, size)
    finally:
        cluster.shutdown()
    assert stopped["lost_at"] is not None and stopped["state"] == "cancelled"
    assert stopped["refused"] and "takes no new write leases" in stopped["refused"]
    assert took["state"] == "done" and took["busy"] > 0
    # One clock: every namespace is on this host.
    print(f"\n[a member's link to etcd down (TTL {TTL}s): it gave its lease up "
          f"{stopped['lost_at'] - down_at:.1f}s after, its upload ended "
          f"{stopped['ended'] - down_at:.1f}s after ({stopped['error']}); the member in "
          f"another namespace held the lease from {took['taken_at'] - down_at:.1f}s "
          f"({took['busy']} busy tries, {took['ceph_busy']} refused by Ceph's lock)]")
    # Nothing written twice: the image holds what the other member wrote, and nothing the
    # cut-off one wrote after.
    assert data == b"B" * size
    lab.counts["leases lost"] += 1
    lab.counts["operations refused"] += 1 + took["busy"] + took["ceph_busy"]
