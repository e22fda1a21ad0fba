"""The report's view of network faults (the fault proxy), resource faults (cgroup limits) and per-host cgroup
accounting: pure functions over a trial's events, host samples and detail (harness.analysis.report reads them)."""

from __future__ import annotations

import json
from typing import Any

FAMILIES = ("network", "resource")


def fault_windows(events: list[dict[str, Any]], end: float, family: str) -> list[dict[str, Any]]:
    """Each armed stretch of each fault of a family: {fault, kind, label, from, to, hosts, ...}; `to` is the
    trial's end when it was never disarmed. Network windows carry what the fault did in them (`counts`, as
    of its disarm), resource windows what each cgroup took (`applied`).

    Over a cluster each machine arms the fault on its own hosts (its events say which machine): a machine's
    n-th arm of a fault is the fault's n-th window, which runs from the first machine's arm to the last one's
    disarm, over every machine's hosts and links, with their counts summed."""
    windows: list[dict[str, Any]] = []
    by_ordinal: dict[tuple[int, int], dict[str, Any]] = {}      # (fault, n) -> its n-th window
    arms: dict[tuple[int, Any], int] = {}                        # (fault, machine) -> arms seen
    open_: dict[tuple[int, Any], dict[str, Any]] = {}            # (fault, machine) -> the window it holds open
    for event in sorted(events, key=lambda e: e["t"]):
        detail = event["detail"]
        if detail.get("family") != family or event["kind"] not in ("fault-arm", "fault-disarm"):
            continue
        index, t = detail["fault"], event["t"]
        source = (index, detail.get("machine"))
        if event["kind"] == "fault-arm":
            if source in open_:          # armed again before its disarm (an older store's machines): one window
                window = open_[source]
                window["_open"] -= 1
            else:
                ordinal = arms[source] = arms.get(source, -1) + 1
                window = by_ordinal.get((index, ordinal))
            if window is None:
                window = by_ordinal[(index, ordinal)] = {
                    "fault": index, "kind": detail.get("fault_kind"), "label": detail.get("label") or
                    detail.get("limit") or detail.get("fault_kind"), "from": t, "to": None, "hosts": [], "_open": 0}
                windows.append(window)
            window["from"] = min(window["from"], t)
            window["hosts"] = sorted(set(window["hosts"]) | set(detail.get("hosts", [])))
            if "links" in detail:
                window["links"] = sorted(set(window.get("links", [])) | set(detail["links"]))
            for key in ("applied", "errors"):
                if key in detail:
                    window[key] = {**window.get(key, {}), **detail[key]}
            if "resumed" in detail:
                window["resumed"] = detail["resumed"]
            window["_open"] += 1
            open_[source] = window
        elif source in open_:
            window = open_.pop(source)
            window["_open"] -= 1
            window["to"] = t if window["to"] is None else max(window["to"], t)
            if "counts" in detail:
                counts = window.setdefault("counts", {})
                for key, value in detail["counts"].items():
                    counts[key] = counts.get(key, 0) + value
    for window in windows:
        if window.pop("_open") > 0:
            window["to"] = end
    return windows


def network_faults(events: list[dict[str, Any]], detail: dict[str, Any], end: float,
                   names: dict[int, str]) -> list[dict[str, Any]]:
    """Per network fault: its windows and, from the trial's end, its totals (bytes delayed, connections
    reset, refused, black-holed...) and the links it acted on."""
    windows = fault_windows(events, end, "network")
    totals = (detail.get("network") or {}).get("faults", {})
    faults: dict[int, dict[str, Any]] = {}
    for window in windows:
        entry = faults.setdefault(window["fault"], {
            "fault": window["fault"], "kind": window["kind"], "label": window["label"],
            "hosts": [names.get(h, f"h{h}") for h in window["hosts"]], "links": window.get("links", []),
            "windows": []})
        entry["windows"].append({"from": window["from"], "to": window["to"], **({"counts": window["counts"]}
                                                                                if "counts" in window else {})})
    for index, total in totals.items():
        entry = faults.get(int(index))
        if entry is not None:
            entry["counts"] = {k: v for k, v in total.items() if k not in ("kind", "label")}
    return [faults[i] for i in sorted(faults)]


