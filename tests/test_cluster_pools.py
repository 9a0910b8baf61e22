"""Cluster-wide pool definitions between real virtstored daemons (state roots of their
own) on the three-member etcd on 127.0.0.1: a shared pool defined, marked autostart or
undefined on one member follows on the others through etcd's watch; a member's own
values of host-local keys apply on that member only; a member started later catches up."""

from __future__ import annotations

import json
import os
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

import virtstore
from cluster_fixtures import etcd_cluster  # noqa: F401
from net_fixtures import Server, free_port
from server_fixtures import Daemon, start_daemon
from virtstore.api import Connection
from virtstore.api.embedded import EmbeddedConnection
from virtstore.engine.cluster import ClusterConfig
from virtstore.errors import AlreadyExists, ClusterUnavailable, InvalidArgument, NoSuchPool
from virtstore.xml import parse_pool_xml

WAIT = 15.0  # seconds a change may take to show before the test gives up


def netfs_xml(name: str, target: Path, export: str = "/export/vms",
              uuid: str | None = None) -> str:
    uu = f"<uuid>{uuid}</uuid>" if uuid else ""
    return (f"<pool type='netfs'><name>{name}</name>{uu}<source><host name='192.0.2.10'/>"
            f"<dir path='{export}'/><format type='nfs'/></source>"
            f"<target><path>{target}</path></target></pool>")


def eventually(what: str, check: Callable[[], Any]) -> Any:
    """Poll ``check`` until it returns something true (or WAIT passes)."""
    deadline = time.monotonic() + WAIT
    while True:
        try:
            got = check()
        except NoSuchPool:
            got = None
        if got:
            return got
        if time.monotonic() > deadline:
            pytest.fail(f"not seen within {WAIT}s: {what}")
        time.sleep(0.05)


def has_pool(conn: Connection, name: str) -> bool:
    return name in {p.name for p in conn.list_pools()}


class Members:
    def __init__(self, tmp: Path, endpoints: list[str]) -> None:
        self.tmp, self.endpoints = tmp, endpoints
        self.tag = f"{os.getpid()}-{time.monotonic_ns()}"
        self.daemons: dict[str, Daemon] = {}
        self.conns: dict[str, Connection] = {}

    def name(self, member: str) -> str:
        return f"{member}-{self.tag}"

    def start(self, member: str, *extra: str) -> Connection:
        d = start_daemon(self.tmp / member, "--cluster", ",".join(self.endpoints),
                         "--cluster-member", self.name(member), "--cluster-ttl", "3", *extra)
        self.daemons[member] = d
        self.conns[member] = virtstore.connect(d.rw_uri)
        return self.conns[member]

    def stop(self, member: str) -> None:
        self.conns.pop(member).close()
        assert self.daemons.pop(member).stop() == 0


@pytest.fixture
def members(tmp_path: Path, etcd_cluster: Server) -> Iterator[Members]:  # noqa: F811
    m = Members(tmp_path, etcd_cluster.info["endpoints"])
    yield m
    for member in list(m.daemons):
        m.stop(member)


