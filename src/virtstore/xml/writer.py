"""A small indented text buffer producing libvirt's exact XML layout (virBuffer)."""

from __future__ import annotations

# virBufferEscapeString silently drops C0 controls other than tab, LF and CR, and
# escapes the five XML specials.
_ESCAPES: dict[int, str | None] = {
    **{c: None for c in (*range(0x01, 0x09), 0x0B, 0x0C, *range(0x0E, 0x20))},
    **{ord(k): v for k, v in (("<", "&lt;"), (">", "&gt;"), ("&", "&amp;"),
                              ('"', "&quot;"), ("'", "&apos;"))},
}


def esc(value: object) -> str:
    return str(value).translate(_ESCAPES)


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
