"""Fixtures of the reliability suite and its closing summary."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from reliability import summary
from reliability.harness import work_area

_STARTED = time.monotonic()


@pytest.fixture
def area() -> Iterator[Path]:
    """A scratch directory under /var/lib (file creation in /tmp is much slower on the CI
    machines), removed afterwards."""
    with work_area() as d:
        yield d


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if not summary.touched():
        return
    terminalreporter.section("virtstore reliability")
    for line in summary.lines():
        terminalreporter.write_line(line)
    terminalreporter.write_line(f"{'wall time of the session':<32} "
                                f"{time.monotonic() - _STARTED:.1f} s")
