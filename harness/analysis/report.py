"""Analysis over the store only (pure reads), so any past or killed run can be reported.

build_report() returns a plain dict with a documented, versioned schema (docs/report-json.md);
render_text() prints it as tables.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from tabulate import tabulate

from harness.store.crashcounts import Crashes, bucket_rows, read_crashes
from harness.base.errors import HarnessError
from harness.analysis.faultreport import cgroup_totals, network_faults, resource_faults, text_lines as fault_text_lines
from harness.analysis.histmerge import merge_encoded
from harness.analysis.machines import machine_lines, machines_section
from harness.base.outcomes import COUNTS, ERROR_KINDS
from harness.store import reads
from harness.store.runstore import RunStore, open_run

REPORT_SCHEMA = 1
MAX_CRASHES_LISTED = 10000  # counts stay exact, the list is cut (a simulated cascade stores only a sample)


def _window_samples(samples: list[dict[str, Any]], start: float, end: float) -> list[dict[str, Any]]:
    """Samples whose interval [t, t+span) has its middle inside [start, end) (span is 1 second, or a
    rolled-up window in a long run)."""
    return [s for s in samples if start <= s["t"] + s.get("span", 1) / 2 < end]


def window_metrics(samples: list[dict[str, Any]], crashes: Crashes | list[dict[str, Any]], start: float,
                   end: float, *, until: float | None = None, counts_end: float | None = None) -> dict[str, Any]:
    """One window's numbers. `until`: the load's end; a sample reaching past it counts its outcomes but
    only its seconds before it (the drain after the load holds replies and timeouts of requests that
    arrived before the end, not a second of load). `counts_end`: take samples up to there (the last
    phase takes the drain), crashes still by their own time within [start, end) (`crashes`: a trial's
    counts, harness.store.crashcounts, or crash rows)."""
    chosen = _window_samples(samples, start, end if counts_end is None else counts_end)
    return {**traffic_metrics(chosen, start, end, until=until),
            "hosts_alive_min": min((s["hosts_alive"] for s in chosen), default=None),
            "hosts_alive_max": max((s["hosts_alive"] for s in chosen), default=None),
            "crashes": crashes.in_window(start, end) if isinstance(crashes, Crashes)
            else sum(1 for c in crashes if start <= c["t"] < end)}


def traffic_metrics(chosen: list[dict[str, Any]], start: float, end: float, *,
                    until: float | None = None) -> dict[str, Any]:
    """Counts, rates and latency percentiles over these samples (fleet-wide rows, or one request's);
    `until`: the load's end (see window_metrics)."""
    covered = sum(_seconds_of(s, until) for s in chosen)
    seconds = max(covered, 1e-9) if chosen else max(end - start, 1e-9)
    histogram = merge_encoded(sample["hist"] for sample in chosen if sample["hist"])
    total = {key: sum(s[key] for s in chosen) for key in COUNTS}
    errors = sum(total[k] for k in ERROR_KINDS)
    has = histogram.get_total_count() > 0

    def pct(q: float) -> float | None:
        return histogram.get_value_at_percentile(q) / 1e6 if has else None

    return {
        "start": start, "end": end, "seconds": covered,
        "offered": total["offered"], "sent": total["sent"], "ok": total["ok"],
        "errors": {k: total[k] for k in ERROR_KINDS}, "error_total": errors,
        "offered_rate": total["offered"] / seconds if chosen else 0.0,
        "achieved_rate": total["ok"] / seconds if chosen else 0.0,
        "error_rate": errors / total["offered"] if total["offered"] else 0.0,
        "timeout_rate": total["timeout"] / total["offered"] if total["offered"] else 0.0,
        "latency": {"p50": pct(50), "p90": pct(90), "p99": pct(99), "p999": pct(99.9),
                    "max": histogram.get_max_value() / 1e6 if has else None},
    }


def _seconds_of(sample: dict[str, Any], until: float | None) -> float:
    span = sample.get("span", 1)
    if until is None or sample["t"] + span <= until:
        return span
    return max(0.0, until - sample["t"])


def _requests(store: RunStore, tid: int, phases: list[dict[str, Any]], until: float) -> dict[str, Any]:
    """Per request of a mix: the whole run and each phase, like the fleet-wide tables (the drain after
    the load counts in the last phase, without a second of its own)."""
    rows = reads.request_samples(store, tid)
    by_name: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        by_name.setdefault(row["name"], []).append(row)

    def phase(samples: list[dict[str, Any]], index: int, p: dict[str, Any]) -> dict[str, Any]:
        end = math.inf if index == len(phases) - 1 else p["end"]
        return {"name": p["name"], **traffic_metrics(_window_samples(samples, p["start"], end), p["start"], p["end"],
                                                     until=until)}

    return {name: {"overall": traffic_metrics(samples, -math.inf, math.inf, until=until),
                   "phases": [phase(samples, i, p) for i, p in enumerate(phases)]}
            for name, samples in by_name.items()}


def _replies(store: RunStore, tid: int) -> dict[str, dict[str, int]]:
    """Bad replies by kind (http_5xx, resp_error, protocol_error...) and HTTP replies by status code."""
    result: dict[str, dict[str, int]] = {"bad_kinds": {}, "status": {}}
    for row in reads.reply_counts(store, tid):
        result["bad_kinds" if row["family"] == "bad" else "status"][row["name"]] = row["n"]
    return result


def build_report(run_dir: Path) -> dict[str, Any]:
    store = open_run(run_dir)
    try:
        return _build(store, run_dir)
    finally:
        store.close()


# A finished trial's part of the report, built while later trials still run (a run over a cluster builds each
# as its trial comes back: the report is then not all built after the last one). Used only if the trial's row,
# the run's duration and its phases are still what they were when it was built.
_built: dict[tuple[str, int], tuple[Any, dict[str, Any]]] = {}


def build_finished_trial(run_dir: Path, trial_id: int) -> None:
    store = open_run(run_dir)
    try:
        run = reads.runs(store)[0]
        phases = reads.phases(store)
        trial = next(t for t in reads.trials(store) if t["id"] == trial_id)
        _built[(str(run_dir), trial_id)] = (_inputs(trial, run, phases), _trial(store, trial, phases, run))
    finally:
        store.close()


def _inputs(trial: dict[str, Any], run: dict[str, Any], phases: list[dict[str, Any]]) -> Any:
    return (sorted(trial.items()), run["duration"], [sorted(p.items()) for p in phases])


def _trial_part(store: RunStore, run_dir: Path, trial: dict[str, Any], phases: list[dict[str, Any]],
                run: dict[str, Any]) -> dict[str, Any]:
    built = _built.pop((str(run_dir), trial["id"]), None)
    if built is not None and built[0] == _inputs(trial, run, phases):
        return built[1]
    return _trial(store, trial, phases, run)


def _build(store: RunStore, run_dir: Path) -> dict[str, Any]:
    runs = reads.runs(store)
    if not runs:
        raise HarnessError(f"{run_dir} holds no run record (the run stopped before it began)")
    run = runs[0]
    phases = reads.phases(store)
    status = run["status"]
    if status == "running":
        status = "incomplete"  # the harness died (SIGKILL, power loss) before finishing
    report: dict[str, Any] = {
        "schema": REPORT_SCHEMA, "run_id": run["id"], "run_dir": str(run_dir), "scenario": run["scenario"],
        "scenario_file": run["scenario_file"], "seed": run["seed"], "duration": run["duration"],
        "hosts": run["hosts"], "started": run["started"], "ended": run["ended"], "status": status,
        "phases": [{"name": p["name"], "kind": p["kind"], "start": p["start"], "end": p["end"],
                    "rate_from": p["rate_from"], "rate_to": p["rate_to"]} for p in phases],
        "trials": [],
    }
    for trial in reads.trials(store):
        report["trials"].append(_trial_part(store, run_dir, trial, phases, run))
    return report


def _trial(store: RunStore, trial: dict[str, Any], phases: list[dict[str, Any]], run: dict[str, Any]) -> dict[str, Any]:
    tid = trial["id"]
    samples = reads.samples(store, tid)
    counted = read_crashes(store, tid)
    crashes = counted.rows
    events = reads.events(store, tid)
    for item in crashes + events:
        item["detail"] = json.loads(item["detail"] or "{}")
    end = max([run["duration"]] + [s["t"] + s.get("span", 1) for s in samples])
    names = _host_names(events)
    for crash in crashes:
        crash["host_name"] = names.get(crash["host"], f"h{crash['host']}")
    phase_rows = []
    until = float(run["duration"])
    for index, phase in enumerate(phases):
        last = index == len(phases) - 1
        metrics = window_metrics(samples, counted, phase["start"], phase["end"], until=until,
                                 counts_end=math.inf if last else None)
        phase_rows.append({"name": phase["name"], **metrics})
    overall = window_metrics(samples, counted, -math.inf, math.inf, until=until)
    status = trial["status"]
    if status == "running":
        status = "incomplete"
    return {
        "id": tid, "variant": trial["variant"], "repeat": trial["repeat"], "seed": trial["seed"], "status": status,
        "detail": json.loads(trial["detail"] or "{}"),
        "overall": overall, "phases": phase_rows,
        "crashes_total": counted.total,
        "crashes_sampled": counted.sampled,
        "crashes": [{k: c[k] for k in ("t", "host", "pid", "signal", "signal_name", "core_dumped", "uptime",
                                       "offered_rate", "host_inflight", "hosts_alive", "core_path", "executable",
                                       "detail", "crash_class", "signature", "bucket", "in_allocator",
                                       "fault_address", "host_name")}
                    | {"faults_armed": faults_armed(c["detail"]), "when": _when(c, run["duration"])}
                    for c in crashes[:MAX_CRASHES_LISTED]],
        "fault_windows": fault_windows(store, tid, events, names),
        "buckets": counted.buckets(names),
        "crashes_by_signal": counted.by_signal,
        "crashes_by_host": {names.get(h, f"h{h}"): n for h, n in counted.by_host.items()},
        "hosts_alive": _alive_timeline(samples),
        "host_losses": [{"t": e["t"], **e["detail"],
                         "host_names": [names.get(h, f"h{h}") for h in e["detail"].get("hosts", [])]}
                        for e in events if e["kind"] == "host-loss"],
        **({"groups": _group_totals(store, tid, events, counted)} if _has_groups(events) else {}),
        # A resumed run: where the load timeline continued and how long the harness was down.
        "gaps": [{"t": e["t"], **e["detail"]} for e in events if e["kind"] == "gap"],
        "proof": _proof_summary(events),
        "low_disk": [{"t": e["t"], **e["detail"]} for e in events if e["kind"] == "low-disk"],
        # Arrivals of the plan the driver could not send by the planned end plus the timeout (bounded work).
        "unsent": next(({"count": e["detail"]["unsent"], "exact": e["detail"]["exact"]}
                        for e in events if e["kind"] == "unsent"), None),
        # Target output beyond log_max a second: counted, never written.
        "log_dropped_bytes": sum(e["detail"].get("stdout", 0) + e["detail"].get("stderr", 0)
                                 for e in events if e["kind"] == "log-dropped"),
        # Every host starts once per stretch of the run (a resume starts them all again): not restarts.
        "restarts": sum(1 for e in events if e["kind"] == "start") + _counted_events(store, tid, "start")
        - len({e["host"] for e in events if e["kind"] == "start"}) * (1 + sum(e["kind"] == "gap" for e in events)),
        "samples": len(samples),
        "end": end,
        "requests": _requests(store, tid, phases, until),
        "replies": _replies(store, tid),
        "protocol_errors": [{"t": e["t"], "host": e["host"], "host_name": names.get(e["host"], f"h{e['host']}"),
                             **e["detail"]} for e in events if e["kind"] == "protocol-error"],
        "setup": [{"t": e["t"], "host": e["host"], "kind": e["kind"], **e["detail"]}
                  for e in events if e["kind"] in ("setup", "setup-failed")],
        **_fault_sections(store, tid, events, json.loads(trial["detail"] or "{}"), end, names),
        **_machines(store, tid, json.loads(trial["detail"] or "{}"), end, names, events),
    }


def _machines(store: RunStore, tid: int, detail: dict[str, Any], end: float, names: dict[int, str],
              events: list[dict[str, Any]]) -> dict[str, Any]:
    """A fleet spread over a cluster's machines (harness/analysis/machines.py); nothing otherwise."""
    if not detail.get("machines") and not any(e["kind"] == "placement" for e in events):
        return {}
    section = machines_section(detail, reads.host_samples(store, tid), end, names, events)
    if section is not None:
        section["takeovers"] = [{"t": e["t"], **e["detail"]} for e in events if e["kind"] == "driver-takeover"]
    return {"machines": section} if section else {}


def faults_armed(detail: dict[str, Any]) -> list[dict[str, Any]] | None:
    """The shim faults armed on the host when it died, each with what it had injected there by then
    (None: the run had no shim faults)."""
    shim = detail.get("shim")
    if not shim:
        return None
    out = []
    for slot in shim.get("armed", []):
        index = slot["slot"]

        def at(key: str) -> Any:
            values = shim.get(key) or []
            return values[index] if index < len(values) else None

        out.append({"fault": slot.get("fault"), "slot": index, "kind": slot.get("kind"), "mode": slot.get("mode"),
                    "window": slot.get("window"), "armed_at": slot.get("armed_at"),
                    "eligible": at("eligible"), "injected": at("injected"), "last_injected": at("last_injected")})
    return out


def _when(crash: dict[str, Any], duration: float) -> str:
    """load | drain (after the load, before the fleet was stopped) | stopping (found while the harness
    stopped the host at the trial's end) | start-up (before the load)."""
    if crash["detail"].get("stopping"):
        return "stopping"
    if crash["t"] < 0:
        return "start-up"
    return "load" if crash["t"] < duration else "drain"


def fault_windows(store: RunStore, trial: int, events: list[dict[str, Any]],
                  names: dict[int, str]) -> list[dict[str, Any]]:
    """Per window of each shim fault and per host it applied to: eligible calls, injected failures, the first
    and last injection (trial seconds). From the controller's `fault-window` events; a window still open when
    the harness died is read from the last per-host sample inside it (its end is then null)."""
    out = []
    joined: dict[tuple[Any, Any, Any], dict[str, Any]] = {}
    for event in events:
        if event["kind"] != "fault-window":
            continue
        d = event["detail"]
        key = (d.get("fault"), d.get("slot"), d.get("window"))
        machine = d.get("machine")
        if machine is not None and key in joined and machine not in joined[key]["_machines"]:
            # over a cluster each machine closes the window on its own hosts: one window, every host (a
            # resumed run's window of the same number, closed twice by one machine, stays two)
            window = joined[key]
            window["_machines"].add(machine)
            window["hosts"] = sorted(window["hosts"] + d.get("hosts", []), key=lambda h: h["host"])
            starts = [s for s in (window["start"], d.get("start")) if s is not None]
            window["start"] = min(starts) if starts else None
            window["end"] = max(window["end"], d["end"]) if None not in (window["end"], d.get("end")) else None
            continue
        window = joined[key] = {k: d.get(k) for k in ("fault", "slot", "fault_kind", "mode", "window", "start",
                                                      "end", "ended_by", "resumed")} | {"hosts": d.get("hosts", []),
                                                                                        "_machines": {machine}}
        out.append(window)
    for window in out:
        window.pop("_machines")
    armed: dict[tuple[int, Any], dict[str, Any]] = {}
    lost: dict[Any, float] = {}
    for event in events:     # arms with no closing fault-window: the harness stopped inside the window
        if event["kind"] in ("machine-loss", "machine-lost"):
            lost[event["detail"].get("machine")] = event["t"]
        if event["detail"].get("family") in ("network", "resource"):
            continue         # (those are the proxy's and the cgroups': harness/analysis/faultreport.py)
        source = (event["detail"].get("fault"), event["detail"].get("machine"))    # (machine: over a cluster)
        if event["kind"] == "fault-arm":
            armed[source] = event
        elif event["kind"] in ("fault-disarm", "fault-window"):
            armed.pop(source, None)
    for (index, machine), event in armed.items():
        d = event["detail"]
        if machine is None and any(w["fault"] == index and w["start"] is not None
                                   and abs(w["start"] - event["t"]) < 1e-3 for w in out):
            continue
        hosts = []
        for host in d.get("hosts", []):
            row = reads.last_shim_counters(store, trial, host, math.floor(event["t"]))
            shim = json.loads(row[0]["shim"]) if row else {}
            slot = d.get("slot", 0)

            def at(key: str) -> Any:
                values = shim.get(key) or []
                return values[slot] if slot < len(values) else None

            hosts.append({"host": host, "eligible": at("eligible"), "injected": at("injected"),
                          "first": at("first_injected"), "last": at("last_injected")})
        out.append({"fault": index, "slot": d.get("slot"), "fault_kind": d.get("fault_kind"), "mode": d.get("mode"),
                    "window": None, "start": event["t"], "end": None, "resumed": False,
                    "ended_by": (f"unknown (its machine, m{machine}, was lost inside the window at {lost[machine]:.1f}s; "
                                 f"counts as of its last second)") if machine in lost else
                                "unknown (the harness stopped inside the window; counts as of its last second)",
                    "hosts": hosts})
    for window in out:
        for host in window["hosts"]:
            host["host_name"] = names.get(host["host"], f"h{host['host']}")
        window["eligible"] = sum(h["eligible"] or 0 for h in window["hosts"])
        window["injected"] = sum(h["injected"] or 0 for h in window["hosts"])
    return sorted(out, key=lambda w: (w["start"] if w["start"] is not None else 0.0, w["fault"]))


def _fault_sections(store: RunStore, tid: int, events: list[dict[str, Any]], detail: dict[str, Any], end: float,
                    names: dict[int, str]) -> dict[str, Any]:
    """Network faults, resource faults, OOM kills of processes whose host lived on, per-host cgroup totals
    (harness/analysis/faultreport.py); each only when the run has it."""
    out: dict[str, Any] = {}
    network = network_faults(events, detail, end, names)
    if network:
        out["network_faults"] = network
    resource = resource_faults(events, end, names)
    if resource:
        out["resource_faults"] = resource
    ooms = [{"t": e["t"], "host": e["host"], "host_name": names.get(e["host"], f"h{e['host']}"), **e["detail"]}
            for e in events if e["kind"] == "oom-kill"]
    if ooms:
        out["oom_kills"] = ooms
    rows = reads.cgroup_samples(store, tid)
    if rows:
        out["cgroups"] = cgroup_totals(rows, names)
    return out


def _host_names(events: list[dict[str, Any]]) -> dict[int, str]:
    """Host index -> name: a mixed fleet's hosts are named after their group (estats-0), others h<index>."""
    return {e["host"]: e["detail"]["name"] for e in events if e["kind"] == "start" and "name" in e["detail"]}


def _has_groups(events: list[dict[str, Any]]) -> bool:
    return any(e["kind"] == "start" and e["detail"].get("group") for e in events)


def _counted_events(store: RunStore, trial: int, kind: str) -> int:
    """Events of a kind stored as counts, not rows (a simulated crash loop's restarts)."""
    return reads.counted_events(store, trial, kind)


def _group_totals(store: RunStore, trial: int, events: list[dict[str, Any]],
                  crashes: Crashes) -> dict[str, dict[str, int]]:
    """Per fleet group: hosts, requests sent, good replies, errors and crashes (a mixed fleet's groups
    should each have served)."""
    group_of = {e["host"]: e["detail"]["group"] for e in events if e["kind"] == "start" and e["detail"].get("group")}
    totals: dict[str, dict[str, int]] = {}
    for name in dict.fromkeys(group_of[h] for h in sorted(group_of)):
        totals[name] = {"hosts": sum(1 for g in group_of.values() if g == name), "sent": 0, "ok": 0, "errors": 0,
                        "crashes": 0}
    for row in reads.host_traffic(store, trial):
        if row["host"] in group_of:
            for key in ("sent", "ok", "errors"):
                totals[group_of[row["host"]]][key] += row[key] or 0
    for host, count in crashes.by_host.items():
        if host in group_of:
            totals[group_of[host]]["crashes"] += count
    return totals


def crash_buckets(crashes: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Crashes grouped by signature bucket (untriaged ones by signal), most frequent first (every crash
    a row; harness.store.crashcounts counts compactly stored ones)."""
    return bucket_rows(crashes, None, {})


def _alive_timeline(samples: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Runs of the same number of hosts alive: [{from, to, alive}]. A sample's count is the fewest hosts
    alive at any moment of its second [t, t+1): a host that died at 4.00 s counts from second 4."""
    timeline: list[dict[str, Any]] = []
    for sample in samples:
        end = sample["t"] + sample.get("span", 1)
        if timeline and timeline[-1]["alive"] == sample["hosts_alive"]:
            timeline[-1]["to"] = end
        else:
            start = timeline[-1]["to"] if timeline else 0
            timeline.append({"from": start, "to": end, "alive": sample["hosts_alive"]})
    return timeline


def per_second(run_dir: Path, trial: int = 1) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(samples, host_samples) of one trial, for plots and tests."""
    store = open_run(run_dir)
    try:
        return reads.samples(store, trial), reads.host_samples(store, trial)
    finally:
        store.close()


# --- text ------------------------------------------------------------------------------------

def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value * 1e3:.1f}"


def _proof_summary(events: list[dict[str, Any]]) -> dict[str, Any]:
    """Per trial, from every incarnation's proof: what malloc was bound to (one line per distinct binding),
    allocators mapped but not bound, warnings (mixed bindings, the GOT disagreeing with ld.so's rules)."""
    from harness.collect.proof.binding import summarize
    proofs = [e["detail"] for e in events if e["kind"] == "proof" and "source" in e["detail"]]
    return {"hosts_proven": len(proofs),
            "bindings": sorted({summarize(p) for p in proofs}),
            "allocators": sorted({p.get("allocator") for p in proofs if p.get("allocator")}),
            "sources": sorted({p.get("source") for p in proofs if p.get("source")}),
            "mapped_unbound": sorted({m["allocator"] for p in proofs for m in p.get("mapped_unbound", [])}),
            "got_check": sorted({p.get("got_check") for p in proofs if p.get("got_check")}),
            "warnings": sorted({w for p in proofs for w in p.get("warnings", [])})}


def _uptime(seconds: float) -> str:
    return f"{seconds:.2f}s" if seconds < 10 else f"{seconds:.1f}s"


def _at(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}s"


def armed_text(armed: list[dict[str, Any]] | None) -> str:
    """A crash's armed faults in a table cell: `f0 nth: 1183 injected, last 5.02s`."""
    if armed is None:
        return "-"
    if not armed:
        return "none"
    return "; ".join(f"f{a['fault'] if a.get('fault') is not None else '?'} {a.get('mode') or ''}: "
                     f"{a['injected'] if a.get('injected') is not None else 'unknown'} injected"
                     + (f", last {_at(a.get('last_injected'))}" if a.get("injected") else "") for a in armed)


MAX_WINDOW_HOSTS = 8   # host rows per fault window in the text report (the JSON has them all)


def fault_window_table(windows: list[dict[str, Any]]) -> str:
    rows = []
    for w in windows:
        span = f"{_at(w['start'])}-{_at(w['end']) if w['end'] is not None else '?'}"
        if w.get("ended_by") == "trial end":
            span += " (to the end)"
        label = [f"f{w['fault']}", f"{w.get('fault_kind')} {w.get('mode')}", span]
        hosts = w["hosts"]
        for host in hosts[:MAX_WINDOW_HOSTS]:
            rows.append(label + [host.get("host_name") or f"h{host['host']}",
                                 f"{_count(host.get('injected'))} / {_count(host.get('eligible'))}",
                                 _at(host.get("first")), _at(host.get("last"))])
            label = ["", "", ""]
        if len(hosts) > MAX_WINDOW_HOSTS:
            rest = hosts[MAX_WINDOW_HOSTS:]
            rows.append(label + [f"{len(rest)} more", f"{sum(h.get('injected') or 0 for h in rest)} / "
                                                       f"{sum(h.get('eligible') or 0 for h in rest)}", "", ""])
        if not hosts:
            rows.append(label + ["(no host)", "-", "-", "-"])
    return tabulate(rows, headers=["fault", "kind", "window", "host", "injected / eligible", "first injection",
                                   "last injection"], disable_numparse=True)


def _count(value: int | None) -> str:
    return "unknown" if value is None else str(value)


def _hosts_text(hosts: list[str]) -> str:
    return " ".join(hosts) if len(hosts) <= 16 else f"{len(hosts)} hosts"


def render_text(report: dict[str, Any], expectations: list[dict[str, Any]] | None = None) -> str:
    out = [f"run {report['run_id']}  scenario {report['scenario']}  seed {report['seed']}  "
           f"status {report['status']}", f"results: {report['run_dir']}"]
    if report["status"] in ("incomplete", "interrupted"):
        out.append(f"stopped before the end: `harness resume {report['run_dir']}` finishes it")
    for trial in report["trials"]:
        title = f"trial {trial['id']}: variant {trial['variant']} (repeat {trial['repeat'] + 1}) — {trial['status']}"
        out += ["", title]
        proof = trial.get("proof") or {}
        out.append("allocator (proof): " + ("; ".join(proof["bindings"]) if proof.get("bindings") else "unknown "
                                            "(no host was proven)"))
        out += [f"  warning: {w}" for w in proof.get("warnings", [])]
        out.append(_phase_table(trial))
        out += _request_lines(trial)
        out += fault_text_lines(trial)
        out += _bucket_lines(report, trial)
        out += _crash_lines(trial)
        out += _trial_notes(trial)
    out += _plan_cut_lines(report)
    if expectations:
        out += ["", "expectations:", _expectation_table(expectations)]
    return "\n".join(out)


def _phase_table(trial: dict[str, Any]) -> str:
    rows = []
    for phase in trial["phases"] + [{"name": "all", **trial["overall"]}]:
        lat = phase["latency"]
        rows.append([phase["name"], f"{phase['start']:.0f}-{phase['end']:.0f}s" if phase["name"] != "all" else "",
                     f"{phase['offered_rate']:.0f}", f"{phase['achieved_rate']:.0f}", _ms(lat["p50"]),
                     _ms(lat["p90"]), _ms(lat["p99"]), _ms(lat["p999"]),
                     " ".join(f"{k}={v}" for k, v in phase["errors"].items() if v) or "0",
                     phase["crashes"], phase["hosts_alive_min"] if phase["hosts_alive_min"] is not None else "-"])
    return tabulate(rows, headers=["phase", "window", "offered/s", "ok/s", "p50 ms", "p90 ms", "p99 ms",
                                   "p99.9 ms", "errors", "crashes", "min alive"])


def _bucket_lines(report: dict[str, Any], trial: dict[str, Any]) -> list[str]:
    if not trial["buckets"]:
        return []
    bucket_rows = [[b["bucket"], b["count"], b["crash_class"], b["signature"] or "-", _hosts_text(b["hosts"]),
                    f"{b['first_seen']:.1f}-{b['last_seen']:.1f}s", b["cores_kept"]]
                   for b in trial["buckets"]]
    out = [tabulate(bucket_rows, headers=["bucket", "crashes", "class", "signature", "hosts", "seen", "cores kept"])]
    for b in trial["buckets"][:5]:
        if b["example_core"]:
            out.append(f"  {b['bucket']}: example core {b['example_core']}  "
                       f"(harness crashes {report['run_dir']} {b['bucket']})")
    return out


def _crash_lines(trial: dict[str, Any]) -> list[str]:
    if not trial["crashes"]:
        return ["crashes: none"]
    by_host = ", ".join(f"{h}: {n}" for h, n in trial["crashes_by_host"].items())
    by_signal = ", ".join(f"{s}: {n}" for s, n in trial["crashes_by_signal"].items())
    if len(trial["crashes_by_host"]) > 16:
        by_host = f"{len(trial['crashes_by_host'])} hosts"
    out = [f"crashes: {trial['crashes_total']} ({by_signal}; {by_host})"]
    shim = any(c.get("faults_armed") is not None for c in trial["crashes"])
    crash_rows = [[f"{c['t']:.2f}" + ("" if c.get("when", "load") == "load" else f" ({c['when']})"),
                   c.get("host_name") or f"h{c['host']}", c["pid"], c["signal_name"],
                   c["crash_class"] or "-",
                   c["bucket"] or "-", "yes" if c["core_dumped"] else "no", _uptime(c["uptime"]),
                   f"{c['offered_rate']:.0f}", c["hosts_alive"]]
                  + ([armed_text(c.get("faults_armed"))] if shim else []) for c in trial["crashes"][:20]]
    out.append(tabulate(crash_rows, headers=["t (s)", "host", "pid", "signal", "class", "bucket", "core",
                                             "uptime", "offered/s", "alive after"]
                        + (["faults armed (injected on the host, last at)"] if shim else []),
                        disable_numparse=True))
    if trial["crashes_total"] > 20:
        kept = (f"; {len(trial['crashes'])} of them kept as rows, a sample" if trial.get("crashes_sampled")
                else "")
        out.append(f"... and {trial['crashes_total'] - 20} more (harness report --json{kept})")
    return out


def _trial_notes(trial: dict[str, Any]) -> list[str]:
    """Groups, fault windows, hosts alive over time, host losses, restarts, gaps, and what was not sent,
    written or collected."""
    out = []
    if trial.get("groups"):
        out.append("groups: " + "; ".join(f"{name} ({g['hosts']} host{'s' if g['hosts'] != 1 else ''}): "
                                          f"sent {g['sent']}, ok {g['ok']}, "
                                          f"errors {g['errors']}, crashes {g['crashes']}"
                                          for name, g in trial["groups"].items()))
    if trial.get("machines"):
        out += machine_lines(trial["machines"])
    if trial.get("fault_windows"):
        out.append("fault windows (what each did on each host: injected / eligible calls):")
        out.append(fault_window_table(trial["fault_windows"]))
    segments = [f"{seg['from']}-{seg['to']}s:{seg['alive']}" for seg in trial["hosts_alive"]]
    if len(segments) > 24:  # big fleets change every second: show the start and the end
        segments = segments[:12] + [f"... ({len(segments) - 18} more)"] + segments[-6:]
    timeline = " ".join(segments)
    out.append(f"hosts alive over time: {timeline or '-'}")
    for loss in trial["host_losses"]:
        hosts = ", ".join(loss.get("host_names") or [f"h{h}" for h in loss.get("hosts", [])]) or "none available"
        out.append(f"host-loss at {loss['t']:.2f}s: {loss.get('how')} {hosts}")
    if trial["restarts"] > 0:
        out.append(f"restarts: {trial['restarts']}")
    for gap in trial["gaps"]:
        out.append(f"gap: the harness stopped and was resumed at {gap['resumed_at']}s of load after "
                   f"{gap['down_seconds']:.0f}s down; the load after the gap continues the same seeded stream")
    if trial.get("unsent"):
        count = trial["unsent"]["count"]
        shown = f"{count}" if trial["unsent"]["exact"] else f"about {count:.3g} (estimated from the plan)"
        out.append(f"unsent: {shown} planned arrivals were never sent: the driver could not keep up by the "
                   f"planned end plus the client timeout")
    if trial.get("log_dropped_bytes"):
        out.append(f"target output dropped: {trial['log_dropped_bytes'] / 2**20:.1f} MiB beyond log_max a second "
                   f"(counted, never written)")
    for low in trial["low_disk"]:
        out.append(f"low disk at {low['t']:.0f}s: {low.get('free', 0) / 2**20:.0f} MiB free on {low.get('path')}; "
                   f"cores not collected while the disk stays low (crashes still counted)")
    return out


def _plan_cut_lines(report: dict[str, Any]) -> list[str]:
    cut = report.get("plan_cut")
    if not cut:
        return []
    from harness.base.units import format_duration
    return ["", f"the run lasted {format_duration(cut['duration'])} of a {format_duration(cut['planned'])} plan; "
                "cut: " + "; ".join([f"phase {p['name']} " + ("dropped" if p["ran"] <= 0 else
                                                              f"cut after {format_duration(p['ran'])}")
                                     for p in cut["phases"]] + cut["faults"])]


def _expectation_table(expectations: list[dict[str, Any]]) -> str:
    rows = [["NOT EVALUATED" if e.get("evaluated", True) is False else "held" if e["held"] else "FAILED",
             e["text"] + (f" (request {e['request']})" if e.get("request") else "")
             + (f" (phase {e['phase']})" if e.get("phase") else "")
             + (f" (variant {e['variant']})" if e.get("variant") else ""), e["observed_text"]]
            for e in expectations]
    return tabulate(rows, headers=["", "expectation", "observed"])


def _request_lines(trial: dict[str, Any]) -> list[str]:
    """The mix's requests side by side, reply kinds and HTTP statuses, protocol errors, set-up failures."""
    out = []
    requests = trial.get("requests") or {}
    if requests:
        rows = []
        for name, metrics in requests.items():
            overall = metrics["overall"]
            lat = overall["latency"]
            rows.append([name, overall["offered"], f"{overall['offered_rate']:.0f}", f"{overall['achieved_rate']:.0f}",
                         _ms(lat["p50"]), _ms(lat["p99"]), _ms(lat["p999"]),
                         " ".join(f"{k}={v}" for k, v in overall["errors"].items() if v) or "0"])
        out.append(tabulate(rows, headers=["request", "offered", "offered/s", "ok/s", "p50 ms", "p99 ms",
                                           "p99.9 ms", "errors"]))
    replies = trial.get("replies") or {}
    if replies.get("bad_kinds"):
        out.append("bad replies by kind: " + " ".join(f"{k}={v}" for k, v in replies["bad_kinds"].items()))
    if replies.get("status"):
        out.append("HTTP status: " + " ".join(f"{k}={v}" for k, v in replies["status"].items()))
    errors = trial.get("protocol_errors") or []
    if errors:
        total = trial["detail"].get("protocol_errors", len(errors))
        first = errors[0]
        out.append(f"protocol errors: {total} (first at {first['t']:.2f}s on {first['host_name']}: {first['reason']}; "
                   f"bytes {first['excerpt'][:60]!r})")
    failed = [s for s in trial.get("setup") or [] if s["kind"] == "setup-failed"]
    if failed:
        out.append(f"set-up failed {len(failed)} time(s) (first: {failed[0]['why']})")
    return out


def find_run(arg: str, results: Path = Path("results")) -> Path:
    """A run directory from a path, a run id, or 'latest'."""
    path = Path(arg)
    if path.is_dir() and (path / "run.db").exists():
        return path
    if arg == "latest":
        runs = sorted((p for p in results.glob("*/run.db")), key=lambda p: p.stat().st_mtime)
        if runs:
            return runs[-1].parent
    candidate = results / arg
    if (candidate / "run.db").exists():
        return candidate
    raise FileNotFoundError(f"no run at {arg} (expected a results/<run-id> directory holding run.db)")
