"""The one check of a user-given number, for method configs, rank allocators and compressors alike,
so that every field and argument is refused the same way and NaN and infinity never get through."""

from __future__ import annotations

import math
from typing import Any


def check_number(
    owner: str,
    name: str,
    value: Any,
    low: float | None = None,
    high: float | None = None,
    *,
    low_open: bool = False,
    high_open: bool = False,
    integer: bool = False,
) -> None:
    """Raise ``ValueError`` unless ``value`` is a finite number (an integer if ``integer``) within the bounds.

    NaN and ±inf are refused first: every comparison with NaN is false, so a check written as
    ``value < low`` would let it through. A bool is not a number here.

    Args:
        owner: who takes the value (a config class, an allocator, a compressor); the message starts with it.
        name: the field or argument, shown as ``name=value``.
        low, high: the bounds, each optional; inclusive unless ``low_open`` / ``high_open``.
        integer: the value must be an ``int``.

    Raises:
        ValueError: ``"<owner>: <name>=<value> must be ..."`` with what is allowed.
    """
    is_number = isinstance(value, int if integer else (int, float)) and not isinstance(value, bool)
    # An int needs no finiteness check (and math.isfinite overflows on a huge one).
    finite = is_number and (isinstance(value, int) or math.isfinite(value))
    if finite and _within(value, low, high, low_open, high_open):
        return
    kind = "an integer" if integer else "" if finite else "a finite number"
    allowed = " ".join(part for part in (kind, _interval(low, high, low_open, high_open)) if part)
    raise ValueError(f"{owner}: {name}={value!r} must be {allowed}")


def _within(value: float, low: float | None, high: float | None, low_open: bool, high_open: bool) -> bool:
    above = low is None or (value > low if low_open else value >= low)
    below = high is None or (value < high if high_open else value <= high)
    return above and below


def _interval(low: float | None, high: float | None, low_open: bool, high_open: bool) -> str:
    if low is not None and high is not None:
        return f"in {'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
    if low is not None:
        return f"{'>' if low_open else '>='} {low}"
    if high is not None:
        return f"{'<' if high_open else '<='} {high}"
    return ""
