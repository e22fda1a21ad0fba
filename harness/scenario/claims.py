"""What a comparison of variants can be asked (pure: no store, no statistics).

The metrics `harness compare` reports, and the `{compare: [variant, reference], <metric>: <claim>}`
expectation a scenario states: the loader parses it with this module, harness.analysis.compare judges it.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

# metric -> (label, unit, lower is better, test)
METRICS: dict[str, tuple[str, str, bool, str]] = {
    "crash_rate": ("crash rate", "per host-hour", True, "exact conditional rate ratio"),
    "crashed_trials": ("crashed trials", "fraction of trials", True, "Fisher exact"),
    "first_crash": ("time to first crash", "s (Kaplan-Meier median)", False, "log-rank"),
    "p50_latency": ("p50 latency", "s (median of trials)", True, "Mann-Whitney U"),
    "p99_latency": ("p99 latency", "s (median of trials)", True, "Mann-Whitney U"),
    "throughput": ("throughput", "ok/s (median of trials)", False, "Mann-Whitney U"),
    "peak_rss": ("peak RSS", "bytes (median of trials)", True, "Mann-Whitney U"),
}

VERDICT_CLAIMS = ("better", "worse", "no worse", "no better", "no difference")
_RATIO_CLAIM = re.compile(r"^\s*(<=|>=|<|>)\s*([0-9]*\.?[0-9]+)\s*x\s*$")


@dataclass(frozen=True)
class VariantExpectation:
    """`{compare: [variant, reference], <metric>: <claim>}` from a scenario's expect list.

    claim: a verdict claim ("better", "worse", "no worse", "no better", "no difference") judged on the
    comparison's verdict, or a ratio claim ("< 1.1x", "<= 1.1x", "> 0.9x", ">= 0.9x") judged on the
    ratio variant / reference (rate ratio, ratio of medians, or time ratio).
    """

    variant: str
    reference: str
    metric: str
    claim: str                         # one of VERDICT_CLAIMS, or "<", "<=", ">", ">="
    factor: float | None = None        # for ratio claims
    text: str = ""
    index: int = 0
    line: int = 0

    @classmethod
    def parse(cls, compare: Sequence[str], metric: str, value: str, *, index: int = 0,
              line: int = 0) -> "VariantExpectation":
        """Raises ValueError with a message fit for a FILE:LINE: FIELD: message line."""
        if len(compare) != 2 or not all(isinstance(n, str) and n for n in compare):
            raise ValueError("compare: needs two variant names, [variant, reference]")
        if compare[0] == compare[1]:
            raise ValueError("compare: the two variants are the same")
        if metric not in METRICS:
            raise ValueError(f"unknown metric {metric!r} for compare (known: {', '.join(METRICS)})")
        text = f"{compare[0]} vs {compare[1]}: {metric} {str(value).strip()}"
        claim = str(value).strip().lower()
        if claim in VERDICT_CLAIMS:
            return cls(compare[0], compare[1], metric, claim, None, text, index, line)
        match = _RATIO_CLAIM.match(claim)
        if not match:
            raise ValueError(f"{metric}: expected one of {', '.join(VERDICT_CLAIMS)} or a ratio like '< 1.1x', "
                             f"got {value!r}")
        if metric == "crashed_trials":
            raise ValueError("crashed_trials takes a verdict claim (better, no worse, ...), not a ratio")
        factor = float(match.group(2))
        if factor <= 0:
            raise ValueError(f"{metric}: the ratio must be positive")
        return cls(compare[0], compare[1], metric, match.group(1), factor, text, index, line)
