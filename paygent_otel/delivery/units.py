"""Durations and sizes as people write them: ``30s``, ``500ms``, ``2m``, ``1h30m``, ``64MiB``.

One parser for every flag (and environment variable) that takes a duration or a size, so
``--flush-timeout 2m`` and ``--spool-max-bytes 64MiB`` read the same everywhere. A bare
number keeps the unit the option always had (``bare_unit``), so existing values go on
working. Errors are :class:`ValueError` naming the text and the units accepted.
"""

from __future__ import annotations

import argparse
import math
import re
from collections.abc import Callable
from datetime import UTC, datetime, tzinfo
from typing import Final, TypeVar

__all__ = [
    "DURATION_UNITS",
    "SIZE_UNITS",
    "duration_type",
    "flag_type",
    "parse_duration",
    "parse_instant",
    "parse_size",
    "size_type",
]

DURATION_UNITS: Final = {
    "ns": 1e-9,
    "us": 1e-6,
    "µs": 1e-6,
    "ms": 1e-3,
    "s": 1.0,
    "m": 60.0,
    "min": 60.0,
    "h": 3600.0,
    "d": 86_400.0,
}
"""Duration suffixes and their length in seconds (``m`` is minutes, as in Go and Prometheus)."""

SIZE_UNITS: Final = {
    "b": 1,
    "k": 1000,
    "kb": 1000,
    "kib": 1 << 10,
    "m": 1000**2,
    "mb": 1000**2,
    "mib": 1 << 20,
    "g": 1000**3,
    "gb": 1000**3,
    "gib": 1 << 30,
    "t": 1000**4,
    "tb": 1000**4,
    "tib": 1 << 40,
}
"""Size suffixes (case-insensitive) in bytes: ``KB``/``MB``/``GB`` are powers of 1000,
``KiB``/``MiB``/``GiB`` powers of 1024."""

_T = TypeVar("_T")

_NUMBER = r"(?:\d+(?:\.\d*)?|\.\d+)"
_DURATION_PART = re.compile(rf"({_NUMBER})\s*([a-zµ]*)", re.IGNORECASE)
_SIZE = re.compile(rf"({_NUMBER})\s*([a-z]*)", re.IGNORECASE)


def parse_duration(text: str, *, bare_unit: str = "s") -> float:
    """Seconds in ``text``: ``"30s"``, ``"500ms"``, ``"2m"``, ``"1h30m"``, ``"1.5"``.

    A number without a unit is in ``bare_unit`` (one of :data:`DURATION_UNITS`). Negative,
    infinite and unknown values raise :class:`ValueError`.
    """
    if bare_unit not in DURATION_UNITS:
        raise ValueError(f"bare_unit {bare_unit!r} is not one of {', '.join(DURATION_UNITS)}")
    compact = text.strip().replace(" ", "")
    if not compact:
        raise ValueError(f"{text!r} is not a duration; write for example 30s, 500ms, 2m or 1h30m")
    seconds = 0.0
    position = 0
    parts = 0
    while position < len(compact):
        match = _DURATION_PART.match(compact, position)
        if match is None or match.end() == position:
            break
        number, unit = match.groups()
        unit = unit.lower()
        if not unit and (parts or match.end() != len(compact)):
            break  # "1h30" is ambiguous; a bare number stands alone
        factor = DURATION_UNITS.get(unit or bare_unit)
        if factor is None:
            break
        seconds += float(number) * factor
        position = match.end()
        parts += 1
    if position != len(compact) or not parts:
        raise ValueError(
            f"{text!r} is not a duration; write a number with a unit "
            f"({', '.join(DURATION_UNITS)}), such as 30s, 500ms, 2m or 1h30m "
            f"(a bare number is in {bare_unit})"
        )
    if not math.isfinite(seconds):
        raise ValueError(f"{text!r} is not a finite duration")
    return seconds


def parse_size(text: str) -> int:
    """Bytes in ``text``: ``"64MiB"``, ``"1GB"``, ``"512k"``, ``"1048576"`` (bare = bytes).

    Fractions are allowed when they make whole bytes (``"1.5GiB"``); negative, fractional
    byte counts and unknown units raise :class:`ValueError`.
    """
    match = _SIZE.fullmatch(text.strip())
    factor = SIZE_UNITS.get(match.group(2).lower() or "b") if match else None
    if match is None or factor is None:
        raise ValueError(
            f"{text!r} is not a size; write bytes or a number with a unit "
            "(KB, MB, GB = 1000s; KiB, MiB, GiB = 1024s), such as 64MiB or 1GB"
        )
    size = float(match.group(1)) * factor
    if size != int(size):
        raise ValueError(f"{text!r} is not a whole number of bytes")
    return int(size)


def flag_type(parse: Callable[[str], _T]) -> Callable[[str], _T]:
    """An argparse ``type=`` from a parser: its ``ValueError`` becomes a usage error that
    names the flag and the value (exit status 2)."""

    def parse_flag(text: str) -> _T:
        try:
            return parse(text)
        except ValueError as exc:
            message = str(exc)
            raise argparse.ArgumentTypeError(
                message if repr(text) in message else f"{text!r}: {message}"
            ) from None

    return parse_flag


def duration_type(*, bare_unit: str = "s", minimum: float = 0.0) -> Callable[[str], float]:
    """An argparse ``type=`` for durations: seconds as a float (at least ``minimum``)."""

    def duration(text: str) -> float:
        seconds = parse_duration(text, bare_unit=bare_unit)
        if seconds < minimum:
            raise ValueError(f"{text!r} is shorter than the minimum {minimum:g} s")
        return seconds

    return flag_type(duration)


def size_type(*, minimum: int = 0) -> Callable[[str], int]:
    """An argparse ``type=`` for sizes: bytes as an int (at least ``minimum``)."""

    def size(text: str) -> int:
        value = parse_size(text)
        if value < minimum:
            raise ValueError(f"{text!r} is less than the minimum {minimum} bytes")
        return value

    return flag_type(size)


def parse_instant(text: str, *, now: float, tz: tzinfo = UTC) -> float:
    """Unix seconds for ``text``: an ISO date or time (``2026-11-30``, ``2026-11-30T14:00``,
    ``...Z`` or ``...+01:00``; without an offset it is in ``tz``) or a duration ago
    (``2h``, ``7d``, ``30m``: that long before ``now``)."""
    stripped = text.strip()
    try:
        moment = datetime.fromisoformat(stripped)
    except ValueError:
        try:
            return now - parse_duration(stripped)
        except ValueError:
            raise ValueError(
                f"{text!r} is neither a time (2026-11-30, 2026-11-30T14:00, 2026-11-30T14:00Z)"
                " nor a duration ago (30m, 2h, 7d)"
            ) from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=tz)
    return moment.timestamp()
