"""Hardened XML parsing: every document virtstore reads from a user goes through here.

Documents come from CLI files, the REST API and pool directories, so they are treated
as hostile: no DTDs, no entities beyond the five predefined ones, no network, bounded
size and depth, UTF-8 only.
"""

from __future__ import annotations

import re

from virtstore.errors import XMLError

TYPE_CHECKING = False
if TYPE_CHECKING:
    from lxml import etree

MAX_DOCUMENT_BYTES = 1024 * 1024
MAX_DEPTH = 64

_DECL = re.compile(rb"<\?xml\s[^>]*?encoding\s*=\s*[\"']([A-Za-z0-9._-]+)[\"']")
_ALLOWED_ENCODINGS = frozenset({"utf-8", "utf8", "us-ascii", "ascii"})
_MARKUP_DECL = re.compile(rb"<!(DOCTYPE|ENTITY|ELEMENT|ATTLIST|NOTATION)\b")


def _parser() -> etree.XMLParser:
    # lxml is loaded when a document is parsed, not by the modules that only format.
    from lxml import etree

    # A fresh parser each time: lxml parsers keep error state and are not thread-safe.
    return etree.XMLParser(
        resolve_entities=False,
        no_network=True,
        load_dtd=False,
        dtd_validation=False,
        huge_tree=False,
        remove_pis=True,
        encoding="utf-8",
    )


def _one_line(text: str) -> str:
    return " ".join(text.split())


def _to_bytes(text: str | bytes) -> bytes:
    if isinstance(text, str):
        try:
            return text.encode("utf-8")
        except UnicodeEncodeError as exc:  # lone surrogates
            raise XMLError("document is not valid UTF-8") from exc
    if isinstance(text, (bytes, bytearray, memoryview)):
        return bytes(text)
    raise XMLError(f"expected an XML document, got {type(text).__name__}")


def _check_raw(data: bytes) -> bytes:
    if len(data) > MAX_DOCUMENT_BYTES:
        raise XMLError(
            f"document too large: {len(data)} bytes (limit {MAX_DOCUMENT_BYTES})")
    if not data.strip():
        raise XMLError("empty XML document")
    if b"\x00" in data:
        raise XMLError("document contains a NUL byte")
    if data.startswith(b"\xef\xbb\xbf"):
        data = data[3:]
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise XMLError(f"document is not valid UTF-8 (byte offset {exc.start})") from exc
    decl = _DECL.match(data.lstrip())
    if decl is not None:
        encoding = decl.group(1).decode("ascii").lower()
        if encoding not in _ALLOWED_ENCODINGS:
            raise XMLError(f"unsupported document encoding '{decl.group(1).decode()}'")
    found = _MARKUP_DECL.search(data)
    if found is not None:
        raise XMLError(f"<!{found.group(1).decode()}> is not allowed in documents")
    return data


def _check_tree(root: etree._Element) -> None:
    from lxml import etree

    tree = root.getroottree()
    docinfo = tree.docinfo
    if getattr(docinfo, "doctype", "") or docinfo.internalDTD is not None:
        raise XMLError("DOCTYPE is not allowed in documents")
    stack: list[tuple[etree._Element, int]] = [(root, 1)]
    while stack:
        node, depth = stack.pop()
        if depth > MAX_DEPTH:
            raise XMLError(f"document nesting deeper than {MAX_DEPTH} levels")
        for child in node:
            if isinstance(child, etree._Entity):
                raise XMLError(f"entity reference {child.text} is not allowed")
            stack.append((child, depth + 1))


def parse_document(text: str | bytes, root: str, label: str) -> etree._Element:
    """Parse a hostile document and return its root, which must be named ``root``.

    ``label`` is libvirt's name for the document in syntax errors, e.g.
    ``(storage_pool_definition)``.
    """
    from lxml import etree

    data = _check_raw(_to_bytes(text))
    try:
        element = etree.fromstring(data, _parser())
    except etree.XMLSyntaxError as exc:
        line = exc.lineno if exc.lineno else 0
        message = exc.msg or str(exc)
        # lxml appends "(<string>, line N)"; libvirt puts the line first instead.
        message = re.sub(r",? \(<string>, line \d+\)$", "", message)
        message = re.sub(r", line \d+, column \d+$", "", message)
        raise XMLError(_one_line(f"{label}:{line}: {message}")) from exc
    _check_tree(element)
    if element.tag != root:
        raise XMLError(f"unexpected root element <{element.tag}>, expecting <{root}>")
    return element
