"""What a scenario needs of where it runs, beyond what loading it checks (pure)."""

from __future__ import annotations

from harness.scenario.model import Scenario


def machine_loss_problem(scenario: Scenario, after: float = 0.0) -> str | None:
    """A machine-loss loses a cluster worker's machine: a local run has no such machine to lose. `after`: a
    resumed run goes on from that second (the earliest any of its unfinished trials goes on from), so a loss
    before it is past and needs no machine any more."""
    ahead = [fault for fault in scenario.machine_losses if fault.at >= after]
    if not ahead:
        return None
    return (f"faults[{ahead[0].index}]: machine-loss needs --cluster (the hosts spread over "
            f"cluster workers' machines)")
