"""Three cluster members (engines with their own state roots, in their own processes)
on one RBD pool of the one-node Ceph, coordinated by the three-member etcd."""

from __future__ import annotations

import io
import json
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from cluster_fixtures import (  # noqa: F401
    Member,
    define_members,
    etcd_cluster,
    etcd_kill,
    etcd_restart,
    pool_xml,
    same_names_by_four_clients,
    undefine_members,
)
from net_fixtures import Server, ceph_fixture  # noqa: F401
from virtstore.errors import Busy, ClusterUnavailable
from virtstore.types import VolumeCreateArgs

TTL = 3
MiB = 1 << 20


@pytest.fixture
def members(tmp_path: Path, ceph_fixture: Server,  # noqa: F811
            etcd_cluster: Server) -> Iterator[list[Member]]:  # noqa: F811
    made = define_members(tmp_path, ceph_fixture, [etcd_cluster.info["endpoints"]] * 3, TTL)
    yield made
    undefine_members(made)


def test_four_clients_on_three_members_make_each_name_once(
        members: list[Member], ceph_fixture: Server) -> None:  # noqa: F811
    counts = same_names_by_four_clients(members, ceph_fixture)
    assert counts["unavailable"] == 0


def test_two_members_writing_one_volume_and_a_killed_holder(
        members: list[Member]) -> None:
    a, b, _ = members
    conn_b = b.connect()
    for vol in ("cl-w", "cl-g"):
        conn_b.volume_create(b.pool, VolumeCreateArgs(vol, 64 * MiB))
    proc = a.popen("hold", "cl-w", "cl-g")
    try:
        assert proc.stdout is not None
        assert "ready" in json.loads(proc.stdout.readline())
        conn_b.pool_refresh(b.pool)
        refused = 0
        for vol in ("cl-w", "cl-g"):
            with pytest.raises(Busy, match="host0"):
                conn_b.volume_upload(b.pool, vol, io.BytesIO(b"x" * MiB))
            refused += 1
        with pytest.raises(Busy):
            conn_b.volume_delete(b.pool, "cl-g")  # a guest runs on it elsewhere
        refused += 1
        held = {x["volume"]: x for x in conn_b.volume_lease_list(b.pool)}
        assert held["cl-w"]["op"] == "upload" and held["cl-g"]["holder"] == "guest-on-host0"
        status = conn_b.cluster_status()
        assert {m["member"]: m["leases"] for m in status["members"]}.get("host0") == 2
    finally:
        os.kill(proc.pid, signal.SIGKILL)  # the holder dies with its leases
        proc.wait(10)
    killed, killed_at = time.monotonic(), time.time()
    expired = None
    while expired is None and time.monotonic() < killed + TTL + 10:
        if not [x for x in conn_b.volume_lease_list(b.pool) if x["member"] == "host0"]:
            expired = time.monotonic() - killed
        time.sleep(0.1)
    assert expired is not None and expired <= TTL + 3
    # The guest's volume is free at once; the one whose upload died keeps Ceph's lock
    # until Ceph notices its client is gone (its watch timeout, 30 s by default).
    jobs = {vol: conn_b.volume_upload(b.pool, vol, io.BytesIO(b"y" * MiB))
            for vol in ("cl-w", "cl-g")}
    written = {}
    for vol, job in jobs.items():
        info = conn_b.job_wait(job.id, 90)
        assert info.state == "done" and info.ended is not None
        written[vol] = info.ended - killed_at
    print(f"\n[two writers: {refused} operations refused while host0 held the leases; "
          f"after its SIGKILL its etcd leases expired in {expired:.1f}s (TTL {TTL}s), the "
          f"volumes were written again after "
          f"{', '.join(f'{v} {t:.1f}s' for v, t in sorted(written.items()))}]")
    assert written["cl-g"] <= TTL + 5
    conn_b.close()


