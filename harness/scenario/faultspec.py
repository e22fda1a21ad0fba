"""Scenario entries for network faults (the fault proxy) and resource faults (cgroup limits).

Called by harness.scenario.loader for `faults:` items of these kinds; the shared parts (window, hosts, groups) are
read there. Pure: values in, dataclasses and problems out.
"""

from __future__ import annotations

import difflib
import re
from typing import Any

from harness.base import units
from harness.base.fields import Invalid, Reader, as_positive_int, describe, one_of
from harness.scenario.model import HostSelection, NetFault, ResourceFault, Window

DIRECTIONS = ("upstream", "downstream", "both")
# What each network fault kind reads besides the common keys, and its default direction (toxiproxy's: a
# toxic acts on what the host sends back unless told otherwise; a cut cuts both ways).
NET_KEYS: dict[str, set[str]] = {
    "latency": {"latency", "jitter"},
    "bandwidth": {"rate"},
    "stall": set(),
    "partition": {"how"},
    "reset": {"at"},
    "slicer": {"size", "variation", "delay"},
}
DEFAULT_DIRECTION = {"latency": "downstream", "bandwidth": "downstream", "slicer": "downstream",
                     "stall": "both", "partition": "both", "reset": "both"}
NET_COMMON = {"kind", "hosts", "groups", "between", "direction", "from", "until", "every", "for"}
RESOURCE_KEYS = {"memory": {"limit"}, "cpu": {"quota"}, "pids": {"limit"}}
RESOURCE_COMMON = {"kind", "hosts", "groups", "from", "until", "every", "for"}
MAX_LATENCY = 600.0


def _duration(value: Any) -> float:
    return units.parse_duration(value)


def _bytes_per_second(value: Any) -> int:
    """'64KiB/s', '1MiB', 8192 -> bytes per second (at least 1)."""
    text = value.strip() if isinstance(value, str) else value
    if isinstance(text, str):
        text = re.sub(r"\s*/\s*s$", "", text)
    rate = units.parse_size(text)
    if rate < 1:
        raise Invalid(f"expected a rate of at least 1 byte per second, like 64KiB/s, got {describe(value)}")
    return rate


def _segment(value: Any) -> int:
    size = units.parse_size(value)
    if size < 1:
        raise Invalid(f"expected a size of at least one byte, got {describe(value)}")
    return size


def _cpu_quota(value: Any) -> float:
    """'20%' (of one CPU), 0.2, '150%' or 1.5 (one and a half CPUs)."""
    if isinstance(value, str) and value.strip().endswith("%"):
        try:
            quota = float(value.strip()[:-1]) / 100
        except ValueError:
            raise Invalid(f"expected a CPU quota like '20%' or 0.2 (of one CPU), got {describe(value)}") from None
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        quota = float(value)
    else:
        raise Invalid(f"expected a CPU quota like '20%' or 0.2 (of one CPU), got {describe(value)}")
    if not 0.01 <= quota <= 1024:
        raise Invalid(f"a CPU quota goes from 1% of one CPU to 1024 CPUs, got {describe(value)}")
    return quota


