"""Exposure: how long host processes really ran, from their start and exit events (pure).

Crash rates are crashes per host-hour; the host-hours must be the hosts' real uptime. Counting the
per-second samples in which a host was seen up misses a host that crash-loops: one that lives 0.9 s
at a time is rarely up when the sampler looks, so its crashes would have no exposure at all. Each
incarnation counts from its start to its exit (the uptime the supervisor measured); one with no exit
(a trial cut short by a SIGKILLed harness) counts up to the last second the store holds.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Exposure:
    host_seconds: float
    incarnations: int       # host processes started
    unfinished: int         # of them, without an exit event (counted up to `end`)
    shortest: float | None  # the shortest finished incarnation (s), a crash loop shows here


def uptime_exposure(events: Iterable[dict[str, Any]], end: float) -> Exposure | None:
    """Host-seconds of one trial from its `start` and `exit` (or `stop`) events (each with t, kind, host, pid and
    detail as a dict); None when the trial has no start events (a store written without them).

    `end`: the trial's last recorded time, for incarnations that never exited."""
    starts: dict[tuple[Any, Any], float] = {}
    finished: list[float] = []
    for event in sorted(events, key=lambda e: e["t"]):
        key = (event.get("host"), event.get("pid"))
        if event["kind"] == "start" and event.get("pid") is not None:
            starts[key] = float(event["t"])
        elif event["kind"] in ("exit", "stop") and key in starts:
            # the harness stopping a host at the end records `stop` (an exit only if it crashed doing so)
            began = starts.pop(key)
            uptime = (event.get("detail") or {}).get("uptime")
            lived = float(uptime) if uptime is not None else float(event["t"]) - began
            finished.append(max(lived, 0.0))
    if not finished and not starts:
        return None
    # math.fsum: the exact sum, whatever order the events come in (a simulated crash storm's exposure,
    # summed by the simulator from counts, is the same number: harness/sim/run.py)
    seconds = math.fsum(finished + [max(end - began, 0.0) for began in starts.values()])
    return Exposure(seconds, len(finished) + len(starts), len(starts), min(finished, default=None))
