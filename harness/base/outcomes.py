"""What became of every arrival, and the per-second records that count it.

The one vocabulary the driver, the simulator, the store and the analysis share. An arrival is
*offered* at its planned time and *sent* when it is written to a host; every offered arrival ends as
exactly one outcome: ok, timeout (no reply within the client's timeout), conn_error (the connection was
lost with the request in flight, or refused), no_host (nobody in rotation) or bad_reply (a reply that
does not match its expectation or cannot be parsed). `COUNTS` are the counted columns of every
per-second record, in the order the store's tables hold them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

OUTCOMES = ("ok", "timeout", "conn_error", "no_host", "bad_reply")
ERROR_KINDS = OUTCOMES[1:]
COUNTS = ("offered", "sent", *OUTCOMES)


@dataclass(frozen=True)
class Sample:
    """The fleet's second `t` (a row of `samples`): the counts, latency percentiles (seconds) and histogram."""

    t: int
    offered: int
    sent: int
    ok: int
    timeout: int
    conn_error: int
    no_host: int
    bad_reply: int
    p50: float | None
    p90: float | None
    p99: float | None
    p999: float | None
    max: float | None
    hosts_alive: int
    offered_rate: float
    hist: bytes | None


@dataclass(frozen=True)
class RequestSample:
    """One request name's outcomes in one second (a mix of several requests only)."""

    t: int
    name: str
    offered: int
    sent: int
    ok: int
    timeout: int
    conn_error: int
    no_host: int
    bad_reply: int
    hist: bytes | None


@dataclass(frozen=True)
class HostSample:
    """One host's second: what it was sent and answered, its state and footprint."""

    t: int
    host: int
    state: str
    pid: int | None
    sent: int
    ok: int
    errors: int
    inflight: int
    rss: int | None
    fds: int | None
    shim: dict[str, Any] | None = None
    threads: int | None = None
    cgroup: dict[str, Any] | None = None    # the host's cgroup counters (harness/run/isolation/cgroups.py)


def counted(record: Any) -> tuple[int, ...]:
    """A record's COUNTS, in order (a Sample, a driver's Counters, anything with those attributes)."""
    return tuple(getattr(record, name) for name in COUNTS)
