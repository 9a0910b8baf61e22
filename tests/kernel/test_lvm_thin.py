"""Thin provisioning and snapshots on LVM (ours; libvirt has neither): a logical pool
with ``<lvm:thin_pool>`` makes its thin pool and creates thin volumes in it; storage
snapshots are thin snapshots, reverted with the bytes checked; a linked clone is an
active thin snapshot; ``<backingStore>`` on a thick pool makes an LVM snapshot."""

from __future__ import annotations

import io
import json
import os
from pathlib import Path
from typing import Any

import pytest

from block_fixtures import BlockLab, lvm, sh
from virtstore.api import VolumeCreateArgs
from virtstore.api.embedded import EmbeddedConnection
from virtstore.errors import NoSuchVolume, Unsupported

MiB = 1 << 20
NS = "http://virtstore.org/schemas/storagepool/logical/1.0"


def pool_xml(vg: str, *devs: str, thin: str | None = None) -> str:
    src = "".join(f"<device path='{d}'/>" for d in devs)
    extra = f"<lvm:thin_pool name='{thin}' size='120' unit='MiB'/>" if thin else ""
    return (f"<pool type='logical' xmlns:lvm='{NS}'><name>{vg}</name><source>{src}"
            f"</source><target><path>/dev/{vg}</path></target>{extra}</pool>")


def lvs(vg: str) -> dict[str, dict[str, str]]:
    out = lvm("lvs", "--reportformat", "json", "-a", "-o",
              "lv_name,lv_attr,origin,pool_lv,data_percent,lv_size,lv_tags", "--units", "b",
              "--nosuffix", vg).stdout
    return {r["lv_name"]: r for r in json.loads(out)["report"][0]["lv"]}


def wait(conn: EmbeddedConnection, job_id: str) -> None:
    info = conn.job_wait(job_id, 300)
    assert info.state == "done", info.error


def upload(conn: EmbeddedConnection, pool: str, vol: str, data: bytes) -> None:
    wait(conn, conn.volume_upload(pool, vol, io.BytesIO(data)).id)


def download(conn: EmbeddedConnection, pool: str, vol: str, length: int) -> bytes:
    sink = io.BytesIO()
    wait(conn, conn.volume_download(pool, vol, sink, length=length).id)
    return sink.getvalue()


def first_backup(conn: EmbeddedConnection, pool: str, data: bytes, bdir: str,
                 tracking: str) -> dict[str, Any]:
    """Volume "db" of 32 MiB holding ``data`` (4 chunks), backed up into ``bdir``: the
    full backup's manifest, checked to read only the 4 chunks written, by ``tracking``,
    with a hidden snapshot of its own."""
    conn.volume_create(pool, VolumeCreateArgs(name="db", capacity=32 * MiB))
    upload(conn, pool, "db", data)
    wait(conn, conn.volume_backup(pool, "db", bdir).id)
    (full,) = conn.backup_list(bdir)
    assert (full["kind"], full["tracking"]) == ("full", tracking)
    assert full["snapshot"] == f"virtstore-backup-{full['id']}"
    # The storage knows which blocks hold data: the other 4 chunks are not read.
    assert full["stats"]["chunks_read"] == 4
    return full


@pytest.fixture
def thin_pool(lab: BlockLab, conn: EmbeddedConnection) -> str:
    d1, d2 = lab.loop(96 * MiB), lab.loop(96 * MiB)
    vg = lab.vg("vsthin")
    conn.pool_define_xml(pool_xml(vg, d1, d2, thin="tp"))
    conn.pool_build(vg)
    conn.pool_start(vg)
    return vg


def test_thin_volumes_allocation_and_pool_sizes(thin_pool: str,
                                                conn: EmbeddedConnection) -> None:
    vg = thin_pool
    rep = lvs(vg)
    assert rep["tp"]["lv_attr"][0] == "t" and rep["tp"]["lv_size"] == str(120 * MiB)
    # Over-committed: more than the thin pool (and the VG) holds.
    conn.volume_create(vg, VolumeCreateArgs(name="big", capacity=256 * MiB))
    rep = lvs(vg)
    assert rep["big"]["lv_attr"][0] == "V" and rep["big"]["pool_lv"] == "tp"
    assert conn.volume_info(vg, "big").capacity == 256 * MiB
    assert conn.volume_info(vg, "big").allocation < MiB
    payload = os.urandom(8 * MiB)
    upload(conn, vg, "big", payload)
    conn.pool_refresh(vg)
    alloc = conn.volume_info(vg, "big").allocation
    # lvs gives the percent with two decimals: 0.01 % of 256 MiB is 27 KB.
    assert abs(alloc - 8 * MiB) < 64 * 1024
    assert alloc == round(256 * MiB * float(lvs(vg)["big"]["data_percent"]) / 100)
    info = conn.pool_info(vg)
    assert info.capacity == 120 * MiB and abs(info.allocation - 8 * MiB) < 64 * 1024
    assert "<lvm:thin_pool name='tp'" in conn.pool_xml(vg)


