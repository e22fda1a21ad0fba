"""The balancer for a tick's worth of requests at once: a vectorized twin of harness.run.balancer.Balancer.

Balancer.pick() places one request at a time; a simulated fleet of 10,000 hosts receives hundreds
of thousands of requests per tick, so this module places a whole tick's count in one step with the
same semantics:
- hosts out of rotation (dead, restarting, ejected) get nothing; their share goes to the rest;
- round-robin: each host in rotation gets total // n, and the remainder goes one each to the next
  hosts in rotation order from the pointer (exactly what `total` calls of Balancer.pick() do);
- least-loaded: each request goes to a host with the fewest in flight, so a tick's requests
  "water-fill" the hosts up to a common level; ties go in rotation order from the pointer. With
  equal loads this is exactly the sequential result; with unequal loads every host ends with the
  same count as the sequential Balancer or one off (which of the hosts at the final level get the
  last few requests can differ), the total is exact.
In-flight counts do not change inside a tick (no completions between picks): that is the tick's
resolution, documented in docs/simulation.md.
"""

from __future__ import annotations

import numpy as np

from harness.run.balancer import Balancer

POLICIES = ("round-robin", "least-loaded")


def _cyclic(indices: np.ndarray, pointer: int) -> np.ndarray:
    """Host indices (ascending) in rotation order starting at the first one >= pointer."""
    start = int(np.searchsorted(indices, pointer))
    if start == 0 or start == len(indices):
        return indices
    return np.concatenate((indices[start:], indices[:start]))


_ALL: dict[int, np.ndarray] = {}


def assign(total: int, in_rotation: np.ndarray, inflight: np.ndarray, policy: str,
           pointer: int, in_count: int | None = None) -> tuple[np.ndarray, int]:
    """(requests per host, new pointer) for `total` requests; the pointer is Balancer._next.
    `in_count`, when given, is the number of hosts in rotation (saves a scan)."""
    hosts = len(in_rotation)
    counts = np.zeros(hosts, dtype=np.int64)
    if total <= 0:
        return counts, pointer
    live = _ALL.get(hosts) if in_count == hosts else np.flatnonzero(in_rotation)
    if live is None:
        live = _ALL[hosts] = np.arange(hosts)
    n = len(live)
    if n == 0:
        return counts, pointer
    if policy == "round-robin":
        return _spread(total, live, counts, pointer, hosts)
    if policy != "least-loaded":
        raise ValueError(f"unknown balancer policy {policy!r}")
    levels = inflight if n == hosts else inflight[live]
    low = levels.min()
    if low == levels.max():                       # equal loads: the sequential result exactly
        return _spread(total, live, counts, pointer, hosts)
    order = np.argsort(levels, kind="stable")
    ranked = levels[order]
    prefix = np.concatenate(([0], np.cumsum(ranked)))
    # cost[j-1]: requests needed to raise the j least-loaded hosts to the (j+1)-th one's level
    j = np.arange(1, n)
    cost = j * ranked[1:] - prefix[1:n]
    filled = int(np.searchsorted(cost, total, side="right")) + 1      # hosts at the final level
    level, remainder = divmod(total + int(prefix[filled]), filled)
    members = live[order[:filled]]
    counts[members] = level - inflight[members]
    if remainder:
        members.sort()
        ring = _cyclic(members, pointer)
        counts[ring[:remainder]] += 1
        pointer = int(ring[remainder - 1] + 1) % hosts
    else:
        # the last request went to the last host to reach the level; the next pick starts after it
        pointer = pointer
    return counts, pointer


def _spread(total: int, live: np.ndarray, counts: np.ndarray, pointer: int, hosts: int) -> tuple[np.ndarray, int]:
    n = len(live)
    base, remainder = divmod(total, n)
    if n == hosts:                                # everyone in rotation: no index juggling
        counts += base
        if remainder:
            stop = pointer + remainder                # the next `remainder` hosts from the pointer, wrapping
            counts[pointer:min(stop, hosts)] += 1
            if stop > hosts:
                counts[:stop - hosts] += 1
            return counts, stop % hosts
        return counts, pointer
    counts[live] += base
    ring = _cyclic(live, pointer)
    if remainder:
        counts[ring[:remainder]] += 1
        last = ring[remainder - 1]
    else:
        last = ring[n - 1]
    return counts, int(last + 1) % hosts


def sequential(total: int, in_rotation: list[bool], inflight: list[int], policy: str,
               pointer: int = 0) -> tuple[list[int], int]:
    """The same placement done by the real Balancer, one pick at a time (for tests and tiny fleets)."""
    balancer = Balancer(len(in_rotation), policy)
    balancer.in_rotation = list(in_rotation)
    balancer.inflight = list(inflight)
    balancer._next = pointer
    counts = [0] * len(in_rotation)
    for _ in range(total):
        host = balancer.pick()
        if host is None:
            break
        balancer.started(host)
        counts[host] += 1
    return counts, balancer._next
