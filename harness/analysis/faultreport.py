"""The report's view of network faults (the fault proxy), resource faults (cgroup limits) and per-host cgroup
accounting: pure functions over a trial's events, host samples and detail (harness.analysis.report reads them)."""

from __future__ import annotations

import json
from typing import Any

FAMILIES = ("network", "resource")


ARMS = ("fault-arm", "fault-armed")
DISARMS = ("fault-disarm", "fault-disarmed")
MACHINE_LOSSES = ("machine-loss", "machine-lost")


def armed_stretches(events: list[dict[str, Any]], end: float, family: str | None = None) -> list[dict[str, Any]]:
    """Each armed stretch of each fault (of one family, or every one): {fault, from, to, arms, disarms} with
    the details of the arm and disarm events that make it; `to` is the trial's end when it was never disarmed.

    Over a cluster each machine arms a fault on its own hosts (its events say which `machine`): a machine's
    n-th arm of a fault is part of the fault's n-th stretch, which runs from the first machine's arm to the
    last one's disarm. A machine lost (machine-loss, machine-lost) ends what it held armed there and then
    (`lost`: those machines; what they did after their last disarm is unknown). Events without a machine
    (one machine: a local run) pair each arm with the next disarm."""
    stretches: list[dict[str, Any]] = []
    by_ordinal: dict[tuple[Any, int], dict[str, Any]] = {}     # (fault, n) -> its n-th stretch
    arms: dict[tuple[Any, Any], int] = {}                       # (fault, machine) -> arms seen
    open_: dict[tuple[Any, Any], dict[str, Any]] = {}           # (fault, machine) -> the stretch it holds open
    for event in sorted(events, key=lambda e: e["t"]):
        kind, detail, t = event["kind"], event.get("detail") or {}, event["t"]
        if kind in MACHINE_LOSSES and detail.get("machine") is not None:
            for source in [s for s in open_ if s[1] == detail["machine"]]:
                stretch = open_.pop(source)
                stretch["_open"] -= 1
                stretch["to"] = t if stretch["to"] is None else max(stretch["to"], t)
                stretch["lost"].append(detail["machine"])
            continue
        if kind not in ARMS + DISARMS or (family is not None and detail.get("family") != family):
            continue
        index = detail.get("fault", detail.get("slot"))
        source = (index, detail.get("machine"))
        if kind in ARMS:
            if source in open_:          # armed again before its disarm (an older store's machines): one stretch
                stretch = open_[source]
                stretch["_open"] -= 1
            else:
                ordinal = arms[source] = arms.get(source, -1) + 1
                stretch = by_ordinal.get((index, ordinal))
                if stretch is None:
                    stretch = by_ordinal[(index, ordinal)] = {"fault": index, "from": t, "to": None, "arms": [],
                                                              "disarms": [], "lost": [], "_open": 0}
                    stretches.append(stretch)
            stretch["from"] = min(stretch["from"], t)
            stretch["arms"].append(detail)
            stretch["_open"] += 1
            open_[source] = stretch
        elif source in open_:
            stretch = open_.pop(source)
            stretch["_open"] -= 1
            stretch["to"] = t if stretch["to"] is None else max(stretch["to"], t)
            stretch["disarms"].append(detail)
    for stretch in stretches:
        if stretch.pop("_open") > 0:
            stretch["to"] = end
    return stretches


def fault_windows(events: list[dict[str, Any]], end: float, family: str) -> list[dict[str, Any]]:
    """Each armed stretch of each fault of a family (armed_stretches): {fault, kind, label, from, to, hosts,
    ...}. Network windows carry what the fault did in them (`counts`, as of its disarms: every machine's
    summed), resource windows what each cgroup took (`applied`)."""
    windows = []
    for stretch in armed_stretches(events, end, family):
        first = stretch["arms"][0]
        window: dict[str, Any] = {
            "fault": stretch["fault"], "kind": first.get("fault_kind"),
            "label": first.get("label") or first.get("limit") or first.get("fault_kind"),
            "from": stretch["from"], "to": stretch["to"],
            "hosts": sorted({h for arm in stretch["arms"] for h in arm.get("hosts", [])})}
        if any("links" in arm for arm in stretch["arms"]):
            window["links"] = sorted({link for arm in stretch["arms"] for link in arm.get("links", [])})
        for key in ("applied", "errors"):
            if any(key in arm for arm in stretch["arms"]):
                window[key] = {k: v for arm in stretch["arms"] for k, v in arm.get(key, {}).items()}
        if "resumed" in first:
            window["resumed"] = first["resumed"]
        if any("counts" in d for d in stretch["disarms"]):
            counts: dict[str, int] = {}
            for disarm in stretch["disarms"]:
                for key, value in disarm.get("counts", {}).items():
                    counts[key] = counts.get(key, 0) + value
            window["counts"] = counts
        if stretch["lost"]:
            window["lost"] = stretch["lost"]
        windows.append(window)
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
        if entry is None and total.get("unknown"):
            # never armed where it could be seen: every machine running its links was lost first (--cluster)
            entry = faults[int(index)] = {"fault": int(index), "kind": total.get("kind"), "label": total.get("label"),
                                          "hosts": [], "links": [], "windows": []}
        if entry is not None:
            entry["counts"] = {k: v for k, v in total.items() if k not in ("kind", "label", "unknown")}
            if total.get("unknown"):
                # a machine lost took its proxy's counts with it: these are at least what the fault did
                entry["unknown"] = total["unknown"]
    return [faults[i] for i in sorted(faults)]


def unknown_counts(unknown: list[dict[str, Any]]) -> str:
    """'; m2 lost at 5.0s: its counts after 3.0s unknown' for each machine lost with links of the fault (and
    armed there) whose proxy's last counts for it were not heard."""
    parts = []
    for part in unknown:
        since = f" after {part['known_until']:.1f}s" if part.get("known_until") is not None else ""
        lost = f" at {part['lost_at']:.1f}s" if part.get("lost_at") is not None else ""
        parts.append(f"m{part['machine']} lost{lost}: its counts{since} unknown")
    return "".join(f"; {p}" for p in parts)


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
        out.append(f"network fault {fault['fault']}: {fault['label']} on {where} ({spans or 'not armed'})"
                   + (f": {'at least ' if fault.get('unknown') else ''}{counts}" if counts else "")
                   + unknown_counts(fault.get("unknown") or []))
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
