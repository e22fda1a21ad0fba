"""The keys of fleet.simulated and how each is parsed; shared by the loader (validation, with file
and line) and by variants (args: {hosts: 800, memory.budget: 64MiB} override model fields)."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import replace
from typing import Any

from harness.base import units
from harness.scenario.model import SimModel

MAX_HOSTS = 1_000_000


class Bad(ValueError):
    pass


def _int(low: int, high: int | None = None) -> Callable[[Any], int]:
    def parse(value: Any) -> int:
        if isinstance(value, str) and value.strip().lstrip("-").isdigit():
            value = int(value.strip())
        if isinstance(value, bool) or not isinstance(value, int):
            raise Bad(f"expected a whole number, got {value!r}")
        if value < low or (high is not None and value > high):
            raise Bad(f"expected a whole number from {low} to {high}, got {value}" if high is not None
                      else f"expected a whole number of at least {low}, got {value}")
        return value
    return parse


def _number(low: float = 0.0) -> Callable[[Any], float]:
    def parse(value: Any) -> float:
        if isinstance(value, str):
            try:
                value = float(value.strip())
            except ValueError:
                raise Bad(f"expected a number, got {value!r}") from None
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise Bad(f"expected a number, got {value!r}")
        if value < low:
            raise Bad(f"expected a number of at least {low:g}, got {value:g}")
        return float(value)
    return parse


def _positive_rate(value: Any) -> float:
    rate = units.parse_rate(value)
    if rate <= 0:
        raise Bad(f"expected a rate greater than zero, got {value!r}")
    return rate


def _duration(value: Any) -> float:
    seconds = units.parse_duration(value)
    if seconds < 0:
        raise Bad(f"expected a duration of at least zero, got {value!r}")
    return seconds


def _tick(value: Any) -> float:
    seconds = units.parse_duration(value)
    if not 0 < seconds <= 1 or abs(1.0 / seconds - round(1.0 / seconds)) > 1e-9 or round(1.0 / seconds) > 1000:
        raise Bad(f"the tick must divide one second (1s, 500ms, 100ms, 10ms ...), got {value!r}")
    return 1.0 / round(1.0 / seconds)


def _budget(value: Any) -> int | None:
    if value in (None, "none", "unlimited"):
        return None
    size = units.parse_size(value)
    if size <= 0:
        raise Bad(f"expected a size greater than zero (or 'none'), got {value!r}")
    return size


def _spread(value: Any) -> float:
    fraction = units.parse_fraction(value)
    if fraction >= 1.0:
        raise Bad(f"spread must be below 100% (each host keeps a positive budget), got {value!r}")
    return fraction


def _fraction_or_more(value: Any) -> float:
    """A fraction that may exceed 1 (retry budget: 200% = two retries per fresh request)."""
    if isinstance(value, str) and value.strip().endswith("%"):
        try:
            number = float(value.strip()[:-1]) / 100.0
        except ValueError:
            raise Bad(f"expected a fraction like 10% or 0.1, got {value!r}") from None
    else:
        number = _number()(value)
    if not math.isfinite(number) or number < 0:
        raise Bad(f"expected a fraction of at least 0, got {value!r}")
    return number


def _choice(*choices: str) -> Callable[[Any], str]:
    def parse(value: Any) -> str:
        if value not in choices:
            raise Bad(f"expected one of {', '.join(choices)}, got {value!r}")
        return str(value)
    return parse


# dotted key as written -> (SimModel field, parser)
FIELDS: dict[str, tuple[str, Callable[[Any], Any]]] = {
    "hosts": ("hosts", _int(1, MAX_HOSTS)),
    "capacity": ("capacity", _positive_rate),
    "service_time": ("service_time", _duration),
    "queue": ("queue", _int(0)),
    "tick": ("tick", _tick),
    "arrivals": ("arrivals", _choice("poisson", "even")),
    "memory.base": ("memory_base", units.parse_size),
    "memory.per_request": ("memory_per_request", units.parse_size),
    "memory.budget": ("memory_budget", _budget),
    "memory.spread": ("memory_spread", _spread),
    "memory.on_exhaust": ("memory_on_exhaust", _choice("crash", "reject")),
    "hazard.base": ("hazard_base", units.parse_rate),
    "hazard.scale": ("hazard_scale", units.parse_rate),
    "hazard.exponent": ("hazard_exponent", _number(0.0)),
    "hazard.alloc_fail": ("hazard_alloc_fail", _number(0.0)),
    "hazard.lock_error": ("hazard_lock_error", _number(0.0)),
    "restart.policy": ("restart_policy", _choice("always", "on-failure", "never")),
    "restart.time": ("restart_time", _duration),
    "restart.backoff": ("restart_backoff", _duration),
    "restart.max_backoff": ("restart_max_backoff", _duration),
    "restart.reset_after": ("restart_reset_after", _duration),
    "warmup.for": ("warmup_for", _duration),
    "warmup.from": ("warmup_from", units.parse_fraction),
    "retries.max": ("retries_max", _int(0, 10)),
    "retries.budget": ("retries_budget", _fraction_or_more),
    "cascade_threshold": ("cascade_threshold", units.parse_fraction),
    "host_samples": ("host_samples", _int(0, 512)),
}
SECTIONS: dict[str, set[str]] = {}
for _key in FIELDS:
    if "." in _key:
        _section, _name = _key.split(".", 1)
        SECTIONS.setdefault(_section, set()).add(_name)
TOP = {key for key in FIELDS if "." not in key} | set(SECTIONS)
REQUIRED = ("hosts", "capacity")


def parse(key: str, value: Any) -> Any:
    """One field's value; ValueError (with a message) when it is not valid."""
    if key not in FIELDS:
        raise Bad(f"unknown simulated-model key {key!r} (known: {', '.join(FIELDS)})")
    return FIELDS[key][1](value)


def override(model: SimModel, args: dict[str, str]) -> SimModel:
    """A variant's args applied to the model: {hosts: "800", memory.budget: "64MiB"}."""
    changes = {FIELDS[key][0]: parse(key, value) for key, value in args.items()}
    return replace(model, **changes) if changes else model


def check(model: SimModel) -> list[tuple[str, str]]:
    """Problems between fields: [(dotted key, message)]."""
    problems = []
    if model.memory_budget is not None and model.memory_per_request == 0 and model.memory_base == 0:
        problems.append(("memory.budget", "a memory budget needs memory.per_request (or memory.base) to matter"))
    if model.memory_budget is not None and model.memory_base >= model.memory_budget * (1 - model.memory_spread):
        problems.append(("memory.base", "the base memory alone is over the (smallest) budget: every host "
                                        "would die at start"))
    if model.warmup_from == 0 and model.warmup_for > 0:
        pass  # a host that starts cold serves nothing at first: allowed
    return problems
