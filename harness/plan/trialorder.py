"""The order of a run's trials: every variant x repeat, interleaved (pure)."""

from __future__ import annotations

from harness.base.errors import HarnessError
from harness.scenario.model import Scenario, Variant


def trial_order(scenario: Scenario, only: str | None, repeats: int) -> list[tuple[Variant, int]]:
    """Variants interleaved: A B C A B C ..., so drift on the machine hits them all alike."""
    variants = list(scenario.variants) or [Variant(name="default")]
    if only is not None:
        chosen = scenario.variant(only)
        if chosen is None:
            names = ", ".join(v.name for v in scenario.variants) or "(none defined)"
            raise HarnessError(f"no variant named {only!r} in {scenario.file} (variants: {names})")
        variants = [chosen]
    return [(variant, repeat) for repeat in range(repeats) for variant in variants]
