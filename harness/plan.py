"""The plan: deterministic streams derived from the scenario's seed (no I/O).

Every stream has its own generator seeded from (seed, purpose), so changing one thing (say,
the number of hosts) does not shift the arrivals or keys: variants see the same arrivals.
"""

from __future__ import annotations

import bisect
import itertools
import random
from collections.abc import Iterator
from dataclasses import dataclass

from harness.loadshape import LoadShape
from harness.scenario import HostLoss, Keys


def stream(seed: int, purpose: str) -> random.Random:
    """A generator for one purpose; string seeds are hashed the same way on every platform."""
    return random.Random(f"{seed}:{purpose}")


@dataclass(frozen=True, slots=True)
class Arrival:
    index: int
    t: float          # intended send time, seconds from the start of the load
    key: str
    request: int = 0  # which request of the mix (index into target.requests)


class KeyPicker:
    """Keys over a key space, uniform or Zipf-distributed (small spaces force key reuse)."""

    def __init__(self, keys: Keys, rng: random.Random):
        self.rng = rng
        self.space = keys.space
        self.cumulative: list[float] | None = None
        if keys.distribution == "zipf":
            weights = (1.0 / (rank ** keys.zipf_s) for rank in range(1, keys.space + 1))
            self.cumulative = list(itertools.accumulate(weights))

    def pick(self) -> str:
        if self.cumulative is None:
            return key_name(self.rng.randrange(self.space))
        point = self.rng.random() * self.cumulative[-1]
        return key_name(bisect.bisect_left(self.cumulative, point))


def key_name(number: int) -> str:
    """The key numbered `number` in the key space (what {key} becomes; set-up's keys: all walks them)."""
    return f"k{number}"


def arrivals(shape: LoadShape, keys: Keys, seed: int, weights: tuple[float, ...] = ()) -> Iterator[Arrival]:
    """A non-homogeneous Poisson process with rate r(t), by inverting Λ(t) (exact, no thinning).

    Each arrival's request is drawn from the mix by `weights` on a stream of its own, so adding a
    request to the mix changes neither the arrival times nor the keys."""
    gaps = stream(seed, "arrivals")
    picker = KeyPicker(keys, stream(seed, "keys"))
    chooser = RequestChooser(weights, stream(seed, "requests"))
    total = 0.0
    for index in itertools.count():
        total += gaps.expovariate(1.0)
        t = shape.inverse(total)
        if t is None or t >= shape.duration:
            return
        yield Arrival(index, t, picker.pick(), chooser.pick())


class RequestChooser:
    """Which request of the mix an arrival is, by weight (always 0 for a single request)."""

    def __init__(self, weights: tuple[float, ...], rng: random.Random):
        self.rng = rng
        self.cumulative = list(itertools.accumulate(weights)) if len(weights) > 1 else []

    def pick(self) -> int:
        if not self.cumulative:
            return 0
        point = self.rng.random() * self.cumulative[-1]
        return min(bisect.bisect_right(self.cumulative, point), len(self.cumulative) - 1)


@dataclass(frozen=True)
class LossEvent:
    t: float
    fault: HostLoss
    occurrence: int


def loss_events(faults: tuple[HostLoss, ...], duration: float) -> list[LossEvent]:
    events = [LossEvent(t, fault, n) for fault in faults for n, t in enumerate(fault.times) if t < duration]
    return sorted(events, key=lambda e: (e.t, e.fault.index))


def choose_hosts(seed: int, event: LossEvent, candidates: list[int], count: int) -> list[int]:
    """Which hosts an event strikes: seeded per event, so the same history picks the same hosts."""
    rng = stream(seed, f"host-loss:{event.fault.index}:{event.occurrence}")
    return sorted(rng.sample(sorted(candidates), min(count, len(candidates))))
