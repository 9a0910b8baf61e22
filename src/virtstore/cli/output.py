"""virsh's plain text output: aligned tables, ``Key:  value`` blocks and sizes.

The layout is virsh's (vshTable and vshPrettyCapacity) byte for byte, so that
scripts and eyes used to virsh read ours the same way.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence


def _width(text: str) -> int:
    if text.isascii():
        return len(text)
    import unicodedata

    width = 0
    for ch in text:
        if unicodedata.combining(ch):
            continue
        width += 2 if unicodedata.east_asian_width(ch) in ("W", "F") else 1
    return width


def table(headers: Sequence[str], rows: Iterable[Sequence[str]], *,
          header: bool = True) -> str:
    """A vshTable: one leading space, columns padded to the widest cell plus two
    spaces (the last column unpadded), and a dashed line as wide as every column
    plus three. ``header=False`` (virsh -q) leaves out the header and the line."""
    body = [list(r) for r in rows]
    widths = [_width(h) for h in headers]
    for row in body:
        for i, cell in enumerate(row):
            widths[i] = max(widths[i], _width(cell))

    def line(cells: Sequence[str]) -> str:
        parts = []
        last = len(cells) - 1
        for i, cell in enumerate(cells):
            pad = "" if i == last else " " * (widths[i] - _width(cell) + 2)
            parts.append(f" {cell}{pad}")
        return "".join(parts)

    out = []
    if header:
        out.append(line(headers))
        out.append("-" * sum(w + 3 for w in widths))
    out.extend(line(r) for r in body)
    return "\n".join(out)


def info_block(pairs: Iterable[tuple[str, str]]) -> str:
    """``Name:           value`` lines, the label padded to 15 as virsh does."""
    return "\n".join(f"{label + ':':<15} {value}" for label, value in pairs)


def pretty_size(n: int) -> str:
    """``5.00 GiB``: virsh's vshPrettyCapacity."""
    from virtstore.xml.units import format_size_human

    value, unit = format_size_human(n)
    return f"{value:.2f} {unit}"


def yes_no(value: bool) -> str:
    return "yes" if value else "no"


def parse_scaled(text: str, what: str = "size") -> int:
    """A size as virsh's scaled integers take it (``virtstore.xml.units.parse_scaled``)."""
    from virtstore.xml.units import parse_scaled as parse

    return parse(text, what)
