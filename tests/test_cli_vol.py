"""vol-* commands end to end: the real CLI and engine on a temporary state root, with the
files checked on disk and with qemu-img."""

from __future__ import annotations

import json
import os
from pathlib import Path

from cli_fixtures import Cli, Result, cli_fixture, error_of, pool_fixture  # noqa: F401
from conftest import qemu_info
from conftest import requires_qemu_img as needs_qemu_img

VIRSH = Path(__file__).parent / "data" / "virsh"
MiB = 1024**2
GiB = 1024**3



@needs_qemu_img
def test_create_raw_and_qcow2_with_units(cli: Cli, pool: Path) -> None:
    assert cli("vol-create-as", "images", "disk.raw", "10M").out == "Vol disk.raw created\n\n"
    raw = pool / "disk.raw"
    assert raw.stat().st_size == 10 * MiB
    assert qemu_info(raw)["format"] == "raw"

    assert cli("vol-create-as", "images", "disk.qcow2", "1G", "--format", "qcow2").out == (
        "Vol disk.qcow2 created\n\n")
    info = qemu_info(pool / "disk.qcow2")
    assert info["format"] == "qcow2"
    assert info["virtual-size"] == GiB
    assert (pool / "disk.qcow2").stat().st_size < 1 * MiB

    cli("vol-create-as", "images", "decimal.raw", "10MB")
    assert (pool / "decimal.raw").stat().st_size == 10_000_000
    cli("vol-create-as", "images", "kib.raw", "5KiB")
    assert (pool / "kib.raw").stat().st_size == 5 * 1024
    cli("vol-create-as", "images", "bytes.raw", "100")
    assert (pool / "bytes.raw").stat().st_size == 100


def test_create_with_allocation_allocates(cli: Cli, pool: Path) -> None:
    cli("vol-create-as", "images", "full.raw", "4M", "--allocation", "4M")
    assert (pool / "full.raw").stat().st_blocks * 512 >= 4 * MiB
    cli("vol-create-as", "images", "sparse.raw", "4M", "--allocation", "0")
    assert (pool / "sparse.raw").stat().st_blocks * 512 < 4 * MiB


@needs_qemu_img
def test_list_and_info(cli: Cli, pool: Path) -> None:
    cli("vol-create-as", "images", "a.img", "1G", "--allocation", "0")
    cli("vol-create-as", "images", "b.qcow2", "512M", "--format", "qcow2")
    lines = cli("vol-list", "images").out.split("\n")
    assert lines[0] == " Name      Path"
    assert lines[1] == "-" * (10 + len(str(pool / "b.qcow2")) + 3)
    assert lines[2] == f" a.img     {pool / 'a.img'}"
    assert lines[3] == f" b.qcow2   {pool / 'b.qcow2'}"

    details = cli("vol-list", "images", "--details").out.split("\n")
    assert details[0].split() == ["Name", "Path", "Type", "Capacity", "Allocation"]
    a_row = details[2].split()
    assert a_row[:6] == ["a.img", str(pool / "a.img"), "file", "1.00", "GiB", "0.00"]
    b_row = details[3].split()
    assert b_row[:5] == ["b.qcow2", str(pool / "b.qcow2"), "file", "512.00", "MiB"]
    # the columns line up: each row's path starts where the header's does
    assert {d.index("/") for d in details[2:4]} == {details[0].index("Path")}

    assert cli("vol-info", "a.img", "--pool", "images").out == (
        "Name:           a.img\nType:           file\nCapacity:       1.00 GiB\n"
        "Allocation:     0.00 B\n\n")
    on_disk = (pool / "b.qcow2").stat()
    assert cli("vol-info", str(pool / "b.qcow2"), "--bytes").out == (
        "Name:           b.qcow2\nType:           file\n"
        f"Capacity:       {512 * MiB} bytes\n"
        f"Allocation:     {on_disk.st_blocks * 512} bytes\n\n")
    assert cli("vol-info", "b.qcow2", "images", "--physical", "--bytes").out.split("\n")[3] == (
        f"Physical:       {on_disk.st_size} bytes")


def test_json_outputs(cli: Cli, pool: Path) -> None:
    cli("vol-create-as", "images", "a.img", "3M")
    listed = json.loads(cli("vol-list", "images", "--json").out)
    assert len(listed) == 1
    vol = listed[0]
    assert vol["name"] == "a.img" and vol["pool"] == "images"
    assert vol["path"] == str(pool / "a.img")
    assert vol["capacity"] == 3 * MiB and vol["type"] == "file"
    assert json.loads(cli("vol-info", "a.img", "--pool", "images", "--json").out) == vol


