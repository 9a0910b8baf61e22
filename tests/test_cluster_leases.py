"""Write leases on a real three-member etcd cluster on 127.0.0.1: exclusive between
members, gone after the TTL when their holder is killed, kept through the loss of one
etcd member, refused by a member cut off from etcd."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator

import pytest

from cluster_fixtures import etcd_cluster, etcd_kill, etcd_restart  # noqa: F401
from net_fixtures import Server
from virtstore.engine.cluster import Cluster, ClusterConfig
from virtstore.errors import Busy, ClusterUnavailable
from virtstore.xml import PoolDef, PoolSource

TTL = 3


def rbd_pool(name: str = "p", source: str = "rbd") -> PoolDef:
    return PoolDef(type="rbd", name=name, source=PoolSource(name=source))


@pytest.fixture
def etcd(etcd_cluster: Server) -> Server:  # noqa: F811
    return etcd_cluster


@pytest.fixture
def members(etcd: Server, request: pytest.FixtureRequest) -> Iterator[list[Cluster]]:
    ttl = getattr(request, "param", TTL)
    made = [Cluster(ClusterConfig(tuple(etcd.info["endpoints"]), f"m{i}-{os.getpid()}",
                                  ttl=ttl)) for i in range(3)]
    yield made
    for c in made:
        c.close()


def unique(prefix: str) -> str:
    return f"{prefix}-{time.monotonic_ns()}"


def test_one_member_wins_a_write_lease(members: list[Cluster]) -> None:
    a, b, _ = members
    vol = unique("v")
    # Two members naming the same Ceph pool differently still meet on one key.
    lease = a.acquire("pa", rbd_pool("pa"), vol, op="upload")
    with pytest.raises(Busy, match=f"member '{a.member}'"):
        b.acquire("pb", rbd_pool("pb"), vol, op="upload")
    assert [x["member"] for x in b.leases() if x["volume"] == vol] == [a.member]
    a.release(lease)
    again = b.acquire("pb", rbd_pool("pb"), vol, op="upload")
    b.release(again)
    assert not [x for x in a.leases() if x["volume"] == vol]
    # Another Ceph pool is another storage: the same volume name does not collide.
    other = a.acquire("q", rbd_pool("q", source="other"), vol, op="create")
    b.acquire("pb", rbd_pool("pb"), vol, op="create")
    a.release(other)


def test_explicit_lease_is_renewed_by_its_holder_and_ended(members: list[Cluster]) -> None:
    a, b, _ = members
    vol = unique("g")
    first = a.acquire("p", rbd_pool(), vol, op="lease", holder="guest1", ttl=TTL)
    second = a.acquire("p", rbd_pool(), vol, op="lease", holder="guest1", ttl=TTL)
    assert second.etcd_lease == first.etcd_lease  # renewed, not doubled
    with pytest.raises(Busy):
        a.acquire("p", rbd_pool(), vol, op="lease", holder="guest2", ttl=TTL)
    with pytest.raises(Busy, match="not this member's"):
        b.unlease("p", rbd_pool(), vol, holder=None)
    a.unlease("p", rbd_pool(), vol, holder="guest1")
    b.release(b.acquire("p", rbd_pool(), vol, op="upload"))


HOLDER = textwrap.dedent("""
    import sys, time
    from virtstore.engine.cluster import Cluster, ClusterConfig
    from virtstore.xml import PoolDef, PoolSource
    eps, member, prefix, n, ttl = sys.argv[1].split(","), sys.argv[2], sys.argv[3], \\
        int(sys.argv[4]), int(sys.argv[5])
    c = Cluster(ClusterConfig(tuple(eps), member, ttl=ttl))
    pool = PoolDef(type="rbd", name="p", source=PoolSource(name="rbd"))
    for i in range(n):
        c.acquire("p", pool, f"{prefix}{i}", op="upload")
    c.acquire("p", pool, f"{prefix}guest", op="lease", holder="g", ttl=ttl)
    print("ready", flush=True)
    time.sleep(120)
