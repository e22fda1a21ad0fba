"""The plan: deterministic streams derived from the scenario's seed (no I/O).

Every stream has its own generator seeded from (seed, purpose), so changing one thing (say,
the number of hosts) does not shift the arrivals or keys: variants see the same arrivals.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from harness.scenario.loadshape import LoadShape
from harness.scenario.model import HostLoss, Keys, MachineLoss


def stream(seed: int, purpose: str) -> random.Random:
    """A generator for one purpose; string seeds are hashed the same way on every platform."""
    return random.Random(f"{seed}:{purpose}")


@dataclass(frozen=True, slots=True)
class Arrival:
    index: int
    t: float          # intended send time, seconds from the start of the load
    key: str
    request: int = 0  # which request of the mix (index into target.requests)


CHUNK = 1024      # arrivals drawn per step (part of the stream's definition); small, so drawing one delays no send much


def numpy_stream(seed: int, purpose: str) -> np.random.Generator:
    """A numpy generator for one purpose, seeded like `stream` from (seed, purpose) alone."""
    digest = hashlib.sha256(f"{seed}:{purpose}".encode()).digest()
    return np.random.Generator(np.random.PCG64(int.from_bytes(digest[:16], "little")))


@dataclass(slots=True)
class ArrivalChunk:
    """Consecutive arrivals of the plan (or of one driver worker's share of it), as plain lists: the
    driver walks them one by one, and list items are Python objects already (no per-item boxing)."""

    index: list[int]
    t: list[float]
    key: list[int]        # key numbers (key_name gives the text)
    request: list[int]


@dataclass(frozen=True)
class PlanSpec:
    """What a driver needs to draw the plan's arrivals itself (a driver worker draws its own share)."""

    shape: LoadShape
    keys: Keys
    seed: int
    weights: tuple[float, ...] = ()
    start_at: float = 0.0            # resume: arrivals before this were sent by the stopped run


def arrival_chunks(shape: LoadShape, keys: Keys, seed: int, weights: tuple[float, ...] = (), *,
                   worker: int = 0, workers: int = 1, start_at: float = 0.0) -> Iterator[ArrivalChunk]:
    """The plan's arrivals: a non-homogeneous Poisson process with rate r(t), by inverting Λ(t) (exact, no
    thinning), drawn CHUNK at a time with numpy.

    Times, keys, the request of the mix and the driver worker each come from a stream of their own, so
    adding a request to the mix changes neither the times nor the keys, and splitting the load across
    workers changes none of them: worker w of W keeps the arrivals whose seeded assignment is w. Each
    share is an independent Poisson process of rate r(t)/W (thinning by independent marks), and the
    shares together are exactly the single-process stream, for any W."""
    gaps = numpy_stream(seed, "arrivals")
    key_rng = numpy_stream(seed, "keys")
    request_rng = numpy_stream(seed, "requests")
    assign_rng = numpy_stream(seed, f"driver-workers:{workers}") if workers > 1 else None
    zipf = _zipf_cumulative(keys) if keys.distribution == "zipf" else None
    mix = np.cumsum(np.array(weights, dtype=float)) if len(weights) > 1 else None
    total = 0.0
    first = 0
    while True:
        marks = np.cumsum(np.concatenate(([total], gaps.standard_exponential(CHUNK))))[1:]
        total = float(marks[-1])
        times = shape.inverse_many(marks)
        past = np.flatnonzero(np.isnan(times) | (times >= shape.duration))
        n = int(past[0]) if len(past) else CHUNK
        if zipf is None:
            numbers = key_rng.integers(0, keys.space, CHUNK)
        else:
            numbers = np.searchsorted(zipf, key_rng.random(CHUNK) * zipf[-1], side="left")
        if mix is None:
            requests = np.zeros(CHUNK, dtype=np.int64)
        else:
            requests = np.minimum(np.searchsorted(mix, request_rng.random(CHUNK) * mix[-1], side="right"),
                                  len(mix) - 1)
        keep = np.arange(n)
        if assign_rng is not None:
            keep = keep[assign_rng.integers(0, workers, CHUNK)[:n] == worker]
        if start_at > 0:
            keep = keep[times[keep] >= start_at]
        if len(keep):
            yield ArrivalChunk((keep + first).tolist(), times[keep].tolist(), numbers[keep].tolist(),
                               requests[keep].tolist())
        if n < CHUNK:
            return
        first += CHUNK


def _zipf_cumulative(keys: Keys) -> np.ndarray:
    return np.cumsum(1.0 / np.arange(1, keys.space + 1, dtype=float) ** keys.zipf_s)


def arrivals(shape: LoadShape, keys: Keys, seed: int, weights: tuple[float, ...] = ()) -> Iterator[Arrival]:
    """The plan's arrivals one by one (the single-process stream of `arrival_chunks`)."""
    for chunk in arrival_chunks(shape, keys, seed, weights):
        for index, t, key, request in zip(chunk.index, chunk.t, chunk.key, chunk.request):
            yield Arrival(index, t, key_name(key), request)


def key_name(number: int) -> str:
    """The key numbered `number` in the key space (what {key} becomes; set-up's keys: all walks them)."""
    return f"k{number}"


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


def choose_machines(seed: int, fault: MachineLoss, candidates: list[int]) -> list[int]:
    """Which machines a machine-loss takes: the one it names (none if that machine is not among the
    candidates), else `count` of them seeded per fault, so the same run loses the same machines."""
    if fault.machine is not None:
        return [fault.machine] if fault.machine in candidates else []
    rng = stream(seed, f"machine-loss:{fault.index}")
    return sorted(rng.sample(sorted(candidates), min(fault.count, len(candidates))))
