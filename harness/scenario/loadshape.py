"""The offered load r(t): a piecewise-linear arrival rate for the whole fleet, built from phases.

Phases are applied in order, each starting where the previous one ended and knowing the rate
it left behind ("current rate"):
- ramp:  {from: R (default current), to: R, over: D}         linear from -> to
- hold:  {for: D, rate: R (default current)}                   constant
- spike: {factor: F | to: R, for: D}                           constant F x current (or R), then
                                                              back to the rate before the spike
- steps: {from: R (default current), to: R, count: N, each: D} N equal stairs ending at `to`
"""

from __future__ import annotations

import bisect
import math
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Segment:
    start: float
    end: float
    rate_from: float
    rate_to: float

    def rate(self, t: float) -> float:
        if self.end <= self.start:
            return self.rate_to
        return self.rate_from + (self.rate_to - self.rate_from) * (t - self.start) / (self.end - self.start)

    def area(self, until: float | None = None) -> float:
        """Expected arrivals in [start, min(until, end)]."""
        stop = self.end if until is None else min(max(until, self.start), self.end)
        return (self.rate_from + self.rate(stop)) * 0.5 * (stop - self.start)


@dataclass(frozen=True)
class Phase:
    name: str
    kind: str
    start: float
    end: float
    segments: tuple[Segment, ...]

    @property
    def rate_from(self) -> float:
        return self.segments[0].rate_from if self.segments else 0.0

    @property
    def rate_to(self) -> float:
        return self.segments[-1].rate_to if self.segments else 0.0


@dataclass(frozen=True)
class PhaseSpec:
    """A phase as written: kind plus its parameters in base units (None = not given)."""

    kind: str
    name: str | None = None
    duration: float = 0.0
    rate_from: float | None = None
    rate_to: float | None = None
    factor: float | None = None
    count: int = 1


