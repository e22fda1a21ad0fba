"""What one driver process can send, so a scenario asking for more is told before it runs.

Measured with bench/driver.py (8 echo hosts on this 2-core machine; the highest open-loop rate whose
p99 send lag stays under 1 ms): see README "Benchmarks". Beyond it the driver falls behind; the load
still ends at its planned end plus the client timeout, and what was not sent is counted as unsent.
"""

from __future__ import annotations

from harness.scenario import Scenario

DRIVER_MAX_RATE = 16_000   # requests/s, one driver process (bench/driver.py)


def peak_rate(scenario: Scenario) -> float:
    """The highest offered rate of the load (a ramp's or a phase's end included)."""
    return max((max(s.rate_from, s.rate_to) for s in scenario.load.segments), default=0.0)


def rate_warning(scenario: Scenario) -> str | None:
    """One line when the offered rate is beyond what one driver process sends, else None."""
    if scenario.fleet.simulated is not None:
        return None  # a model: no driver sends anything
    peak = peak_rate(scenario)
    if peak <= DRIVER_MAX_RATE:
        return None
    return (f"the offered rate peaks at {peak:,.0f}/s, beyond what one driver process sends (about "
            f"{DRIVER_MAX_RATE:,}/s, measured by bench/driver.py): the driver will fall behind, and what it "
            f"cannot send by the planned end plus the client timeout is counted as unsent")
