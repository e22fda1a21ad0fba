"""Allocation-failure and lock-error faults: the runner's side of the shim.

Each host gets its own control file (hosts/t<N>/h<i>/shim.ctl) and starts with the shim first in
LD_PRELOAD (before any allocator a variant preloads, so the two compose). The controller arms and
disarms each fault's slot in the hosts it applies to on the scenario's timeline, while the targets
run; the control file outlives restarts, so a restarted host comes back with its faults armed.
"""

from __future__ import annotations

import errno as errno_module
from dataclasses import asdict
from pathlib import Path
from typing import Any

import trio

from harness.errors import HarnessError
from harness.fleet import Host
from harness.plan import stream
from harness.scenario import Scenario, ShimFault
from harness.shim.control import ENV_VAR, NSLOTS, ControlFile, FaultSlot, ShimCounters

CONTROL_NAME = "shim.ctl"


def host_budget(scenario: Scenario, fault: ShimFault, host: int) -> int:
    """Real machines differ: with `spread`, each host's budget is budget x (1 +- spread), seeded."""
    if not fault.spread:
        return fault.budget
    jitter = stream(scenario.seed, f"budget:{fault.index}:{host}").uniform(-fault.spread, fault.spread)
    return max(1, int(fault.budget * (1.0 + jitter)))


def slot_for(fault: ShimFault, budget: int | None = None) -> FaultSlot:
    return FaultSlot(
        kind="alloc" if fault.kind == "alloc-fail" else "lock", mode=fault.mode,  # type: ignore[arg-type]
        functions=frozenset(fault.functions), probability=fault.probability, nth=fault.nth, after=fault.after,
        budget=fault.budget if budget is None else budget, min_size=fault.min_size, max_size=fault.max_size,
        errno=int(getattr(errno_module, fault.errno_name)), times=fault.times, callers=fault.callers)


def fault_hosts(scenario: Scenario, fault: ShimFault) -> list[int]:
    """Which hosts a fault applies to: all of its groups' (the whole fleet by default), or a seeded choice
    among them fixed for the run."""
    pool = scenario.hosts_in(fault.groups)
    count = fault.hosts.resolve(len(pool))
    if count >= len(pool):
        return pool
    return sorted(stream(scenario.seed, f"shim-fault:{fault.index}").sample(pool, count))


def counters_summary(counters: ShimCounters) -> dict[str, Any]:
    return {"calls": {k: v for k, v in counters.calls.items() if v},
            "injected": [s.injected for s in counters.slots],
            "eligible": [s.eligible for s in counters.slots],
            "live_bytes": counters.live_bytes, "peak_bytes": counters.peak_bytes, "loaded": counters.loaded}


class ShimFaults:
    def __init__(self, scenario: Scenario, hosts: list[Host], shim_library: Path):
        faults = scenario.shim_faults
        if len(faults) > NSLOTS:
            raise HarnessError(f"{scenario.file}: at most {NSLOTS} alloc-fail/lock-error faults, got {len(faults)}")
        self.scenario = scenario
        self.faults = faults
        self.hosts = hosts
        self.targets = {fault.index: fault_hosts(scenario, fault) for fault in faults}
        self.slots = {fault.index: slot for slot, fault in enumerate(faults)}
        self.files: dict[int, ControlFile] = {}
        for host in hosts:
            control = ControlFile.create(host.dir / CONTROL_NAME, seed=scenario.seed, host_index=host.index)
            self.files[host.index] = control
            host.env[ENV_VAR] = str(control.path)
            preload = host.env.get("LD_PRELOAD", "").strip()
            host.env["LD_PRELOAD"] = f"{shim_library} {preload}".strip()  # shim first
            host.extra["shim"] = str(shim_library)

    def close(self) -> None:
        for control in self.files.values():
            control.close()

    def armed(self, host: int) -> list[dict[str, Any]]:
        control = self.files[host]
        return [{"slot": slot, **{k: (sorted(v) if isinstance(v, frozenset) else v)
                                  for k, v in asdict(fault).items()}}
                for slot, fault in control.armed().items()]

    def snapshot(self, host: int) -> dict[str, Any]:
        return counters_summary(self.files[host].counters())

    def timeline(self) -> list[tuple[float, str, ShimFault]]:
        actions: list[tuple[float, str, ShimFault]] = []
        for fault in self.faults:
            for start, end in fault.window.intervals(self.scenario.duration):
                actions.append((start, "arm", fault))
                if end < self.scenario.duration:
                    actions.append((end, "disarm", fault))
        return sorted(actions, key=lambda a: (a[0], a[1] == "arm", a[2].index))

    async def run(self, t0: float, recorder: Any) -> None:
        try:
            for t, action, fault in self.timeline():
                await trio.sleep_until(t0 + t)
                slot = self.slots[fault.index]
                for host in self.targets[fault.index]:
                    if action == "arm":
                        self.files[host].arm(slot, slot_for(fault, host_budget(self.scenario, fault, host)))
                    else:
                        self.files[host].disarm(slot)
                recorder.event(f"fault-{action}", None, None, fault=fault.index, fault_kind=fault.kind, mode=fault.mode,
                               slot=slot, hosts=self.targets[fault.index])
            await trio.sleep_forever()  # faults stay as the timeline left them until the trial ends
        finally:
            for control in self.files.values():
                control.disarm_all()