class LoadShape:
    """r(t) over [0, duration]; cumulative arrivals Λ(t) and its inverse for exact arrival times."""

    def __init__(self, phases: list[Phase], duration: float):
        self.phases = tuple(phases)
        self.duration = duration
        self.specs: tuple[PhaseSpec, ...] = ()      # the phases as written, when built from specs
        self.segments: tuple[Segment, ...] = tuple(seg for phase in phases for seg in phase.segments)
        self._starts = [seg.start for seg in self.segments]
        cumulative = [0.0]
        for seg in self.segments:
            cumulative.append(cumulative[-1] + seg.area())
        self._cumulative = cumulative

    @classmethod
    def build(cls, specs: list[PhaseSpec], duration: float | None = None) -> "LoadShape":
        phases: list[Phase] = []
        t = 0.0
        current = 0.0
        seen: dict[str, int] = {}
        for spec in specs:
            segments: list[Segment]
            if spec.kind == "ramp":
                start_rate = current if spec.rate_from is None else spec.rate_from
                end_rate = spec.rate_to if spec.rate_to is not None else start_rate
                segments = [Segment(t, t + spec.duration, start_rate, end_rate)]
                current = end_rate
            elif spec.kind == "hold":
                rate = current if spec.rate_to is None else spec.rate_to
                segments = [Segment(t, t + spec.duration, rate, rate)]
                current = rate
            elif spec.kind == "spike":
                rate = spec.rate_to if spec.rate_to is not None else current * (spec.factor or 1.0)
                segments = [Segment(t, t + spec.duration, rate, rate)]
            elif spec.kind == "steps":
                base = current if spec.rate_from is None else spec.rate_from
                target = spec.rate_to if spec.rate_to is not None else base
                segments = []
                for index in range(spec.count):
                    rate = base + (target - base) * (index + 1) / spec.count
                    start = t + index * spec.duration
                    segments.append(Segment(start, start + spec.duration, rate, rate))
                current = target
            else:
                raise ValueError(f"unknown phase kind {spec.kind!r}")
            end = segments[-1].end if segments else t
            base_name = spec.name or spec.kind
            seen[base_name] = seen.get(base_name, 0) + 1
            name = base_name if spec.name or seen[base_name] == 1 else f"{base_name}#{seen[base_name]}"
            phases.append(Phase(name, spec.kind, t, end, tuple(segments)))
            t = end
        total = t
        if duration is None:
            duration = total
        elif duration > total:
            phases.append(Phase("tail", "hold", total, duration, (Segment(total, duration, current, current),)))
        elif duration < total:
            phases = _truncate(phases, duration)
        shape = cls(phases, duration)
        shape.specs = tuple(specs)
        return shape

    def rate(self, t: float) -> float:
        if not self.segments or t < 0 or t > self.duration:
            return 0.0
        index = max(0, bisect.bisect_right(self._starts, t) - 1)
        return self.segments[index].rate(t)

    def expected(self, t: float) -> float:
        """Λ(t): expected number of arrivals in [0, t]."""
        if not self.segments or t <= 0:
            return 0.0
        t = min(t, self.duration)
        index = max(0, bisect.bisect_right(self._starts, t) - 1)
        return self._cumulative[index] + self.segments[index].area(t)

    @property
    def total_expected(self) -> float:
        return self._cumulative[-1]

    def inverse(self, target: float) -> float | None:
        """The time t with Λ(t) = target, or None past the end of the load."""
        if target > self._cumulative[-1] or not self.segments:
            return None
        index = max(0, bisect.bisect_right(self._cumulative, target) - 1)
        index = min(index, len(self.segments) - 1)
        # Skip zero-area segments (rate 0 stretches) so arrivals land where rate > 0.
        while index < len(self.segments) - 1 and self.segments[index].area() == 0.0:
            index += 1
        seg = self.segments[index]
        need = target - self._cumulative[index]
        r0 = seg.rate_from
        slope = (seg.rate_to - seg.rate_from) / (seg.end - seg.start) if seg.end > seg.start else 0.0
        if need <= 0:
            return seg.start
        if slope == 0.0:
            if r0 <= 0:
                return None
            return min(seg.end, seg.start + need / r0)
        # Solve r0*x + slope*x^2/2 = need for x >= 0. The textbook root (-r0 + sqrt(disc)) / slope
        # cancels catastrophically on a nearly flat ramp; this form is exact for both signs of slope.
        disc = r0 * r0 + 2.0 * slope * need
        denominator = r0 + math.sqrt(max(disc, 0.0))
        if denominator <= 0:
            return None
        x = 2.0 * need / denominator
        return min(seg.end, seg.start + x)

    def inverse_many(self, targets: np.ndarray) -> np.ndarray:
        """`inverse` of many targets at once (NaN past the end of the load): the arithmetic of `inverse`,
        element by element, so a stream of arrivals costs numpy time, not a Python call per arrival."""
        out = np.full(len(targets), np.nan)
        if not self.segments or not len(targets):
            return out
        arrays = self._arrays()
        cumulative, starts, ends, rate_from, slopes, skip = arrays
        last = len(self.segments) - 1
        index = np.clip(np.searchsorted(cumulative, targets, side="right") - 1, 0, last)
        index = skip[index]                       # past zero-area (rate 0) segments, as inverse does
        start, end, r0, slope = starts[index], ends[index], rate_from[index], slopes[index]
        need = targets - cumulative[index]
        flat = slope == 0.0
        with np.errstate(divide="ignore", invalid="ignore"):
            t_flat = np.where(r0 > 0, np.minimum(end, start + need / np.where(r0 > 0, r0, 1.0)), np.nan)
            disc = r0 * r0 + 2.0 * slope * need
            denominator = r0 + np.sqrt(np.maximum(disc, 0.0))
            t_ramp = np.where(denominator > 0,
                              np.minimum(end, start + 2.0 * need / np.where(denominator > 0, denominator, 1.0)),
                              np.nan)
        result = np.where(flat, t_flat, t_ramp)
        result = np.where(need <= 0, start, result)
        return np.where(targets > cumulative[-1], np.nan, result)

    def _arrays(self) -> tuple[np.ndarray, ...]:
        cached = getattr(self, "_array_cache", None)
        if cached is None:
            segments = self.segments
            slopes = [(s.rate_to - s.rate_from) / (s.end - s.start) if s.end > s.start else 0.0 for s in segments]
            skip, next_nonzero = [0] * len(segments), len(segments) - 1
            for i in range(len(segments) - 1, -1, -1):
                if segments[i].area() != 0.0 or i == len(segments) - 1:
                    next_nonzero = i
                skip[i] = next_nonzero
            cached = (np.array(self._cumulative), np.array([s.start for s in segments]),
                      np.array([s.end for s in segments]), np.array([s.rate_from for s in segments]),
                      np.array(slopes), np.array(skip))
            self._array_cache = cached
        return cached

    def phase_at(self, t: float) -> Phase | None:
        for phase in self.phases:
            if phase.start <= t < phase.end:
                return phase
        return self.phases[-1] if self.phases and t >= self.phases[-1].end else None

    def windows(self, phase_name: str) -> list[tuple[float, float]]:
        """[start, end) windows of every phase with this name (or kind, for unnamed phases)."""
        return [(p.start, p.end) for p in self.phases if p.name == phase_name or p.name.split("#")[0] == phase_name]


def _truncate(phases: list[Phase], duration: float) -> list[Phase]:
    result = []
    for phase in phases:
        if phase.start >= duration:
            break
        segments = []
        for seg in phase.segments:
            if seg.start >= duration:
                break
            if seg.end > duration:
                seg = Segment(seg.start, duration, seg.rate_from, seg.rate(duration))
            segments.append(seg)
        result.append(Phase(phase.name, phase.kind, phase.start, min(phase.end, duration), tuple(segments)))
    return result
