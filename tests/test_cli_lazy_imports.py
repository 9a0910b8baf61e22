"""Single-object commands import only what they use: no XML layer, no lifecycle code,
no data layer, no dataclasses (which pulls in inspect). Checked in a fresh interpreter,
since what one test imports stays imported for the next."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from virtstore.api.embedded import EmbeddedConnection

# Modules these commands must not load (prefix match on the dotted name).
NOT_FOR_READS = ("lxml", "dataclasses", "inspect", "subprocess", "virtstore.engine.pools",
                 "virtstore.engine.volumes", "virtstore.engine.jobs", "virtstore.data",
                 "virtstore.formats", "logging", "threading")
# Nor these, which a read (printing XML included) has no use for: the typing module, re
# (and enum through it), and the other commands' tables.
NOT_FOR_PLAIN_READS = (*NOT_FOR_READS, "typing", "re", "enum", "virtstore.cli.data_cmds",
                       "virtstore.cli.job_cmds", "virtstore.cli.backup_cmds",
                       "virtstore.cli.secret_cmds")

_PROBE = """
import sys
from virtstore.cli.main import main
status = main(sys.argv[1:])
sys.stdout.flush()
mods = sorted(sys.modules)
import json  # after the list: json imports re
sys.stderr.write("\\nMODULES " + json.dumps(mods) + "\\n")
sys.exit(status)
"""


def _run(root: Path, *argv: str) -> tuple[str, set[str]]:
    env = dict(os.environ, VIRTSTORE_ROOT=str(root))
    res = subprocess.run([sys.executable, "-c", _PROBE, *argv], capture_output=True,
                         text=True, env=env, check=False)
    assert res.returncode == 0, res.stderr
    mods = set(json.loads(res.stderr.rsplit("MODULES ", 1)[1]))
    return res.stdout, mods


def _loaded(mods: set[str], prefixes: tuple[str, ...]) -> list[str]:
    return sorted(m for m in mods if any(m == p or m.startswith(p + ".") for p in prefixes))


@pytest.fixture
def state(root: Path, pooldir: Path) -> Path:
    (pooldir / "a.img").write_bytes(b"\0" * 4096)
    conn = EmbeddedConnection(str(root))
    conn.pool_define_xml(f"<pool type='dir'><name>p</name><target><path>{pooldir}</path>"
                         "</target></pool>")
    conn.pool_start("p")
    conn.close()
    return root


@pytest.mark.parametrize("argv", [
    ("vol-info", "a.img", "--pool", "p"),
    ("vol-path", "a.img", "--pool", "p"),
    ("vol-key", "a.img", "--pool", "p"),
    ("vol-list", "p"),
    ("pool-info", "p"),
    ("pool-list", "--all"),
])
def test_read_commands_import_no_heavy_layers(state: Path, argv: tuple[str, ...]) -> None:
    out, mods = _run(state, *argv)
    assert out.strip()
    assert "virtstore.engine.index" in mods
    assert _loaded(mods, NOT_FOR_PLAIN_READS) == []


@pytest.mark.parametrize("argv", [
    ("vol-info", "a.img", "--pool", "p"),
    ("vol-path", "a.img", "--pool", "p"),
    ("vol-key", "a.img", "--pool", "p"),
])
def test_a_volume_named_in_its_pool_is_read_without_the_backend(
        state: Path, argv: tuple[str, ...]) -> None:
    out, mods = _run(state, *argv)
    assert out.strip()
    assert _loaded(mods, ("virtstore.backends",)) == []


def test_command_modules_table_names_each_module_s_commands() -> None:
    """The table that lets a command import only its own module lists every command
    of every command module, under the module that holds it."""
    import importlib

    from virtstore.cli.main import COMMAND_MODULES, find_command

    cli_dir = Path(importlib.import_module("virtstore.cli").__file__ or "").parent
    assert set(COMMAND_MODULES) == {p.stem for p in cli_dir.glob("*_cmds.py")}
    for module, names in COMMAND_MODULES.items():
        table = importlib.import_module(f"virtstore.cli.{module}").COMMANDS
        assert tuple(c.name for c in table) == names
        for cmd in table:
            assert find_command(cmd.name) is cmd
    assert find_command("vol-nonesuch") is None


def test_dumpxml_of_a_dir_volume_parses_no_xml(state: Path) -> None:
    out, mods = _run(state, "vol-dumpxml", "a.img", "--pool", "p")
    assert "<name>a.img</name>" in out
    assert _loaded(mods, NOT_FOR_PLAIN_READS) == []


def test_a_write_still_loads_what_it_needs(state: Path) -> None:
    _out, mods = _run(state, "vol-create-as", "p", "b.img", "1M")
    assert "virtstore.engine.volumes" in mods


def test_reboot_is_seen_by_a_read_only_command(state: Path, monkeypatch: pytest.MonkeyPatch
                                                ) -> None:
    """The first process after a boot marks pools inactive before it reads anything,
    even when that process is a read-only command."""
    monkeypatch.setenv("VIRTSTORE_BOOT_ID", "another-boot")
    out, _mods = _run(state, "pool-list", "--all")
    line = next(ln for ln in out.splitlines() if ln.split()[:1] == ["p"])
    assert line.split()[1] == "inactive"


_ENTRY = "import sys; from virtstore.cli.main import entry; sys.argv[0] = 'virtstore'; entry()"


def test_the_command_s_quick_exit_loses_no_output(state: Path, tmp_path: Path) -> None:
    """``virtstore`` ends a read command without the interpreter's teardown: what it
    printed is all there, in a file as in a pipe, and a failure keeps its status."""
    env = dict(os.environ, VIRTSTORE_ROOT=str(state))
    out = tmp_path / "out.txt"
    with out.open("w") as fh:
        res = subprocess.run([sys.executable, "-c", _ENTRY, "vol-info", "a.img", "p"],
                             stdout=fh, stderr=subprocess.PIPE, text=True, env=env,
                             check=False)
    assert res.returncode == 0, res.stderr
    assert out.read_text().splitlines()[:2] == ["Name:           a.img",
                                                "Type:           file"]
    listing = subprocess.run([sys.executable, "-c", _ENTRY, "vol-list", "p"],
                             capture_output=True, text=True, env=env, check=False)
    assert listing.returncode == 0 and "a.img" in listing.stdout
    missing = subprocess.run([sys.executable, "-c", _ENTRY, "vol-info", "b.img", "p"],
                             capture_output=True, text=True, env=env, check=False)
    assert missing.returncode == 1
    assert missing.stderr.startswith("error: failed to get vol 'b.img'")
