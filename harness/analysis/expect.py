"""Expectations (thresholds) evaluated over a report: pure, so past runs can be re-judged."""

from __future__ import annotations

import math
import operator
from typing import Any

from harness.scenario.model import Expectation, Scenario
from harness.base.units import format_duration

_OPS = {"<": operator.lt, "<=": operator.le, ">": operator.gt, ">=": operator.ge, "==": operator.eq}


def _observe(expectation: Expectation, trial: dict[str, Any]) -> float | None:
    scope = trial
    if expectation.request is not None:
        scope = (trial.get("requests") or {}).get(expectation.request)
        if scope is None:
            return None   # a mix of one request has no per-request rows: no data
    windows = [scope["overall"]] if expectation.phase is None else [
        p for p in scope["phases"] if p["name"] == expectation.phase or p["name"].split("#")[0] == expectation.phase]
    if not windows:
        return None
    metric = expectation.metric
    if metric == "crashes":
        return float(sum(w["crashes"] for w in windows))
    if metric in ("error_rate", "timeout_rate"):
        offered = sum(w["offered"] for w in windows)
        bad = sum(w["error_total"] if metric == "error_rate" else w["errors"]["timeout"] for w in windows)
        return bad / offered if offered else 0.0
    if metric == "throughput":
        seconds = sum(w["seconds"] for w in windows)
        return sum(w["ok"] for w in windows) / seconds if seconds else 0.0
    if metric == "hosts_alive":
        values = [w["hosts_alive_min"] for w in windows if w["hosts_alive_min"] is not None]
        return float(min(values)) if values else None
    key = {"p50_latency": "p50", "p90_latency": "p90", "p99_latency": "p99", "p999_latency": "p999",
           "max_latency": "max"}[metric]
    values = [w["latency"][key] for w in windows if w["latency"][key] is not None]
    return max(values) if values else None


def _format(metric: str, value: float | None) -> str:
    if value is None:
        return "no data"
    if metric.endswith("_latency"):
        return format_duration(value)
    if metric.endswith("_rate"):
        return f"{value * 100:.3g}%"
    if metric == "throughput":
        return f"{value:.0f}/s"
    return f"{value:g}"


def evaluate(scenario: Scenario, report: dict[str, Any],
             not_evaluated: dict[int, str] | None = None) -> list[dict[str, Any]]:
    """One result per expectation: held in every matching trial? the worst observed value.

    `not_evaluated`: expectation index -> why it cannot be judged (its phase was cut by the run's
    duration); such an expectation is not held (`evaluated: false`), whatever the data."""
    results = []
    for expectation in scenario.expect:
        reason = (not_evaluated or {}).get(expectation.index)
        if reason is not None:
            results.append({"index": expectation.index, "line": expectation.line, "metric": expectation.metric,
                            "op": expectation.op, "limit": expectation.value, "phase": expectation.phase,
                            "variant": expectation.variant, "request": expectation.request, "text": expectation.text,
                            "held": False, "evaluated": False, "observed": None,
                            "observed_text": f"not evaluated: {reason}"})
            continue
        trials = [t for t in report["trials"] if expectation.variant is None or t["variant"] == expectation.variant]
        observed = [_observe(expectation, t) for t in trials]
        compare = _OPS[expectation.op]
        failures = [v for v in observed if v is None or not compare(v, expectation.value)]
        held = bool(trials) and not failures
        worst: float | None
        if failures:
            worst = next((v for v in failures if v is None), None)
            numeric = [v for v in failures if v is not None]
            if numeric:
                worst = max(numeric) if expectation.op in ("<", "<=") else min(numeric)
        else:
            numeric = [v for v in observed if v is not None]
            worst = (max(numeric) if expectation.op in ("<", "<=") else min(numeric)) if numeric else None
        text = _format(expectation.metric, worst)
        if not held and worst is not None and expectation.value and not math.isinf(worst):
            text += f" (limit {expectation.op} {_format(expectation.metric, expectation.value)})"
        if not trials:  # `--variant` ran another one: nothing to judge, nothing failed
            held, text = True, "skipped (this variant did not run)"
        results.append({"index": expectation.index, "line": expectation.line, "metric": expectation.metric,
                        "op": expectation.op, "limit": expectation.value, "phase": expectation.phase,
                        "variant": expectation.variant, "request": expectation.request, "text": expectation.text,
                        "held": held, "evaluated": True, "observed": worst, "observed_text": text})
    return results
