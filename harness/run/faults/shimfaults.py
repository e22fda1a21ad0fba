"""Allocation-failure and lock-error faults: the runner's side of the shim.

Each host gets its own control file (hosts/t<N>/h<i>/shim.ctl) and starts with the shim first in
LD_PRELOAD (before any allocator a variant preloads, so the two compose). The controller arms and
disarms each fault's slot in the hosts it applies to on the scenario's timeline, while the targets
run; the control file outlives restarts, so a restarted host comes back with its faults armed.
"""

from __future__ import annotations

import errno as errno_module
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import trio

from harness.base.errors import HarnessError
from harness.run.fleet import Host
from harness.plan.streams import stream
from harness.scenario.model import Scenario, ShimFault
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


def counters_summary(counters: ShimCounters, clock: Callable[[int], float] | None = None) -> dict[str, Any]:
    """The counters as stored with samples and crashes; `clock` maps the shim's CLOCK_MONOTONIC
    nanoseconds to the trial's seconds (first/last injection per slot, None when none)."""
    summary = {"calls": {k: v for k, v in counters.calls.items() if v},
               "injected": [s.injected for s in counters.slots],
               "eligible": [s.eligible for s in counters.slots],
               "live_bytes": counters.live_bytes, "peak_bytes": counters.peak_bytes, "loaded": counters.loaded}
    if clock is not None:
        summary["first_injected"] = [round(clock(s.first_ns), 4) if s.first_ns else None for s in counters.slots]
        summary["last_injected"] = [round(clock(s.last_ns), 4) if s.last_ns else None for s in counters.slots]
    return summary


def monotonic_clock(now: Callable[[], float]) -> Callable[[int], float]:
    """CLOCK_MONOTONIC nanoseconds (the shim's clock) -> seconds on a clock whose current value is now()."""
    return lambda ns: now() - (time.monotonic_ns() - ns) / 1e9


@dataclass
class _OpenWindow:
    fault: ShimFault
    slot: int
    number: int          # which of the fault's intervals on the timeline (0, 1, ...)
    start: float         # trial time it was armed
    resumed: bool        # armed again by `harness resume` part-way through


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
        self.faults_by_slot = {slot: fault for slot, fault in enumerate(faults)}
        self.open: dict[int, _OpenWindow] = {}                   # fault index -> its window armed now
        self.log: list[tuple[float, str, int, int]] = []          # (trial time, arm|disarm, fault, window)
        self.clock: Callable[[int], float] = monotonic_clock(time.monotonic)  # the runner sets the trial's
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
        """The faults armed in the host's control file now."""
        return self.armed_at(host, None)

    def armed_at(self, host: int, t: float | None) -> list[dict[str, Any]]:
        """The faults that were armed on `host` at trial time t (None: now), by the controller's own log
        of what it armed and disarmed when, so a crash seen while the fleet is being stopped (after the
        faults were disarmed) is told the truth about its moment; parameters as the file holds them."""
        control = self.files[host]
        out = []
        for slot, fault in self.faults_by_slot.items():
            if host not in self.targets[fault.index]:
                continue
            window = self._window_at(fault.index, t)
            if window is None:
                continue
            decoded = control.slot(slot)
            if decoded is None:
                continue
            out.append({"slot": slot, "fault": fault.index, "window": window[0], "armed_at": window[1],
                        **{k: (sorted(v) if isinstance(v, frozenset) else v) for k, v in asdict(decoded).items()}})
        return out

    def _window_at(self, fault: int, t: float | None) -> tuple[int, float] | None:
        """(window number, armed at) of the fault's window open at t (None: now), from the log."""
        state: tuple[int, float] | None = None
        for when, action, index, number in self.log:
            if index != fault:
                continue
            if t is not None and when > t:
                break
            state = (number, when) if action == "arm" else None
        return state

    def snapshot(self, host: int) -> dict[str, Any]:
        return counters_summary(self.files[host].counters(), self.clock)

    def timeline(self) -> list[tuple[float, str, ShimFault]]:
        actions: list[tuple[float, str, ShimFault]] = []
        for fault in self.faults:
            for start, end in fault.window.intervals(self.scenario.duration):
                actions.append((start, "arm", fault))
                if end < self.scenario.duration:
                    actions.append((end, "disarm", fault))
        return sorted(actions, key=lambda a: (a[0], a[1] == "arm", a[2].index))

    def _window_number(self, fault: ShimFault, start: float) -> int:
        starts = [a for a, _ in fault.window.intervals(self.scenario.duration)]
        return min(range(len(starts)), key=lambda i: abs(starts[i] - start)) if starts else 0

    def _still_open(self, fault: ShimFault, start: float, at: float) -> bool:
        return any(a == start and b > at for a, b in fault.window.intervals(self.scenario.duration))

    async def run(self, t0: float, recorder: Any, start_at: float = 0.0) -> None:
        """Arm and disarm on the scenario's timeline (t0: trial time 0); `start_at` > 0 continues a
        resumed trial: windows that closed before it are not replayed, one still open is armed again."""
        self.clock = monotonic_clock(recorder.now)
        try:
            for t, action, fault in self.timeline():
                if t < start_at and not (action == "arm" and self._still_open(fault, t, start_at)):
                    continue
                await trio.sleep_until(t0 + max(t, start_at))
                slot = self.slots[fault.index]
                if action == "arm":
                    for host in self.targets[fault.index]:
                        self.files[host].arm(slot, slot_for(fault, host_budget(self.scenario, fault, host)))
                    number = self._window_number(fault, t)
                    self.open[fault.index] = _OpenWindow(fault, slot, number, round(recorder.now(), 6), t < start_at)
                    self.log.append((recorder.now(), "arm", fault.index, number))
                else:
                    for host in self.targets[fault.index]:
                        self.files[host].disarm(slot)
                    self._close(fault.index, recorder, "schedule")
                recorder.event(f"fault-{action}", None, None, fault=fault.index, fault_kind=fault.kind, mode=fault.mode,
                               slot=slot, hosts=self.targets[fault.index])
            await trio.sleep_forever()  # faults stay as the timeline left them until the trial ends
        finally:
            self.finish(recorder)

    def finish(self, recorder: Any) -> None:
        """The load is over: disarm everything and close the open windows (before the fleet is stopped, so
        a host that dies while being stopped is not taken for one that died under a fault). Idempotent."""
        for control in self.files.values():
            control.disarm_all()
        for index in list(self.open):
            self._close(index, recorder, "trial end")

    def _close(self, index: int, recorder: Any, ended_by: str) -> None:
        """A window ends: what it did on each host (eligible calls, injected failures, first and last
        injection) goes into a `fault-window` event; the next arming zeroes these counters."""
        window = self.open.pop(index, None)
        if window is None:
            return
        now = recorder.now()
        self.log.append((now, "disarm", index, window.number))
        hosts = []
        for host in self.targets[index]:
            counters = self.files[host].counters().slots[window.slot]
            hosts.append({"host": host, "eligible": counters.eligible, "injected": counters.injected,
                          "first": round(self.clock(counters.first_ns), 4) if counters.first_ns else None,
                          "last": round(self.clock(counters.last_ns), 4) if counters.last_ns else None})
        fault = window.fault
        recorder.event("fault-window", None, None, fault=index, slot=window.slot, fault_kind=fault.kind,
                       mode=fault.mode, window=window.number, start=window.start, end=round(now, 6),
                       ended_by=ended_by, resumed=window.resumed, hosts=hosts)