def net_fault(r: Reader, index: int, kind: str, window: Window, hosts: HostSelection, groups: tuple[str, ...],
              group_names: set[str] | None) -> NetFault | None:
    between = _between(r, group_names)
    if between is not None and (r.has("hosts") or r.has("groups")):
        r.problem(("between",), "a fault is either between two groups or on hosts (hosts:, groups:), not both")
    direction = r.get("direction", one_of(*DIRECTIONS), default=DEFAULT_DIRECTION[kind])
    if kind == "reset" and r.has("direction"):
        r.problem(("direction",), "a reset closes the connection both ways: it has no direction")
    instant = False
    if kind == "reset" and r.has("at"):
        for key in ("from", "until", "every", "for"):
            if r.has(key):
                r.problem((key,), f"'{key}' makes a window; 'at' resets the connections once: give one or the other")
        at = r.get("at", _duration, default=0.0)
        window, instant = Window(start=at, until=at), True
    fault = NetFault(index=index, kind=kind, window=window, hosts=hosts, groups=groups, between=between,
                     direction=direction, instant=instant)
    if kind == "latency":
        latency = r.get("latency", _duration, required=True, default=0.0)
        jitter = r.get("jitter", _duration, default=0.0)
        if not 0 < latency <= MAX_LATENCY:
            if r.has("latency"):
                r.problem(("latency",), f"expected a latency above 0 and at most {MAX_LATENCY:g}s, got {latency:g}s")
        elif jitter > latency:
            r.problem(("jitter",), f"jitter ({jitter:g}s) larger than the latency ({latency:g}s) would send "
                                   f"chunks back in time")
        return _replace(fault, latency=latency, jitter=jitter)
    if kind == "bandwidth":
        return _replace(fault, rate=r.get("rate", _bytes_per_second, required=True, default=1))
    if kind == "partition":
        return _replace(fault, how=r.get("how", one_of("refuse", "blackhole"), default="refuse"))
    if kind == "slicer":
        size = r.get("size", _segment, required=True, default=1)
        variation = r.get("variation", lambda v: units.parse_size(v), default=0)
        if variation >= size:
            r.problem(("variation",), f"variation ({variation} bytes) must be smaller than the size ({size} bytes)")
        return _replace(fault, size=size, variation=variation, delay=r.get("delay", _duration, default=0.0))
    return fault


def _replace(fault: NetFault, **changes: Any) -> NetFault:
    from dataclasses import replace
    return replace(fault, **changes)


def _between(r: Reader, group_names: set[str] | None) -> tuple[str, str] | None:
    if not r.has("between"):
        return None
    value = r.data["between"]
    if not isinstance(value, list) or len(value) != 2 or not all(isinstance(n, str) for n in value):
        r.problem(("between",), f"expected two group names, like [varnish, nginx], got {describe(value)}")
        return None
    if group_names is None:
        r.problem(("between",), "the fleet has no groups (fleet.groups) for a fault between groups")
        return None
    for name in value:
        if name not in group_names:
            hint = difflib.get_close_matches(name, sorted(group_names), n=1)
            r.problem(("between",), f"no fleet group named {name!r}" + (f" (did you mean '{hint[0]}'?)" if hint
                                    else f" (groups: {', '.join(sorted(group_names))})"))
            return None
    if value[0] == value[1]:
        r.problem(("between",), "name two different groups")
        return None
    return value[0], value[1]


def resource_fault(r: Reader, index: int, kind: str, window: Window, hosts: HostSelection,
                   groups: tuple[str, ...]) -> ResourceFault:
    if kind == "memory":
        limit = r.get("limit", units.parse_size, required=True, default=0)
        if r.has("limit") and limit < 1024 * 1024:
            r.problem(("limit",), f"a memory limit below 1MiB ({limit} bytes) leaves nothing to start a process")
        return ResourceFault(index=index, kind=kind, window=window, hosts=hosts, groups=groups, limit=limit)
    if kind == "pids":
        return ResourceFault(index=index, kind=kind, window=window, hosts=hosts, groups=groups,
                             limit=r.get("limit", as_positive_int, required=True, default=1))
    return ResourceFault(index=index, kind=kind, window=window, hosts=hosts, groups=groups,
                         quota=r.get("quota", _cpu_quota, required=True, default=1.0))


def between_groups_ok(r: Reader, fault: NetFault, backends: dict[str, tuple[str, ...]]) -> None:
    """A fault between two groups acts on the connections one makes to the other (backends:)."""
    if fault.between is None:
        return
    a, b = fault.between
    if b not in backends.get(a, ()) and a not in backends.get(b, ()):
        r.problem(("between",), f"no traffic flows between {a} and {b}: neither names the other in backends:")
