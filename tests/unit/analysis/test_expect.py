"""Expectations judged over a report (pure)."""

from __future__ import annotations

from harness.analysis.expect import evaluate
from harness.scenario.loader import load_scenario_text

SCENARIO = """
name: judge
target: {command: [x, "{port}"]}
fleet: {hosts: 2}
load: [{hold: {rate: 10, for: 2s}}]
variants: [{name: a}, {name: b}]
expect:
  - {variant: a, crashes: 0}
  - {variant: b, crashes: 0}
  - {p99_latency: "< 100ms", phase: hold}
"""


def _trial(variant: str, crashes: int, p99: float) -> dict:
    window = {"crashes": crashes, "offered": 20, "error_total": 0, "errors": {"timeout": 0}, "seconds": 2, "ok": 20,
              "hosts_alive_min": 2, "latency": {"p50": p99 / 2, "p90": p99, "p99": p99, "p999": p99, "max": p99}}
    return {"variant": variant, "overall": window, "phases": [{"name": "hold", **window}]}


def test_expectations_hold_fail_and_skip() -> None:
    scenario = load_scenario_text(SCENARIO)
    results = evaluate(scenario, {"trials": [_trial("a", 0, 0.05), _trial("a", 2, 0.2)]})
    by_text = {r["text"] + str(r["variant"]): r for r in results}
    crashed = by_text["crashes 0a"]
    assert not crashed["held"] and crashed["observed"] == 2  # worst trial
    skipped = by_text["crashes 0b"]
    assert skipped["held"] and "did not run" in skipped["observed_text"]
    latency = by_text["p99_latency < 100msNone"]
    assert not latency["held"] and latency["observed"] == 0.2
    assert evaluate(scenario, {"trials": [_trial("a", 0, 0.05), _trial("b", 0, 0.01)]})[2]["held"]