def test_snapshots_revert_and_linked_clone(thin_pool: str,
                                           conn: EmbeddedConnection) -> None:
    vg = thin_pool
    conn.volume_create(vg, VolumeCreateArgs(name="vol", capacity=32 * MiB))
    first = os.urandom(2 * MiB)
    upload(conn, vg, "vol", first)
    conn.volume_snapshot_create(vg, "vol", "s1")
    assert [s.name for s in conn.volume_snapshot_list(vg, "vol")] == ["s1"]
    rep = lvs(vg)
    assert rep["vol+s1"]["origin"] == "vol" and rep["vol+s1"]["lv_attr"][4] == "-"
    assert "vol+s1" not in {v.name for v in conn.list_volumes(vg)}

    second = os.urandom(2 * MiB)
    upload(conn, vg, "vol", second)
    conn.volume_snapshot_create(vg, "vol", "s2")
    upload(conn, vg, "vol", os.urandom(2 * MiB))
    conn.volume_snapshot_revert(vg, "vol", "s1")
    assert download(conn, vg, "vol", 2 * MiB) == first
    with open(f"/dev/{vg}/vol", "rb") as fh:
        assert fh.read(2 * MiB) == first
    assert not [n for n in lvs(vg) if "virtstore" in n]
    # Every snapshot is still there after a revert, and a revert to a snapshot taken
    # of the volume before the last revert works too.
    assert sorted(s.name for s in conn.volume_snapshot_list(vg, "vol")) == ["s1", "s2"]
    conn.volume_snapshot_revert(vg, "vol", "s2")
    assert download(conn, vg, "vol", 2 * MiB) == second
    with pytest.raises(NoSuchVolume):
        conn.volume_snapshot_revert(vg, "vol", "nope")

    # A linked clone is an active thin snapshot: the bytes, then its own life.
    wait(conn, conn.volume_clone(vg, "vol", "clone", linked=True).id)
    rep = lvs(vg)
    assert rep["clone"]["lv_attr"][0] == "V" and rep["clone"]["origin"] == "vol"
    assert download(conn, vg, "clone", 2 * MiB) == second
    upload(conn, vg, "clone", first)
    assert download(conn, vg, "vol", 2 * MiB) == second

    conn.volume_snapshot_delete(vg, "vol", "s2")
    assert [s.name for s in conn.volume_snapshot_list(vg, "vol")] == ["s1"]
    assert "vol+s2" not in lvs(vg)
    # A restart: snapshots stay inactive, the volume and its clone come back active.
    conn.pool_stop(vg)
    conn.pool_start(vg)
    rep = lvs(vg)
    assert rep["vol"]["lv_attr"][4] == "a" and rep["vol+s1"]["lv_attr"][4] == "-"
    assert sorted(v.name for v in conn.list_volumes(vg)) == ["clone", "vol"]
    # A deleted volume's snapshots go with it.
    conn.volume_delete(vg, "vol")
    assert not [n for n in lvs(vg) if n.startswith("vol")]
    assert download(conn, vg, "clone", 2 * MiB) == first


def test_thick_volumes_have_no_snapshots_and_backing_store_is_a_snapshot(
        lab: BlockLab, conn: EmbeddedConnection, tmp_path: Path) -> None:
    vg = lab.vg("vsthick")
    conn.pool_define_xml(pool_xml(vg, lab.loop(96 * MiB)))
    conn.pool_build(vg)
    conn.pool_start(vg)
    conn.volume_create(vg, VolumeCreateArgs(name="base", capacity=8 * MiB))
    first = os.urandom(MiB)
    upload(conn, vg, "base", first)
    with pytest.raises(Unsupported, match="thin"):
        conn.volume_snapshot_create(vg, "base", "s1")
    conn.volume_create_xml(vg, f"<volume><name>snap</name><capacity unit='MiB'>8"
                               f"</capacity><backingStore><path>/dev/{vg}/base</path>"
                               f"</backingStore></volume>")
    rep = lvs(vg)
    assert rep["snap"]["lv_attr"][0] == "s" and rep["snap"]["origin"] == "base"
    assert f"/dev/{vg}/base" in conn.volume_xml(vg, "snap")
    upload(conn, vg, "base", os.urandom(MiB))
    assert download(conn, vg, "snap", MiB) == first
    # No thin pool to ask what changed: a thick LV's backups read it whole.
    wait(conn, conn.volume_backup(vg, "base", str(tmp_path / "bk")).id)
    (full,) = conn.backup_list(str(tmp_path / "bk"))
    assert full["tracking"] == "block-hash"
    assert not [n for n in lvs(vg) if n.startswith("virtstore-")]


