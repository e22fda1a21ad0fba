"""Network faults: a user-space fault proxy per link (toxiproxy's model, no kernel module) and the timeline
that arms its faults. Only links some network fault may act on go through it (topology.py)."""

from __future__ import annotations

from typing import Any, Collection

import trio

from harness.run.faults.network.proxy import FaultProxy
from harness.run.faults.network.topology import DRIVER, LinkSpec, fault_hosts, fault_links, host_names, proxied_links
from harness.scenario.model import NetFault, Scenario

__all__ = ["NetFaults", "armed_spans", "describe", "merge_summaries"]


def armed_spans(fault: NetFault, duration: float) -> list[tuple[float, float]]:
    """When a fault is armed in a trial of `duration`: (start, end) each; an instant fault's has no length;
    an end at or past `duration` is the trial's end (never disarmed)."""
    if fault.instant:
        return [(fault.window.start, fault.window.start)] if fault.window.start < duration else []
    return fault.window.intervals(duration)


def describe(fault: NetFault) -> str:
    """A short label: 'latency 50 ms (+-5 ms) downstream', 'partition refuse', 'bandwidth 64 KiB/s'."""
    if fault.kind == "latency":
        text = f"latency {fault.latency * 1e3:g} ms" + (f" (+-{fault.jitter * 1e3:g} ms)" if fault.jitter else "")
    elif fault.kind == "bandwidth":
        text = f"bandwidth {fault.rate / 1024:g} KiB/s"
    elif fault.kind == "partition":
        text = f"partition {fault.how}"
    elif fault.kind == "slicer":
        text = f"slicer {fault.size} B" + (f" +-{fault.variation}" if fault.variation else "") + \
            (f" every {fault.delay * 1e3:g} ms" if fault.delay else "")
    else:
        text = fault.kind
    if fault.kind != "reset" and fault.direction != "both":
        text += f" {fault.direction}"
    if fault.between is not None:
        text += f" between {fault.between[0]} and {fault.between[1]}"
    return text


class NetFaults:
    """The proxy of one trial and its faults' timeline."""

    def __init__(self, scenario: Scenario, ports: list[int], addrs: list[str] | None = None, *,
                 hosts: Collection[int] | None = None, listen: str = "127.0.0.1", says_unlinked: bool = True):
        """`hosts`: the hosts whose links this proxy carries (over a cluster, its machine's: a link's proxy
        runs beside the host it leads to), listening on `listen`. A fault with no link here records nothing,
        unless it has no link anywhere and `says_unlinked` (over a cluster the command says those: hosts=())."""
        self.scenario = scenario
        self.faults = scenario.net_faults
        names = host_names(scenario)
        self.names = names

        def link_name(spec: LinkSpec) -> str:
            return f"{spec.client}->{names[spec.host]}"
        self.link_name = link_name
        links = [(spec, link_name(spec), (addrs[spec.host] if addrs else "127.0.0.1", ports[spec.host]))
                 for spec in proxied_links(scenario) if hosts is None or spec.host in hosts]
        everywhere = {f.index: fault_links(scenario, f) for f in self.faults}
        self.proxy = FaultProxy(links, everywhere, self.faults, scenario.seed, listen)
        self.targets = {f.index: sorted({s.host for s in self.proxy.fault_links[f.index]}) for f in self.faults}
        self.silent = {f.index for f in self.faults if not self.proxy.fault_links[f.index]
                       and (everywhere[f.index] or not says_unlinked)}

    def detail(self, fault: NetFault) -> dict[str, Any]:
        detail: dict[str, Any] = {
            "fault": fault.index, "fault_kind": fault.kind, "family": "network", "label": describe(fault),
            "hosts": self.targets[fault.index],
            "links": [self.link_name(s) for s in self.proxy.fault_links[fault.index]]}
        if fault.between is None and (fault.hosts.count is not None or fault.hosts.fraction is not None):
            detail["chosen"] = fault_hosts(self.scenario, fault)
        return detail

    def timeline(self) -> list[tuple[float, str, NetFault]]:
        actions: list[tuple[float, str, NetFault]] = []
        for fault in self.faults:
            for start, end in armed_spans(fault, self.scenario.duration):
                actions.append((start, "arm", fault))
                if fault.instant or end < self.scenario.duration:
                    actions.append((end, "disarm", fault))
        order = {"arm": 0, "disarm": 1}
        return sorted(actions, key=lambda a: (a[0], a[2].index, order[a[1]]))

    async def run(self, t0: float, recorder: Any, start_at: float = 0.0) -> None:
        """Arm and disarm on the scenario's timeline (a resumed trial re-arms what is in force at start_at)."""
        actions = self.timeline()
        for t, action, fault in actions:
            if t < start_at and not fault.instant:
                self.proxy.act(action, fault)   # what was done before the gap, silently
        try:
            for t, action, fault in actions:
                if t < start_at:
                    continue
                await trio.sleep_until(t0 + t)
                self.proxy.act(action, fault)
                if fault.index in self.silent:
                    continue
                detail = self.detail(fault)
                if action == "disarm":
                    detail["counts"] = self.proxy.counts(fault.index)
                recorder.event(f"fault-{action}", None, None, **detail)
            await trio.sleep_forever()
        finally:
            for fault in self.faults:
                self.proxy.act("disarm", fault)

    def summary(self) -> dict[str, Any]:
        summary = self.proxy.summary()
        summary["faults"] = {index: {"kind": self.faults_by_index[int(index)].kind,
                                     "label": describe(self.faults_by_index[int(index)]), **counts}
                             for index, counts in summary["faults"].items()}
        return summary

    @property
    def faults_by_index(self) -> dict[int, NetFault]:
        return {f.index: f for f in self.faults}

    def driver_ports(self, ports: list[int]) -> list[int]:
        return self.proxy.driver_ports(ports)


def merge_summaries(summaries: list[dict[str, Any]]) -> dict[str, Any]:
    """The fleet's summary from each machine's proxy (over a cluster): each fault's counts summed, every link."""
    merged: dict[str, Any] = {"faults": {}, "links": {}}
    for summary in summaries:
        for index, counts in summary["faults"].items():
            entry = merged["faults"].setdefault(index, {k: v for k, v in counts.items() if not isinstance(v, int)})
            for key, value in counts.items():
                if isinstance(value, int):
                    entry[key] = entry.get(key, 0) + value
        merged["links"].update(summary["links"])
    return merged
