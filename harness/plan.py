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


@dataclass(frozen=True)
class Arrival:
    index: int
    t: float          # intended send time, seconds from the start of the load
    key: str


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
            return f"k{self.rng.randrange(self.space)}"
        point = self.rng.random() * self.cumulative[-1]
        return f"k{bisect.bisect_left(self.cumulative, point)}"


def arrivals(shape: LoadShape, keys: Keys, seed: int) -> Iterator[Arrival]:
    """A non-homogeneous Poisson process with rate r(t), by inverting Λ(t) (exact, no thinning)."""
    gaps = stream(seed, "arrivals")
    picker = KeyPicker(keys, stream(seed, "keys"))
    total = 0.0
    for index in itertools.count():
        total += gaps.expovariate(1.0)
        t = shape.inverse(total)
        if t is None or t >= shape.duration:
            return
        yield Arrival(index, t, picker.pick())


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
