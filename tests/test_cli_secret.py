"""secret-* commands end to end through the real CLI and engine on a temporary state root."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from cli_fixtures import Cli, Result, cli_fixture, error_of  # noqa: F401

VIRSH = Path(__file__).parent / "data" / "virsh"


def define(cli: Cli, tmp_path: Path, xml: str) -> str:
    f = tmp_path / "secret.xml"
    f.write_text(xml)
    out = cli("secret-define", str(f)).out
    assert out.startswith("Secret ") and out.endswith(" created\n\n")
    return out.split()[1]


CEPH = ("<secret ephemeral='no' private='no'><description>test secret</description>"
        "<usage type='ceph'><name>client.admin secret</name></usage></secret>")


def test_define_list_dump_undefine(cli: Cli, tmp_path: Path) -> None:
    uuid = define(cli, tmp_path, CEPH)
    assert len(uuid) == 36
    assert cli("secret-list").out == (
        " UUID                                   Usage\n"
        f"{'-' * 66}\n"
        f" {uuid}   ceph client.admin secret\n\n")
    plain = define(cli, tmp_path, "<secret ephemeral='no' private='no'/>")
    lines = cli("secret-list").out.split("\n")
    assert f" {plain}   Unused" in lines
    assert [line.split()[0] for line in lines[2:4]] == sorted([uuid, plain])

    xml = cli("secret-dumpxml", uuid).out
    assert f"<uuid>{uuid}</uuid>" in xml
    assert "<name>client.admin secret</name>" in xml

    listed = json.loads(cli("secret-list", "--json").out)
    by_uuid = {s["uuid"]: s for s in listed}
    assert by_uuid[uuid]["usage_type"] == "ceph"
    assert by_uuid[uuid]["usage_id"] == "client.admin secret"
    assert by_uuid[uuid]["private"] is False

    assert cli("secret-undefine", uuid).out == f"Secret {uuid} deleted\n\n"
    assert uuid not in cli("secret-list").out
    assert uuid in error_of(cli("secret-dumpxml", uuid, ok=False))


def test_values(cli: Cli, tmp_path: Path) -> None:
    uuid = define(cli, tmp_path, CEPH)
    result = cli("secret-set-value", uuid, "--base64", "aGVsbG8=", ok=False)
    assert result.rc == 0 and result.out == "Secret value set\n\n"
    assert result.err == "warning: Passing secret value as command-line argument is insecure!\n"
    # virsh prints the base64 text with no empty line after it
    assert cli("secret-get-value", uuid).out == "aGVsbG8=\n"
    assert cli("secret-get-value", uuid, "--plain").out == "hello\n"
    assert cli("-q", "secret-get-value", uuid, "--plain").out == "hello"

    (tmp_path / "plain").write_bytes(b"s3cr\x00t")
    cli("secret-set-value", uuid, "--file", str(tmp_path / "plain"), "--plain")
    assert cli("secret-get-value", uuid).out == "czNjcgB0\n"

    (tmp_path / "b64").write_text("d29ybGQ=\n")
    assert cli("secret-set-value", uuid, "--file", str(tmp_path / "b64")).out == (
        "Secret value set\n\n")
    assert cli("secret-get-value", uuid, "--plain").out == "world\n"

    assert error_of(cli("secret-set-value", uuid, "--base64", "!!notbase64", ok=False)) == (
        "Invalid base64 data in secret value")


def test_missing_value_without_a_terminal(root: Path, tmp_path: Path, cli: Cli) -> None:
    uuid = define(cli, tmp_path, CEPH)
    exe = Path(sys.executable).with_name("virtstore")
    proc = subprocess.run([str(exe), "--root", str(root), "secret-set-value", uuid],
                          stdin=subprocess.DEVNULL, capture_output=True, text=True)
    assert (proc.returncode, proc.stderr) == (1, "error: Input secret value is missing\n")


def test_private_secret(cli: Cli, tmp_path: Path) -> None:
    uuid = define(cli, tmp_path, "<secret ephemeral='no' private='yes'>"
                                 "<usage type='iscsi'><target>libvirtiscsi</target></usage>"
                                 "</secret>")
    cli("secret-set-value", uuid, "--base64", "aGVsbG8=", ok=False)
    assert "private" in error_of(cli("secret-get-value", uuid, ok=False))
    assert uuid in cli("secret-list", "--private").out
    assert uuid not in cli("secret-list", "--no-private").out
    assert uuid in cli("secret-list", "--no-ephemeral").out


def test_unknown_secret(cli: Cli) -> None:
    uuid = "2c19d434-ffb8-4b16-bf0f-ee66b9fff8c3"
    assert uuid in error_of(cli("secret-get-value", uuid, ok=False))
    assert uuid in error_of(cli("secret-undefine", uuid, ok=False))
