"""What every command gets: the connection (opened on first use), output, quiet mode."""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from virtstore.errors import VirtstoreError

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import TextIO

    from virtstore.api import Connection
    from virtstore.cli.parser import Args


class CommandFailed(Exception):
    """A failure reported as virsh does: what failed (``failed to get pool 'x'``), then
    the reason, each on its own ``error:`` line."""

    def __init__(self, what: str, cause: VirtstoreError) -> None:
        super().__init__(f"{what}: {cause}")
        self.what = what
        self.cause = cause


@contextmanager
def failing(what: str) -> Iterator[None]:
    """Report a failure inside as ``what`` and then its reason; an inner report wins,
    as in virsh, where a failed lookup stops the command before its action."""
    try:
        yield
    except VirtstoreError as err:
        raise CommandFailed(what, err) from err


class Context:
    def __init__(self, *, uri: str | None = None, root: str | None = None, quiet: bool = False,
                 out: TextIO | None = None) -> None:
        self.uri = uri
        self.root = root
        self.quiet = quiet
        self.out = out if out is not None else sys.stdout
        self._conn: Connection | None = None
        # virsh ends every command's output with an empty line unless -q; commands
        # whose output is meant for programs (JSON, a bare secret value) turn it off.
        self.trailer = True

    @property
    def conn(self) -> Connection:
        if self._conn is None:
            import virtstore

            self._conn = virtstore.connect(self.uri, root=self.root)
        return self._conn

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def print(self, text: str = "") -> None:
        """Command output proper: always printed."""
        self.out.write(text + "\n")

    def extra(self, text: str) -> None:
        """Chatter (success messages, table headers): silenced by -q, as virsh does."""
        if not self.quiet:
            self.out.write(text + "\n")

    def json(self, value: object) -> None:
        import json

        self.out.write(json.dumps(value, indent=2) + "\n")
        self.trailer = False

    def dump_xml(self, xml: str, args: Args) -> None:
        """A ``*-dumpxml`` result: the document, or what ``--xpath`` selects from it."""
        expr = args.get("xpath")
        if expr is None:
            self.out.write(xml if xml.endswith("\n") else xml + "\n")
            return
        from virtstore.cli.xmlbuild import xpath_dump

        self.out.write(xpath_dump(xml, expr, wrap=args.flag("wrap")))

    def warn(self, text: str) -> None:
        sys.stderr.write(f"warning: {text}\n")


def define_from_file(args: Args, failed: str, define: Callable[[str], str]) -> tuple[str, str]:
    """``define`` the XML in the file --file names: (what it returns, the path); its
    failure is reported as ``failed`` (``{}``: the path)."""
    path = args.req("file")
    xml = read_text_file(path)
    with failing(failed.format(path)):
        return define(xml), path


def read_text_file(path: str) -> str:
    """An XML file named on the command line, with virsh's message when it cannot be read."""
    from virtstore.errors import InvalidArgument

    try:
        with open(path, encoding="utf-8") as fh:
            return fh.read()
    except OSError as err:
        raise InvalidArgument(f"Failed to open file '{path}': {err.strerror}") from None
    except UnicodeDecodeError as err:
        raise InvalidArgument(f"Failed to read file '{path}': {err}") from None