def test_lookups_by_name_key_and_path(cli: Cli, pool: Path) -> None:
    cli("vol-create-as", "images", "a.img", "1M")
    path = str(pool / "a.img")
    assert cli("vol-path", "a.img", "--pool", "images").out == f"{path}\n\n"
    key = cli("vol-key", "a.img", "--pool", "images").out.strip()
    assert key
    # without --pool, a volume is found by key or by path
    assert cli("vol-name", path).out == "a.img\n\n"
    assert cli("vol-name", key).out == "a.img\n\n"
    assert cli("vol-path", key).out == f"{path}\n\n"
    assert cli("vol-key", path).out == f"{key}\n\n"
    assert cli("vol-pool", path).out == "images\n\n"
    uuid = cli("pool-uuid", "images").out.strip()
    assert cli("vol-pool", key, "--uuid").out == f"{uuid}\n\n"
    # --pool takes the pool's UUID, and can be spelled as a second word
    assert cli("vol-path", "a.img", "--pool", uuid).out == f"{path}\n\n"
    assert cli("vol-path", "a.img", "images").out == f"{path}\n\n"
    assert cli("vol-path", "--pool=images", "--vol=a.img").out == f"{path}\n\n"
    # a path given with the right --pool works too
    assert cli("vol-info", path, "--pool", "images").out.startswith("Name:           a.img\n")

    msg = error_of(cli("vol-path", "a.img", ok=False))
    assert "a.img" in msg and "--pool" in msg
    msg = error_of(cli("vol-info", "nosuch", "--pool", "images", ok=False))
    assert "nosuch" in msg


def test_volume_of_another_pool_is_refused(cli: Cli, pool: Path, tmp_path: Path) -> None:
    other = tmp_path / "other"
    other.mkdir()
    cli("pool-create-as", "other", "dir", "--target", str(other))
    cli("vol-create-as", "other", "o.img", "1M")
    msg = error_of(cli("vol-info", str(other / "o.img"), "--pool", "images", ok=False))
    assert "not in pool 'images'" in msg


def test_dumpxml_create_from_file_and_delete(cli: Cli, pool: Path, tmp_path: Path) -> None:
    xml_file = tmp_path / "vol.xml"
    xml_file.write_text("<volume><name>c.img</name><capacity unit='M'>10</capacity></volume>")
    assert cli("vol-create", "images", str(xml_file)).out == (
        f"Vol c.img created from {xml_file}\n\n")
    assert (pool / "c.img").stat().st_size == 10 * MiB
    xml = cli("vol-dumpxml", "c.img", "--pool", "images").out
    assert "<name>c.img</name>" in xml
    assert f"<capacity unit='bytes'>{10 * MiB}</capacity>" in xml
    assert f"<path>{pool / 'c.img'}</path>" in xml

    assert cli("vol-delete", str(pool / "c.img")).out == f"Vol {pool / 'c.img'} deleted\n\n"
    assert not (pool / "c.img").exists()
    cli("vol-create-as", "images", "d.img", "1M")
    assert cli("vol-delete", "d.img", "--pool", "images").out == "Vol d.img deleted\n\n"
    assert not (pool / "d.img").exists()
    assert cli("vol-list", "images").out == " Name   Path\n--------------\n\n"


@needs_qemu_img
def test_backing_volume(cli: Cli, pool: Path) -> None:
    cli("vol-create-as", "images", "base.qcow2", "64M", "--format", "qcow2")
    cli("vol-create-as", "images", "top.qcow2", "64M", "--format", "qcow2",
        "--backing-vol", "base.qcow2", "--backing-vol-format", "qcow2")
    info = qemu_info(pool / "top.qcow2")
    assert info["format"] == "qcow2"
    assert info["backing-filename"] in ("base.qcow2", str(pool / "base.qcow2"))


def test_print_xml_is_what_virsh_prints(cli: Cli, pool: Path) -> None:
    cli("vol-create-as", "images", "a.img", "1M")
    out = cli("vol-create-as", "images", "z.qcow2", "10G", "--allocation", "1M", "--format",
              "qcow2", "--backing-vol", "a.img", "--backing-vol-format", "raw",
              "--print-xml").out
    assert out == (VIRSH / "vol-create-as-backing.xml").read_text().replace(
        "/tmp/vt/p1/a.img", str(pool / "a.img"))
    assert not (pool / "z.qcow2").exists()
    assert cli("vol-create-as", "images", "z", "10GB", "--allocation", "5KiB",
               "--print-xml").out == (VIRSH / "vol-create-as-units.xml").read_text()


def test_errors(cli: Cli, pool: Path) -> None:
    assert error_of(cli("vol-create-as", "images", "bad", "-5G", ok=False)) == (
        "Malformed size -5G")
    assert error_of(cli("vol-create-as", "images", "bad", "5Q", ok=False)).startswith(
        "Malformed size 5Q")
    assert not (pool / "bad").exists()
    cli("vol-create-as", "images", "a.img", "1M")
    msg = error_of(cli("vol-create-as", "images", "a.img", "1M", ok=False))
    assert "a.img" in msg and "exist" in msg
    msg = error_of(cli("vol-create-as", "images", "x/y", "1M", ok=False))
    assert "x/y" in msg
    assert not (pool / "x").exists()
    msg = error_of(cli("vol-list", "nosuch", ok=False))
    assert "nosuch" in msg
    cli("pool-destroy", "images")
    msg = error_of(cli("vol-list", "images", ok=False))
    assert "not active" in msg
    assert os.path.exists(pool / "a.img")
