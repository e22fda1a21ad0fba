"""Resource faults on the timeline: cgroup limits (memory, CPU quota, pids) set on chosen hosts during
their windows, and what the kernel did about them (OOM kills, throttling, refused forks).

A host's cgroup outlives its restarts, so a limit holds for every incarnation while its window lasts:
a host OOM-killed under a memory limit is restarted under the same limit (a crash loop, as in
production). A window that starts at 0 is set before the hosts start, so it applies from their first
byte. When two faults of one kind overlap on a host, the one armed last holds; when it ends, the other
takes over again.
"""

from __future__ import annotations

import os
import signal
from typing import Any

import trio

from harness.collect.signature import bucket_id
from harness.plan.streams import stream
from harness.scenario.model import ResourceFault, Scenario

OOM_CLASS = "oom-kill"


def fault_hosts(scenario: Scenario, fault: ResourceFault) -> list[int]:
    """Which hosts a fault limits: all of its groups' (the whole fleet by default), or a seeded choice."""
    pool = scenario.hosts_in(fault.groups)
    count = fault.hosts.resolve(len(pool))
    if count >= len(pool):
        return pool
    return sorted(stream(scenario.seed, f"resource-fault:{fault.index}").sample(pool, count))


def describe_limit(fault: ResourceFault) -> str:
    if fault.kind == "memory":
        return f"memory {fault.limit // 2**20} MiB" if fault.limit % 2**20 == 0 else f"memory {fault.limit} B"
    if fault.kind == "cpu":
        return f"cpu {fault.quota * 100:g}%"
    return f"pids {fault.limit}"


class ResourceFaults:
    """Arms and disarms the scenario's resource faults on the hosts' cgroups (host.jail.cgroup)."""

    def __init__(self, scenario: Scenario, hosts: list[Any]):
        self.scenario = scenario
        self.faults = scenario.resource_faults
        self.hosts = hosts
        self.targets = {fault.index: fault_hosts(scenario, fault) for fault in self.faults}
        self.active: dict[tuple[int, str], list[ResourceFault]] = {}   # (host, kind) -> armed, oldest first
        self.applied: dict[int, list[dict[str, Any]]] = {}               # fault -> per host what was set

    def timeline(self) -> list[tuple[float, str, ResourceFault]]:
        actions: list[tuple[float, str, ResourceFault]] = []
        for fault in self.faults:
            for start, end in fault.window.intervals(self.scenario.duration):
                actions.append((start, "arm", fault))
                if end < self.scenario.duration:
                    actions.append((end, "disarm", fault))
        return sorted(actions, key=lambda a: (a[0], a[1] == "arm", a[2].index))

    def _set(self, host: int, kind: str) -> dict[str, Any]:
        cgroup = self.hosts[host].jail.cgroup if self.hosts[host].jail is not None else None
        if cgroup is None:
            return {"error": "no cgroup"}
        armed = self.active.get((host, kind)) or []
        fault = armed[-1] if armed else None
        if kind == "memory":
            return cgroup.set_memory(fault.limit if fault else None)
        if kind == "cpu":
            return cgroup.set_cpu(fault.quota if fault else None)
        return cgroup.set_pids(fault.limit if fault else None)

    def act(self, action: str, fault: ResourceFault) -> dict[str, Any]:
        """Arm or disarm one fault on its hosts; returns the event's detail (what each cgroup took)."""
        results = {}
        for host in self.targets[fault.index]:
            armed = self.active.setdefault((host, fault.kind), [])
            if action == "arm":
                armed.append(fault)
            elif fault in armed:
                armed.remove(fault)
            results[self.hosts[host].name] = self._set(host, fault.kind)
        errors = {name: r["error"] for name, r in results.items() if "error" in r}
        detail: dict[str, Any] = {"fault": fault.index, "fault_kind": fault.kind, "family": "resource",
                                  "limit": describe_limit(fault), "hosts": self.targets[fault.index],
                                  "applied": results}
        if errors:
            detail["errors"] = errors
        return detail

    def initial(self, start_at: float = 0.0) -> list[dict[str, Any]]:
        """Before the hosts start: the limits in force at `start_at` (0, or where a resumed trial goes on)
        are set, so they apply from a host's first byte. Returns the events' details (fault-arm)."""
        events = []
        for t, action, fault in self.timeline():
            if t > start_at or (t == start_at and start_at > 0):
                break
            detail = self.act(action, fault)
            if start_at == 0:
                events.append(detail if action == "arm" else {**detail, "disarm": True})
        if start_at > 0:   # a resumed trial: one event per fault in force again
            events += [{"fault": f.index, "fault_kind": f.kind, "family": "resource", "limit": describe_limit(f),
                        "hosts": self.targets[f.index], "resumed": True}
                       for f in self.faults if any(f in armed for armed in self.active.values())]
        return events

    async def run(self, t0: float, recorder: Any, start_at: float = 0.0) -> None:
        for t, action, fault in self.timeline():
            if t < start_at or (start_at == 0 and t <= 0):
                continue   # set before the hosts started (initial)
            await trio.sleep_until(t0 + t)
            detail = await trio.to_thread.run_sync(self.act, action, fault)
            recorder.event(f"fault-{action}", None, None, **detail)
        await trio.sleep_forever()


def oom_verdict(host: Any, exit_signal: int | None) -> dict[str, Any] | None:
    """Was this death the kernel's OOM killer? Yes when the host died of SIGKILL and its cgroup's OOM-kill
    count rose during the incarnation (the harness's own SIGKILLs never reach here: they are expected
    exits, not crashes). Returns the cgroup's evidence, or None."""
    child = host.child
    incarnation = getattr(child, "incarnation", None)
    cgroup = incarnation.cgroup if incarnation is not None else None
    if cgroup is None or exit_signal != signal.SIGKILL:
        return None
    now = cgroup.oom_kills()
    before = getattr(incarnation, "oom_before", None)
    if now is None or before is None or now <= before:
        return None
    stats = cgroup.stats()
    return {"oom_kills": now - before, "oom_kills_total": now, "memory_limit": stats.get("memory_limit"),
            "memory_peak": stats.get("memory_peak"), "memory": stats.get("memory"),
            "limit_hits": stats.get("memory_events"), "source": _oom_source(cgroup)}


def _oom_source(cgroup: Any) -> str:
    directory = cgroup.dir_of("memory")
    if directory is None:
        return "?"
    name = "memory.events" if (directory / "memory.events").exists() else "memory.oom_control"
    return os.path.join(str(directory), name)


def oom_triage(executable: str, evidence: dict[str, Any]) -> dict[str, Any]:
    """A triage row for an OOM kill (no core: SIGKILL dumps none): its class and a bucket per program."""
    signature = f"oom-kill {os.path.basename(executable) or '?'}"
    limit = evidence.get("memory_limit")
    return {"crash_class": OOM_CLASS, "signature": signature, "signature_method": "cgroup",
            "bucket": bucket_id(OOM_CLASS, signature), "signal": int(signal.SIGKILL), "signal_name": "SIGKILL",
            "class_detail": (f"killed by the kernel's OOM killer: the cgroup counted {evidence['oom_kills']} OOM "
                             f"kill(s)" + (f" under a {limit // 2**20} MiB limit" if limit else "")),
            "evidence": evidence, "in_allocator": False, "core_kept": False, "crashing_thread": []}
