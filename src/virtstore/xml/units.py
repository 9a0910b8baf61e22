"""Scaled sizes as libvirt reads them (virScaleInteger) and as virsh prints them."""

from __future__ import annotations

from virtstore.errors import InvalidArgument, XMLError

UINT64_MAX = 2**64 - 1
INT64_MAX = 2**63 - 1  # off_t is signed: libvirt caps capacity and allocation here

_POWERS = {"k": 1, "m": 2, "g": 3, "t": 4, "p": 5, "e": 6}
# strtoull: optional leading whitespace and '+', then decimal digits; nothing after.
_UNSIGNED = r"[ \t\n\v\f\r]*\+?([0-9]+)"


def unit_scale(unit: str | None) -> int:
    """Bytes per unit. Case-insensitive; 'K'/'KiB' are 1024, 'KB' is 1000, as libvirt."""
    if not unit:
        return 1
    low = unit.lower()
    if low in ("b", "byte", "bytes"):
        return 1
    power = _POWERS.get(low[0])
    if power is not None:
        rest = low[1:]
        if rest in ("", "ib"):
            return int(1024**power)
        if rest == "b":
            return int(1000**power)
    raise XMLError(f"unknown suffix '{unit}'")


def parse_size(value: str, unit: str | None, *, limit: int = UINT64_MAX,
               element: str = "capacity") -> int:
    """Exact byte count of ``value`` in ``unit``; negatives, junk and overflow are refused.

    ``element`` names the XML element in the message ("malformed capacity element");
    ``limit`` is the largest byte count accepted.
    """
    import re  # here: a command that only prints sizes need not load re (and enum)

    match = re.fullmatch(_UNSIGNED, value)
    if match is None:
        raise XMLError(f"malformed {element} element")
    number = int(match.group(1))
    if number > UINT64_MAX:
        raise XMLError(f"malformed {element} element")
    scale = unit_scale(unit)
    if number and number > limit // scale:
        raise XMLError(f"value too large: {number}{unit or ''}")
    return number * scale


_HUMAN_UNITS = ("B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB")


def format_size_human(n: int) -> tuple[float, str]:
    """virsh's vshPrettyCapacity: the value and unit it prints as "%.2lf %s"."""
    if n < 0:
        raise ValueError("size cannot be negative")
    limit = 1024
    for unit in _HUMAN_UNITS[:-1]:
        if n < limit:
            return n / (limit // 1024), unit
        limit *= 1024
    return n / (limit // 1024), _HUMAN_UNITS[-1]


def parse_scaled(text: str, what: str = "size") -> int:
    """A size as virsh's scaled integers take it: ``100`` bytes, ``10G``/``10GiB``
    (powers of 1024), ``10GB`` (powers of 1000), suffix case-insensitive; no sign,
    no fraction. Raises InvalidArgument("Malformed size -5G") like virsh."""
    import re

    m = re.fullmatch(r"([0-9]+)\s*([A-Za-z]*)", text)
    if m is None:
        raise InvalidArgument(f"Malformed {what} {text}")
    number, suffix = m.groups()
    try:
        return parse_size(number, suffix or None)
    except (InvalidArgument, ValueError) as err:
        raise InvalidArgument(f"Malformed {what} {text}: {err}") from None


def size_arg(value: int | str, what: str = "size") -> int:
    """A size given to the Python API: bytes as an int, or virsh's scaled integer."""
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise InvalidArgument(f"{what} must be an int or a size such as '10G', "
                              f"not {type(value).__name__}")
    if isinstance(value, str):
        return parse_scaled(value.strip(), what)
    if value < 0:
        raise InvalidArgument(f"Malformed {what} {value}")
    return value
