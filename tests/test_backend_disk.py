"""disk pools on real loop devices: labels, partitions as volumes with exact extents,
dos primary/extended/logical, libvirt's naming and overwrite rules."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from block_fixtures import BlockLab, lab_fixture, sh  # noqa: F401
from virtstore.api import VolumeCreateArgs
from virtstore.api.embedded import EmbeddedConnection
from virtstore.backends import backend_for
from virtstore.backends.disk import DiskBackend
from virtstore.cli.main import main
from virtstore.errors import Busy, InvalidArgument, NoSpace, OperationInvalid
from virtstore.host import partitions
from virtstore.xml import parse_pool_xml

DATA = Path(__file__).parent / "data" / "block"
MiB = 1 << 20


def disk_xml(name: str, dev: str, fmt: str = "gpt") -> str:
    return (f"<pool type='disk'><name>{name}</name><source><device path='{dev}'/>"
            f"<format type='{fmt}'/></source><target><path>/dev</path></target></pool>")


def test_parse_recorded_dos_table() -> None:
    t = partitions.build_table("/dev/loop0", (DATA / "parted-dos.txt").read_text(),
                               (DATA / "sfdisk-dos.json").read_text())
    assert t.label == "dos" and t.size == 100 * MiB
    kinds = {p.number: (p.kind, p.format) for p in t.partitions}
    assert kinds == {1: ("primary", "linux-lvm"), 2: ("extended", "extended"),
                     5: ("logical", "linux"), 6: ("logical", "linux")}
    assert t.partitions[0].start == MiB and t.partitions[0].end == 10 * MiB - 1
    assert t.partitions[0].node == "/dev/loop0p1"
    inside = [r for r in t.free if r.logical]
    assert inside and all(t.partitions[1].start <= r.start for r in inside)
    assert t.free[-1].end == 100 * MiB - 1 and not t.free[-1].logical


def test_parse_recorded_gpt_table() -> None:
    t = partitions.build_table("/dev/sdb", (DATA / "parted-gpt.txt").read_text(),
                               (DATA / "sfdisk-gpt.json").read_text())
    assert t.label == "gpt"
    assert [(p.number, p.name, p.format) for p in t.partitions] == [
        (1, "data", "linux"), (2, "vol2", "linux-lvm"), (3, "swap", "linux-swap")]
    assert t.partitions[1].node == "/dev/sdb2"
    assert t.partitions[1].size == 20 * MiB


def test_gpt_pool_partitions_with_exact_extents(lab: BlockLab, conn: EmbeddedConnection
                                               ) -> None:
    dev = lab.loop(128 * MiB)
    base = os.path.basename(dev)
    conn.pool_define_xml(disk_xml("d", dev))
    conn.pool_build("d")
    conn.pool_start("d")
    assert conn.list_volumes("d") == []
    with pytest.raises(InvalidArgument, match=f"invalid partition name 'x', expected '{base}p1'"):
        conn.volume_create("d", VolumeCreateArgs(name="x", capacity=10 * MiB))
    conn.volume_create("d", VolumeCreateArgs(name=base + "p1", capacity=10 * MiB))
    conn.volume_create("d", VolumeCreateArgs(name=base + "p2", capacity=20 * MiB,
                                             format="linux-lvm"))
    vols = {v.name: v for v in conn.list_volumes("d")}
    assert vols[base + "p1"].capacity == 10 * MiB and vols[base + "p1"].type == "block"
    assert vols[base + "p2"].format == "linux-lvm"
    assert os.path.exists(dev + "p1") and os.path.exists(dev + "p2")
    # Exact extents, checked against the kernel's view of the partitions.
    be = backend_for("disk")
    assert isinstance(be, DiskBackend)
    pool = parse_pool_xml(conn.pool_xml("d"))
    src = be.volume_source(pool, base + "p2")
    assert src is not None and src.device_path == dev
    start = int(Path(f"/sys/class/block/{base}p2/start").read_text()) * 512
    size = int(Path(f"/sys/class/block/{base}p2/size").read_text()) * 512
    assert (src.extents[0].start, src.extents[0].end) == (start, start + size)
    table = json.loads(sh("sfdisk", "--json", dev).stdout)["partitiontable"]
    names = [p.get("name") for p in table["partitions"]]
    assert names == [base + "p1", base + "p2"]  # the staging label was replaced
    xml = conn.pool_xml("d")
    assert "<freeExtent start=" in xml
    info = conn.pool_info("d")
    assert info.capacity == 128 * MiB and info.allocation == 30 * MiB
    conn.volume_delete("d", base + "p1")
    assert [v.name for v in conn.list_volumes("d")] == [base + "p2"]
    assert not os.path.exists(f"/sys/class/block/{base}p1")
    # The next partition reuses the free number.
    conn.volume_create("d", VolumeCreateArgs(name=base + "p1", capacity=5 * MiB))
    conn.pool_stop("d")
    conn.pool_start("d")
    assert sorted(v.name for v in conn.list_volumes("d")) == [base + "p1", base + "p2"]


def test_dos_primary_extended_logical(lab: BlockLab, conn: EmbeddedConnection) -> None:
    dev = lab.loop(128 * MiB)
    base = os.path.basename(dev)
    conn.pool_define_xml(disk_xml("d", dev, "dos"))
    conn.pool_start("d", build=True)
    for n in (1, 2, 3):
        conn.volume_create("d", VolumeCreateArgs(name=f"{base}p{n}", capacity=8 * MiB))
    conn.volume_create("d", VolumeCreateArgs(name=f"{base}p4", capacity=60 * MiB,
                                             format="extended"))
    with pytest.raises(InvalidArgument, match="extended partition already exists"):
        conn.volume_create("d", VolumeCreateArgs(name=f"{base}p5", capacity=MiB,
                                                 format="extended"))
    conn.volume_create("d", VolumeCreateArgs(name=f"{base}p5", capacity=10 * MiB,
                                             format="linux-swap"))
    vols = {v.name: v for v in conn.list_volumes("d")}
    assert vols[f"{base}p4"].format == "extended" and vols[f"{base}p4"].allocation == 0
    assert vols[f"{base}p5"].format == "linux-swap"
    t = partitions.read_table(dev)
    kinds = {p.number: p.kind for p in t.partitions}
    assert kinds == {1: "primary", 2: "primary", 3: "primary", 4: "extended", 5: "logical"}
    with pytest.raises(OperationInvalid, match="still holds logical partitions"):
        conn.volume_delete("d", f"{base}p4")
    conn.volume_delete("d", f"{base}p5")
    conn.volume_delete("d", f"{base}p4")


def test_build_overwrite_rules(lab: BlockLab, conn: EmbeddedConnection) -> None:
    dev = lab.loop(64 * MiB)
    sh("mkfs.ext4", "-q", "-F", dev)
    conn.pool_define_xml(disk_xml("d", dev))
    with pytest.raises(OperationInvalid, match="forced overwrite is necessary"):
        conn.pool_build("d")
    with pytest.raises(OperationInvalid, match="forced overwrite is necessary"):
        conn.pool_build("d", overwrite=False)
    with pytest.raises(OperationInvalid, match=r"requires build|does not match"):
        conn.pool_start("d")
    conn.pool_build("d", overwrite=True)
    assert partitions.read_table(dev).label == "gpt"
    probed = sh("blkid", "-p", "-o", "export", dev, check=False).stdout.splitlines()
    assert not [ln for ln in probed if ln.startswith("TYPE=")]  # the ext4 is gone
    # Same label again: already built, left as it is; --no-overwrite refuses.
    conn.pool_build("d")
    with pytest.raises(OperationInvalid, match="already formatted"):
        conn.pool_build("d", overwrite=False)


def test_partition_in_use_is_not_deleted(lab: BlockLab, conn: EmbeddedConnection,
                                         tmp_path: Path) -> None:
    dev = lab.loop(64 * MiB)
    base = os.path.basename(dev)
    conn.pool_define_xml(disk_xml("d", dev))
    conn.pool_start("d", build=True)
    conn.volume_create("d", VolumeCreateArgs(name=base + "p1", capacity=32 * MiB))
    sh("mkfs.ext4", "-q", "-F", dev + "p1")
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    sh("mount", dev + "p1", str(mnt))
    try:
        with pytest.raises(Busy, match="mounted on"):
            conn.volume_delete("d", base + "p1")
    finally:
        sh("umount", str(mnt))
    conn.volume_delete("d", base + "p1")


def test_disk_pool_through_the_cli(lab: BlockLab, tmp_path: Path,
                                   capsys: pytest.CaptureFixture[str]) -> None:
    dev = lab.loop(64 * MiB)
    base = os.path.basename(dev)
    root = str(tmp_path / "state")
    xml = tmp_path / "d.xml"
    xml.write_text(disk_xml("d", dev, "dos"))

    def cli(*args: str) -> str:
        assert main(["--root", root, *args]) == 0, capsys.readouterr().err
        return capsys.readouterr().out

    cli("pool-define", str(xml))
    cli("pool-build", "d", "--no-overwrite")
    cli("pool-start", "d")
    cli("vol-create-as", "d", base + "p1", "16M", "--format", "linux")
    out = cli("vol-dumpxml", "--pool", "d", base + "p1")
    assert f"<path>{dev}p1</path>" in out and "<format type='linux'/>" in out
    assert base + "p1" in cli("vol-list", "d")
    assert "freeExtent" in cli("pool-dumpxml", "d")
    cli("vol-delete", "--pool", "d", base + "p1")
    cli("pool-destroy", "d")


def test_grow_partitions_into_the_free_space_after_them(lab: BlockLab,
                                                       conn: EmbeddedConnection) -> None:
    dev = lab.loop(128 * MiB)
    base = os.path.basename(dev)
    conn.pool_define_xml(disk_xml("d", dev, "dos"))
    conn.pool_start("d", build=True)
    conn.volume_create("d", VolumeCreateArgs(name=f"{base}p1", capacity=8 * MiB))
    conn.volume_create("d", VolumeCreateArgs(name=f"{base}p2", capacity=118 * MiB,
                                             format="extended"))
    conn.volume_create("d", VolumeCreateArgs(name=f"{base}p5", capacity=8 * MiB))
    payload = os.urandom(MiB)
    with open(f"/dev/{base}p5", "r+b") as fh:
        fh.write(payload)
    # A logical partition grows inside the extended one, not past it.
    conn.job_wait(conn.volume_resize("d", f"{base}p5", 20 * MiB).id, 120)
    p5 = next(p for p in partitions.read_table(dev).partitions if p.number == 5)
    assert p5.size == 20 * MiB and conn.volume_info("d", f"{base}p5").capacity == 20 * MiB
    with open(f"/dev/{base}p5", "rb") as fh:
        assert fh.read(MiB) == payload
    with pytest.raises(NoSpace, match="can grow by"):
        conn.volume_resize("d", f"{base}p5", 120 * MiB)
    with pytest.raises(InvalidArgument, match="extended partition is not resized"):
        conn.volume_resize("d", f"{base}p2", 119 * MiB)
    with pytest.raises(InvalidArgument, match="not shrunk"):
        conn.volume_resize("d", f"{base}p1", 4 * MiB, shrink=True)
    # p1 has the extended partition right after it.
    with pytest.raises(NoSpace, match="can grow by 0 bytes"):
        conn.volume_resize("d", f"{base}p1", 9 * MiB)
    assert conn.volume_info("d", f"{base}p1").capacity == 8 * MiB
