"""What one driver process can send, so a scenario asking for more is told before it runs.

Measured with bench/driver.py (8 echo hosts on this 2-core machine; the highest open-loop rate whose
p99 send lag stays under 1 ms): see README "Benchmarks". Beyond it the driver falls behind; the load
still ends at its planned end plus the client timeout, and what was not sent is counted as unsent.
"""

from __future__ import annotations

from harness.scenario.model import Scenario

DRIVER_MAX_RATE = 16_000   # requests/s, one driver process (bench/driver.py)


def peak_rate(scenario: Scenario) -> float:
    """The highest offered rate of the load (a ramp's or a phase's end included)."""
    return max((max(s.rate_from, s.rate_to) for s in scenario.load.segments), default=0.0)


def rate_warning(scenario: Scenario) -> str | None:
    """One line when the offered rate is beyond what the scenario's driver processes send, else None."""
    if scenario.fleet.simulated is not None:
        return None  # a model: no driver sends anything
    from harness.run.driverpool import resolve_workers
    workers = resolve_workers(scenario.client.workers)
    capacity = DRIVER_MAX_RATE * workers
    peak = peak_rate(scenario)
    if peak <= capacity:
        return None
    who = "one driver process sends" if workers == 1 else f"{workers} driver processes send (client.workers)"
    return (f"the offered rate peaks at {peak:,.0f}/s, beyond what {who} (about {capacity:,}/s, measured by "
            f"bench/driver.py): the driver will fall behind, and what it cannot send by the planned end plus "
            f"the client timeout is counted as unsent")
