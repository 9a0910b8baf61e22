"""docs/cli.md and the command table agree: every command is documented, and every
command the page names exists (or is listed as not implemented yet)."""

from __future__ import annotations

import re
from pathlib import Path

from virtstore.cli.main import commands

DOC = Path(__file__).resolve().parent.parent / "docs" / "cli.md"
# Words in backticks that look like commands: a known prefix and a dash.
_PREFIXES = ("pool-", "vol-", "secret-", "job-", "host-", "guest-", "backup-", "cluster-",
             "nbd-", "find-", "migrate-")


def _named(text: str) -> set[str]:
    words = re.findall(r"`([a-z]+(?:-[a-z0-9]+)+)[ `\[]", text)
    return {w for w in words if w.startswith(_PREFIXES)}


def test_every_command_is_documented() -> None:
    doc = DOC.read_text()
    documented = _named(doc) | set(re.findall(r"`([a-z]+)[ `]", doc))
    assert set(commands()) - documented == set()


def test_every_documented_command_exists() -> None:
    doc = DOC.read_text()
    not_yet = doc[doc.index("Not implemented yet"):].split("\n\n", 1)[0]
    assert _named(doc.replace(not_yet, "")) - set(commands()) == set()
    assert not _named(not_yet) & set(commands()), "implemented now: update the list"