CHUNK = 4 * MiB


def test_backups_of_a_thin_volume_tracked_by_thin_delta(thin_pool: str,
                                                        conn: EmbeddedConnection,
                                                        tmp_path: Path) -> None:
    vg = thin_pool
    v1 = os.urandom(4 * CHUNK)
    bdir = str(tmp_path / "bk")
    # The pool's metadata maps only the 4 chunks written.
    full = first_backup(conn, vg, v1, bdir, "thin-delta")
    # The backup's thin snapshot: inactive, read-only, hidden from the volume's
    # snapshots and from the pool's volumes.
    rep = lvs(vg)
    attr = rep[full["snapshot"]]["lv_attr"]
    assert attr[0] == "V" and attr[1] == "r" and attr[4] == "-"
    assert conn.volume_snapshot_list(vg, "db") == []
    assert [v.name for v in conn.list_volumes(vg)] == ["db"]

    # Chunk 1 partly overwritten, chunk 6 written (nothing there before), chunk 3
    # discarded (unmapped: reads zeros now), chunk 7 discarded though it held nothing:
    # the incremental reads chunks 1, 3 and 6 only.
    part = os.urandom(2 * MiB)
    wait(conn, conn.volume_upload(vg, "db", io.BytesIO(part), offset=CHUNK + MiB).id)
    new6 = os.urandom(MiB)
    wait(conn, conn.volume_upload(vg, "db", io.BytesIO(new6), offset=6 * CHUNK).id)
    for chunk in (3, 7):
        sh("blkdiscard", "-o", str(chunk * CHUNK), "-l", str(CHUNK), f"/dev/{vg}/db")
    v2 = bytearray(v1 + bytes(4 * CHUNK))
    v2[CHUNK + MiB:CHUNK + 3 * MiB] = part
    v2[3 * CHUNK:4 * CHUNK] = bytes(CHUNK)
    v2[6 * CHUNK:6 * CHUNK + MiB] = new6
    assert download(conn, vg, "db", 32 * MiB) == bytes(v2)
    wait(conn, conn.volume_backup(vg, "db", bdir, incremental=True).id)
    inc = next(m for m in conn.backup_list(bdir) if m["id"] != full["id"])
    assert (inc["kind"], inc["parent"], inc["tracking"]) == ("incremental", full["id"],
                                                            "thin-delta")
    assert inc["stats"]["chunks_read"] == 3
    assert not inc["warnings"]
    # The chain keeps one thin snapshot of the volume: the newest backup's.
    assert sorted(n for n in lvs(vg) if n.startswith("virtstore-backup-")) == \
        [inc["snapshot"]]
    # No metadata snapshot stays held by the pool (dmsetup status: held root "-").
    status = sh("dmsetup", "status", f"{vg}-tp-tpool").stdout.split()
    assert status[2] == "thin-pool" and status[6] == "-"

    # Both points restore, byte for byte.
    wait(conn, conn.volume_restore(bdir, vg, "db-now").id)
    assert download(conn, vg, "db-now", 32 * MiB) == bytes(v2)
    wait(conn, conn.volume_restore(bdir, vg, "db-then", point=full["id"]).id)
    assert download(conn, vg, "db-then", 32 * MiB) == v1 + bytes(4 * CHUNK)
    conn.volume_delete(vg, "db-now")
    conn.volume_delete(vg, "db-then")

    # A snapshot removed by hand gives a full backup, said so; a metadata snapshot
    # left held (as by a killed backup) is released, and the backup goes on.
    lvm("lvremove", "-f", f"{vg}/{inc['snapshot']}")
    sh("dmsetup", "message", f"{vg}-tp-tpool", "0", "reserve_metadata_snap")
    wait(conn, conn.volume_backup(vg, "db", bdir, incremental=True).id)
    last = next(m for m in conn.backup_list(bdir) if m["id"] not in (full["id"], inc["id"]))
    assert last["kind"] == "full" and "missing" in " ".join(last["warnings"])
    # Chunks 0, 1, 2 and 6 are mapped; 3 and 7 are not since their discards.
    assert last["stats"]["chunks_read"] == 4
    assert sh("dmsetup", "status", f"{vg}-tp-tpool").stdout.split()[6] == "-"
    # Deleting the volume removes its backup snapshot too.
    conn.volume_delete(vg, "db")
    assert not [n for n in lvs(vg) if n.startswith(("db", "virtstore-"))]
