"""vol-clone, vol-create-from, vol-resize, vol-wipe, vol-upload, vol-download and
vol-snapshot-* end to end: the real CLI and engine on a temporary state root, with the
files checked on disk and with qemu-img."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from cli_fixtures import Cli, Result, cli_fixture, error_of, make_pool, pool_fixture  # noqa: F401
from conftest import qemu_info, same_image
from conftest import requires_qemu_img as needs_qemu_img

KiB = 1024
MiB = 1024**2

needs_qemu_io = pytest.mark.skipif(shutil.which("qemu-io") is None,
                                   reason="qemu-io is not installed")


def sparse_file(path: Path, size: int, chunks: dict[int, bytes]) -> None:
    """A file of ``size`` bytes, holes everywhere but at the given offsets."""
    with open(path, "wb") as fh:
        fh.truncate(size)
        for offset, data in chunks.items():
            fh.seek(offset)
            fh.write(data)


def allocated(path: Path) -> int:
    return path.stat().st_blocks * 512


@pytest.fixture
def source(cli: Cli, pool: Path) -> Path:
    """images/src.img: 32 MiB raw, 1 MiB of data at 0 and at 16 MiB, holes elsewhere."""
    path = pool / "src.img"
    sparse_file(path, 32 * MiB, {0: os.urandom(MiB), 16 * MiB: os.urandom(MiB)})
    cli("pool-refresh", "images")
    return path


# -- vol-clone -----------------------------------------------------------------

def test_clone_raw_copies_bytes_and_keeps_holes(cli: Cli, pool: Path, source: Path) -> None:
    assert cli("vol-clone", "src.img", "copy.img", "--pool", "images").out == (
        "Vol copy.img cloned from src.img\n\n")
    copy = pool / "copy.img"
    assert copy.read_bytes() == source.read_bytes()
    assert copy.stat().st_size == 32 * MiB
    # 2 MiB of data: the 30 MiB of holes stay holes.
    assert allocated(copy) <= allocated(source) + 64 * KiB
    assert allocated(copy) < 4 * MiB
    # The engine knows the new volume.
    assert "copy.img" in cli("vol-list", "images").out
    # By path, without --pool; the message names the source by its name.
    assert cli("vol-clone", str(source), "copy2.img").out == (
        "Vol copy2.img cloned from src.img\n\n")
    msg = error_of(cli("vol-clone", "src.img", "copy.img", "--pool", "images", ok=False))
    assert "copy.img" in msg and "exist" in msg


def test_clone_print_xml_is_the_source_xml_renamed(cli: Cli, pool: Path,
                                                   source: Path) -> None:
    out = cli("vol-clone", "src.img", "x.img", "--pool", "images", "--print-xml").out
    dump = cli("vol-dumpxml", "src.img", "--pool", "images").out
    # virsh prints libxml2's serialisation: double quotes, no final newline before its
    # closing empty line.
    assert out == dump.rstrip("\n").replace("'", '"').replace(
        "<name>src.img</name>", "<name>x.img</name>") + "\n"
    assert not (pool / "x.img").exists()


def test_clone_to_another_pool(cli: Cli, tmp_path: Path, pool: Path, source: Path) -> None:
    other = make_pool(cli, tmp_path, "other")
    cli("vol-clone", "src.img", "moved.img", "--pool", "images", "--target-pool", "other")
    assert (other / "moved.img").read_bytes() == source.read_bytes()
    assert not (pool / "moved.img").exists()
    out = json.loads(cli("vol-info", "moved.img", "--pool", "other", "--json").out)
    assert out["pool"] == "other" and out["capacity"] == 32 * MiB


@needs_qemu_img
def test_clone_to_qcow2(cli: Cli, pool: Path, source: Path) -> None:
    cli("vol-clone", "src.img", "copy.qcow2", "--pool", "images", "--format", "qcow2")
    info = qemu_info(pool / "copy.qcow2")
    assert info["format"] == "qcow2"
    assert info["virtual-size"] == 32 * MiB
    assert same_image(source, "raw", pool / "copy.qcow2", "qcow2")
    vol = json.loads(cli("vol-info", "copy.qcow2", "images", "--json").out)
    assert vol["format"] == "qcow2"


@needs_qemu_img
def test_linked_clone_is_an_overlay(cli: Cli, pool: Path, source: Path) -> None:
    cli("vol-clone", "src.img", "linked.qcow2", "--pool", "images", "--linked")
    info = qemu_info(pool / "linked.qcow2")
    assert info["format"] == "qcow2"
    assert info["backing-filename"] in (str(source), "src.img")
    assert info.get("backing-filename-format") == "raw"
    # An overlay holds no data of its own, and reads through to the source.
    assert allocated(pool / "linked.qcow2") < MiB
    assert same_image(source, "raw", pool / "linked.qcow2", "qcow2")


@needs_qemu_img
def test_create_from_qcow2_xml_with_raw_source(cli: Cli, pool: Path, source: Path,
                                               tmp_path: Path) -> None:
    xml = tmp_path / "new.xml"
    xml.write_text("<volume><name>new.qcow2</name><capacity unit='M'>32</capacity>"
                   "<target><format type='qcow2'/></target></volume>")
    assert cli("vol-create-from", "images", str(xml), "src.img", "--inputpool",
               "images").out == "Vol new.qcow2 created from input vol src.img\n\n"
    info = qemu_info(pool / "new.qcow2")
    assert info["format"] == "qcow2" and info["virtual-size"] == 32 * MiB
    assert same_image(source, "raw", pool / "new.qcow2", "qcow2")
    # The input volume by path needs no --inputpool.
    xml.write_text("<volume><name>new2.img</name><capacity unit='M'>32</capacity></volume>")
    assert cli("vol-create-from", "images", str(xml), str(source)).out == (
        "Vol new2.img created from input vol src.img\n\n")
    assert (pool / "new2.img").read_bytes() == source.read_bytes()


# -- vol-resize ----------------------------------------------------------------

def test_resize(cli: Cli, pool: Path) -> None:
    cli("vol-create-as", "images", "r.img", "10M", "--allocation", "0")
    path = pool / "r.img"
    assert cli("vol-resize", "r.img", "20M", "--pool", "images").out == (
        "Size of volume 'r.img' successfully changed to 20M\n\n")
    assert path.stat().st_size == 20 * MiB
    assert cli("vol-resize", "r.img", "4M", "--pool", "images", "--delta").out == (
        "Size of volume 'r.img' successfully changed by 4M\n\n")
    assert path.stat().st_size == 24 * MiB

    # Smaller without --shrink: libvirt's message, and the file is untouched.
    assert error_of(cli("vol-resize", "r.img", "5M", "--pool", "images", ok=False)) == (
        "Can't shrink capacity below current capacity unless shrink flag explicitly "
        "specified")
    assert error_of(cli("vol-resize", "r.img", "-5M", "--pool", "images", ok=False)) == (
        "negative size requires --shrink")
    assert path.stat().st_size == 24 * MiB

    assert cli("vol-resize", "r.img", "8M", "--pool", "images", "--shrink").out == (
        "Size of volume 'r.img' successfully changed to 8M\n\n")
    assert path.stat().st_size == 8 * MiB
    # A negative size is a delta.
    assert cli("vol-resize", "r.img", "-3M", "--pool", "images", "--shrink").out == (
        "Size of volume 'r.img' successfully changed by 3M\n\n")
    assert path.stat().st_size == 5 * MiB
    vol = json.loads(cli("vol-info", "r.img", "images", "--json").out)
    assert vol["capacity"] == 5 * MiB

    assert error_of(cli("vol-resize", "r.img", "5X", "--pool", "images", ok=False)).startswith(
        "Malformed size 5X")


def test_resize_allocate(cli: Cli, pool: Path) -> None:
    cli("vol-create-as", "images", "a.img", "1M", "--allocation", "0")
    cli("vol-resize", "a.img", "9M", "--pool", "images", "--allocate")
    assert (pool / "a.img").stat().st_size == 9 * MiB
    assert allocated(pool / "a.img") >= 8 * MiB


# -- vol-wipe ------------------------------------------------------------------

def test_wipe_zero_zeroes_and_keeps_sparse(cli: Cli, pool: Path, source: Path) -> None:
    before = allocated(source)
    assert cli("vol-wipe", "src.img", "--pool", "images").out == "Vol src.img wiped\n\n"
    assert source.stat().st_size == 32 * MiB
    assert source.read_bytes() == bytes(32 * MiB)
    assert allocated(source) <= before + 64 * KiB

    assert cli("vol-wipe", str(source), "--algorithm", "zero").out == (
        f"Vol {source} wiped\n\n")
    assert error_of(cli("vol-wipe", "src.img", "--pool", "images", "--algorithm", "bogus",
                        ok=False)) == "Unsupported algorithm 'bogus'"


# -- vol-upload / vol-download -------------------------------------------------

def test_upload_download_round_trip_with_holes(cli: Cli, pool: Path, tmp_path: Path) -> None:
    cli("vol-create-as", "images", "u.img", "16M", "--allocation", "0")
    local = tmp_path / "local.bin"
    sparse_file(local, 16 * MiB, {MiB: os.urandom(512 * KiB), 15 * MiB: os.urandom(KiB)})
    assert cli("vol-upload", "u.img", str(local), "--pool", "images").out == "\n"
    vol = pool / "u.img"
    assert vol.read_bytes() == local.read_bytes()
    assert allocated(vol) < 2 * MiB

    back = tmp_path / "back.bin"
    assert cli("vol-download", "u.img", str(back), "--pool", "images", "--sparse").out == "\n"
    assert back.read_bytes() == local.read_bytes()
    assert allocated(back) < 2 * MiB
    # An existing file is overwritten, as virsh does.
    back.write_bytes(b"x" * (20 * MiB))
    cli("vol-download", "u.img", str(back), "--pool", "images")
    assert back.read_bytes() == local.read_bytes()


def test_upload_download_offset_and_length(cli: Cli, pool: Path, tmp_path: Path) -> None:
    cli("vol-create-as", "images", "o.img", "4M", "--allocation", "0")
    vol = pool / "o.img"
    data = os.urandom(64 * KiB)
    piece = tmp_path / "piece.bin"
    piece.write_bytes(data)
    cli("vol-upload", "o.img", str(piece), "--pool", "images", "--offset", str(MiB),
        "--length", str(4 * KiB))
    content = vol.read_bytes()
    assert len(content) == 4 * MiB
    assert content[MiB:MiB + 4 * KiB] == data[:4 * KiB]
    assert content[:MiB] == bytes(MiB)
    assert content[MiB + 4 * KiB:] == bytes(3 * MiB - 4 * KiB)

    part = tmp_path / "part.bin"
    cli("vol-download", "o.img", str(part), "--pool", "images", "--offset", str(MiB - 2 * KiB),
        "--length", str(8 * KiB))
    assert part.read_bytes() == content[MiB - 2 * KiB:MiB + 6 * KiB]

    assert error_of(cli("vol-upload", "o.img", str(piece), "--pool", "images", "--offset",
                        "-1", ok=False)) == (
        "Numeric value '-1' for <offset> option is malformed or out of range")
    assert error_of(cli("vol-upload", "o.img", str(tmp_path / "missing"), "--pool", "images",
                        ok=False)) == f"cannot read {tmp_path / 'missing'}"
    assert error_of(cli("vol-download", "o.img", str(tmp_path / "no" / "x"), "--pool",
                        "images", ok=False)) == f"cannot create {tmp_path / 'no' / 'x'}"


def test_failed_download_removes_the_file_it_made(cli: Cli, pool: Path,
                                                  tmp_path: Path) -> None:
    out = tmp_path / "out.bin"
    msg = error_of(cli("vol-download", "nosuch.img", str(out), "--pool", "images", ok=False))
    assert "nosuch.img" in msg
    assert not out.exists()


# -- --json progress -----------------------------------------------------------

def test_json_progress_lines(cli: Cli, pool: Path, source: Path) -> None:
    # Throttled so that the 2 MiB of data take a while and progress is seen moving.
    result = cli("vol-clone", "src.img", "j.img", "--pool", "images", "--json",
                 "--bandwidth", "4M/s")
    lines = [json.loads(line) for line in result.out.splitlines()]
    assert len(lines) >= 3  # the start, some progress, the end
    ids = {line["id"] for line in lines}
    assert len(ids) == 1
    assert all(line["kind"] == "clone" and line["target_volume"] == "j.img" for line in lines)
    assert all(line["state"] == "running" for line in lines[:-1])
    assert all(line["bandwidth"] == 4 * MiB for line in lines)
    final = lines[-1]
    assert final["state"] == "done" and final["error"] is None
    assert final["bytes_done"] >= final["bytes_total"] > 0
    done = [line["bytes_done"] for line in lines]
    assert done == sorted(done)


def test_json_failure_is_a_final_line_and_one_error(cli: Cli, pool: Path) -> None:
    cli("vol-create-as", "images", "r.img", "10M", "--allocation", "0")
    result = cli("vol-resize", "r.img", "1M", "--pool", "images", "--json", ok=False)
    assert error_of(result).startswith("Can't shrink capacity")


# -- storage snapshots ---------------------------------------------------------

def qemu_io(path: Path, command: str) -> str:
    return subprocess.run(["qemu-io", "-f", "qcow2", "-c", command, str(path)],
                          capture_output=True, text=True, check=True).stdout


def pattern_at(path: Path, pattern: int, offset: int, length: int) -> bool:
    done = subprocess.run(["qemu-io", "-f", "qcow2", "-c",
                           f"read -P {pattern:#x} {offset} {length}", str(path)],
                          capture_output=True, text=True)
    return done.returncode == 0 and "Pattern verification failed" not in done.stdout


@needs_qemu_img
@needs_qemu_io
@pytest.mark.parametrize("kind", ["internal", "external"])
def test_snapshots_on_qcow2(cli: Cli, pool: Path, kind: str) -> None:
    cli("vol-create-as", "images", "s.qcow2", "16M", "--format", "qcow2")
    path = pool / "s.qcow2"
    qemu_io(path, "write -P 0x41 0 1M")
    extra = ["--external"] if kind == "external" else []
    assert cli("vol-snapshot-create", "s.qcow2", "before", "--pool", "images",
               *extra).out == "Volume snapshot before created\n\n"
    qemu_io(path, "write -P 0x42 0 1M")
    assert pattern_at(path, 0x42, 0, MiB)

    out = cli("vol-snapshot-list", "s.qcow2", "--pool", "images").out.split("\n")
    assert out[0].split() == ["Name", "Kind", "Created", "Size"]
    assert out[2].split()[:2] == ["before", kind]
    snaps = json.loads(cli("vol-snapshot-list", "s.qcow2", "--pool", "images", "--json").out)
    assert [(s["name"], s["kind"]) for s in snaps] == [("before", kind)]
    info = qemu_info(path)
    if kind == "internal":
        assert [s["name"] for s in info.get("snapshots", [])] == ["before"]
    else:
        assert info.get("backing-filename")  # the frozen image under an overlay

    assert cli("vol-snapshot-revert", "s.qcow2", "before", "--pool", "images").out == (
        "Vol s.qcow2 reverted to snapshot before\n\n")
    assert pattern_at(path, 0x41, 0, MiB)

    assert cli("vol-snapshot-delete", "s.qcow2", "before", "--pool", "images").out == (
        "Volume snapshot before deleted\n\n")
    assert json.loads(cli("vol-snapshot-list", "s.qcow2", "images", "--json").out) == []
    assert not qemu_info(path).get("snapshots")
    # The volume keeps the reverted contents, and no snapshot file is left beside it.
    assert pattern_at(path, 0x41, 0, MiB)
    assert sorted(p.name for p in pool.iterdir()) == ["s.qcow2"]
    msg = error_of(cli("vol-snapshot-revert", "s.qcow2", "before", "--pool", "images",
                       ok=False))
    assert "before" in msg


def test_snapshot_of_raw_needs_reflink(cli: Cli, pool: Path, source: Path) -> None:
    """ext4 and tmpfs cannot share extents: a clear refusal, and nothing made."""
    fs = subprocess.run(["stat", "-f", "-c", "%T", str(pool)], capture_output=True,
                        text=True, check=True).stdout.strip()
    if fs in ("xfs", "btrfs"):
        pytest.skip(f"{fs} can share extents")
    msg = error_of(cli("vol-snapshot-create", "src.img", "s", "--pool", "images", ok=False))
    assert "reflink" in msg
    assert sorted(p.name for p in pool.iterdir()) == ["src.img"]