""")


def test_leases_of_a_killed_member_expire_after_the_ttl(etcd: Server,
                                                        members: list[Cluster]) -> None:
    prefix = unique("k") + "-"
    n = 20
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, ",".join(etcd.info["endpoints"]),
                             "doomed", prefix, str(n), str(TTL)],
                            stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "ready"
        held = [x for x in members[0].leases() if x["volume"].startswith(prefix)]
        assert len(held) == n + 1 and {x["member"] for x in held} == {"doomed"}
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)
    killed = time.monotonic()
    b = members[1]
    names = [f"{prefix}{i}" for i in range(n)] + [f"{prefix}guest"]
    with pytest.raises(Busy, match="doomed"):
        b.acquire("p", rbd_pool(), names[0], op="upload")
    taken: dict[str, float] = {}
    deadline = killed + TTL + 5
    while len(taken) < len(names) and time.monotonic() < deadline:
        for name in names:
            if name in taken:
                continue
            try:
                b.release(b.acquire("p", rbd_pool(), name, op="upload"))
                taken[name] = time.monotonic() - killed
            except Busy:
                pass
        time.sleep(0.1)
    print(f"\n[killed member: {len(taken)}/{len(names)} leases taken over, after "
          f"{min(taken.values()):.1f}-{max(taken.values()):.1f}s (TTL {TTL}s)]")
    assert len(taken) == len(names)
    assert max(taken.values()) <= TTL + 2


# A session outlives etcd's leader election (a second or more on a busy machine) only
# when its TTL leaves room for it: 3 s trusted for 2.4 s did not always.
@pytest.mark.parametrize("members", [10], indirect=True)
def test_the_cluster_goes_on_without_one_etcd_member(etcd: Server,
                                                     members: list[Cluster]) -> None:
    a, b, _ = members
    first = a.acquire("p", rbd_pool(), unique("before"), op="upload")
    etcd_kill(etcd, 0)  # the endpoint every client tries first
    try:
        done = refused = 0
        t0 = time.monotonic()
        for i in range(100):
            if time.monotonic() - t0 > 30:
                break
            vol = unique(f"e{i}")
            ls = a.acquire("p", rbd_pool(), vol, op="create")
            try:
                b.acquire("p", rbd_pool(), vol, op="create")
            except Busy:
                refused += 1
            a.release(ls)
            done += 1
        a.beat()  # the session survives on the two members left
        st = b.status()
        print(f"\n[one etcd member down: {done} leases in {time.monotonic() - t0:.2f}s, "
              f"{refused} refused to the second member, quorum {st['quorum']}]")
        assert done == 100 and refused == 100
        assert st["quorum"] and [e["healthy"] for e in st["endpoints"]] == [False, True, True]
        assert first.key in a._held and not first.lost.is_set()
    finally:
        etcd_restart(etcd, 0)
    a.release(first)


def test_a_member_cut_off_from_etcd_loses_its_leases_and_refuses_new_ones(
        etcd: Server, members: list[Cluster]) -> None:
    # This member reaches etcd only through member 2; the others through all three.
    lonely = Cluster(ClusterConfig((etcd.info["endpoints"][2],), "lonely", ttl=TTL))
    try:
        lost = threading.Event()
        ls = lonely.acquire("p", rbd_pool(), unique("cut"), op="upload")
        ls.on_lost(lost.set)
        etcd_kill(etcd, 2)
        try:
            assert lost.wait(TTL + 3), "the lease was not given up after the TTL"
            with pytest.raises(ClusterUnavailable, match="takes no new write leases"):
                lonely.acquire("p", rbd_pool(), unique("cut2"), op="upload")
            # The rest of the cluster takes the lost lease over.
            deadline = time.monotonic() + TTL + 5
            while time.monotonic() < deadline:
                try:
                    members[0].release(members[0].acquire("p", rbd_pool(), ls.volume,
                                                          op="upload"))
                    break
                except Busy:
                    time.sleep(0.2)
            else:
                pytest.fail("the lease of the cut-off member never expired")
        finally:
            etcd_restart(etcd, 2)
        st = lonely.status()["this_member"]
        assert st["leases_lost"] == 1 and st["refused_unavailable"] >= 1
        deadline = time.monotonic() + 15
        while lonely.status()["this_member"]["cut_off"] and time.monotonic() < deadline:
            lonely.beat()
            time.sleep(0.3)
        lonely.release(lonely.acquire("p", rbd_pool(), unique("back"), op="upload"))
        print(f"\n[cut-off member: {json.dumps(st)}]")
    finally:
        lonely.close()


def test_a_create_sent_again_finds_its_own_key(etcd: Server) -> None:
    """A request that a dying etcd member committed but did not answer is sent again to
    another member: finding the key with its own value and lease is success, not busy
    (else nobody would ever make that name: seen as a lost name in the 200-names test)."""
    from virtstore.host.etcd import EtcdClient

    c = EtcdClient(etcd.info["endpoints"])
    try:
        key = unique("/virtstore-test/claim")
        lease, _ = c.grant(30)
        value = json.dumps({"holder": "x", "since": time.time()})
        made, rev, _ = c.create(key, value, lease=lease)
        assert made and rev > 0
        again, rev2, cur = c.create(key, value, lease=lease)  # the same request, resent
        assert again and rev2 == rev and cur is None
        other, _, cur = c.create(key, value.replace("x", "y"), lease=lease)
        assert not other and cur is not None and cur.value == value
        lease2, _ = c.grant(30)
        other, _, cur = c.create(key, value, lease=lease2)  # equal value, another lease
        assert not other
        c.revoke(lease2)
        c.revoke(lease)
        assert c.get(key) is None
    finally:
        c.close()
