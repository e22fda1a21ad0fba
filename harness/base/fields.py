"""A small reader for YAML mappings that collects every problem with its file, line and field.

Validation never stops at the first mistake: each getter records a Problem and returns a
placeholder so the rest of the document is still checked, and the caller raises once at the end.
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Callable
from typing import Any, TypeVar

from harness.base.errors import Problem
from harness.base.yamlsource import UNREADABLE, PathKey, Source, problem

T = TypeVar("T")


class _Missing:
    def __repr__(self) -> str:
        return "MISSING"


MISSING: Any = _Missing()


class Invalid(Exception):
    """Raised inside parsers to report a value problem (message only)."""


class Reader:
    """Reads one mapping of the document; records problems into a shared list."""

    def __init__(self, source: Source, path: PathKey, value: Any, problems: list[Problem],
                 allowed: set[str] | None = None, what: str = "a mapping",
                 elsewhere: dict[str, str] | None = None):
        """`elsewhere` maps keys that belong in another section to where they go (hosts -> fleet.hosts),
        so a key written one level off gets a 'did you mean' pointing there."""
        self.source = source
        self.path = path
        self.problems = problems
        self.ok = isinstance(value, dict)
        self.data: dict[str, Any] = value if isinstance(value, dict) else {}
        if not self.ok and value is not MISSING and value is not UNREADABLE:
            self.problem((), f"expected {what}, got {describe(value)}")
        self.misspelt: set[str] = set()    # allowed keys that an unknown key was taken for (hostz -> hosts)
        if allowed is not None and self.ok:
            for key in self.data:
                if key not in allowed:
                    hint = difflib.get_close_matches(key, sorted(allowed), n=1)
                    self.misspelt.update(hint)
                    self.problem((key,), f"unknown key '{key}'{_suggest(key, allowed, elsewhere or {})}")

    def problem(self, sub: PathKey, message: str) -> None:
        path = self.path + sub
        self.problems.append(problem(self.source.file, self.source.line(path), path, message))

    def has(self, key: str) -> bool:
        return key in self.data

    def get(self, key: str, parse: Callable[[Any], T], default: Any = MISSING, required: bool = False) -> T:
        if key not in self.data:
            if required and key not in self.misspelt:   # a misspelt key already has its 'did you mean'
                self.problem((key,), f"missing required field '{key}'")
            return default
        if self.data[key] is UNREADABLE:
            return default
        try:
            return parse(self.data[key])
        except (Invalid, ValueError, ArithmeticError) as exc:
            self.problem((key,), str(exc))
            return default

    def child(self, key: str, allowed: set[str] | None = None, what: str = "a mapping",
              required: bool = False) -> "Reader":
        if key not in self.data and required and key not in self.misspelt:
            self.problem((key,), f"missing required section '{key}'")
        return Reader(self.source, self.path + (key,), self.data.get(key, MISSING), self.problems, allowed, what)

    def items(self, key: str) -> list[tuple[PathKey, Any]]:
        """Elements of a list field, each with its path; a non-list is a problem."""
        value = self.data.get(key, MISSING)
        if value is MISSING or value is None or value is UNREADABLE:
            return []
        if not isinstance(value, list):
            self.problem((key,), f"expected a list, got {describe(value)}")
            return []
        return [(self.path + (key, index), item) for index, item in enumerate(value) if item is not UNREADABLE]


def _suggest(key: str, allowed: set[str], elsewhere: dict[str, str]) -> str:
    hint = difflib.get_close_matches(key, sorted(allowed), n=1)
    if hint:
        return f" (did you mean '{hint[0]}'?)"
    if key in elsewhere:
        return f" (did you mean '{elsewhere[key]}'?)"
    hint = difflib.get_close_matches(key, sorted(elsewhere), n=1)
    if hint:
        return f" (did you mean '{elsewhere[hint[0]]}'?)"
    return f" (expected one of: {', '.join(sorted(allowed))})"


def describe(value: Any) -> str:
    if value is None:
        return "nothing (null)"
    if isinstance(value, bool):
        return f"a boolean ({value})"
    if isinstance(value, (int, float)):
        return f"a number ({_short(str(value))})"
    if isinstance(value, str):
        return f"a string ({_short(repr(value))})"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "a mapping"
    return f"a {type(value).__name__} ({_short(str(value))})"


def _short(text: str) -> str:
    """Keep quoted values in messages short and on one line."""
    text = text.replace("\n", "\\n")
    return text if len(text) <= 40 else text[:37] + "..."


# Scalar parsers usable with Reader.get ------------------------------------------------------

def as_str(value: Any) -> str:
    if not isinstance(value, str) or not value:
        raise Invalid(f"expected a non-empty string, got {describe(value)}")
    return value


def as_int(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise Invalid(f"expected a whole number, got {describe(value)}")
    return value


def as_positive_int(value: Any) -> int:
    number = as_int(value)
    if number < 1:
        raise Invalid(f"expected a whole number of at least 1, got {number}")
    return number


def as_number(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise Invalid(f"expected a number, got {describe(value)}")
    try:
        number = float(value)
    except OverflowError:
        raise Invalid("the number is too large") from None
    if not math.isfinite(number):
        raise Invalid(f"expected a finite number, got {describe(value)}")
    return number


_BOOL_WORDS = {"yes": True, "on": True, "no": False, "off": False, "y": True, "n": False}


def as_bool(value: Any) -> bool:
    """true/false; the YAML 1.1 words (yes/no/on/off) too, where a boolean is what the field means.
    (The loader reads YAML 1.2, where those words are text, so string fields keep them as written.)"""
    if isinstance(value, str) and value.lower() in _BOOL_WORDS:
        return _BOOL_WORDS[value.lower()]
    if not isinstance(value, bool):
        raise Invalid(f"expected true or false, got {describe(value)}")
    return value


def as_argv(value: Any) -> tuple[str, ...]:
    if isinstance(value, str):
        raise Invalid("expected a list of arguments like [make, -C, targets/echo], not a shell string")
    if not isinstance(value, list) or not value:
        raise Invalid(f"expected a non-empty list of arguments, got {describe(value)}")
    if not all(isinstance(arg, (str, int, float)) and not isinstance(arg, bool) for arg in value):
        raise Invalid("every argument must be a string or number")
    return tuple(str(arg) for arg in value)


def as_str_map(value: Any) -> dict[str, str]:
    if not isinstance(value, dict):
        raise Invalid(f"expected a mapping of names to values, got {describe(value)}")
    result = {}
    for key, item in value.items():
        if isinstance(item, (dict, list)) or item is None:
            raise Invalid(f"value of '{key}' must be a string or number")
        result[str(key)] = str(item).lower() if isinstance(item, bool) else str(item)
    return result


def one_of(*choices: str) -> Callable[[Any], str]:
    def parse(value: Any) -> str:
        if value not in choices:
            raise Invalid(f"expected one of {', '.join(choices)}, got {describe(value)}")
        return value
    return parse
