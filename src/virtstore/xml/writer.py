"""A small indented text buffer producing libvirt's exact XML layout (virBuffer)."""

from __future__ import annotations

import re

# virBufferEscapeString silently drops C0 controls other than tab, LF and CR.
_DROPPED = re.compile(r"[\x01-\x08\x0b\x0c\x0e-\x1f]")
_ENTITIES = {"<": "&lt;", ">": "&gt;", "&": "&amp;", '"': "&quot;", "'": "&apos;"}


def esc(value: object) -> str:
    return re.sub(r"[<>&\"']", lambda m: _ENTITIES[m.group(0)], _DROPPED.sub("", str(value)))


class Writer:
    def __init__(self, indent: int = 0) -> None:
        self._lines: list[str] = []
        self._indent = indent

    def line(self, text: str) -> None:
        self._lines.append(" " * self._indent + text)

    def open(self, text: str) -> None:
        self.line(text)
        self._indent += 2

    def close(self, text: str) -> None:
        self._indent -= 2
        self.line(text)

    def elem(self, tag: str, value: object) -> None:
        """``<tag>value</tag>``, unless the value is None."""
        if value is not None:
            self.line(f"<{tag}>{esc(value)}</{tag}>")

    def empty(self, tag: str, attr: str, value: object) -> None:
        """``<tag attr='value'/>``, unless the value is None."""
        if value is not None:
            self.line(f"<{tag} {attr}='{esc(value)}'/>")

    def text(self) -> str:
        return "".join(f"{line}\n" for line in self._lines)

    @property
    def indent(self) -> int:
        return self._indent

    def extend(self, other: Writer) -> None:
        self._lines.extend(other._lines)
