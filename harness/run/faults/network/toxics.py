"""What the armed network faults do to one chunk of a stream: when each of its bytes may go on. Pure (no I/O,
no clock of its own), so it is tested without sockets.

For one direction of one connection, a `Shaper` turns a chunk read at time `now` into segments with release
times, applying in order:
- latency: the chunk waits `latency` (+- `jitter`, seeded per connection), never overtaking the chunk before
  it (a stream stays in order, as TCP keeps it);
- slicer: the chunk is cut into segments of `size` +- `variation` bytes, `delay` apart;
- bandwidth: each segment leaves len / rate seconds after the one before it has gone (a wire of that speed,
  no burst).
Stalls and partitions hold whole directions and are the pump's business (harness/run/faults/network/proxy.py).
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass, field

from harness.scenario.model import NetFault

SHAPING = ("latency", "slicer", "bandwidth")
MAX_SEGMENTS = 4096      # per chunk: a 64 KiB read sliced 16 bytes at a time


@dataclass
class Counts:
    """Per fault, what it did (summed over connections and links)."""

    bytes_delayed: int = 0        # bytes that went through while it shaped them
    chunks: int = 0               # reads it shaped
    segments: int = 0             # slicer: segments written
    bytes_held: int = 0           # stall/partition: bytes read while it held their direction (they waited)
    connections_stalled: int = 0  # stall/partition: connections that had to wait
    connections_reset: int = 0    # reset: connections closed with RST
    connections_refused: int = 0  # partition refuse: new connections reset at once
    connections_blackholed: int = 0   # partition blackhole: new connections held, nothing forwarded

    def as_dict(self) -> dict[str, int]:
        return {k: v for k, v in self.__dict__.items() if v}

    def add(self, other: "Counts") -> None:
        for key, value in other.__dict__.items():
            setattr(self, key, getattr(self, key) + value)


def applies(fault: NetFault, direction: str) -> bool:
    return fault.direction in ("both", direction)


@dataclass
class Shaper:
    """One direction of one connection: release times for its chunks."""

    rng: random.Random
    last_release: float = 0.0          # keeps the stream in order
    bandwidth_free: dict[int, float] = field(default_factory=dict)   # fault index -> when its budget is free

    def plan(self, now: float, data: bytes, faults: Sequence[NetFault],
             counts: dict[int, Counts]) -> list[tuple[float, bytes]]:
        """Segments of `data` with the times they may be written; `faults` are the shaping faults armed on
        this direction (latency, slicer, bandwidth); `counts` is updated per fault."""
        release = now
        for fault in faults:
            if fault.kind == "latency":
                jitter = self.rng.uniform(-fault.jitter, fault.jitter) if fault.jitter else 0.0
                release = max(release, now + fault.latency + jitter)
                _count(counts, fault, len(data))
        release = max(release, self.last_release)
        segments = [data]
        slicer = next((f for f in faults if f.kind == "slicer"), None)
        gaps = [0.0]
        if slicer is not None:
            segments = self._slice(data, slicer)
            gaps = [0.0] + [slicer.delay] * (len(segments) - 1)
            _count(counts, slicer, len(data))
            counts[slicer.index].segments += len(segments)
        bandwidth = [f for f in faults if f.kind == "bandwidth"]
        planned = []
        for segment, gap in zip(segments, gaps):
            release += gap
            for fault in bandwidth:
                # Paced like a link of that speed (no burst): a segment is on the wire for len / rate seconds,
                # after the one before it.
                free = max(self.bandwidth_free.get(fault.index, release), release) + len(segment) / fault.rate
                self.bandwidth_free[fault.index] = free
                release = max(release, free)
            planned.append((release, segment))
        for fault in bandwidth:
            _count(counts, fault, len(data))
        self.last_release = release
        return planned

    def _slice(self, data: bytes, fault: NetFault) -> list[bytes]:
        pieces, at = [], 0
        while at < len(data):
            size = fault.size + (self.rng.randint(-fault.variation, fault.variation) if fault.variation else 0)
            size = max(1, size)
            if len(pieces) >= MAX_SEGMENTS - 1:
                size = len(data) - at
            pieces.append(data[at:at + size])
            at += size
        return pieces or [data]


def _count(counts: dict[int, Counts], fault: NetFault, nbytes: int) -> None:
    entry = counts.setdefault(fault.index, Counts())
    entry.bytes_delayed += nbytes
    entry.chunks += 1
