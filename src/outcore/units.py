"""Byte quantities as people write them: "2GiB", "512MiB", "1.5GB", 4096."""
from __future__ import annotations

import math
import operator
import re

from .errors import OutcoreError

_UNITS = {
    "": 1, "b": 1,
    "k": 1000, "kb": 1000, "m": 1000**2, "mb": 1000**2, "g": 1000**3, "gb": 1000**3,
    "t": 1000**4, "tb": 1000**4, "p": 1000**5, "pb": 1000**5,
    "kib": 1024, "mib": 1024**2, "gib": 1024**3, "tib": 1024**4, "pib": 1024**5,
}
_PATTERN = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([a-zA-Z]*)\s*$")


def parse_bytes(value: int | float | str) -> int:
    """Return a byte count from an int, a whole float (2e9), or a string such as "6GiB"
    or "1.5 GB". A number is bytes: 1.5 is refused rather than read as 1 byte (the
    caller most likely meant a unit)."""
    if isinstance(value, bool):
        raise OutcoreError(f"expected a byte quantity such as 2147483648 or '2GiB', got {value!r}")
    if not isinstance(value, (int, float, str)):
        try:
            value = operator.index(value)      # numpy's and torch's integer scalars
        except TypeError:
            # (Its repr cut short: a model passed where the budget goes printed whole.)
            shown = repr(value).split("\n", 1)[0][:60]
            raise OutcoreError(
                f"cannot read a {type(value).__name__} ({shown}) as a byte quantity: "
                "write a number of bytes or a number with a unit, e.g. '512MiB', '6GiB', "
                "'1.5GB' (OutOfCore's first argument is the budget)") from None
    if isinstance(value, (int, float)):
        _require_finite(value, value)
        if value < 0:
            raise OutcoreError(f"a byte quantity cannot be negative, got {value!r}")
        if isinstance(value, float) and not value.is_integer():
            raise OutcoreError(
                f"{value!r} is not a whole number of bytes: a number is read as bytes, so "
                f"write the unit in a string, e.g. '{value:g}GB' or '{value:g}GiB', or give "
                "an integer number of bytes")
        return int(value)
    if isinstance(value, str):
        if value.strip().startswith("-"):
            raise OutcoreError(f"a byte quantity cannot be negative, got {value!r}")
        match = _PATTERN.match(value)
        if match and re.fullmatch(r"[KMGTP]i?b", match.group(2)):
            # Megabits, as network speeds are written (helper-130: "12 Mb" was read as
            # 12 MB), and mebibits ("4Mib" was read as 4 MiB: helper-152): a byte
            # quantity is asked for.
            prefix, binary = match.group(2)[0], "i" in match.group(2)
            name = {"K": "kilo", "M": "mega", "G": "giga", "T": "tera", "P": "peta"}[prefix]
            name = name[:2] + "bi" if binary else name
            raise OutcoreError(
                f"{value!r} reads as {name}bits (a lowercase b is a bit): write bytes, e.g. "
                f"'{match.group(1)}{prefix}B' or '{match.group(1)}{prefix}iB'")
        if match and match.group(2).lower() in _UNITS:
            number = float(match.group(1)) * _UNITS[match.group(2).lower()]
            _require_finite(number, value)
            if _UNITS[match.group(2).lower()] == 1 and not number.is_integer():
                raise OutcoreError(
                    f"{value!r} is not a whole number of bytes: write the unit, e.g. "
                    f"'{match.group(1)}GB' or '{match.group(1)}GiB', or an integer number of bytes")
            return round(number)
    raise OutcoreError(
        f"cannot read {value!r} as a byte quantity: write a number of bytes or a number "
        "with a unit, e.g. '512MiB', '6GiB', '1.5GB'")


def parse_budget(value: int | float | str, where: str = "the budget",
                 floor: int = 2**16) -> int:
    """parse_bytes for a fast tier's budget, where a bare number is read as bytes: one
    under `floor`, 64 KiB ("--budget 16", budget=2), is refused, since no training step
    runs in it and the user almost surely left out the unit (16GiB? 16MiB?). A string
    with a unit, "8B" or "300KiB", is taken as written. (64 KiB: a computed budget, a
    fraction of a small model's peak, is a bare number too, and below it no storage would
    move; OutOfCore lowers `floor` to its min_move_bytes, where storages that small move,
    so that smallest_budget's figure for them is taken as it is: helper-209.)"""
    n = parse_bytes(value)
    match = _PATTERN.match(value) if isinstance(value, str) else None
    bare = not isinstance(value, str) or (match is not None and not match.group(2))
    if bare and 0 < n < floor:
        raise OutcoreError(
            f"{where} {value!r} is read as {n} bytes, less than a storage worth moving "
            f"({format_bytes(floor)}): write the unit, e.g. '{value}GiB' or '{value}MiB', or "
            f"'{value}B' where you do mean bytes")
    return n


def _require_finite(number, value) -> None:
    if not math.isfinite(number):
        raise OutcoreError(f"{value!r} is not a finite byte quantity: write a number of bytes or a "
                           "number with a unit, e.g. '512MiB', '6GiB', '1.5GB'")


def count(n: int, noun: str, plural: str | None = None) -> str:
    """`n` and the noun in its number: count(1, "trim") -> '1 trim', count(2, "trim")
    -> '2 trims'."""
    return f"{n} {noun if n == 1 else plural or noun + 's'}"


def exact_bytes(n: int) -> str:
    """Bytes as an error states a budget to pass: the binary unit and, from 1 KiB on, the
    exact count, e.g. 1536 -> '1.50 KiB (1,536 B)', 1000 -> '1000 B'."""
    short = format_bytes(n)
    return short if abs(n) < 1024 else f"{short} ({int(n):,} B)"


def format_bytes(n: int | float) -> str:
    """Render bytes with a binary unit, e.g. 1536 -> '1.50 KiB'."""
    n = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{int(n)} B" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")
