"""Guest layouts beyond the first disk, read through the embedded Connection as qcow2
volumes: Fedora's (xfs /boot, btrfs root in subvolumes, zstd-compressed), a whole-disk
btrfs whose default subvolume is the system, and LVM inside the volume with an extlinux
/boot."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from inspect_fixtures import (
    FEDORA_ID,
    FEDORA_KERNEL,
    FedoraDisk,
    LvmDisk,
    build_btrfs_plain,
    build_fedora,
    build_lvm,
    can_build,
    qcow2_pool,
)
from virtstore.api.embedded import EmbeddedConnection

pytestmark = pytest.mark.skipif(can_build() is not None, reason=str(can_build()))


@pytest.fixture(scope="module")
def fedora(tmp_path_factory: pytest.TempPathFactory) -> FedoraDisk:
    return build_fedora(tmp_path_factory.mktemp("fedora"))


@pytest.fixture(scope="module")
def ubuntu(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, bytes, bytes]:
    return build_btrfs_plain(tmp_path_factory.mktemp("ubuntu"))


@pytest.fixture
def pool(root: Path, tmp_path: Path, fedora: FedoraDisk,
         ubuntu: tuple[Path, bytes, bytes]) -> Iterator[EmbeddedConnection]:
    """Pool ``l`` with fedora.qcow2 and ubuntu.qcow2."""
    with qcow2_pool(root, tmp_path / "images", "l", {"fedora.qcow2": fedora.raw,
                                                     "ubuntu.qcow2": ubuntu[0]}) as c:
        yield c


def by_device(found: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {fs["device"]: fs for fs in found["filesystems"]}


def test_fedora_inspect_reads_btrfs_subvolumes(pool: EmbeddedConnection,
                                               fedora: FedoraDisk) -> None:
    found = pool.volume_inspect("l", "fedora.qcow2")
    # /etc/os-release is a relative symlink into /usr/lib inside subvolume "root".
    assert found["os"] == {"type": "linux", "distro": "fedora", "id_like": None,
                           "name": "Fedora Linux 40 (Cloud Edition)", "version": "40",
                           "hostname": "fedora-guest", "root": "/dev/sda2"}
    mounts = {fs["device"]: fs["mountpoint"] for fs in found["filesystems"]}
    assert mounts == {"/dev/sda1": "/boot", "/dev/sda2": "/", "/dev/sda3": None}
    assert [(e["mountpoint"], e["device"], e["options"]) for e in found["fstab"]] == [
        ("/", "/dev/sda2", "subvol=root,compress=zstd:1"),
        ("/boot", "/dev/sda1", "defaults"),
        ("/home", "/dev/sda2", "subvol=home,compress=zstd:1")]


def test_fedora_boot_files_from_xfs(pool: EmbeddedConnection, fedora: FedoraDisk,
                                    tmp_path: Path) -> None:
    out = tmp_path / "k"
    found = pool.volume_boot_files("l", "fedora.qcow2", extract_dir=str(out))
    # grubenv's saved_entry names the BLS entry; $kernelopts comes from grubenv.
    assert found["config"] == f"/boot/loader/entries/{FEDORA_ID}-{FEDORA_KERNEL}.conf"
    assert found["kernel"] == f"/boot/vmlinuz-{FEDORA_KERNEL}"
    assert found["initrd"] == f"/boot/initramfs-{FEDORA_KERNEL}.img"
    assert found["cmdline"] == (f"root=UUID={fedora.root_uuid} ro rootflags=subvol=root "
                                "console=ttyS0 no_timer_check")
    for path in (found["kernel"], found["initrd"]):
        assert (out / Path(path).name).read_bytes() == fedora.files[path]


def test_whole_disk_btrfs_default_subvolume_compressed_kernel(
        pool: EmbeddedConnection, ubuntu: tuple[Path, bytes, bytes], tmp_path: Path) -> None:
    out = tmp_path / "k"
    found = pool.volume_boot_files("l", "ubuntu.qcow2", extract_dir=str(out))
    assert found["kernel"] == "/boot/vmlinuz-6.8.0-31-generic"
    assert found["initrd"] == "/boot/initrd.img-6.8.0-31-generic"
    # Written zstd-compressed (compress-force): the bytes come back decompressed.
    assert (out / "vmlinuz-6.8.0-31-generic").read_bytes() == ubuntu[1]
    assert (out / "initrd.img-6.8.0-31-generic").read_bytes() == ubuntu[2]
    os_ = pool.volume_inspect("l", "ubuntu.qcow2")["os"]
    assert (os_["distro"], os_["version"], os_["root"]) == ("ubuntu", "24.04", "/dev/sda")


@pytest.fixture(scope="module")
def lvm(tmp_path_factory: pytest.TempPathFactory) -> LvmDisk:
    return build_lvm(tmp_path_factory.mktemp("lvm"))


@pytest.fixture
def lvm_pool(root: Path, tmp_path: Path, lvm: LvmDisk) -> Iterator[EmbeddedConnection]:
    with qcow2_pool(root, tmp_path / "images", "v", {"lvm.qcow2": lvm.raw}) as c:
        yield c


def test_lvm_inside_a_volume(lvm_pool: EmbeddedConnection, lvm: LvmDisk) -> None:
    """The LVs of a VG on a partition of the volume, read from LVM's metadata on the
    PV: no device-mapper, nothing activated."""
    fss = by_device(lvm_pool.volume_df("v", "lvm.qcow2"))
    vg = f"/dev/{lvm.vg}"
    assert sorted(fss) == sorted(["/dev/sda1", "/dev/sda2", f"{vg}/root", f"{vg}/srv-data",
                                  f"{vg}/swap"])
    assert fss["/dev/sda2"]["type"] == "LVM2_member"
    for name in ("root", "srv-data"):
        fs, part = fss[f"{vg}/{name}"], lvm.lvs[name]
        size, used, avail, files, ffree = part.statvfs or (0, 0, 0, 0, 0)
        assert (fs["type"], fs["label"], fs["uuid"]) == ("ext4", part.label, part.uuid)
        assert (fs["size"], fs["used"], fs["available"]) == (size, used, avail)
        assert (fs["inodes"], fs["inodes_free"]) == (files, ffree)
        assert fs["partition_size"] == part.size_mib << 20
    assert (fss[f"{vg}/swap"]["type"], fss[f"{vg}/swap"]["label"]) == ("swap", "lvswap")
    found = lvm_pool.volume_inspect("v", "lvm.qcow2")
    assert (found["os"]["distro"], found["os"]["hostname"], found["os"]["root"]) == (
        "debian", "lvmguest", f"{vg}/root")
    mounts = {fs["device"]: fs["mountpoint"] for fs in found["filesystems"]}
    assert (mounts["/dev/sda1"], mounts[f"{vg}/root"], mounts[f"{vg}/srv-data"]) == (
        "/boot", "/", "/srv")


def test_extlinux_boot_files(lvm_pool: EmbeddedConnection, lvm: LvmDisk,
                             tmp_path: Path) -> None:
    out = tmp_path / "k"
    found = lvm_pool.volume_boot_files("v", "lvm.qcow2", extract_dir=str(out))
    # DEFAULT picks the second LABEL; LINUX is relative to extlinux.conf's directory,
    # initrd= in APPEND is absolute on the /boot filesystem.
    assert (found["config"], found["title"]) == ("/boot/extlinux/extlinux.conf", "debian")
    assert found["kernel"] == "/boot/vmlinuz-6.1.0-18-amd64"
    assert found["initrd"] == "/boot/initrd.img-6.1.0-18-amd64"
    assert found["cmdline"] == f"root=/dev/mapper/{lvm.vg}-root ro quiet"
    for path in (found["kernel"], found["initrd"]):
        assert (out / Path(path).name).read_bytes() == lvm.files[path]


def test_windows_registry(root: Path, tmp_path: Path) -> None:
    pytest.importorskip("hivex", reason="python3-hivex is not installed")
    from inspect_fixtures import build_windows

    raw = build_windows(tmp_path / "build")
    with qcow2_pool(root, tmp_path / "images", "w", {"win.qcow2": raw}) as c:
        found = c.volume_inspect("w", "win.qcow2")
    # The version from the major/minor numbers (CurrentVersion stays "6.3" on Windows
    # 10 and later); the hostname from the control set that Select\Current names.
    assert found["os"] == {
        "type": "windows", "distro": "windows", "systemroot": "/Windows",
        "hives": ["SOFTWARE", "SYSTEM", "SAM"], "name": "Windows Server 2022 Datacenter",
        "version": "10.0", "build": "20348", "edition": "ServerDatacenter",
        "variant": "Server", "hostname": "WIN-TEST01", "root": "/dev/sda1"}
    assert [fs["mountpoint"] for fs in found["filesystems"]] == ["/"]
