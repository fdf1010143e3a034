"""Durations and sizes as people write them next to Collector configs: ``500ms``, ``2m``,
``64MiB``. One parser for every flag and environment variable that takes one."""

from __future__ import annotations

import math
import re
from typing import Final

__all__ = ["parse_duration", "parse_size"]

_DURATION_UNITS: Final = {
    "ns": 1e-9,
    "us": 1e-6,
    "µs": 1e-6,
    "ms": 1e-3,
    "s": 1.0,
    "m": 60.0,
    "h": 3600.0,
}
_SIZE_UNITS: Final = {
    "b": 1,
    "kb": 1000,
    "mb": 1000**2,
    "gb": 1000**3,
    "tb": 1000**4,
    "kib": 1 << 10,
    "mib": 1 << 20,
    "gib": 1 << 30,
    "tib": 1 << 40,
}
_NUMBER: Final = r"(\d+(?:\.\d*)?|\.\d+)"
_DURATION_PART: Final = re.compile(_NUMBER + r"\s*(ns|us|µs|ms|s|m|h)")
_BARE: Final = re.compile(_NUMBER)
_SIZE: Final = re.compile(_NUMBER + r"\s*([kmgt]i?b|b)?", re.IGNORECASE)


def parse_duration(text: str, *, bare_unit: str = "s") -> float:
    """Seconds in ``text``: ``500ms``, ``30s``, ``2m``, ``1h``, ``1.5s``, ``1m30s`` (Go and
    Collector style), or a bare number in ``bare_unit`` (``"s"`` or ``"ms"``).

    Raises ``ValueError`` naming the value for anything else (negative, NaN, no number).
    """
    if bare_unit not in _DURATION_UNITS:
        raise ValueError(f"bare_unit must be one of {', '.join(_DURATION_UNITS)}")
    value = text.strip()
    if _BARE.fullmatch(value):
        return float(value) * _DURATION_UNITS[bare_unit]
    parts = list(_DURATION_PART.finditer(value))
    if not parts or "".join(p.group(0) for p in parts).replace(" ", "") != value.replace(" ", ""):
        raise ValueError(
            f"{text!r} is not a duration: write a number with a unit (500ms, 30s, 2m, 1h), "
            f"or a bare number of {'seconds' if bare_unit == 's' else bare_unit}"
        )
    seconds = math.fsum(float(p.group(1)) * _DURATION_UNITS[p.group(2)] for p in parts)
    if not math.isfinite(seconds):
        raise ValueError(f"{text!r} is not a finite duration")
    return seconds


def parse_size(text: str) -> int:
    """Bytes in ``text``: ``64MiB``, ``1GiB``, ``512KB`` (KB, MB, GB: powers of 1000; KiB,
    MiB, GiB: powers of 1024; case-insensitive) or a bare number of bytes (``1000``).

    Raises ``ValueError`` naming the value for anything else, or a fraction of a byte.
    """
    match = _SIZE.fullmatch(text.strip())
    if match is None:
        raise ValueError(
            f"{text!r} is not a size: write bytes (1000) or a number with a unit "
            "(512KB, 64MiB, 1GiB)"
        )
    number, unit = match.group(1), (match.group(2) or "b").lower()
    exact = float(number) * _SIZE_UNITS[unit]
    if not math.isfinite(exact) or exact != int(exact):
        raise ValueError(f"{text!r} is not a whole number of bytes")
    return int(exact)
