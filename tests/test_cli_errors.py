"""virsh's error lines, its size grammar for vol-resize, and global options before the
command name, as a user types them."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cli_fixtures import Cli, cli_fixture, errors_of, make_pool  # noqa: F401

NOSUCH_POOL = "Storage pool not found: no storage pool with matching name 'nosuch'"
NO_SECRET = "00000000-0000-0000-0000-000000000000"


@pytest.fixture
def images(cli: Cli, tmp_path: Path) -> Path:
    d = make_pool(cli, tmp_path, "images")
    cli("vol-create-as", "images", "a.img", "1M")
    return d


@pytest.mark.parametrize("argv", [
    ("pool-info", "nosuch"), ("pool-dumpxml", "nosuch"), ("pool-start", "nosuch"),
    ("pool-destroy", "nosuch"), ("pool-delete", "nosuch"), ("pool-undefine", "nosuch"),
    ("pool-refresh", "nosuch"), ("pool-autostart", "nosuch"), ("pool-uuid", "nosuch"),
    ("pool-build", "nosuch"), ("vol-list", "nosuch"), ("vol-info", "v", "--pool", "nosuch"),
    ("vol-create-as", "nosuch", "v", "1G"),
])
def test_unknown_pool_gives_virshs_two_lines(cli: Cli, argv: tuple[str, ...]) -> None:
    assert errors_of(cli(*argv, ok=False)) == ["failed to get pool 'nosuch'", NOSUCH_POOL]


@pytest.mark.parametrize("argv", [
    ("vol-info", "x", "--pool", "images"), ("vol-dumpxml", "x", "--pool", "images"),
    ("vol-delete", "x", "--pool", "images"), ("vol-path", "x", "--pool", "images"),
    ("vol-key", "x", "--pool", "images"), ("vol-resize", "x", "1G", "--pool", "images"),
    ("vol-wipe", "x", "--pool", "images"), ("vol-clone", "x", "y", "--pool", "images"),
    ("vol-name", "x"), ("vol-pool", "x"),
])
def test_unknown_volume_gives_virshs_two_lines(cli: Cli, images: Path,
                                               argv: tuple[str, ...]) -> None:
    what, why = errors_of(cli(*argv, ok=False))
    assert what == "failed to get vol 'x'"
    assert why.startswith("Storage volume not found: ") and "'x'" in why


def test_volume_by_path_without_pool_suggests_pool(cli: Cli, images: Path) -> None:
    what, why = errors_of(cli("vol-info", "/nosuch/path", ok=False))
    assert what == "failed to get vol '/nosuch/path', specifying --pool might help"
    assert why.startswith("Storage volume not found: ")


def test_failed_actions_say_what_failed_then_why(cli: Cli, images: Path) -> None:
    assert errors_of(cli("pool-start", "images", ok=False)) == [
        "Failed to start pool images",
        "Requested operation is not valid: storage pool 'images' is already active"]
    assert errors_of(cli("pool-undefine", "images", ok=False))[0] == (
        "Failed to undefine pool images")
    assert errors_of(cli("pool-delete", "images", ok=False))[0] == "Failed to delete pool images"
    assert errors_of(cli("pool-build", "images", ok=False))[0] == "Failed to build pool images"
    assert errors_of(cli("pool-define-as", "images", "dir", "--target", "/elsewhere",
                         ok=False))[0] == "Failed to define pool images"
    assert errors_of(cli("vol-create-as", "images", "a.img", "1M", ok=False)) == [
        "Failed to create vol a.img", "storage volume 'a.img' exists already"]
    assert errors_of(cli("vol-clone", "a.img", "a.img", "--pool", "images",
                         ok=False))[0] == "Failed to clone vol from a.img"
    assert errors_of(cli("vol-resize", "a.img", "1K", "--pool", "images", ok=False))[0] == (
        "Failed to change size of volume 'a.img' to 1K")
    cli("pool-destroy", "images")
    assert errors_of(cli("pool-destroy", "images", ok=False)) == [
        "Failed to destroy pool images",
        "Requested operation is not valid: storage pool 'images' is not active"]
    assert errors_of(cli("pool-refresh", "images", ok=False))[0] == (
        "Failed to refresh pool images")


@pytest.mark.parametrize("argv", [
    ("secret-dumpxml", NO_SECRET), ("secret-get-value", NO_SECRET),
    ("secret-undefine", NO_SECRET), ("secret-set-value", NO_SECRET, "--base64", "aa=="),
])
def test_unknown_secret_gives_virshs_two_lines(cli: Cli, argv: tuple[str, ...]) -> None:
    assert errors_of(cli(*argv, ok=False)) == [
        f"failed to get secret '{NO_SECRET}'",
        f"Secret not found: no secret with matching uuid '{NO_SECRET}'"]


def test_usage_errors_stay_one_line(cli: Cli) -> None:
    assert errors_of(cli("pool-info", ok=False)) == [
        "command 'pool-info' requires <pool> option"]


def test_resize_takes_a_leading_plus_as_virsh_does(cli: Cli, images: Path) -> None:
    # virsh reads the size with strtoull: '+512M' is 512M, a delta only with --delta.
    out = cli("vol-resize", "a.img", "+512M", "--pool", "images").out
    assert out == "Size of volume 'a.img' successfully changed to +512M\n\n"
    assert (images / "a.img").stat().st_size == 512 << 20
    out = cli("vol-resize", "a.img", "+512M", "--pool", "images", "--delta").out
    assert out == "Size of volume 'a.img' successfully changed by +512M\n\n"
    assert (images / "a.img").stat().st_size == 1 << 30
    assert errors_of(cli("vol-resize", "a.img", "++1M", "--pool", "images", ok=False)) == [
        "Malformed size +1M"]


def test_json_before_the_command_name(cli: Cli, images: Path) -> None:
    listed = json.loads(cli("--json", "pool-list").out)
    assert [p["name"] for p in listed] == ["images"]
    info = json.loads(cli("--json", "vol-info", "a.img", "--pool", "images").out)
    assert info["name"] == "a.img"
    assert [p["name"] for p in json.loads(cli("--json", "pool-list", "--json").out)] == [
        "images"]
    assert errors_of(cli("--json", "pool-uuid", "images", ok=False)) == [
        "command 'pool-uuid' doesn't support option --json"]


def test_dumpxml_keeps_what_virsh_shows(cli: Cli, images: Path) -> None:
    cli("vol-create-as", "images", "base.qcow2", "1M", "--format", "qcow2")
    cli("vol-create-as", "images", "top.qcow2", "2M", "--format", "qcow2",
        "--backing-vol", "base.qcow2", "--backing-vol-format", "qcow2")
    top = cli("vol-dumpxml", "top.qcow2", "--pool", "images").out
    assert "<clusterSize unit='B'>65536</clusterSize>" in top
    backing = top[top.index("<backingStore>"):]
    assert "<permissions>" in backing and "<timestamps>" in backing
    assert "<permissions>" in cli("pool-dumpxml", "images").out
    live = cli("pool-dumpxml", "images", "--xpath", "/pool/capacity/text()").out
    cli("pool-destroy", "images")
    stopped = cli("pool-dumpxml", "images", "--inactive", "--xpath",
                  "/pool/capacity/text()").out
    assert stopped == live and stopped != "0\n\n"
