"""pool-* commands end to end: the real CLI, the embedded engine, a temporary state root
and real directories."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from cli_fixtures import Cli, Result, cli_fixture, error_of  # noqa: F401

VIRSH = Path(__file__).parent / "data" / "virsh"


@pytest.fixture
def pool_dir(tmp_path: Path) -> Path:
    d = tmp_path / "images"
    d.mkdir()
    return d


def test_commands_on_a_fresh_root_make_no_pool(cli: Cli, root: Path) -> None:
    # The default pool is virtstored's to make on its first start; a command that only
    # reads, or any other, leaves the pools as they are.
    empty = " Name   State   Autostart\n---------------------------\n\n"
    assert cli("pool-list", "--all").out == empty
    assert cli("vol-list", "default", ok=False).err.startswith(
        "error: failed to get pool 'default'\n")
    assert cli("pool-list", "--all").out == empty
    assert not (root / "images").exists()


def test_dir_pool_lifecycle(cli: Cli, pool_dir: Path) -> None:
    assert cli("pool-define-as", "images", "dir", "--target", str(pool_dir)).out == (
        "Pool images defined\n\n")
    assert cli("pool-list", "--all").out == (
        " Name     State      Autostart\n"
        "--------------------------------\n"
        " images   inactive   no\n\n")
    # An inactive pool is not listed without --all.
    assert "images" not in cli("pool-list").out
    info = cli("pool-info", "images").out.split("\n")
    assert info[0] == "Name:           images"
    assert info[2:5] == ["State:          inactive", "Persistent:     yes",
                         "Autostart:      no"]
    assert not any(line.startswith("Capacity") for line in info)
    assert info[5] == "Shared:         no"  # ours, after virsh's lines

    assert cli("pool-start", "images").out == "Pool images started\n\n"
    assert cli("pool-list").out == (
        " Name     State    Autostart\n"
        "------------------------------\n"
        " images   active   no\n\n")
    info = cli("pool-info", "images", "--bytes").out.split("\n")
    assert info[2] == "State:          running"
    st = os.statvfs(pool_dir)
    capacity = int(info[5].split()[1])
    assert info[5].startswith("Capacity:       ")
    assert capacity == st.f_blocks * st.f_frsize
    pretty = cli("pool-info", "images").out
    assert " GiB\n" in pretty or " TiB\n" in pretty

    xml = cli("pool-dumpxml", "images").out
    assert "<pool type='dir'>" in xml
    assert f"<path>{pool_dir}</path>" in xml
    assert cli("pool-dumpxml", "images", "--xpath", "/pool/target/path").out == (
        f"<path>{pool_dir}</path>\n\n")
    assert cli("pool-dumpxml", "images", "--xpath", "/pool/@type", "--wrap").out == (
        '<nodes type="dir"/>\n\n')
    assert error_of(cli("pool-dumpxml", "images", "--xpath", "count(//path)", ok=False)) == (
        "Incorrect xpath 'count(//path)'")
    assert cli("pool-refresh", "images").out == "Pool images refreshed\n\n"

    assert cli("pool-autostart", "images").out == "Pool images marked as autostarted\n\n"
    assert "images" in cli("pool-list", "--autostart").out
    assert "images" not in cli("pool-list", "--no-autostart").out
    assert cli("pool-autostart", "images", "--disable").out == (
        "Pool images unmarked as autostarted\n\n")

    assert cli("pool-destroy", "images").out == "Pool images destroyed\n\n"
    assert "inactive" in cli("pool-list", "--inactive").out
    assert cli("pool-undefine", "images").out == "Pool images has been undefined\n\n"
    assert "images" not in cli("pool-list", "--all").out
    assert cli("pool-list", "--all").out == (
        " Name   State   Autostart\n---------------------------\n\n")
    assert pool_dir.is_dir()  # undefine leaves the storage alone


def test_pool_list_details_and_filters(cli: Cli, tmp_path: Path) -> None:
    for name in ("alpha", "beta-long-name"):
        (tmp_path / name).mkdir()
        cli("pool-define-as", name, "dir", "--target", str(tmp_path / name))
    cli("pool-start", "alpha")
    lines = cli("pool-list", "--all", "--details").out.split("\n")
    assert lines[0].startswith(" Name             State      Autostart   Persistent   Capacity")
    assert lines[0].split() == ["Name", "State", "Autostart", "Persistent", "Capacity",
                                "Allocation", "Available"]
    assert lines[1] == "-" * len(lines[1]) and len(lines[1]) >= len(lines[0])
    alpha, beta = lines[2].split(), lines[3].split()
    assert alpha[:4] == ["alpha", "running", "no", "yes"]
    assert alpha[5] in ("B", "KiB", "MiB", "GiB", "TiB")
    assert beta == ["beta-long-name", "inactive", "no", "yes", "-", "-", "-"]

    assert cli("pool-list", "--name", "--all").out == (
        f"{'alpha':<20}\n{'beta-long-name':<20}\n\n")
    uuid = cli("pool-uuid", "alpha").out.strip()
    assert cli("pool-list", "--uuid").out == f"{uuid}\n\n"
    assert cli("pool-list", "--uuid", "--name").out == f"{uuid} {'alpha':<20}\n\n"
    assert cli("pool-list", "--type", "logical", "--all").out.count("\n") == 3
    assert cli("pool-list", "--type", "dir,logical", "--all").out.count("\n") == 5
    assert cli("pool-list", "--inactive", "--name").out == f"{'beta-long-name':<20}\n\n"
    assert error_of(cli("pool-list", "--type", "bogus", ok=False)) == (
        "Invalid pool type 'bogus'")
    assert error_of(cli("pool-list", "--details", "--name", ok=False)) == (
        "Options --details and --name are mutually exclusive")


def test_pool_list_quiet_has_rows_only(cli: Cli, pool_dir: Path) -> None:
    cli("pool-define-as", "images", "dir", "--target", str(pool_dir))
    assert cli("-q", "pool-start", "images").out == ""
    assert cli("-q", "pool-list").out == " images   active   no\n"
    assert cli("-q", "pool-autostart", "images").out == ""
    uuid = cli("pool-uuid", "images").out.strip()
    assert cli("-q", "pool-uuid", "images").out == f"{uuid}\n"


def test_pool_uuid_and_name_lookups(cli: Cli, pool_dir: Path) -> None:
    cli("pool-define-as", "images", "dir", "--target", str(pool_dir))
    uuid = cli("pool-uuid", "images").out
    assert uuid.endswith("\n\n")
    uuid = uuid.strip()
    assert len(uuid) == 36 and uuid.count("-") == 4
    assert cli("pool-name", uuid).out == "images\n\n"
    # Every command that takes a pool takes its UUID too, and --pool spelled out.
    assert cli("pool-start", uuid).out == "Pool images started\n\n"
    assert cli("pool-info", "--pool", uuid).out.startswith("Name:           images\n")
    assert cli("pool-info", f"--pool={uuid}").out.startswith("Name:           images\n")


def test_pool_define_from_file_and_create_transient(cli: Cli, tmp_path: Path) -> None:
    target = tmp_path / "defined"
    target.mkdir()
    xml_file = tmp_path / "pool.xml"
    xml_file.write_text(f"<pool type='dir'><name>fromfile</name>"
                        f"<target><path>{target}</path></target></pool>")
    assert cli("pool-define", str(xml_file)).out == f"Pool fromfile defined from {xml_file}\n\n"
    assert "fromfile" in cli("pool-list", "--all", "--persistent").out

    build_dir = tmp_path / "built-by-create"
    assert cli("pool-create-as", "transient", "dir", "--target", str(build_dir),
               "--build").out == "Pool transient created\n\n"
    assert build_dir.is_dir()
    listed = cli("pool-list", "--transient").out
    assert "transient" in listed and "fromfile" not in listed
    assert cli("pool-info", "transient").out.split("\n")[3] == "Persistent:     no"
    cli("pool-destroy", "transient")
    assert "transient" not in cli("pool-list", "--all").out  # a transient pool is gone

    other = tmp_path / "created"
    other.mkdir()
    xml_file.write_text(f"<pool type='dir'><name>created</name>"
                        f"<target><path>{other}</path></target></pool>")
    assert cli("pool-create", str(xml_file)).out == f"Pool created created from {xml_file}\n\n"
    assert "running" in cli("pool-info", "created").out


def test_pool_build_start_build_and_delete(cli: Cli, tmp_path: Path) -> None:
    target = tmp_path / "to-build"
    cli("pool-define-as", "b", "dir", "--target", str(target))
    assert cli("pool-build", "b").out == "Pool b built\n\n"
    assert target.is_dir()
    assert cli("pool-delete", "b").out == "Pool b deleted\n\n"
    assert not target.exists()
    assert cli("pool-start", "b", "--build").out == "Pool b started\n\n"
    assert target.is_dir()
    assert error_of(cli("pool-start", "b", "--overwrite", "--no-overwrite", ok=False)) == (
        "Options --overwrite and --no-overwrite are mutually exclusive")


def test_errors_are_one_line(cli: Cli, pool_dir: Path) -> None:
    msg = error_of(cli("pool-info", "nosuch", ok=False))
    assert "nosuch" in msg
    cli("pool-define-as", "images", "dir", "--target", str(pool_dir))
    msg = error_of(cli("pool-define-as", "images", "dir", "--target", str(pool_dir), ok=False))
    assert "images" in msg and "exist" in msg
    cli("pool-start", "images")
    msg = error_of(cli("pool-start", "images", ok=False))
    assert "already active" in msg
    msg = error_of(cli("pool-define-as", "a/b", "dir", "--target", str(pool_dir), ok=False))
    assert "/" in msg
    assert error_of(cli("pool-define", str(pool_dir / "missing.xml"), ok=False)) == (
        f"Failed to open file '{pool_dir / 'missing.xml'}': No such file or directory")
    assert error_of(cli("pool-info", ok=False)) == "command 'pool-info' requires <pool> option"


def test_error_through_the_installed_command(root: Path) -> None:
    exe = Path(sys.executable).with_name("virtstore")
    proc = subprocess.run([str(exe), "--root", str(root), "pool-info", "nosuch"],
                          capture_output=True, text=True)
    assert proc.returncode == 1
    assert proc.stdout == ""
    # virsh 9.0's two lines, byte for byte: scripts grep the first.
    assert proc.stderr == ("error: failed to get pool 'nosuch'\n"
                           "error: Storage pool not found: no storage pool with matching "
                           "name 'nosuch'\n")


def test_json_outputs(cli: Cli, pool_dir: Path) -> None:
    cli("pool-define-as", "images", "dir", "--target", str(pool_dir))
    cli("pool-start", "images")
    listed = json.loads(cli("pool-list", "--json").out)
    assert [p["name"] for p in listed] == ["images"]
    info = json.loads(cli("pool-info", "images", "--json").out)
    # Sizes move with whatever else writes to the filesystem meanwhile.
    moving = ("allocation", "available")
    assert {k: v for k, v in info.items() if k not in moving} == {
        k: v for k, v in listed[0].items() if k not in moving}
    assert info["state"] == "running" and info["type"] == "dir"
    assert info["persistent"] is True and info["autostart"] is False
    assert info["target_path"] == str(pool_dir)
    assert info["capacity"] == os.statvfs(pool_dir).f_blocks * os.statvfs(pool_dir).f_frsize
    assert json.loads(cli("pool-list", "--inactive", "--json").out) == []


# -- pool-define-as: the XML virsh would write -------------------------------------------

PRINT_XML_CASES = {
    "pool-define-as-dir.xml": ["q", "dir", "--target", "/tmp/q"],
    "pool-define-as-netfs.xml": ["q", "netfs", "--source-host", "nfs.example.com",
                                 "--source-path", "/export", "--target", "/mnt/q",
                                 "--source-format", "nfs", "--source-protocol-ver", "4"],
    "pool-define-as-iscsi.xml": ["q", "iscsi", "--source-host", "10.0.0.1", "--source-dev",
                                 "iqn.2020-01.com.example:t1", "--target", "/dev/disk/by-path",
                                 "--source-initiator", "iqn.2020-01.com.example:init",
                                 "--auth-type", "chap", "--auth-username", "bob",
                                 "--secret-usage", "libvirtiscsi"],
    "pool-define-as-rbd.xml": ["q", "rbd", "--source-host", "mon1", "--source-name", "rbdpool",
                               "--auth-type", "ceph", "--auth-username", "admin",
                               "--secret-uuid", "2c19d434-ffb8-4b16-bf0f-ee66b9fff8c3"],
    "pool-define-as-scsi-host.xml": ["q", "scsi", "--adapter-name", "host0"],
    "pool-define-as-fc-parent.xml": ["q", "scsi", "--adapter-wwnn", "20000000c9831b4b",
                                     "--adapter-wwpn", "10000000c9831b4b",
                                     "--adapter-parent", "scsi_host3"],
    "pool-define-as-fc-parent-wwn.xml": ["q", "scsi", "--adapter-wwnn", "1", "--adapter-wwpn",
                                         "2", "--adapter-parent-wwnn", "3",
                                         "--adapter-parent-wwpn", "4"],
    "pool-define-as-fc-fabric.xml": ["q", "scsi", "--adapter-wwnn", "1", "--adapter-wwpn", "2",
                                     "--adapter-parent-fabric-wwn", "5"],
    "pool-define-as-logical.xml": ["q", "logical", "--source-dev", "/dev/sdb", "--source-name",
                                   "vg0", "--target", "/dev/vg0", "--source-format", "lvm2"],
    "pool-define-as-positional.xml": ["q", "dir", "h", "/p", "/dev", "n", "/t"],
    "pool-define-as-no-source.xml": ["q", "netfs", "--source-protocol-ver", "3",
                                     "--auth-type", "chap", "--auth-username", "u"],
}


@pytest.mark.parametrize("recording", sorted(PRINT_XML_CASES))
@pytest.mark.parametrize("command", ["pool-define-as", "pool-create-as"])
def test_print_xml_is_what_virsh_prints(cli: Cli, root: Path, recording: str,
                                        command: str) -> None:
    out = cli(command, *PRINT_XML_CASES[recording], "--print-xml").out
    assert out == (VIRSH / recording).read_text()
    assert not root.exists() or "q" not in cli("pool-list", "--all").out  # nothing defined


def test_print_xml_output_defines_the_same_pool(cli: Cli, tmp_path: Path) -> None:
    target = tmp_path / "t"
    target.mkdir()
    xml = cli("pool-define-as", "viaxml", "dir", "--target", str(target), "--print-xml").out
    (tmp_path / "p.xml").write_text(xml)
    cli("pool-define", str(tmp_path / "p.xml"))
    assert f"<path>{target}</path>" in cli("pool-dumpxml", "viaxml").out


def test_pool_capabilities(cli: Cli) -> None:
    out = cli("pool-capabilities").out
    assert out.startswith("<storagepoolCapabilities")
    assert "<pool type='dir' supported='yes'>" in out


def test_import_libvirt_pools(cli: Cli, tmp_path: Path) -> None:
    config = tmp_path / "libvirt-storage"
    (config / "autostart").mkdir(parents=True)
    target = tmp_path / "imported"
    target.mkdir()
    (config / "legacy.xml").write_text(
        "<pool type='dir'>\n  <name>legacy</name>\n"
        "  <uuid>7b91da61-6f1d-40c8-9514-cf89bf814c2c</uuid>\n"
        f"  <target>\n    <path>{target}</path>\n  </target>\n</pool>\n")
    (config / "autostart" / "legacy.xml").symlink_to(config / "legacy.xml")
    out = cli("pool-import-libvirt", "--config-dir", str(config)).out
    assert out == f"Pool legacy imported from {config}\n\n"
    info = cli("pool-info", "7b91da61-6f1d-40c8-9514-cf89bf814c2c").out
    assert info.startswith("Name:           legacy\n")
    assert "Autostart:      yes" in info
    # An import defines what it found and nothing else.
    assert cli("pool-list", "--all", "--name").out == f"{'legacy':<20}\n\n"