def test_a_shared_pool_defined_on_one_member_follows_on_the_others(
        members: Members, tmp_path: Path) -> None:
    a = members.start("a", "--workers", "2")  # the change is made in any worker
    b = members.start("b", "--workers", "1")
    pool = f"nfs-{members.tag}"
    a.pool_define_xml(netfs_xml(pool, tmp_path / "mnt"))
    a_xml = parse_pool_xml(a.pool_xml(pool, inactive=True))

    eventually("the definition on b", lambda: has_pool(b, pool))
    b_xml = parse_pool_xml(b.pool_xml(pool, inactive=True))
    assert (b_xml.uuid, b_xml.source.hosts[0].name, b_xml.source.dir, b_xml.target.path) == (
        a_xml.uuid, "192.0.2.10", "/export/vms", str(tmp_path / "mnt"))
    assert not b.pool_info(pool).autostart

    # Autostart marked on b shows on a.
    b.pool_set_autostart(pool, True)
    eventually("autostart on a", lambda: a.pool_info(pool).autostart)

    # b mounts the export elsewhere: its own value, set from a.
    a.pool_override(pool, "target.path", str(tmp_path / "b-mnt"), member=members.name("b"))
    eventually("b's own target path", lambda: parse_pool_xml(
        b.pool_xml(pool, inactive=True)).target.path == str(tmp_path / "b-mnt"))
    assert parse_pool_xml(a.pool_xml(pool, inactive=True)).target.path == str(tmp_path / "mnt")
    assert a.pool_overrides(pool) == {members.name("b"): {
        "target.path": str(tmp_path / "b-mnt")}}

    # A new version from a reaches b with b's own path kept; one from b keeps it too.
    a.pool_define_xml(netfs_xml(pool, tmp_path / "mnt", "/export/v2", uuid=a_xml.uuid))
    eventually("the new export on b", lambda: parse_pool_xml(
        b.pool_xml(pool, inactive=True)).source.dir == "/export/v2")
    assert parse_pool_xml(b.pool_xml(pool, inactive=True)).target.path == str(
        tmp_path / "b-mnt")
    b.pool_define_xml(b.pool_xml(pool, inactive=True).replace("/export/v2", "/export/v3"))
    eventually("b's export on a", lambda: parse_pool_xml(
        a.pool_xml(pool, inactive=True)).source.dir == "/export/v3")
    assert parse_pool_xml(a.pool_xml(pool, inactive=True)).target.path == str(tmp_path / "mnt")
    assert b.pool_info(pool).autostart  # a new version keeps the cluster's mark

    # Unset: b takes the cluster's value again.
    b.pool_override(pool, "target.path", None)
    assert parse_pool_xml(b.pool_xml(pool, inactive=True)).target.path == str(tmp_path / "mnt")
    with pytest.raises(InvalidArgument, match="cannot differ per member"):
        b.pool_override(pool, "source.dir", "/x")
    with pytest.raises(InvalidArgument, match="absolute"):
        b.pool_override(pool, "target.path", "relative/x")

    # A pool of this host's own kind stays this host's.
    a.pool_define_xml(f"<pool type='dir'><name>own-{members.tag}</name><target><path>"
                      f"{tmp_path / 'own'}</path></target></pool>")

    b.pool_undefine(pool)
    eventually("the undefine on a", lambda: not has_pool(a, pool))
    assert not has_pool(a, pool) and not has_pool(b, pool)
    assert not has_pool(b, f"own-{members.tag}")


def test_a_member_started_later_catches_up(members: Members, tmp_path: Path) -> None:
    a = members.start("a", "--workers", "1")
    early = f"early-{members.tag}"
    a.pool_define_xml(netfs_xml(early, tmp_path / "early"))
    a.pool_set_autostart(early, True)
    # c's own value is set before c ever started.
    a.pool_override(early, "source.host", "192.0.2.77:2049", member=members.name("c"))
    c = members.start("c", "--workers", "1")
    # Taken in as the daemon opened its engine: no wait.
    assert c.pool_info(early).autostart
    host = parse_pool_xml(c.pool_xml(early, inactive=True)).source.hosts[0]
    assert (host.name, host.port) == ("192.0.2.77", 2049)
    assert parse_pool_xml(a.pool_xml(early, inactive=True)).source.hosts[0].name == "192.0.2.10"

    # Undefined while c is down: gone when c comes back.
    members.stop("c")
    a.pool_undefine(early)
    c = members.start("c", "--workers", "1")
    assert not has_pool(c, early)


def test_a_name_the_cluster_has_is_refused_and_nothing_changes(
        members: Members, tmp_path: Path) -> None:
    a = members.start("a", "--workers", "1")
    pool = f"taken-{members.tag}"
    a.pool_define_xml(netfs_xml(pool, tmp_path / "a-mnt"))
    other = EmbeddedConnection(str(tmp_path / "lone"), cluster=ClusterConfig(
        tuple(members.endpoints), members.name("lone"), ttl=3))
    try:
        other.pool_undefine(pool)  # taken in as the engine opened: drop it here ...
        eventually("the undefine on a", lambda: not has_pool(a, pool))
        a.pool_define_xml(netfs_xml(pool, tmp_path / "a-mnt"))  # ... and a defines anew
        with pytest.raises(AlreadyExists, match="is defined in the cluster with uuid"):
            other.pool_define_xml(netfs_xml(pool, tmp_path / "lone-mnt"))
        assert not has_pool(other, pool)
    finally:
        other.close()
    a.pool_undefine(pool)

    # A pool this host had before it joined, under a name the cluster uses: kept as it
    # is, and the cluster's is reported as not taken in.
    clash = f"clash-{members.tag}"
    alone = EmbeddedConnection(str(tmp_path / "early"))
    alone.pool_define_xml(netfs_xml(clash, tmp_path / "early-mnt"))
    own_uuid = alone.pool_info(clash).uuid
    alone.close()
    a.pool_define_xml(netfs_xml(clash, tmp_path / "a-mnt2"))
    joined = EmbeddedConnection(str(tmp_path / "early"), cluster=ClusterConfig(
        tuple(members.endpoints), members.name("early"), ttl=3))
    try:
        assert joined.pool_info(clash).uuid == own_uuid
        st = joined.cluster_status()["pools"]
        assert clash in st["cluster_pools"]
        assert "of its own" in st["not_applied"][clash]
        assert clash not in a.cluster_status()["pools"]["not_applied"]
    finally:
        joined.close()
    a.pool_undefine(clash)


