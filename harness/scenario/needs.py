"""What a scenario needs of where it runs, beyond what loading it checks (pure)."""

from __future__ import annotations

from harness.scenario.model import Scenario


def machine_loss_problem(scenario: Scenario) -> str | None:
    """A machine-loss loses a cluster worker's machine: a local run has no such machine to lose."""
    if not scenario.machine_losses:
        return None
    return (f"faults[{scenario.machine_losses[0].index}]: machine-loss needs --cluster (the hosts spread over "
            f"cluster workers' machines)")
