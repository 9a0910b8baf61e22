"""vol-df, pool-df, vol-boot-files and vol-inspect on real guest disks (a qcow2 volume
with a GPT and nine partitions made by real mkfs, and a raw whole-disk ext4), through
the embedded Connection and the command line."""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from cli_fixtures import Cli, Result, cli_fixture, error_of  # noqa: F401
from inspect_fixtures import GuestDisk, build_guest, build_plain, can_build, qcow2_pool
from virtstore.api.embedded import EmbeddedConnection

pytestmark = pytest.mark.skipif(can_build() is not None, reason=str(can_build()))


@pytest.fixture(scope="module")
def guest(tmp_path_factory: pytest.TempPathFactory) -> GuestDisk:
    return build_guest(tmp_path_factory.mktemp("guest"))


@pytest.fixture(scope="module")
def plain(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, bytes, bytes]:
    return build_plain(tmp_path_factory.mktemp("plain"))


@pytest.fixture
def vols(root: Path, tmp_path: Path, guest: GuestDisk,
         plain: tuple[Path, bytes, bytes]) -> Iterator[EmbeddedConnection]:
    """Pool ``g`` with guest.qcow2 (the GPT disk as qcow2), plain.raw and empty.raw."""
    d = tmp_path / "images"
    d.mkdir()
    subprocess.run(["cp", "--sparse=always", str(plain[0]), str(d / "plain.raw")], check=True)
    with open(d / "empty.raw", "wb") as fh:
        fh.truncate(8 << 20)
    with qcow2_pool(root, d, "g", {"guest.qcow2": guest.raw}) as c:
        yield c


