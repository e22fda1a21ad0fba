"""Parsing of durations, sizes, rates and fractions written with units in scenarios.

Each parser takes a YAML scalar (str, int or float) and returns a number in base units
(seconds, bytes, per-second, fraction 0..1), or raises ValueError with a message meant for
the user ("expected a duration like '30s' or '2m'").
"""

from __future__ import annotations

import math
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


def _show(value: object) -> str:
    """repr() for messages, shortened so that a message stays one readable line."""
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _finite(value: object, what: str, example: str) -> float:
    """A YAML number as a finite float (rejects .nan, .inf and integers too large for a float)."""
    try:
        number = float(value)  # type: ignore[arg-type]
    except OverflowError:
        raise ValueError(f"{what} {_show(value)} is too large") from None
    if not math.isfinite(number):
        raise ValueError(f"expected {example}, got {_show(value)}")
    return number


def _negative(text: str) -> bool:
    return text.startswith("-") and bool(re.match(r"-\s*(?:[0-9]|\.[0-9])", text))


_DURATION_TERM = _NUMBER + r"\s*(ns|us|µs|ms|min|s|m|h|d)"


def parse_duration(value: object) -> float:
    """'30s', '1.5m', '250ms', '8h', '1h30m' or a bare number of seconds (also as a string: '10')."""
    example = "a duration like '30s', '250ms' or '2m'"
    if _is_number(value):
        seconds = _finite(value, "duration", example)
    elif isinstance(value, str):
        text = value.strip().lower()
        if _negative(text):
            raise ValueError(f"duration must not be negative, got {_show(value)}")
        if re.fullmatch(_NUMBER, text):
            seconds = float(text)
        else:
            parts = re.findall(_DURATION_TERM, text)
            if not parts or re.sub(_DURATION_TERM, "", text).strip():
                raise ValueError(f"expected {example}, got {_show(value)}")
            seconds = sum(float(number) * _DURATION_UNITS[unit] for number, unit in parts)
        if not math.isfinite(seconds):
            raise ValueError(f"duration {_show(value)} is too large")
    else:
        raise ValueError(f"expected {example}, got {_show(value)}")
    if seconds < 0:
        raise ValueError(f"duration must not be negative, got {_show(value)}")
    return seconds


def parse_size(value: object) -> int:
    """'48MiB', '64k', '1GiB' or a bare number of bytes."""
    example = "a size like '48MiB' or '64KiB'"
    if _is_number(value):
        size = _finite(value, "size", example)
    elif isinstance(value, str):
        text = value.strip()
        if _negative(text):
            raise ValueError(f"size must not be negative, got {_show(value)}")
        match = re.fullmatch(_NUMBER + r"\s*([a-zA-Z]*)", text)
        if not match or match.group(2).lower() not in _SIZE_UNITS:
            raise ValueError(f"expected {example}, got {_show(value)}")
        size = float(match.group(1)) * _SIZE_UNITS[match.group(2).lower()]
        if not math.isfinite(size):
            raise ValueError(f"size {_show(value)} is too large")
    else:
        raise ValueError(f"expected {example}, got {_show(value)}")
    if size < 0:
        raise ValueError(f"size must not be negative, got {_show(value)}")
    return int(size)


def parse_rate(value: object) -> float:
    """Arrivals per second: 1200, '1200/s', '1200rps', '600/m'. Must not be negative."""
    example = "a rate like 1200 or '1200/s'"
    if _is_number(value):
        rate = _finite(value, "rate", example)
    elif isinstance(value, str):
        match = re.fullmatch(r"(-?" + _NUMBER[1:] + r"\s*(/s|/m|/min|/h|rps)?", value.strip().lower())
        if not match:
            raise ValueError(f"expected {example}, got {_show(value)}")
        rate = float(match.group(1)) * _RATE_UNITS[match.group(2) or ""]
        if not math.isfinite(rate):
            raise ValueError(f"rate {_show(value)} is too large")
    else:
        raise ValueError(f"expected {example}, got {_show(value)}")
    if rate < 0:
        raise ValueError(f"rate must not be negative, got {_show(value)}")
    return rate


def parse_fraction(value: object) -> float:
    """'1%', '0.5%', 0.01 (also as a string: '0.01') -> a fraction in [0, 1]."""
    example = "a fraction like 0.01 or '1%'"
    if _is_number(value):
        fraction = _finite(value, "fraction", example)
    elif isinstance(value, str):
        text = value.strip()
        if _negative(text):
            raise ValueError(f"expected a fraction between 0 and 1 (or 0% and 100%), got {_show(value)}")
        if re.fullmatch(_NUMBER + r"\s*%", text):
            fraction = float(text[:-1]) / 100.0
        elif re.fullmatch(_NUMBER, text):
            fraction = float(text)
        else:
            raise ValueError(f"expected {example}, got {_show(value)}")
    else:
        raise ValueError(f"expected {example}, got {_show(value)}")
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"expected a fraction between 0 and 1 (or 0% and 100%), got {_show(value)}")
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
