"""Checks on names that become file names or device names."""

from __future__ import annotations

import uuid as uuidlib

from virtstore.errors import InvalidArgument

MAX_NAME_BYTES = 255
# Names the backends keep for their own files, which listings hide: staging and snapshot
# files in file pools (".virtstore-staging-", ".virtstore-snap-", btrfs's
# ".virtstore-snapshots"), staging LVs, partitions and zvols ("virtstore-staging-"), and
# rbd's private images and snapshots ("virtstore-").
PRIVATE_PREFIXES = (".virtstore-", "virtstore-")


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


def check_volume_name(name: str, what: str = "volume") -> str:
    """check_name, and not a name of the backends' own hidden files: such a volume would
    be made and then never listed."""
    check_name(name, what)
    for prefix in PRIVATE_PREFIXES:
        if name.startswith(prefix):
            raise InvalidArgument(f"{what} name '{name}' cannot start with '{prefix}': "
                                  "names with that prefix are reserved for virtstore's own "
                                  "files")
    return name


def check_uuid(value: str) -> str:
    try:
        return str(uuidlib.UUID(value))
    except ValueError:
        raise InvalidArgument(f"invalid UUID '{value}'") from None
