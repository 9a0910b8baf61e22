"""Running the real CLI in process on a temporary state root, for the CLI tests."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import pytest

from virtstore.cli.main import main


class Result(NamedTuple):
    rc: int
    out: str
    err: str


Cli = Callable[..., Result]


@pytest.fixture(name="cli")
def cli_fixture(root: Path, capsys: pytest.CaptureFixture[str]) -> Cli:
    """Run one command line in process, as ``virtstore --root ROOT ARGS``."""

    def run(*args: str, ok: bool = True) -> Result:
        rc = main(["--root", str(root), *args])
        captured = capsys.readouterr()
        result = Result(rc, captured.out, captured.err)
        if ok:
            assert rc == 0, result
            assert captured.err == "", result
        return result

    return run


def errors_of(result: Result) -> list[str]:
    """The ``error:`` lines of a failed command: one, or virsh's two (what failed, then
    why)."""
    assert result.rc == 1, result
    lines = result.err.splitlines()
    assert result.err.endswith("\n") and 1 <= len(lines) <= 2, result
    assert all(line.startswith("error: ") for line in lines), result
    return [line[len("error: "):] for line in lines]


def error_of(result: Result) -> str:
    """Why a command failed: its last ``error:`` line."""
    return errors_of(result)[-1]


def make_pool(cli: Cli, tmp_path: Path, name: str) -> Path:
    """A running dir pool ``name`` in a new directory of that name; the directory."""
    d = tmp_path / name
    d.mkdir()
    cli("pool-define-as", name, "dir", "--target", str(d))
    cli("pool-start", name)
    return d


@pytest.fixture(name="pool")
def pool_fixture(cli: Cli, tmp_path: Path) -> Path:
    """A running dir pool named 'images'; its directory."""
    return make_pool(cli, tmp_path, "images")
