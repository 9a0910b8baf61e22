"""runner.stream: output as it comes, and programs stopped on request."""

from __future__ import annotations

import pytest

from data_fixtures import alive
from virtstore.errors import Cancelled, CommandFailed, NoSpace
from virtstore.host.runner import stream


def test_output_is_cut_at_newlines_and_carriage_returns() -> None:
    pieces: list[str] = []
    result = stream(["sh", "-c", r"printf '  (1.00/100%%)\r  (2.00/100%%)\rdone\nrest'"],
                    pieces.append)
    assert pieces == ["  (1.00/100%)\r", "  (2.00/100%)\r", "done\n", "rest"]
    assert result.returncode == 0
    assert result.stdout.endswith("rest")


def test_other_separators() -> None:
    pieces: list[str] = []
    stream(["printf", "bar |...|\n"], pieces.append, separators="\n.")
    assert pieces == ["bar |.", ".", ".", "|\n"]


def test_failure_names_the_program_and_its_complaint() -> None:
    with pytest.raises(CommandFailed, match=r"'sh' failed \(exit 3\): bad thing") as err:
        stream(["sh", "-c", "echo progress; echo bad thing >&2; exit 3"], lambda _: None)
    assert err.value.returncode == 3
    with pytest.raises(NoSpace):
        stream(["sh", "-c", "echo 'write: No space left on device' >&2; exit 1"],
               lambda _: None)
    with pytest.raises(CommandFailed, match="not found"):
        stream(["/nonexistent/tool"], lambda _: None)


def _pid_of(pieces: list[str]) -> int:
    return int(pieces[0].strip())


def test_should_stop_kills_the_program() -> None:
    pieces: list[str] = []
    with pytest.raises(Cancelled):
        stream(["sh", "-c", "echo $$; exec sleep 60"], pieces.append,
               should_stop=lambda: bool(pieces))
    assert not alive(_pid_of(pieces))


def test_a_program_that_ignores_sigterm_is_killed() -> None:
    pieces: list[str] = []
    with pytest.raises(Cancelled):
        stream(["sh", "-c", "trap '' TERM; echo $$; while :; do sleep 0.05; done"],
               pieces.append, should_stop=lambda: bool(pieces), grace=0.3)
    assert not alive(_pid_of(pieces))


def test_an_exception_in_the_callback_kills_the_program() -> None:
    pieces: list[str] = []

    def on_line(line: str) -> None:
        pieces.append(line)
        raise KeyError("stop")

    with pytest.raises(KeyError):
        stream(["sh", "-c", "echo $$; exec sleep 60"], on_line)
    assert not alive(_pid_of(pieces))


def test_timeout() -> None:
    pieces: list[str] = []
    with pytest.raises(CommandFailed, match="timed out"):
        stream(["sh", "-c", "echo $$; exec sleep 60"], pieces.append, timeout=0.3)
    assert not alive(_pid_of(pieces))