def resource_faults(events: list[dict[str, Any]], end: float, names: dict[int, str]) -> list[dict[str, Any]]:
    faults: dict[int, dict[str, Any]] = {}
    for window in fault_windows(events, end, "resource"):
        entry = faults.setdefault(window["fault"], {
            "fault": window["fault"], "kind": window["kind"], "limit": window["label"],
            "hosts": [names.get(h, f"h{h}") for h in window["hosts"]], "windows": []})
        entry["windows"].append({"from": window["from"], "to": window["to"],
                                 **({"errors": window["errors"]} if "errors" in window else {})})
    return [faults[i] for i in sorted(faults)]


def cgroup_totals(rows: list[dict[str, Any]], names: dict[int, str]) -> dict[str, dict[str, Any]]:
    """Per host, from its cgroup's counters (every process of the host, not only the one psutil reads): the
    highest memory, CPU seconds, throttling, refused forks and OOM kills (counters of the last sample)."""
    hosts: dict[str, dict[str, Any]] = {}
    for row in rows:
        if not row.get("cgroup"):
            continue
        data = json.loads(row["cgroup"])
        name = names.get(row["host"], f"h{row['host']}")
        entry = hosts.setdefault(name, {"memory_peak": 0, "cpu_seconds": None, "throttled": None,
                                        "throttled_seconds": None, "pids_max": 0, "pids_refused": None,
                                        "oom_kills": None, "memory_limit": None})
        for key in ("memory_peak", "memory", "memory_max_in_window"):
            if data.get(key) is not None:
                entry["memory_peak"] = max(entry["memory_peak"], data[key])
        if data.get("pids") is not None:
            entry["pids_max"] = max(entry["pids_max"], data["pids"])
        for key in ("cpu_seconds", "throttled", "throttled_seconds", "pids_refused", "oom_kills", "memory_limit"):
            if data.get(key) is not None:
                entry[key] = data[key]
    return hosts


def text_lines(trial: dict[str, Any]) -> list[str]:
    """The text report's lines for these sections."""
    out = []
    for fault in trial.get("network_faults") or []:
        spans = ", ".join(f"{w['from']:.1f}-{w['to']:.1f}s" if round(w["to"] - w["from"], 2)
                          else f"at {w['from']:.1f}s" for w in fault["windows"])
        counts = " ".join(f"{k.replace('_', ' ')} {v}" for k, v in (fault.get("counts") or {}).items())
        where = ", ".join(fault["hosts"]) if fault["hosts"] else "-"
        out.append(f"network fault {fault['fault']}: {fault['label']} on {where} ({spans})"
                   + (f": {counts}" if counts else ""))
    for fault in trial.get("resource_faults") or []:
        spans = ", ".join(f"{w['from']:.1f}-{w['to']:.1f}s" for w in fault["windows"])
        errors = [e for w in fault["windows"] for e in (w.get("errors") or {}).values()]
        out.append(f"resource fault {fault['fault']}: {fault['limit']} on {', '.join(fault['hosts'])} ({spans})"
                   + (f"; not applied: {errors[0]}" if errors else ""))
    ooms = trial.get("oom_kills") or []
    if ooms:
        out.append(f"OOM kills of processes whose host lived on: {sum(o.get('count', 1) for o in ooms)} "
                   f"(first at {ooms[0]['t']:.1f}s on {ooms[0].get('host_name', '?')})")
    cgroups = trial.get("cgroups") or {}
    if cgroups and (trial.get("resource_faults") or any(c.get("oom_kills") for c in cgroups.values())):
        parts = []
        for name, c in cgroups.items():
            text = f"{name} peak {c['memory_peak'] / 2**20:.1f} MiB"
            if c.get("cpu_seconds") is not None:
                text += f", cpu {c['cpu_seconds']:.1f}s"
            if c.get("throttled"):
                text += f", throttled {c['throttled']}x"
            if c.get("pids_refused"):
                text += f", forks refused {c['pids_refused']}"
            if c.get("oom_kills"):
                text += f", OOM kills {c['oom_kills']}"
            parts.append(text)
        out.append("cgroups: " + "; ".join(parts))
    return out
