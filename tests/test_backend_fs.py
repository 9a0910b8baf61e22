"""fs pools on real loop devices: mkfs with libvirt's overwrite rules, mount with
libvirt's options, file volumes on the mounted filesystem."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from block_fixtures import CONFORMANCE_DIR, BlockLab, lab_fixture, sh  # noqa: F401
from virtstore.api import VolumeCreateArgs
from virtstore.api.embedded import EmbeddedConnection
from virtstore.backends.fs import mount_argv
from virtstore.cli.main import main
from virtstore.errors import OperationInvalid
from virtstore.host import devices, mounts
from virtstore.xml import parse_pool_xml

MiB = 1 << 20
NS = "http://libvirt.org/schemas/storagepool/fs/1.0"


def fs_xml(name: str, dev: str, target: Path, fmt: str = "ext4", opts: tuple[str, ...] = ()
           ) -> str:
    ns = f" xmlns:fs='{NS}'" if opts else ""
    extra = ""
    if opts:
        extra = "<fs:mount_opts>" + "".join(f"<fs:option name='{o}'/>" for o in opts) + \
            "</fs:mount_opts>"
    return (f"<pool type='fs'{ns}><name>{name}</name><source><device path='{dev}'/>"
            f"<format type='{fmt}'/></source><target><path>{target}</path></target>"
            f"{extra}</pool>")


def test_build_start_volumes_stop(lab: BlockLab, conn: EmbeddedConnection,
                                  tmp_path: Path) -> None:
    dev = lab.loop(128 * MiB)
    target = tmp_path / "mnt"
    conn.pool_define_xml(fs_xml("f", dev, target, opts=("noatime",)))
    conn.pool_build("f")
    assert target.is_dir()
    assert devices.probe(dev).get("TYPE") == "ext4"
    conn.pool_start("f")
    m = mounts.mounted_at(str(target))
    assert m is not None and mounts.same_device(m, dev) and m.fstype == "ext4"
    assert {"nodev", "nosuid", "noexec", "noatime"} <= set(m.options)
    info = conn.pool_info("f")
    sv = os.statvfs(target)
    assert info.capacity == sv.f_frsize * sv.f_blocks and info.capacity > 100 * MiB
    conn.volume_create("f", VolumeCreateArgs(name="a.img", capacity=8 * MiB))
    conn.volume_create("f", VolumeCreateArgs(name="b.qcow2", capacity=8 * MiB,
                                             format="qcow2"))
    assert {v.name for v in conn.list_volumes("f")} == {"a.img", "b.qcow2", "lost+found"}
    assert (target / "a.img").stat().st_size == 8 * MiB
    conn.pool_stop("f")
    assert mounts.mounted_at(str(target)) is None
    assert not (target / "a.img").exists()  # it is on the unmounted filesystem
    conn.pool_start("f")
    assert (target / "a.img").exists()
    conn.pool_stop("f")
    conn.pool_delete("f")
    assert not target.exists()


def test_overwrite_rules(lab: BlockLab, conn: EmbeddedConnection, tmp_path: Path) -> None:
    dev = lab.loop(320 * MiB)  # mkfs.xfs wants at least 300 MiB
    target = tmp_path / "mnt"
    conn.pool_define_xml(fs_xml("f", dev, target, "ext4"))
    conn.pool_build("f")
    uuid = devices.probe(dev)["UUID"]
    conn.pool_build("f")  # the same filesystem: already built, kept
    assert devices.probe(dev)["UUID"] == uuid
    with pytest.raises(OperationInvalid, match="already formatted"):
        conn.pool_build("f", overwrite=False)
    conn.pool_undefine("f")
    conn.pool_define_xml(fs_xml("f", dev, target, "xfs"))
    with pytest.raises(OperationInvalid, match="forced overwrite is necessary"):
        conn.pool_build("f")
    assert devices.probe(dev)["UUID"] == uuid
    conn.pool_build("f", overwrite=True)
    assert devices.probe(dev).get("TYPE") == "xfs"
    conn.pool_start("f")
    m = mounts.mounted_at(str(target))
    assert m is not None and m.fstype == "xfs"
    conn.pool_stop("f")


@pytest.mark.parametrize("fmt", ["ext2", "ext3", "vfat"])
def test_mkfs_formats(fmt: str, lab: BlockLab, conn: EmbeddedConnection,
                      tmp_path: Path) -> None:
    dev = lab.loop(160 * MiB)
    conn.pool_define_xml(fs_xml("f", dev, tmp_path / "mnt", fmt))
    conn.pool_build("f", overwrite=False)
    assert devices.probe(dev).get("TYPE") == fmt
    from virtstore.backends.fs import kernel_filesystems

    if fmt not in kernel_filesystems():
        return  # this kernel cannot mount it (vfat here): built, not started
    conn.pool_start("f")
    assert mounts.mounted_at(str(tmp_path / "mnt")) is not None
    conn.pool_stop("f")


def test_no_overwrite_refuses_a_partition_table(lab: BlockLab, conn: EmbeddedConnection,
                                                tmp_path: Path) -> None:
    dev = lab.loop(64 * MiB)
    sh("parted", "-s", dev, "mklabel", "gpt")
    conn.pool_define_xml(fs_xml("f", dev, tmp_path / "mnt"))
    with pytest.raises(OperationInvalid, match="gpt"):
        conn.pool_build("f", overwrite=False)
    with pytest.raises(OperationInvalid, match="forced overwrite"):
        conn.pool_build("f")
    conn.pool_build("f", overwrite=True)
    probed = devices.probe(dev)
    assert probed.get("TYPE") == "ext4" and "PTTYPE" not in probed


def test_start_refuses_another_mount(lab: BlockLab, conn: EmbeddedConnection,
                                     tmp_path: Path) -> None:
    d1, d2 = lab.loop(64 * MiB), lab.loop(64 * MiB)
    sh("mkfs.ext4", "-q", "-F", d1)
    sh("mkfs.ext4", "-q", "-F", d2)
    target = tmp_path / "mnt"
    target.mkdir()
    sh("mount", d2, str(target))
    try:
        conn.pool_define_xml(fs_xml("f", d1, target))
        with pytest.raises(OperationInvalid, match="already mounted"):
            conn.pool_start("f")
    finally:
        sh("umount", str(target))


def test_conformance_pool_fs_by_effect(lab: BlockLab, conn: EmbeddedConnection,
                                       tmp_path: Path) -> None:
    """pool-fs-linux.argv: mount -o nodev,nosuid,noexec -t ext3 /dev/sda6 /mnt."""
    xml = (CONFORMANCE_DIR / "storagepoolxml2xmlin" / "pool-fs.xml").read_text()
    dev = lab.loop(64 * MiB)
    target = tmp_path / "mnt"
    target.mkdir()
    xml = xml.replace("/dev/sda6", dev).replace("<path>/mnt</path>", f"<path>{target}</path>")
    sh("mkfs.ext3", "-q", "-F", dev)
    expected = (CONFORMANCE_DIR / "storagepoolxml2argvdata" / "pool-fs-linux.argv"
                ).read_text().replace("\\\n", " ").split()
    assert mount_argv(parse_pool_xml(xml), dev) == [
        a.replace("/dev/sda6", dev).replace("/mnt", str(target)) for a in expected]
    conn.pool_define_xml(xml)
    conn.pool_start("images")
    m = mounts.mounted_at(str(target))
    assert m is not None and m.fstype == "ext3" and mounts.same_device(m, dev)
    assert {"nodev", "nosuid", "noexec"} <= set(m.options)
    conn.pool_stop("images")


def test_fs_pool_through_the_cli(lab: BlockLab, tmp_path: Path,
                                 capsys: pytest.CaptureFixture[str]) -> None:
    dev = lab.loop(64 * MiB)
    target = tmp_path / "mnt"
    root = str(tmp_path / "state")

    def cli(*args: str, ok: bool = True) -> tuple[str, str]:
        rc = main(["--root", root, *args])
        out, err = capsys.readouterr()
        assert (rc == 0) == ok, err
        return out, err

    cli("pool-define-as", "f", "fs", "--source-dev", dev, "--source-format", "ext4",
        "--target", str(target))
    cli("pool-build", "f")
    _, err = cli("pool-build", "f", "--no-overwrite", ok=False)
    assert "already formatted" in err
    cli("pool-start", "f")
    cli("vol-create-as", "f", "v.img", "4M")
    out, _ = cli("find-storage-pool-sources", "fs")
    assert f"<device path='{dev}'/>" in out
    out, _ = cli("pool-info", "f")
    assert "running" in out
    cli("pool-destroy", "f")
    assert mounts.mounted_at(str(target)) is None
