"""Crash storms kept compact (pure: numpy state, one seeded stream, no I/O).

A crash-looping simulated night has hundreds of thousands of crashes. Each one is counted exactly in
aggregates (per slot x cause, per host x cause, docs/simulation.md), and only a bounded sample becomes
a full crash row:
- every crash while the trial has had fewer than FIRST_ROWS (how the storm began; a small night keeps
  all its crashes as rows, exactly as before);
- the first BUCKET_ROWS of each cause (its first crash names the bucket in every report);
- SPREAD_ROWS drawn uniformly from all the others (the smallest seeded priorities: bottom-k), so the
  crash loop after the onset is sampled too.
The same seed gives the same sample: the priorities come from their own stream, drawn in crash order.
"""

from __future__ import annotations

import heapq
import math
from typing import Any

import numpy as np

MEMORY, HAZARD = 0, 1
CAUSES = ("memory", "hazard")
FIRST_ROWS = 3000
BUCKET_ROWS = 100
SPREAD_ROWS = 1000


class CrashSampler:
    """Which crashes become rows: decided in crash order, the first ones at once, the uniform ones at
    the end of the trial (a later crash may displace an earlier candidate)."""

    def __init__(self, generator: np.random.Generator):
        self.rng = generator
        self.seen = 0
        self.per_cause = [0] * len(CAUSES)
        self.spread: list[tuple[float, int, dict[str, Any]]] = []    # max-heap by -priority

    def choose(self, causes: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """For a tick's crashes (in crash order): (row now? mask, indices that are candidates for the
        uniform sample, their priorities)."""
        k = len(causes)
        rows = np.arange(self.seen, self.seen + k) < FIRST_ROWS
        for cause in range(len(CAUSES)):
            mine = np.flatnonzero(causes == cause)
            if len(mine):
                rows[mine[:max(0, BUCKET_ROWS - self.per_cause[cause])]] = True
                self.per_cause[cause] += len(mine)
        self.seen += k
        rest = np.flatnonzero(~rows)
        if not len(rest):
            return rows, rest, np.empty(0)
        priority = self.rng.random(len(rest))
        wanted = priority < self.threshold()
        return rows, rest[wanted], priority[wanted]

    def offer(self, priority: float, number: int, record: dict[str, Any]) -> None:
        if len(self.spread) < SPREAD_ROWS:
            heapq.heappush(self.spread, (-priority, number, record))
        elif priority < -self.spread[0][0]:
            heapq.heapreplace(self.spread, (-priority, number, record))

    def threshold(self) -> float:
        """The priority a crash needs to enter the uniform sample (below the largest one kept)."""
        return -self.spread[0][0] if len(self.spread) >= SPREAD_ROWS else math.inf

    def sample(self) -> list[dict[str, Any]]:
        """The uniform sample's records, in crash order."""
        return [record for _, _, record in sorted(self.spread, key=lambda item: item[1])]


class CrashTally:
    """Exact crash counts: per slot x cause (a slot is a second, cut at `cuts`, the phase boundaries
    that fall inside a second, so that counts per phase are exact) and per host x cause with the
    first and last crash time."""

    def __init__(self, hosts: int, cuts: list[float]):
        self.count = np.zeros((hosts, len(CAUSES)), dtype=np.int64)
        self.first = np.full((hosts, len(CAUSES)), np.inf)
        self.last = np.full((hosts, len(CAUSES)), -np.inf)
        self.cuts = np.array(sorted({c for c in cuts if c != math.floor(c)}), dtype=np.float64)
        self.slots: dict[tuple[float, float, int], int] = {}     # (start, span, cause) -> crashes
        self.total = [0] * len(CAUSES)

    def add(self, hosts: np.ndarray, times: np.ndarray, causes: np.ndarray) -> None:
        """One tick's crashes (each host at most once)."""
        self.count[hosts, causes] += 1
        self.first[hosts, causes] = np.minimum(self.first[hosts, causes], times)
        self.last[hosts, causes] = np.maximum(self.last[hosts, causes], times)
        rounded = np.round(times, 6)            # the crash rows' times are rounded so; windows use them
        start = np.floor(rounded)
        end = start + 1.0
        if len(self.cuts):
            below = np.searchsorted(self.cuts, rounded, side="right")
            cut_before = np.where(below > 0, self.cuts[np.maximum(below - 1, 0)], -np.inf)
            cut_after = np.where(below < len(self.cuts), self.cuts[np.minimum(below, len(self.cuts) - 1)], np.inf)
            start, end = np.maximum(start, cut_before), np.minimum(end, cut_after)
        for cause in range(len(CAUSES)):
            mine = causes == cause
            if not mine.any():
                continue
            self.total[cause] += int(mine.sum())
            slots, counts = np.unique(np.stack((start[mine], end[mine])), axis=1, return_counts=True)
            for (a, b), n in zip(slots.T.tolist(), counts.tolist()):
                key = (a, b - a, cause)
                self.slots[key] = self.slots.get(key, 0) + n

    def take_slots(self) -> list[tuple[float, float, int, int]]:
        """(start, span, cause, crashes) counted since the last call."""
        taken = sorted((a, span, cause, n) for (a, span, cause), n in self.slots.items())
        self.slots = {}
        return taken

    def per_host(self) -> list[tuple[int, int, int, float, float]]:
        """(host, cause, crashes, first t, last t) for every host and cause that crashed."""
        hosts, causes = np.nonzero(self.count)
        return [(h, c, int(self.count[h, c]), round(float(self.first[h, c]), 6), round(float(self.last[h, c]), 6))
                for h, c in zip(hosts.tolist(), causes.tolist())]


class ExactSum:
    """A running sum kept exactly, in a few partials (Shewchuk's algorithm, as math.fsum uses): value()
    is math.fsum of everything added, in any order, without holding every term (a night's exits)."""

    def __init__(self) -> None:
        self.partials: list[float] = []
        self.count = 0
        self.smallest: float | None = None

    def add(self, values: list[float]) -> None:
        partials = self.partials
        for x in values:
            i = 0
            for y in partials:
                if abs(x) < abs(y):
                    x, y = y, x
                high = x + y
                low = y - (high - x)
                if low:
                    partials[i] = low
                    i += 1
                x = high
            partials[i:] = [x]
        self.count += len(values)
        if values:
            least = min(values)
            self.smallest = least if self.smallest is None else min(self.smallest, least)

    def value(self, more: list[float] = ()) -> float:  # type: ignore[assignment]
        return math.fsum(self.partials + list(more))
