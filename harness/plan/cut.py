"""What a run's duration cut from the scenario's plan (pure): phases, faults and expectations.

A `--duration` (or a scenario `duration:`) shorter than the load as written truncates it: later phases
never run, a phase may stop half-way, host and machine losses and fault windows after the end never happen. That
is said before the run starts, and an expectation on a phase that was cut is *not evaluated* (a failed
verdict with the reason), never "held" over the part that ran.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from harness.scenario.loadshape import LoadShape
from harness.scenario.model import Expectation, Scenario
from harness.base.units import format_duration

EPSILON = 1e-9


def _s(seconds: float) -> str:
    return "0s" if seconds <= EPSILON else format_duration(seconds)


@dataclass(frozen=True)
class CutPhase:
    name: str
    start: float
    end: float              # as planned
    ran: float              # seconds of it that ran (0: dropped)


@dataclass(frozen=True)
class PlanCut:
    duration: float                         # the run's
    planned: float                          # the plan's (the load as written, or the scenario's own longer duration)
    phases: tuple[CutPhase, ...] = ()
    faults: tuple[str, ...] = ()            # one sentence per fault that lost events or windows
    expectations: tuple[tuple[Expectation, str], ...] = ()   # (expectation, why it cannot be evaluated)
    notes: tuple[str, ...] = field(default=())

    def to_json(self) -> dict[str, object]:
        return {"duration": self.duration, "planned": self.planned,
                "phases": [{"name": p.name, "start": p.start, "end": p.end, "ran": p.ran} for p in self.phases],
                "faults": list(self.faults),
                "expectations": [{"index": e.index, "text": e.text, "reason": why} for e, why in self.expectations]}

    @property
    def cut(self) -> bool:
        return bool(self.phases or self.faults)

    def lines(self) -> list[str]:
        """For people: what was cut, one line each."""
        if not self.cut:
            return []
        out = [f"the run lasts {_s(self.duration)} of a {_s(self.planned)} plan; cut:"]
        for phase in self.phases:
            span = f"{_s(phase.start)}-{_s(phase.end)}"
            out.append(f"  phase {phase.name} ({span}): " + ("dropped" if phase.ran <= EPSILON else
                                                              f"cut after {_s(phase.ran)}"))
        out += [f"  {text}" for text in self.faults]
        out += [f"  expectation {e.text}" + (f" (phase {e.phase})" if e.phase else "")
                + (f" (variant {e.variant})" if e.variant else "") + f": not evaluated ({why})"
                for e, why in self.expectations]
        return out


def _phase_matches(expectation: Expectation, name: str) -> bool:
    return expectation.phase is not None and (name == expectation.phase or name.split("#")[0] == expectation.phase)


def plan_cut(plan: Scenario, duration: float) -> PlanCut:
    """`plan`: the scenario as written (loaded without a --duration override); `duration`: the run's."""
    full = LoadShape.build(list(plan.load.specs))
    planned = max(full.duration, plan.duration)
    if duration >= planned - EPSILON:
        return PlanCut(duration, planned)
    phases = tuple(CutPhase(p.name, p.start, p.end, max(0.0, min(p.end, duration) - p.start))
                   for p in full.phases if p.end > duration + EPSILON)
    faults = []
    for loss in plan.host_losses:
        kept = [t for t in loss.times if t < duration]
        planned_times = [t for t in loss.times if t < planned]
        if len(kept) < len(planned_times):
            when = ", ".join(_s(t) for t in planned_times[len(kept):][:4])
            faults.append(f"faults[{loss.index}] (host-loss {loss.how}): " + (
                "never fires" if not kept else f"fires {len(kept)} of {len(planned_times)} times")
                + f" (not at {when}{'...' if len(planned_times) - len(kept) > 4 else ''})")
    for machine_loss in plan.machine_losses:
        if duration <= machine_loss.at < planned:
            faults.append(f"faults[{machine_loss.index}] (machine-loss): never fires (not at {_s(machine_loss.at)})")
    for fault in plan.shim_faults:
        windows = fault.window.intervals(planned)
        kept = [(a, b) for a, b in windows if a < duration]
        if len(kept) < len(windows):
            faults.append(f"faults[{fault.index}] ({fault.kind} {fault.mode}): " + (
                "never armed" if not kept else f"armed in {len(kept)} of {len(windows)} windows"))
        elif kept and kept[-1][1] > duration + EPSILON and (fault.window.until is not None or fault.window.every):
            a, b = kept[-1]
            faults.append(f"faults[{fault.index}] ({fault.kind} {fault.mode}): window "
                          f"{_s(a)}-{_s(b)} cut at {_s(duration)}")
    expectations = []
    for expectation in plan.expect:
        hit = [p for p in phases if _phase_matches(expectation, p.name)]
        if hit:
            what = ", ".join(f"{p.name} " + ("did not run" if p.ran <= EPSILON else
                                             f"ran {_s(p.ran)} of {_s(p.end - p.start)}")
                             for p in hit)
            expectations.append((expectation, f"phase {what}: the run's duration cut it"))
    return PlanCut(duration, planned, phases, tuple(faults), tuple(expectations))
