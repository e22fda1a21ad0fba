"""Parsing of durations, sizes, rates and fractions written with units in scenarios.

Each parser takes a YAML scalar (str, int or float) and returns a number in base units
(seconds, bytes, per-second, fraction 0..1), or raises ValueError with a message meant for
the user ("expected a duration like '30s' or '2m'").
"""

from __future__ import annotations

import re

_NUMBER = r"([0-9]+(?:\.[0-9]*)?|\.[0-9]+)"

_DURATION_UNITS = {
    "ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "min": 60.0,
    "h": 3600.0, "d": 86400.0,
}
_SIZE_UNITS = {
    "": 1, "b": 1, "k": 1000, "kb": 1000, "m": 1000**2, "mb": 1000**2, "g": 1000**3, "gb": 1000**3,
    "kib": 1024, "mib": 1024**2, "gib": 1024**3, "tib": 1024**4, "ki": 1024, "mi": 1024**2, "gi": 1024**3,
}
_RATE_UNITS = {"": 1.0, "/s": 1.0, "rps": 1.0, "/m": 1 / 60.0, "/min": 1 / 60.0, "/h": 1 / 3600.0}


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def parse_duration(value: object) -> float:
    """'30s', '1.5m', '250ms', '8h', '1h30m' or a bare number of seconds."""
    if _is_number(value):
        if value < 0:
            raise ValueError(f"duration must not be negative, got {value}")
        return float(value)  # type: ignore[arg-type]
    if not isinstance(value, str):
        raise ValueError(f"expected a duration like '30s' or '2m', got {value!r}")
    text = value.strip().lower()
    parts = re.findall(_NUMBER + r"\s*(ns|us|µs|ms|min|s|m|h|d)", text)
    if not parts or re.sub(_NUMBER + r"\s*(ns|us|µs|ms|min|s|m|h|d)", "", text).strip():
        raise ValueError(f"expected a duration like '30s', '250ms' or '2m', got {value!r}")
    return sum(float(number) * _DURATION_UNITS[unit] for number, unit in parts)


def parse_size(value: object) -> int:
    """'48MiB', '64k', '1GiB' or a bare number of bytes."""
    if _is_number(value):
        if value < 0:
            raise ValueError(f"size must not be negative, got {value}")
        return int(value)  # type: ignore[arg-type]
    if not isinstance(value, str):
        raise ValueError(f"expected a size like '48MiB' or '64KiB', got {value!r}")
    match = re.fullmatch(_NUMBER + r"\s*([a-zA-Z]*)", value.strip())
    if not match or match.group(2).lower() not in _SIZE_UNITS:
        raise ValueError(f"expected a size like '48MiB' or '64KiB', got {value!r}")
    return int(float(match.group(1)) * _SIZE_UNITS[match.group(2).lower()])


def parse_rate(value: object) -> float:
    """Arrivals per second: 1200, '1200/s', '1200rps', '600/m'. Must not be negative."""
    if _is_number(value):
        rate = float(value)  # type: ignore[arg-type]
    elif isinstance(value, str):
        match = re.fullmatch(r"(-?" + _NUMBER[1:] + r"\s*(/s|/m|/min|/h|rps)?", value.strip().lower())
        if not match:
            raise ValueError(f"expected a rate like 1200 or '1200/s', got {value!r}")
        rate = float(match.group(1)) * _RATE_UNITS[match.group(2) or ""]
    else:
        raise ValueError(f"expected a rate like 1200 or '1200/s', got {value!r}")
    if rate < 0:
        raise ValueError(f"rate must not be negative, got {value!r}")
    return rate


def parse_fraction(value: object) -> float:
    """'1%', '0.5%', 0.01 -> a fraction in [0, 1]."""
    if _is_number(value):
        fraction = float(value)  # type: ignore[arg-type]
    elif isinstance(value, str) and re.fullmatch(_NUMBER + r"\s*%", value.strip()):
        fraction = float(value.strip()[:-1]) / 100.0
    else:
        raise ValueError(f"expected a fraction like 0.01 or '1%', got {value!r}")
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"expected a fraction between 0 and 1 (or 0% and 100%), got {value!r}")
    return fraction


def format_duration(seconds: float) -> str:
    if seconds < 1e-3:
        return f"{seconds * 1e6:.0f}µs"
    if seconds < 1:
        return f"{seconds * 1e3:.3g}ms"
    if seconds < 120:
        return f"{seconds:.3g}s"
    if seconds < 7200:
        return f"{seconds / 60:.3g}m"
    return f"{seconds / 3600:.3g}h"


def format_size(nbytes: float) -> str:
    for unit, scale in (("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024)):
        if abs(nbytes) >= scale:
            return f"{nbytes / scale:.3g}{unit}"
    return f"{nbytes:.0f}B"