def by_device(found: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {fs["device"]: fs for fs in found["filesystems"]}


def test_df_matches_statvfs(vols: EmbeddedConnection, guest: GuestDisk) -> None:
    found = vols.volume_df("g", "guest.qcow2")
    assert found["table"] == "gpt"
    fss = by_device(found)
    assert sorted(fss) == [f"/dev/sda{n}" for n in range(1, 10)]
    for n, part in guest.parts.items():
        fs = fss[f"/dev/sda{n}"]
        assert fs["error"] is None, fs
        expected_type = {"luks": "crypto_LUKS", "garbage": "unknown"}.get(part.kind, part.kind)
        assert fs["type"] == expected_type
        if part.kind != "garbage":
            assert fs["uuid"].lower() == part.uuid.lower()
            assert fs["label"] == part.label
        assert fs["offset"] % 512 == 0 and fs["partition_size"] == part.size_mib << 20
    # ext4 and ntfs: the numbers are statvfs's exactly (ext4's overhead and reserved
    # clusters computed as the kernel does, NTFS's $Bitmap counted).
    for n in (2, 3, 8):
        size, used, avail, files, ffree = guest.parts[n].statvfs or (0, 0, 0, 0, 0)
        fs = fss[f"/dev/sda{n}"]
        assert (fs["size"], fs["used"], fs["available"]) == (size, used, avail), n
        if n != 8:
            assert (fs["inodes"], fs["inodes_free"]) == (files, ffree)
    # xfs: the size and inode counts exactly; free within the blocks the kernel keeps
    # aside per allocation group (a few dozen blocks), which differ between kernels.
    size, used, avail, files, ffree = guest.parts[4].statvfs or (0, 0, 0, 0, 0)
    xfs = fss["/dev/sda4"]
    assert xfs["size"] == size and xfs["inodes"] == files and xfs["inodes_free"] == ffree
    assert abs(xfs["available"] - avail) <= 64 * 4096
    assert xfs["used"] >= 20 << 20
    # vfat: free clusters counted in the FAT, as the kernel and mtools count them.
    assert fss["/dev/sda1"]["available"] == (guest.parts[1].statvfs or (0, 0, 0))[2]
    assert fss["/dev/sda1"]["size"] > 60 << 20
    # btrfs: statfs's numbers exactly (block groups and their profiles from the chunk
    # and extent trees, the global reserve counted as used).
    size, used, avail, _f, _ff = guest.parts[5].statvfs or (0, 0, 0, 0, 0)
    bt = fss["/dev/sda5"]
    assert (bt["size"], bt["used"], bt["available"]) == (size, used, avail)
    assert bt["used"] >= 10 << 20 and bt["notes"] == []
    assert fss["/dev/sda6"]["size"] == (16 << 20) - 4096
    assert fss["/dev/sda7"]["size"] is None


def test_boot_files_found_and_extracted(vols: EmbeddedConnection, guest: GuestDisk,
                                        tmp_path: Path) -> None:
    out = tmp_path / "out"
    found = vols.volume_boot_files("g", "guest.qcow2", extract_dir=str(out))
    # grubenv's saved_entry picks the 6.1.0-1 BLS entry over the newer 6.2.0-1.
    assert found["kernel"] == "/boot/vmlinuz-6.1.0-1"
    assert found["initrd"] == "/boot/initramfs-6.1.0-1.img"
    assert found["cmdline"] == f"root=UUID={guest.parts[3].uuid} ro quiet splash"
    assert (out / "vmlinuz-6.1.0-1").read_bytes() == guest.files["/boot/vmlinuz-6.1.0-1"]
    assert (out / "initramfs-6.1.0-1.img").read_bytes() == \
        guest.files["/boot/initramfs-6.1.0-1.img"]
    assert sorted(p.name for p in out.iterdir()) == ["initramfs-6.1.0-1.img",
                                                     "vmlinuz-6.1.0-1"]


def test_boot_files_plain_vmlinuz_through_symlink(vols: EmbeddedConnection,
                                                   plain: tuple[Path, bytes, bytes],
                                                   tmp_path: Path) -> None:
    found = vols.volume_boot_files("g", "plain.raw", extract_dir=str(tmp_path / "k"))
    # 5.10.0 sorts after 5.9.0 by version; its absolute symlink resolves in the guest.
    assert found["kernel"] == "/boot/vmlinuz-5.10.0"
    assert found["initrd"] == "/boot/initrd.img-5.10.0"
    assert (tmp_path / "k" / "vmlinuz-5.10.0").read_bytes() == plain[1]
    assert (tmp_path / "k" / "initrd.img-5.10.0").read_bytes() == plain[2]


def test_inspect(vols: EmbeddedConnection, guest: GuestDisk) -> None:
    found = vols.volume_inspect("g", "guest.qcow2")
    assert found["os"] == {"type": "linux", "distro": "testlinux", "id_like": "debian",
                           "name": "Test Linux 12 (bookworm)", "version": "12",
                           "hostname": "testguest", "root": "/dev/sda3"}
    mounts = {fs["device"]: fs["mountpoint"] for fs in found["filesystems"]}
    assert mounts == {"/dev/sda1": "/boot/efi", "/dev/sda2": "/boot", "/dev/sda3": "/",
                      "/dev/sda4": "/srv", "/dev/sda5": "/var/lib", "/dev/sda6": None,
                      "/dev/sda7": None, "/dev/sda8": None, "/dev/sda9": None}


def test_empty_volume(vols: EmbeddedConnection) -> None:
    found = vols.volume_df("g", "empty.raw")
    assert [(f["device"], f["type"]) for f in found["filesystems"]] == [("/dev/sda",
                                                                         "unknown")]
    from virtstore.errors import OperationInvalid

    with pytest.raises(OperationInvalid, match="no filesystem"):
        vols.volume_boot_files("g", "empty.raw")


def test_cli(vols: EmbeddedConnection, cli: Cli, guest: GuestDisk, tmp_path: Path) -> None:
    r = cli("vol-df", "guest.qcow2", "g")
    lines = r.out.splitlines()
    assert lines[0].split() == ["Filesystem", "1K-blocks", "Used", "Available", "Use%",
                                "Type"]
    row = next(line.split() for line in lines if line.startswith(" guest.qcow2:/dev/sda3"))
    size, used, avail = ((v + 1023) // 1024 for v in (guest.parts[3].statvfs or (0,) * 3)[:3])
    assert row[1:4] == [str(size), str(used), str(avail)] and row[5] == "ext4"
    h = cli("vol-df", "guest.qcow2", "g", "--human").out
    assert " guest.qcow2:/dev/sda4 " in h and "236M" in h  # 247463936 bytes
    docs = json.loads(cli("pool-df", "g", "--json").out)
    assert sorted(d["volume"] for d in docs) == ["empty.raw", "guest.qcow2", "plain.raw"]
    r = cli("vol-boot-files", "guest.qcow2", "g", "--extract", str(tmp_path / "x"))
    assert "Kernel:         /boot/vmlinuz-6.1.0-1" in r.out
    assert (tmp_path / "x" / "vmlinuz-6.1.0-1").stat().st_size == 3 * (1 << 20) + 123
    r = cli("vol-inspect", "guest.qcow2", "g")
    assert "Distribution:   testlinux" in r.out and "Hostname:       testguest" in r.out
    assert error_of(cli("vol-boot-files", "empty.raw", "g", ok=False)).startswith(
        "no filesystem")




def test_pool_df_reads_every_good_volume_beside_a_broken_one(vols: EmbeddedConnection,
                                                             tmp_path: Path) -> None:
    """A volume qemu cannot open is one error row; the volumes read before and after it
    by the same readers are complete."""
    pool_dir = tmp_path / "images"  # the pool's directory (the vols fixture)
    (pool_dir / "broken.qcow2").write_bytes(b"QFI\xfb" + bytes(range(256)) * 4)
    for n in range(3):
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-F", "qcow2", "-b",
                        str(pool_dir / "guest.qcow2"), str(pool_dir / f"vm{n}.qcow2")],
                       check=True)
    vols.pool_refresh("g")
    rows = {doc["volume"]: doc for doc in vols.pool_df("g")}
    assert sorted(rows) == ["broken.qcow2", "empty.raw", "guest.qcow2", "plain.raw",
                            "vm0.qcow2", "vm1.qcow2", "vm2.qcow2"]
    assert "qemu-nbd could not serve the image" in rows.pop("broken.qcow2")["error"]
    for name, doc in rows.items():
        assert "error" not in doc, doc
        assert doc == {"volume": name, **vols.volume_df("g", name)}
    assert [f["type"] for f in rows["vm1.qcow2"]["filesystems"]] == [
        "vfat", "ext4", "ext4", "xfs", "btrfs", "swap", "crypto_LUKS", "ntfs", "unknown"]