def test_ceph_lock_keeps_out_a_writer_that_bypasses_etcd(
        members: list[Member], ceph_fixture: Server) -> None:  # noqa: F811
    import rados  # type: ignore[import-not-found]
    import rbd  # type: ignore[import-not-found]

    conn = members[0].connect()
    conn.volume_create(members[0].pool, VolumeCreateArgs("cl-locked", 4 * MiB))
    cluster = rados.Rados(conffile=ceph_fixture.info["conf"])
    cluster.connect(timeout=10)
    try:
        with cluster.open_ioctx("rbd") as ioctx, rbd.Image(ioctx, "cl-locked") as img:
            # A guest's librbd that owns the image and will not hand it over.
            img.lock_acquire(rbd.RBD_LOCK_MODE_EXCLUSIVE)
            job = conn.volume_upload(members[0].pool, "cl-locked", io.BytesIO(b"z" * MiB))
            info = conn.job_wait(job.id, 60)
            assert info.state == "failed" and info.error_code == "busy", info
            img.lock_release()
        job = conn.volume_upload(members[0].pool, "cl-locked", io.BytesIO(b"z" * MiB))
        assert conn.job_wait(job.id, 60).state == "done"
        assert conn.volume_lease_list() == [] or all(
            x["volume"] != "cl-locked" for x in conn.volume_lease_list())
    finally:
        cluster.shutdown()
        conn.close()


