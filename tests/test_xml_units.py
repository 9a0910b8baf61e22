"""Scaled sizes: every unit libvirt accepts, exactly, and virsh's human-readable sizes."""

from __future__ import annotations

import pytest

from virtstore.errors import XMLError
from virtstore.xml import format_size_human, parse_size
from virtstore.xml.units import INT64_MAX, UINT64_MAX

K, M, G, T, P, E = (1024**n for n in range(1, 7))

UNITS = [
    (None, 1), ("", 1), ("b", 1), ("B", 1), ("byte", 1), ("bytes", 1), ("BYTES", 1),
    ("Byte", 1),
    ("k", K), ("K", K), ("KiB", K), ("kib", K), ("KB", 1000), ("kb", 1000), ("kB", 1000),
    ("M", M), ("m", M), ("MiB", M), ("MB", 1000**2),
    ("G", G), ("g", G), ("GiB", G), ("GIB", G), ("GB", 1000**3),
    ("T", T), ("TiB", T), ("TB", 1000**4),
    ("P", P), ("PiB", P), ("PB", 1000**5),
    ("E", E), ("EiB", E), ("EB", 1000**6),
]


@pytest.mark.parametrize("unit,scale", UNITS)
def test_every_unit(unit: str | None, scale: int) -> None:
    assert parse_size("1", unit) == scale
    assert parse_size("7", unit) == 7 * scale
    assert parse_size("0", unit) == 0


def test_exact_integer_arithmetic() -> None:
    # Floats would lose the low digits here.
    assert parse_size("9007199254740993", "b") == 9007199254740993
    assert parse_size("15", "EiB") == 15 * 2**60
    assert parse_size("18446744073709551615", None) == UINT64_MAX
    assert parse_size("16", "EiB", limit=UINT64_MAX + 1) == 2**64


@pytest.mark.parametrize("value,unit", [
    ("16", "EiB"), ("18446744073709551616", None), ("17", "E"), ("19", "EB"),
    ("18446744073709551615", "K"),
])
def test_overflow_is_refused(value: str, unit: str | None) -> None:
    with pytest.raises(XMLError) as info:
        parse_size(value, unit)
    assert "\n" not in str(info.value)


def test_limit_is_libvirt_message() -> None:
    with pytest.raises(XMLError, match=r"^value too large: 8EiB$"):
        parse_size("8", "EiB", limit=INT64_MAX)
    assert parse_size("7", "EiB", limit=INT64_MAX) == 7 * E


@pytest.mark.parametrize("value", ["-1", "-0", "1.5", "1e3", "", " ", "0x10", "10 ", "ten",
                                   "1G", "１"])
def test_malformed_numbers(value: str) -> None:
    with pytest.raises(XMLError, match=r"^malformed capacity element$"):
        parse_size(value, None)


def test_leading_whitespace_and_plus_as_strtoull() -> None:
    assert parse_size(" 5", None) == 5
    assert parse_size("+5", "K") == 5 * K


@pytest.mark.parametrize("unit", ["KiBB", "Ki", "kilobytes", "X", "iB", "bb", "GiBs",
                                  "Z", "ZiB", "%"])
def test_unknown_units(unit: str) -> None:
    with pytest.raises(XMLError, match=f"^unknown suffix '{unit}'$"):
        parse_size("1", unit)


def test_element_name_in_message() -> None:
    with pytest.raises(XMLError, match=r"^malformed allocation element$"):
        parse_size("x", None, element="allocation")


@pytest.mark.parametrize("n,value,unit", [
    (0, 0.0, "B"), (1023, 1023.0, "B"), (1024, 1.0, "KiB"), (1536, 1.5, "KiB"),
    (M - 1, (M - 1) / K, "KiB"), (M, 1.0, "MiB"), (5 * G, 5.0, "GiB"),
    (T, 1.0, "TiB"), (3 * P, 3.0, "PiB"), (E, 1.0, "EiB"), (UINT64_MAX, 16.0, "EiB"),
])
def test_format_size_human(n: int, value: float, unit: str) -> None:
    got_value, got_unit = format_size_human(n)
    assert got_unit == unit
    assert got_value == pytest.approx(value)


def test_format_size_human_as_virsh_prints() -> None:
    value, unit = format_size_human(5 * G)
    assert f"{value:.2f} {unit}" == "5.00 GiB"
    value, unit = format_size_human(0)
    assert f"{value:.2f} {unit}" == "0.00 B"
