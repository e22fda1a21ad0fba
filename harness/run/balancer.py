"""Which live host gets the next request. Pure logic, shared by the real driver and the simulator.

A host is either in rotation or out of it (dead, starting, ejected after a timeout). When a
host leaves, its share goes to the survivors at once, simply because it is no longer picked.
"""

from __future__ import annotations


class Balancer:
    def __init__(self, hosts: int, policy: str = "least-loaded"):
        if policy not in ("round-robin", "least-loaded"):
            raise ValueError(f"unknown balancer policy {policy!r}")
        self.policy = policy
        self.in_rotation = [False] * hosts
        self.inflight = [0] * hosts
        self._next = 0

    @property
    def hosts(self) -> int:
        return len(self.in_rotation)

    def set_in_rotation(self, host: int, value: bool) -> None:
        self.in_rotation[host] = value

    def live_hosts(self) -> list[int]:
        return [i for i, up in enumerate(self.in_rotation) if up]

    def pick(self) -> int | None:
        """The host for the next request, or None when no host is in rotation."""
        n = len(self.in_rotation)
        start = self._next
        best: int | None = None
        for offset in range(n):
            host = (start + offset) % n
            if not self.in_rotation[host]:
                continue
            if self.policy == "round-robin":
                best = host
                break
            # least-loaded: fewest requests in flight; ties go to the next in round-robin order
            if best is None or self.inflight[host] < self.inflight[best]:
                best = host
                if self.inflight[host] == 0:
                    break
        if best is not None:
            self._next = (best + 1) % n
        return best

    def started(self, host: int) -> None:
        self.inflight[host] += 1

    def finished(self, host: int, count: int = 1) -> None:
        self.inflight[host] = max(0, self.inflight[host] - count)
