"""Checks on names that become file names or device names."""

from __future__ import annotations

import uuid as uuidlib

from virtstore.errors import InvalidArgument

MAX_NAME_BYTES = 255


def check_name(name: str, what: str) -> str:
    """Refuse names that could escape a pool or confuse a tool: '/', NUL, control
    characters, '.', '..', a leading '-', or more than 255 bytes."""
    if not name:
        raise InvalidArgument(f"{what} name must not be empty")
    if "/" in name:
        raise InvalidArgument(f"{what} name '{name}' cannot contain '/'")
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in name):
        raise InvalidArgument(f"{what} name {name!r} cannot contain control characters")
    if name in (".", ".."):
        raise InvalidArgument(f"{what} name '{name}' is not allowed")
    if name.startswith("-"):
        raise InvalidArgument(f"{what} name '{name}' cannot start with '-'")
    if len(name.encode("utf-8", "surrogatepass")) > MAX_NAME_BYTES:
        raise InvalidArgument(f"{what} name is longer than {MAX_NAME_BYTES} bytes")
    return name


def check_uuid(value: str) -> str:
    try:
        return str(uuidlib.UUID(value))
    except ValueError:
        raise InvalidArgument(f"invalid UUID '{value}'") from None