@pytest.fixture
def stalling(guest: GuestDisk, tmp_path: Path) -> Iterator[tuple[str, dict[str, Any]]]:
    """The GPT disk served by nbdkit, whose reads past the first 64 KiB of the btrfs
    partition wait until the test ends, and of the NTFS partition fail: (its URL, the
    disk's df read from the file)."""
    if shutil.which("nbdkit") is None:
        pytest.skip("nbdkit is not installed")
    from virtstore.inspect import run

    clean = run.df(str(guest.raw))
    parts = {fs["device"]: fs for fs in clean["filesystems"]}
    btrfs, ntfs = parts["/dev/sda5"], parts["/dev/sda8"]
    done = tmp_path / "done"
    sock = tmp_path / "nbd.sock"
    script = (
        f'if [ "$4" -ge {btrfs["offset"] + (64 << 10)} ] && '
        f'[ "$4" -lt {btrfs["offset"] + btrfs["partition_size"]} ]; then\n'
        f'  while [ ! -e {done} ]; do sleep 0.1; done; exit 1\nfi\n'
        f'if [ "$4" -ge {ntfs["offset"] + (64 << 10)} ] && '
        f'[ "$4" -lt {ntfs["offset"] + ntfs["partition_size"]} ]; then\n'
        '  echo EIO >&2; exit 1\nfi\n'
        f'exec dd if={guest.raw} iflag=skip_bytes,count_bytes skip="$4" count="$3" '
        'status=none\n')
    server = subprocess.Popen(
        ["nbdkit", "-f", "-r", "-U", str(sock), "eval",
         f"get_size=echo {guest.raw.stat().st_size}", "thread_model=echo parallel",
         f"pread={script}"], stderr=subprocess.DEVNULL)
    try:
        for _ in range(100):
            if sock.exists():
                break
            time.sleep(0.1)
        yield f"nbd+unix:///?socket={sock}", clean
    finally:
        done.touch()
        server.terminate()
        server.wait(30)


def test_reader_goes_on_after_filesystems_that_hang_or_kill_it(
        stalling: tuple[str, dict[str, Any]], guest: GuestDisk) -> None:
    """One reader process serves disk after disk: a filesystem whose reads hang past the
    time limit, or that kills the reader, is an error entry of its own; the filesystems
    after it, and the next disk, are read by a fresh process as if nothing happened."""
    from virtstore.inspect import run

    url, clean = stalling
    with run.Reader(timeout=3) as reader:
        found = reader.df(url)
        again = reader.df(str(guest.raw))
    assert again == clean
    assert found["table"] == "gpt"
    got = by_device(found)
    assert sorted(got) == sorted(by_device(clean))
    assert got.pop("/dev/sda5")["error"] == "reading it took more than 3s"
    failed = got.pop("/dev/sda8")
    assert failed["type"] == "unknown"
    assert failed["error"].startswith("its reader failed (exit 1):")
    assert "Input/output error" in failed["error"]
    for device, fs in got.items():
        assert fs == by_device(clean)[device]
