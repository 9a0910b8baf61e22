"""Value parsers shared by the pool, volume and secret documents, with libvirt's rules."""

from __future__ import annotations

from virtstore.errors import XMLError

TYPE_CHECKING = False
if TYPE_CHECKING:
    from lxml import etree

NAME_MAX_BYTES = 255


def text_of(node: etree._Element | None, path: str) -> str | None:
    """XPath ``string(path)`` as libvirt reads it: an empty result counts as absent."""
    if node is None:
        return None
    found = node.find(path)
    if found is None:
        return None
    return string_value(found) or None


def string_value(node: etree._Element) -> str:
    """XPath ``string()`` of an element: its text nodes in document order, without
    comments and processing instructions; an XPath evaluation costs 5x more."""
    # lxml yields str in Python 3; its stubs say str | bytes.
    return "".join(node.itertext())  # type: ignore[arg-type]


def attr_of(node: etree._Element | None, path: str, attr: str) -> str | None:
    """``string(path/@attr)`` with the same empty-is-absent rule (path '.' for node)."""
    if node is None:
        return None
    found = node if path == "." else node.find(path)
    if found is None:
        return None
    value = found.get(attr)
    return value or None


def shown(value: str) -> str:
    """A value made safe for a one-line error message: control characters escaped."""
    return "".join(c if c.isprintable() else f"\\x{ord(c):02x}" for c in value)


def check_name(name: str, what: str) -> str:
    """Refuse names that cannot be a file, LV or image name, or that look like options.

    ``what`` is "pool" or "volume". libvirt itself refuses only '/' (and '.', '..' for
    volumes); virtstore refuses the rest at parse time so no backend ever sees them.
    """
    if "/" in name:
        if what == "pool":
            raise XMLError(f"name {shown(name)} cannot contain '/'")
        raise XMLError(f"volume name '{shown(name)}' cannot contain '/'")
    if any(not c.isprintable() for c in name):
        raise XMLError(f"{what} name '{shown(name)}' cannot contain control or "
                       "non-printable characters")
    if name in (".", ".."):
        raise XMLError(f"{what} name '{name}' is not allowed")
    if len(name.encode("utf-8")) > NAME_MAX_BYTES:
        raise XMLError(f"{what} name is longer than {NAME_MAX_BYTES} bytes")
    if name.startswith("-"):
        raise XMLError(f"{what} name '{shown(name)}' cannot start with '-'")
    return name


_HEX = frozenset("0123456789abcdefABCDEF")


def parse_uuid(value: str) -> str | None:
    """libvirt's liberal virUUIDParse: 32 hex digits, '-' or ' ' between pairs,
    surrounding whitespace. Returns the canonical lowercase form, or None if invalid."""
    text = value.lstrip(" \t\n\v\f\r")
    digits: list[str] = []
    pos = 0
    while len(digits) < 32:
        if pos >= len(text):
            return None
        ch = text[pos]
        if ch in "- ":
            pos += 1
            continue
        pair = text[pos:pos + 2]
        if len(pair) < 2 or pair[0] not in _HEX or pair[1] not in _HEX:
            return None
        digits.extend(pair.lower())
        pos += 2
    if text[pos:].strip(" \t\n\v\f\r"):
        return None
    h = "".join(digits)
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


def sanitize_path(path: str) -> str:
    """virFileSanitizePath: collapse repeated '/', drop a trailing '/', keep a leading
    '//' (POSIX allows it to mean something else) but not '///'."""
    if path.startswith("//") and not path.startswith("///"):
        head, rest = "//", path[2:]
    else:
        head, rest = "", path
    import re  # here: printing a document needs none of the parsers' patterns

    cleaned = re.sub(r"/+", "/", rest)
    if len(head + cleaned) > 1 and cleaned.endswith("/"):
        cleaned = cleaned[:-1]
    return head + cleaned


_SIGNED = r"[ \t\n\v\f\r]*([+-]?[0-9]+)"


def parse_int(value: str, base: int = 10) -> int | None:
    """strtol-like: leading whitespace and sign allowed, nothing after the digits."""
    import re

    match = re.fullmatch(_SIGNED, value)
    if match is None:
        return None
    try:
        return int(match.group(1), base)
    except ValueError:
        return None


def parse_c_uint(value: str) -> int | None:
    """strtoul with base 0 (decimal, 0x hex or leading-0 octal), unsigned only."""
    import re

    text = value.lstrip(" \t\n\v\f\r").removeprefix("+")
    try:
        if re.fullmatch(r"0[xX][0-9a-fA-F]+", text):
            return int(text, 16)
        if re.fullmatch(r"0[0-7]*", text):
            return int(text, 8)
        if re.fullmatch(r"[1-9][0-9]*", text):
            return int(text, 10)
    except ValueError:
        return None
    return None


def parse_yes_no(node: etree._Element, attr: str) -> bool | None:
    """virXMLPropTristateBool: absent is None, otherwise exactly 'yes' or 'no'."""
    value = node.get(attr)
    if value is None:
        return None
    if value == "yes":
        return True
    if value == "no":
        return False
    raise XMLError(f"Invalid value for attribute '{attr}' in element '{node.tag}': "
                   f"'{shown(value)}'. Expected 'yes' or 'no'")


def yes_no(value: bool) -> str:
    return "yes" if value else "no"