def test_cli_leases_a_volume_for_a_guest_across_members(
        members: list[Member], monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    from virtstore.cli.main import main

    a, b, _ = members

    def cli(m: Member, *args: str) -> tuple[int, str, str]:
        monkeypatch.setenv("VIRTSTORE_CLUSTER", ",".join(m.endpoints))
        monkeypatch.setenv("VIRTSTORE_CLUSTER_MEMBER", m.name)
        rc = main(["--root", str(m.root), *args])
        cap = capsys.readouterr()
        return rc, cap.out, cap.err

    assert cli(a, "vol-create-as", a.pool, "cl-cli", "4M")[0] == 0
    assert cli(b, "pool-refresh", b.pool)[0] == 0
    rc, out, err = cli(a, "vol-lease", a.pool, "cl-cli", "--holder", "vm1", "--ttl", "30")
    assert rc == 0, err
    assert "leased to vm1 on host0" in out
    # The lease outlives the command that took it; the other member sees it and is refused.
    rc, out, _ = cli(b, "vol-lease-list", b.pool)
    assert rc == 0 and "cl-cli" in out and "host0" in out and "vm1" in out
    rc, _, err = cli(b, "vol-lease", b.pool, "cl-cli", "--holder", "vm1")
    assert rc == 1 and "leased for writing by member 'host0'" in err
    rc, _, err = cli(b, "vol-delete", "cl-cli", "--pool", b.pool)
    assert rc == 1 and "host0" in err
    rc, _, err = cli(b, "vol-unlease", b.pool, "cl-cli")
    assert rc == 1 and "not this member's" in err
    assert cli(a, "vol-lease", a.pool, "cl-cli", "--holder", "vm1", "--ttl", "30")[0] == 0
    rc, out, _ = cli(a, "cluster-status")
    assert rc == 0 and "Quorum" in out and "yes" in out
    for url in a.endpoints:
        assert url in out
    assert cli(a, "vol-unlease", a.pool, "cl-cli", "--holder", "vm1")[0] == 0
    rc, out, _ = cli(b, "vol-lease-list", "--json")
    assert rc == 0 and "cl-cli" not in out
    assert cli(b, "vol-delete", "cl-cli", "--pool", b.pool)[0] == 0


def test_snapshots_and_a_writable_nbd_export_hold_the_write_lease(
        members: list[Member]) -> None:
    a, b, _ = members
    conn_a, conn_b = a.connect(), b.connect()
    try:
        conn_a.volume_create(a.pool, VolumeCreateArgs("cl-s", 4 * MiB))
        conn_b.pool_refresh(b.pool)
        refused = 0
        # A guest runs on it on host0: host1 neither snapshots it nor serves it for writing.
        conn_a.volume_lease(a.pool, "cl-s", holder="vm1")
        with pytest.raises(Busy, match="host0"):
            conn_b.volume_snapshot_create(b.pool, "cl-s", "s1")
        refused += 1
        assert conn_b.volume_snapshot_list(b.pool, "cl-s") == []
        with pytest.raises(Busy, match="host0"):
            conn_b.volume_export_nbd(b.pool, "cl-s")
        refused += 1
        with conn_b.volume_export_nbd(b.pool, "cl-s", read_only=True) as ro:
            assert ro.running  # a reader needs no lease
        conn_a.volume_unlease(a.pool, "cl-s", holder="vm1")

        conn_b.volume_snapshot_create(b.pool, "cl-s", "s1")
        with conn_b.volume_export_nbd(b.pool, "cl-s") as exp:
            assert exp.running
            held = {x["volume"]: x for x in conn_a.volume_lease_list(a.pool)}
            assert (held["cl-s"]["member"], held["cl-s"]["op"]) == ("host1", "nbd-export")
            for verb in ("create", "revert", "delete"):
                with pytest.raises(Busy, match="host1"):
                    if verb == "create":
                        conn_a.volume_snapshot_create(a.pool, "cl-s", "s2")
                    elif verb == "revert":
                        conn_a.volume_snapshot_revert(a.pool, "cl-s", "s1")
                    else:
                        conn_a.volume_snapshot_delete(a.pool, "cl-s", "s1")
                refused += 1
        assert [s.name for s in conn_a.volume_snapshot_list(a.pool, "cl-s")] == ["s1"]
        # The export stopped, its lease went with it.
        conn_a.volume_snapshot_revert(a.pool, "cl-s", "s1")
        conn_a.volume_snapshot_delete(a.pool, "cl-s", "s1")
        assert conn_a.volume_snapshot_list(a.pool, "cl-s") == []
        assert not [x for x in conn_a.volume_lease_list(a.pool) if x["volume"] == "cl-s"]
        print(f"\n[snapshot and NBD writers: {refused} operations refused while another "
              "member held the lease]")
    finally:
        conn_a.close()
        conn_b.close()


def test_a_writable_export_stops_when_its_member_loses_etcd(
        members: list[Member], etcd_cluster: Server) -> None:  # noqa: F811
    m = members[0]
    # This member reaches etcd only through etcd member 2.
    lonely = Member(m.root, "lonely", m.pool, [etcd_cluster.info["endpoints"][2]], TTL)
    conn = lonely.connect()
    try:
        conn.volume_create(m.pool, VolumeCreateArgs("cl-nbd", 4 * MiB))
        exp = conn.volume_export_nbd(m.pool, "cl-nbd")
        assert exp.running
        etcd_kill(etcd_cluster, 2)
        try:
            deadline = time.monotonic() + TTL + 10
            while exp.running and time.monotonic() < deadline:
                time.sleep(0.1)
            assert not exp.running, "the export went on writing without a lease"
            exp.stop()  # its local lock too
            with pytest.raises(ClusterUnavailable, match="takes no new write leases"):
                conn.volume_export_nbd(m.pool, "cl-nbd")
            with pytest.raises(ClusterUnavailable):
                conn.volume_snapshot_create(m.pool, "cl-nbd", "s")
        finally:
            etcd_restart(etcd_cluster, 2)
        assert conn.volume_snapshot_list(m.pool, "cl-nbd") == []
        # Back in touch: what it gave up is gone from etcd, the volume free for anyone.
        deadline = time.monotonic() + 15
        while conn.cluster_status()["this_member"]["cut_off"] and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not [x for x in conn.volume_lease_list(m.pool) if x["volume"] == "cl-nbd"]
        conn.volume_snapshot_create(m.pool, "cl-nbd", "s")
        conn.volume_snapshot_delete(m.pool, "cl-nbd", "s")
    finally:
        conn.close()


def test_a_cluster_pool_undefined_while_running_elsewhere_runs_on_until_stopped(
        members: list[Member], ceph_fixture: Server) -> None:  # noqa: F811
    a, b, _ = members
    name = a.pool + "-x"
    conn_a = a.connect()
    conn_a.pool_define_xml(pool_xml(name, ceph_fixture))
    conn_b = b.connect()  # takes it in as it opens
    conn_b.pool_start(name)
    conn_b.close()
    conn_a.pool_undefine(name)
    conn_a.close()
    conn_b = b.connect()
    try:
        info = conn_b.pool_info(name)
        assert (info.state, info.persistent) == ("running", False)
        assert not (b.root / "pools" / f"{name}.xml").exists()
        conn_b.pool_stop(name)
        assert name not in {p.name for p in conn_b.list_pools()}
    finally:
        conn_b.close()
