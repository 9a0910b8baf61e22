"""zfs pools with real zvols: OpenZFS (Debian's zfs-dkms, built for the lab's kernel by
scripts/kernel-lab-zfs on the host before the VM boots, with zfsutils-linux unpacked
beside it) on a loop device inside the VM, driven through the Connection and the CLI.

When the host could not build the modules the status file says why, and these tests
skip with that reason; the rest of the kernel lab runs all the same.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from test_lvm_thin import download, first_backup, upload, wait

from block_fixtures import LVM_ENV, BlockLab, sh
from conftest import running_udevd, virtstore_cli
from virtstore.api import VolumeCreateArgs
from virtstore.api.embedded import EmbeddedConnection
from virtstore.api.guests import guest_clone
from virtstore.cli.main import main
from virtstore.host import zfs

MiB = 1 << 20
CHUNK = 4 * MiB


def _openzfs_problem(top: Path) -> str | None:
    status = top / "status"
    if not status.exists():
        return f"OpenZFS was not prepared for the kernel lab ({status} is missing: " \
               "scripts/kernel-lab-zfs makes it)"
    text = status.read_text().strip()
    words = text.split()
    if words[:1] != ["ok"]:
        return f"OpenZFS for the kernel lab: {text} (scripts/kernel-lab-zfs)"
    if words[2:3] != [os.uname().release]:
        return f"OpenZFS was built for kernel {words[2:3]}, the VM runs " \
               f"{os.uname().release}"
    return None


@pytest.fixture(scope="module", autouse=True)
def openzfs() -> Iterator[Path]:
    """The zfs module loaded, OpenZFS's tools first on PATH (the host's zfs-fuse ones
    stay behind them), and udevd running with OpenZFS's rule for the /dev/zvol/ links
    (the VM starts no udevd; a host has one)."""
    top = Path(os.environ.get("VIRTSTORE_KLAB_ZFS", "/opt/kernel-lab/zfs"))
    why = _openzfs_problem(top)
    if why:
        pytest.skip(why)
    res = subprocess.run(["modprobe", "zfs"], capture_output=True, text=True, check=False)
    assert res.returncode == 0, f"modprobe zfs: {res.stderr.strip()}"
    user = top / "userland"
    rules = Path("/run/udev/rules.d")
    rules.mkdir(parents=True, exist_ok=True)
    rule = (user / "lib/udev/rules.d/60-zvol.rules").read_text()
    (rules / "60-zvol.rules").write_text(rule.replace("/lib/udev/zvol_id",
                                                      str(user / "lib/udev/zvol_id")))
    with running_udevd(coldplug=False), pytest.MonkeyPatch.context() as mp:
        env = {"PATH": f"{user}/sbin:{user}/usr/sbin:{os.environ['PATH']}",
               "LD_LIBRARY_PATH": f"{user}/lib/x86_64-linux-gnu"}
        for key, value in env.items():
            mp.setenv(key, value)
            mp.setitem(LVM_ENV, key, value)  # the environment of sh() and lab cleanup
        assert zfs.flavour() == "kernel"
        yield top


def pool_xml(name: str, dev: str) -> str:
    return (f"<pool type='zfs'><name>{name}</name><source><device path='{dev}'/>"
            "</source></pool>")


@pytest.fixture
def zpool(lab: BlockLab, conn: EmbeddedConnection) -> str:
    name = lab.zpool()
    conn.pool_define_xml(pool_xml(name, lab.loop(256 * MiB)))
    conn.pool_build(name)
    conn.pool_start(name)
    return name


def pattern(*chunks: int) -> bytes:
    """4 MiB chunks of one byte value each (no two alike: the store keeps one copy of
    equal chunks)."""
    return b"".join(bytes([c]) * CHUNK for c in chunks)


def origin(ds: str) -> str:
    return sh("zfs", "get", "-H", "-o", "value", "origin", ds).stdout.strip()


def test_zvols_through_the_connection(zpool: str, conn: EmbeddedConnection) -> None:
    conn.volume_create(zpool, VolumeCreateArgs(name="disk", capacity=32 * MiB))
    info = conn.volume_info(zpool, "disk")
    assert (info.path, info.capacity) == (f"/dev/zvol/{zpool}/disk", 32 * MiB)
    assert zfs.dataset(f"{zpool}/disk") is not None
    data = pattern(1, 2, 3)
    upload(conn, zpool, "disk", data)
    assert download(conn, zpool, "disk", len(data)) == data
    # A zvol's allocation is what ZFS says it references: the 12 MiB written.
    alloc = conn.volume_info(zpool, "disk").allocation
    assert 12 * MiB <= alloc < 16 * MiB, alloc

    # Resize: volsize grows, the device with it, the bytes stay.
    wait(conn, conn.volume_resize(zpool, "disk", 48 * MiB).id)
    assert conn.volume_info(zpool, "disk").capacity == 48 * MiB
    with open(f"/dev/zvol/{zpool}/disk", "rb") as fh:
        assert fh.seek(0, os.SEEK_END) == 48 * MiB
    assert download(conn, zpool, "disk", len(data)) == data
    with pytest.raises(Exception, match="shrink"):
        conn.volume_resize(zpool, "disk", 16 * MiB)
    wait(conn, conn.volume_resize(zpool, "disk", 40 * MiB, shrink=True).id)
    assert conn.volume_info(zpool, "disk").capacity == 40 * MiB
    assert download(conn, zpool, "disk", len(data)) == data

    # Storage snapshots: take, overwrite, revert, delete.
    conn.volume_snapshot_create(zpool, "disk", "s1")
    assert [s.name for s in conn.volume_snapshot_list(zpool, "disk")] == ["s1"]
    upload(conn, zpool, "disk", pattern(9))
    assert download(conn, zpool, "disk", CHUNK) == pattern(9)
    conn.volume_snapshot_revert(zpool, "disk", "s1")
    assert download(conn, zpool, "disk", len(data)) == data

    # A linked clone is a ZFS clone of a snapshot of the source: same bytes, shared
    # blocks. A full clone is a copy with blocks of its own (no origin).
    wait(conn, conn.volume_clone(zpool, "disk", "copy", linked=True).id)
    assert origin(f"{zpool}/copy").startswith(f"{zpool}/disk@")
    assert download(conn, zpool, "copy", len(data)) == data
    assert conn.volume_info(zpool, "copy").capacity == 40 * MiB
    wait(conn, conn.volume_clone(zpool, "disk", "full").id)
    assert origin(f"{zpool}/full") == "-"
    assert download(conn, zpool, "full", len(data)) == data
    assert conn.volume_info(zpool, "full").capacity == 40 * MiB

    # Stop exports the zpool, start imports it: the volumes and their bytes are there.
    conn.pool_stop(zpool)
    assert not zfs.pool_imported(zpool)
    conn.pool_start(zpool)
    assert sorted(v.name for v in conn.list_volumes(zpool)) == ["copy", "disk", "full"]
    assert download(conn, zpool, "disk", len(data)) == data

    # The source of a linked clone stays while the clone does; the full clone's doesn't.
    with pytest.raises(Exception, match=r"has linked clones \(copy\): delete them first"):
        conn.volume_delete(zpool, "disk")
    assert download(conn, zpool, "disk", len(data)) == data
    conn.volume_delete(zpool, "copy")
    conn.volume_snapshot_delete(zpool, "disk", "s1")
    # The linked clone's snapshot went with it.
    assert conn.volume_snapshot_list(zpool, "disk") == []
    assert not zfs.datasets(f"{zpool}/disk", types="snapshot")
    conn.volume_delete(zpool, "disk")
    assert download(conn, zpool, "full", len(data)) == data
    conn.volume_delete(zpool, "full")
    assert conn.list_volumes(zpool) == []
    assert [d.name for d in zfs.datasets(zpool)] == [zpool]


def test_zvols_through_the_cli(lab: BlockLab, tmp_path: Path,
                               capsys: pytest.CaptureFixture[str]) -> None:
    root = str(tmp_path / "state")
    name = lab.zpool()
    dev = lab.loop(256 * MiB)

    def vs(*args: str) -> str:
        # In process: a command's start-up costs seconds under the VM's emulated CPU.
        code = main(["--root", root, *args])
        out = capsys.readouterr()
        assert code == 0, out.err
        return out.out

    vs("pool-define-as", name, "zfs", "--source-dev", dev)
    vs("pool-build", name)
    vs("pool-start", name)
    vs("vol-create-as", name, "v1", "16M")
    src = tmp_path / "in.img"
    src.write_bytes(pattern(5, 6))
    vs("vol-upload", "--pool", name, "v1", str(src))
    info = json.loads(vs("vol-info", "--pool", name, "v1", "--json"))
    assert info["capacity"] == 16 * MiB and info["path"] == f"/dev/zvol/{name}/v1"
    # The installed command, once, as a user runs it.
    out = tmp_path / "out.img"
    res = subprocess.run([virtstore_cli(), "--root", root, "vol-download", "--pool", name,
                          "v1", str(out)], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    assert out.read_bytes()[:2 * CHUNK] == pattern(5, 6)
    vs("vol-delete", "--pool", name, "v1")
    assert zfs.dataset(f"{name}/v1") is None
    vs("pool-destroy", name)
    assert not zfs.pool_imported(name)
    vs("pool-delete", name)
    found = sh("zpool", "import", "-d", os.path.dirname(dev), check=False)
    assert name not in found.stdout + found.stderr


def test_guest_clone_of_a_zvol_disk_is_a_zfs_clone(zpool: str,
                                                    conn: EmbeddedConnection) -> None:
    conn.volume_create(zpool, VolumeCreateArgs(name="web", capacity=16 * MiB))
    upload(conn, zpool, "web", pattern(7))
    xml = (f"<domain type='kvm'><name>web</name><devices><disk type='block' device='disk'>"
           f"<driver name='qemu' type='raw'/><source dev='/dev/zvol/{zpool}/web'/>"
           "<target dev='vda' bus='virtio'/></disk></devices></domain>")
    new_xml, made = guest_clone(conn, xml, "web2", linked=True)
    assert [v.name for v in made] == ["web2"]
    assert f"<source dev=\"/dev/zvol/{zpool}/web2\"" in new_xml.replace("'", '"')
    assert origin(f"{zpool}/web2").startswith(f"{zpool}/web@")
    assert download(conn, zpool, "web2", CHUNK) == pattern(7)
    # The clone is a volume of its own: writing it leaves the original alone.
    upload(conn, zpool, "web2", pattern(8))
    assert download(conn, zpool, "web", CHUNK) == pattern(7)


def test_backups_of_a_zvol_tracked_by_zfs_send(zpool: str, conn: EmbeddedConnection,
                                               tmp_path: Path) -> None:
    v1 = pattern(11, 12, 13, 14)
    bdir = str(tmp_path / "bk")
    # zfs send carries the blocks that hold data: the 4 chunks written, not all 8.
    full = first_backup(conn, zpool, v1, bdir, "zfs-send")
    # The backup's snapshot is ZFS's own, hidden from the volume's snapshot list.
    assert conn.volume_snapshot_list(zpool, "db") == []
    assert zfs.dataset(f"{zpool}/db@{full['snapshot']}") is not None

    # One chunk overwritten, one written past the old data, one discarded (a hole now,
    # reading zeros): the incremental reads those three, not the holes ZFS reports over
    # chunks that held nothing before either.
    wait(conn, conn.volume_upload(zpool, "db", io.BytesIO(pattern(21)), offset=CHUNK).id)
    wait(conn, conn.volume_upload(zpool, "db", io.BytesIO(pattern(22)),
                                  offset=6 * CHUNK).id)
    sh("blkdiscard", "-o", str(3 * CHUNK), "-l", str(CHUNK), f"/dev/zvol/{zpool}/db")
    v2 = download(conn, zpool, "db", 32 * MiB)
    assert v2 == pattern(11, 21, 13, 0, 0, 0, 22, 0)
    wait(conn, conn.volume_backup(zpool, "db", bdir, incremental=True).id)
    inc = next(m for m in conn.backup_list(bdir) if m["id"] != full["id"])
    assert (inc["kind"], inc["parent"], inc["tracking"]) == ("incremental", full["id"],
                                                            "zfs-send")
    assert inc["stats"]["chunks_read"] == 3
    assert not inc["warnings"]
    # The chain keeps one snapshot on the volume: the newest backup's.
    snaps = [d.name.split("@", 1)[1] for d in zfs.datasets(f"{zpool}/db", types="snapshot")]
    assert snaps == [inc["snapshot"]]

    # Both points restore into the zfs pool as new zvols, byte for byte.
    wait(conn, conn.volume_restore(bdir, zpool, "db-now").id)
    assert download(conn, zpool, "db-now", 32 * MiB) == v2
    wait(conn, conn.volume_restore(bdir, zpool, "db-then", point=full["id"]).id)
    assert download(conn, zpool, "db-then", len(v1)) == v1
    assert conn.volume_info(zpool, "db-then").capacity == 32 * MiB
    assert not [d.name for d in zfs.datasets(zpool) if "staging" in d.name]

    # A snapshot removed behind the chain's back gives a full backup, said so.
    sh("zfs", "destroy", f"{zpool}/db@{inc['snapshot']}")
    wait(conn, conn.volume_backup(zpool, "db", bdir, incremental=True).id)
    last = next(m for m in conn.backup_list(bdir)
                if m["id"] not in (full["id"], inc["id"]))
    assert last["kind"] == "full" and "missing" in " ".join(last["warnings"])

    # A backup killed while it read its snapshot leaves the read's clone behind (a
    # hidden staging name): deleting the volume removes it too.
    stale = f"{zpool}/virtstore-staging-read-{last['id']}"
    sh("zfs", "clone", f"{zpool}/db@{last['snapshot']}", stale)
    assert "db" in [v.name for v in conn.list_volumes(zpool)]
    assert stale.split("/", 1)[1] not in [v.name for v in conn.list_volumes(zpool)]
    conn.volume_delete(zpool, "db")
    assert zfs.dataset(stale) is None and zfs.dataset(f"{zpool}/db") is None
