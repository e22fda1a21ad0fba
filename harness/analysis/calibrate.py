"""`harness calibrate RUN`: fit a simulated host model to a short real run of a target.

From the per-host, per-second samples of a real run with the shim loaded (live heap bytes and
requests in flight) it fits memory = base + per_request x in-flight by least squares
(scipy.stats.linregress), takes the service time from the median latency of unloaded seconds and the
budget (and its spread) from the run's own alloc-fail budget fault, and prints a `fleet.simulated`
block, so the model fleet runs into the same wall as the real one. Capacity is only bounded from
below by what a host served; the estats-like wall is memory, not CPU.
"""

from __future__ import annotations

import json
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from scipy import stats as scipy_stats

from harness.base.errors import HarnessError, ScenarioError
from harness.scenario.loader import load_scenario
from harness.store import reads
from harness.store.runstore import open_run
from harness.base.units import format_size


@dataclass(frozen=True)
class Calibration:
    memory_base: int
    memory_per_request: int
    r_squared: float
    points: int
    service_time: float
    capacity_seen: float           # the most one host served in a second (a lower bound on capacity)
    budget: int | None
    spread: float

    def simulated_block(self, hosts: int) -> dict[str, Any]:
        memory: dict[str, Any] = {"base": self.memory_base, "per_request": self.memory_per_request,
                                  "on_exhaust": "crash"}
        if self.budget:
            memory["budget"] = self.budget
            memory["spread"] = f"{self.spread * 100:g}%"
        return {"hosts": hosts, "capacity": f"{max(self.capacity_seen * 2, 1):.0f}/s",
                "service_time": f"{self.service_time * 1e3:.0f}ms", "memory": memory}


def calibrate(run_dir: Path, trial: int | None = None) -> Calibration:
    store = open_run(run_dir)
    try:
        if trial is None:
            trial = reads.first_trial(store)
            if trial is None:
                raise HarnessError(f"{run_dir} has no trial to calibrate from")
        rows = reads.up_host_samples(store, trial)
        latency = reads.p50s(store, trial)
    finally:
        store.close()
    inflight, live = [], []
    for row in rows:
        shim = json.loads(row["shim"]) if row["shim"] else None
        if shim and shim.get("loaded") and shim.get("live_bytes"):
            inflight.append(row["inflight"])
            live.append(shim["live_bytes"])
    if len(set(inflight)) < 3:
        raise HarnessError(f"{run_dir} trial {trial}: too few distinct in-flight levels with shim counters to fit "
                           f"memory per request (run a ramp with an alloc-fail fault, so the shim is loaded)")
    fit = scipy_stats.linregress(inflight, live)
    scenario = _saved_scenario(run_dir)
    budget_fault = next((f for f in scenario.shim_faults if f.mode == "budget"), None) if scenario else None
    return Calibration(
        memory_base=max(0, int(fit.intercept)), memory_per_request=max(1, int(fit.slope)),
        r_squared=float(fit.rvalue ** 2), points=len(inflight),
        service_time=statistics.median(latency) if latency else 0.1,
        capacity_seen=float(max(r["ok"] for r in rows)) if rows else 0.0,
        budget=budget_fault.budget if budget_fault else None,
        spread=budget_fault.spread if budget_fault else 0.0)


def _saved_scenario(run_dir: Path) -> Any:
    try:
        return load_scenario(run_dir / "scenario.yaml")
    except ScenarioError:
        return None


def render(calibration: Calibration, hosts: int) -> str:
    block = calibration.simulated_block(hosts)
    memory = block["memory"]
    lines = [f"# fitted from {calibration.points} host-seconds: memory = {format_size(calibration.memory_base)} + "
             f"{format_size(calibration.memory_per_request)} x in-flight (r^2 {calibration.r_squared:.2f})",
             "fleet:", "  simulated:", f"    hosts: {hosts}", f"    capacity: {block['capacity']}   "
             f"# 2x the most one host served ({calibration.capacity_seen:.0f}/s); memory is the wall",
             f"    service_time: {block['service_time']}",
             "    memory: {" + ", ".join(f"{k}: {v}" for k, v in memory.items()) + "}"]
    return "\n".join(lines)
