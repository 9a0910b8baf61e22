"""The kernel lab's result, checked in the main run so that its closing summary line
covers both: scripts/test runs tests/kernel inside the VM (scripts/test-kernel) beside
this suite, with VIRTSTORE_KERNEL_LAB_RESULT naming the VM run's output directory; the
check is ordered last (conftest.py) and waits for the VM's status file."""

from __future__ import annotations

import os
import re
import time
from pathlib import Path

import pytest

RESULT = os.environ.get("VIRTSTORE_KERNEL_LAB_RESULT")
# The VM's tests take 10 minutes here when alone; the wait ends long before CI's limit.
WAIT = 50 * 60


def summary_counts(text: str) -> dict[str, int]:
    """The counts of pytest's closing summary line (``3 passed, 1 skipped in 9.1s``)."""
    lines = [ln for ln in text.splitlines() if re.search(r"\d+ (passed|failed|error)", ln)]
    if not lines:
        return {}
    return {kind.rstrip("s"): int(n)
            for n, kind in re.findall(r"(\d+) (passed|failed|errors?|skipped|xfailed|xpassed)",
                                      lines[-1])}


def test_summary_counts_of_a_recorded_line() -> None:
    assert summary_counts("x\n2 failed, 10 passed, 1 skipped in 301.20s (0:05:01)\n") == \
        {"failed": 2, "passed": 10, "skipped": 1}
    assert summary_counts("1 error in 0.5s") == {"error": 1}
    assert summary_counts("boot failed early") == {}


@pytest.mark.timeout(WAIT + 60)
@pytest.mark.skipif(RESULT is None, reason="the kernel lab did not run in this session "
                    "(scripts/test runs it; alone: scripts/test-kernel)")
def test_kernel_lab_passed() -> None:
    assert RESULT is not None
    out = Path(RESULT)
    deadline = time.monotonic() + WAIT
    while not (out / "status").exists():
        assert time.monotonic() < deadline, f"the kernel lab gave no result in {WAIT} s"
        time.sleep(5)
    status = (out / "status").read_text().split()
    output = (out / "output.txt").read_text(errors="replace")
    counts = summary_counts(output)
    tail = "\n".join(output.splitlines()[-30:])
    assert status[0] == "0", f"the kernel lab exited {status[0]}:\n{tail}"
    assert counts.get("passed", 0) > 0, f"no test passed in the kernel lab:\n{tail}"
    assert not counts.get("failed") and not counts.get("error"), tail