def test_a_member_without_etcd_defines_no_shared_pool(tmp_path: Path) -> None:
    dead = f"http://127.0.0.1:{free_port()}"
    conn = EmbeddedConnection(str(tmp_path / "root"), cluster=ClusterConfig(
        (dead,), "cut-off", ttl=3, timeout=0.5))
    try:
        with pytest.raises(ClusterUnavailable, match="cannot reach the cluster's etcd"):
            conn.pool_define_xml(netfs_xml("nfs", tmp_path / "mnt"))
        assert not has_pool(conn, "nfs")
        assert not os.path.exists(tmp_path / "root" / "pools" / "nfs.xml")
        # Its own storage needs no one else.
        conn.pool_define_xml(f"<pool type='dir'><name>d</name><target><path>"
                             f"{tmp_path / 'd'}</path></target></pool>")
        assert has_pool(conn, "d")
    finally:
        conn.close()


def test_a_broken_definition_in_etcd_does_not_stop_the_others(
        etcd_cluster: Server, tmp_path: Path) -> None:  # noqa: F811
    from virtstore.engine.clusterpools import POOLS, def_key
    from virtstore.host.etcd import EtcdClient

    tag = f"{os.getpid()}-{time.monotonic_ns()}"
    eps = tuple(etcd_cluster.info["endpoints"])
    client = EtcdClient(eps)
    client.put(def_key(f"bad-{tag}"), "not json")
    client.put(def_key(f"worse-{tag}"), json.dumps({"xml": "<pool", "uuid": "u"}))
    a = EmbeddedConnection(str(tmp_path / "a"), cluster=ClusterConfig(eps, f"a-{tag}", ttl=3))
    try:
        good = f"good-{tag}"
        a.pool_define_xml(netfs_xml(good, tmp_path / "mnt"))
        b = EmbeddedConnection(str(tmp_path / "b"), cluster=ClusterConfig(eps, f"b-{tag}",
                                                                           ttl=3))
        try:
            assert has_pool(b, good)
            assert not has_pool(b, f"bad-{tag}") and not has_pool(b, f"worse-{tag}")
            broken = b.cluster_status()["pools"]["not_applied"]
            assert {f"bad-{tag}", f"worse-{tag}"} <= set(broken)
            assert good not in broken
        finally:
            b.close()
        a.pool_undefine(good)
    finally:
        a.close()
        for name in (f"bad-{tag}", f"worse-{tag}"):
            client.delete_prefix(f"{POOLS}{name}/")
        client.close()


def test_cli_sets_lists_and_unsets_a_members_own_values(
        etcd_cluster: Server, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,  # noqa: F811
        capsys: pytest.CaptureFixture[str]) -> None:
    from virtstore.cli.main import main

    tag = f"{os.getpid()}-{time.monotonic_ns()}"
    monkeypatch.setenv("VIRTSTORE_CLUSTER", ",".join(etcd_cluster.info["endpoints"]))

    def cli(member: str, *args: str) -> tuple[int, str, str]:
        monkeypatch.setenv("VIRTSTORE_CLUSTER_MEMBER", f"{member}-{tag}")
        rc = main(["--root", str(tmp_path / member), *args])
        cap = capsys.readouterr()
        return rc, cap.out, cap.err

    pool = f"cli-{tag}"
    (tmp_path / "x.xml").write_text(netfs_xml(pool, tmp_path / "mnt"))
    assert cli("a", "pool-define", str(tmp_path / "x.xml"))[0] == 0
    rc, _, err = cli("a", "pool-override", pool, "source.initiator", "iqn.2026-12.test:b")
    assert rc != 0 and "a netfs pool has no source.initiator" in err
    rc, out, err = cli("a", "pool-override", pool, "source.host", "198.51.100.7:2049",
                       "--member", f"b-{tag}")
    assert rc == 0, err
    assert "source.host set" in out
    rc, out, _ = cli("a", "pool-override", pool)
    assert rc == 0 and f"b-{tag}" in out and "198.51.100.7:2049" in out
    # b opens: the cluster's pool with its own server address.
    rc, out, _ = cli("b", "pool-dumpxml", pool, "--inactive")
    assert rc == 0 and "198.51.100.7" in out
    rc, out, _ = cli("a", "pool-dumpxml", pool, "--inactive")
    assert rc == 0 and "198.51.100.7" not in out
    rc, _, err = cli("b", "pool-override", pool, "source.host")
    assert rc != 0 and "give either a VALUE or --unset" in err
    assert cli("b", "pool-override", pool, "source.host", "--unset")[0] == 0
    rc, out, _ = cli("b", "pool-dumpxml", pool, "--inactive")
    assert rc == 0 and "198.51.100.7" not in out and "192.0.2.10" in out
    rc, out, _ = cli("a", "pool-override", pool, "--json")
    assert rc == 0 and json.loads(out) == {}
    rc, out, _ = cli("b", "cluster-status")
    assert rc == 0 and pool in out
    assert cli("b", "pool-undefine", pool)[0] == 0
    rc, out, _ = cli("a", "pool-list", "--all")
    assert rc == 0 and pool not in out


def mount_export(d: Path) -> None:
    """A tmpfs on ``d`` under the name of netfs_xml's export, as its NFS mount would be:
    a netfs pool of that export on ``d`` starts (already mounted) without a server."""
    d.mkdir(exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "192.0.2.10:/export/vms",
                    str(d)], check=True)


def unmount_all(*dirs: Path) -> None:
    for d in dirs:
        while os.path.ismount(d):
            subprocess.run(["umount", str(d)], check=True)


def running(conn: Connection, pool: str) -> bool:
    return conn.pool_info(pool).state == "running"


def test_cluster_pools_marked_autostart_start_on_each_member(
        members: Members, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from virtstore.cli.main import main

    a = members.start("a")
    b = members.start("b")
    pool, marker = f"auto-{members.tag}", f"marker-{members.tag}"
    a_mnt, b_mnt = tmp_path / "a-mnt", tmp_path / "b-mnt"
    mount_export(a_mnt)
    mount_export(b_mnt)
    try:
        a.pool_define_xml(netfs_xml(pool, a_mnt))
        uuid = parse_pool_xml(a.pool_xml(pool)).uuid
        eventually("the definition on b", lambda: has_pool(b, pool))
        # b finds the export at a path of its own: first one that is not there.
        a.pool_override(pool, "target.path", str(tmp_path / "b-missing"),
                        member=members.name("b"))
        assert not running(a, pool) and not running(b, pool)

        a.pool_set_autostart(pool, True)
        eventually("the pool running on a", lambda: running(a, pool))
        why = eventually("b's failed start", lambda: b.cluster_status()["pools"][
            "not_started"].get(pool))
        assert "b-missing" in why
        assert main(["-c", members.daemons["b"].rw_uri, "cluster-status"]) == 0
        assert f"Pool {pool} inactive here, its autostart failed: {why}" in (
            capsys.readouterr().out)
        assert b.pool_info(pool).state == "inactive" and b.pool_info(pool).autostart
        assert f"autostart of cluster pool '{pool}' on member {members.name('b')} failed" in (
            members.daemons["b"].log())
        assert running(a, pool) and a.cluster_status()["pools"]["not_started"] == {}

        # b's own path put right: that change starts it there.
        a.pool_override(pool, "target.path", str(b_mnt), member=members.name("b"))
        eventually("the pool running on b", lambda: running(b, pool))
        assert b.cluster_status()["pools"]["not_started"] == {}

        # b's own autostart value says no: stopped there, it stays stopped when the
        # definition changes and when b's daemon starts again (a start would succeed).
        b.pool_override(pool, "autostart", "no")
        assert not b.pool_info(pool).autostart and a.pool_info(pool).autostart
        b.pool_stop(pool)
        mount_export(b_mnt)
        members.stop("b")
        b = members.start("b")
        a.pool_define_xml(netfs_xml(pool, a_mnt, uuid=uuid))
        a.pool_define_xml(netfs_xml(marker, tmp_path / "marker"))
        # The follower handles events in order: the marker comes after the new version.
        eventually("the marker on b", lambda: has_pool(b, marker))
        assert b.pool_info(pool).state == "inactive" and not b.pool_info(pool).autostart
        assert b.cluster_status()["pools"]["not_started"] == {}

        # a's daemon starting again starts what is marked autostart and not running.
        a.pool_stop(pool)
        mount_export(a_mnt)
        members.stop("a")
        a = members.start("a")
        eventually("the pool running on a after its daemon started", lambda: running(a, pool))
        a.pool_stop(pool)
        for name in (pool, marker):
            a.pool_undefine(name)
    finally:
        unmount_all(a_mnt, b_mnt)
