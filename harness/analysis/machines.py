"""A fleet spread over a cluster's machines, in the report: where the hosts ran, which machines were lost
when, and each machine's share of the good replies between losses (so the share moving off a lost machine
onto the others is there to see). From the trial's `machines` detail and its per-host samples.
"""

from __future__ import annotations

import math
from typing import Any


def machine_shares(machines: list[dict[str, Any]], host_rows: list[dict[str, Any]], end: float,
                   start: float = 0.0) -> list[dict[str, Any]]:
    """Per stretch between machine losses, from `start` (a resumed trial's machines hold from the resumed
    second) to `end`: each machine's good replies and share of them. The second a machine was lost in belongs to
    neither side (part before, part after), so it is left out."""
    machine_of = {host: m["machine"] for m in machines for host in m["hosts"]}
    losses = sorted(m["lost_at"] for m in machines if m.get("lost_at") is not None)
    stretches: list[tuple[float, float]] = []
    for lost in losses:
        if math.floor(lost) > start:
            stretches.append((start, float(math.floor(lost))))
        start = max(start, float(math.floor(lost) + 1))
    if end > start:
        stretches.append((start, end))
    out = []
    for first, last in stretches:
        ok = {m["machine"]: 0 for m in machines}
        for row in host_rows:
            if first <= row["t"] < last and row["host"] in machine_of:
                ok[machine_of[row["host"]]] += row["ok"] or 0
        total = sum(ok.values())
        out.append({"from": first, "to": last, "ok": ok,
                    "share": {m: (n / total if total else None) for m, n in ok.items()}})
    return out


def machines_section(detail: dict[str, Any], host_rows: list[dict[str, Any]], end: float,
                     names: dict[int, str], events: list[dict[str, Any]] | None = None) -> dict[str, Any] | None:
    """The trial's machines (its `machines` detail: the last attempt's), and, for a trial resumed (`gap`
    events), where each earlier stretch ran: on machines (its `placement` event and the losses recorded in it)
    or on the command's machine (a local attempt)."""
    events = events or []
    start = _last_start(events)
    machines = detail.get("machines") or []
    if not machines or float(detail.get("machines_from") or 0) != start:
        # the stored detail is an earlier attempt's (the last one stopped before writing its own): the last
        # attempt's machines are its placement event's, with the losses recorded since (none: a local attempt)
        placed = [e["detail"]["machines"] for e in events
                  if e["kind"] == "placement" and float(e["detail"].get("from", 0)) == start]
        machines = _with_losses(placed[-1], events, start, math.inf, names) if placed else []
    earlier = _earlier_attempts(events, host_rows, start, names, bool(machines))
    if not machines and not earlier:
        return None
    listed = [{**m, "host_names": [names.get(h, f"h{h}") for h in m["hosts"]]} for m in machines]
    return {"machines": listed, "from": start, "local_from": None if machines else start,
            "shares": machine_shares(machines, host_rows, end, start) if machines else [],
            "earlier": earlier}


def _attempt_starts(events: list[dict[str, Any]]) -> list[float]:
    """Where each attempt of the trial began: 0, then each resume's second."""
    return sorted({0.0} | {float(e["detail"]["resumed_at"]) for e in events if e["kind"] == "gap"})


def _last_start(events: list[dict[str, Any]]) -> float:
    return _attempt_starts(events)[-1]


def _earlier_attempts(events: list[dict[str, Any]], host_rows: list[dict[str, Any]], until: float,
                      names: dict[int, str], last_on_machines: bool) -> list[dict[str, Any]]:
    """The stretches before `until` (the last attempt's start), each with its machines (None: it ran on the
    command's machine); [] when no attempt ran on machines."""
    placements = {float(e["detail"].get("from", 0)): e["detail"]["machines"]
                  for e in events if e["kind"] == "placement"}      # the last one for a second wins
    starts = [s for s in _attempt_starts(events) if s < until]
    if not last_on_machines and not any(s in placements for s in starts):
        return []
    out = []
    for first, last in zip(starts, starts[1:] + [until]):
        placed = placements.get(first)
        if placed is None:
            out.append({"from": first, "to": last, "machines": None, "shares": []})
            continue
        machines = _with_losses(placed, events, first, last, names)
        out.append({"from": first, "to": last, "machines": machines,
                    "shares": machine_shares(machines, host_rows, last, first)})
    return out


def _with_losses(placed: list[dict[str, Any]], events: list[dict[str, Any]], first: float, last: float,
                 names: dict[int, str]) -> list[dict[str, Any]]:
    """An attempt's machines as its placement event named them, with the losses recorded in [first, last)."""
    lost = {e["detail"].get("machine"): (e["t"], e["detail"].get("why") or e["kind"]) for e in events
            if e["kind"] in ("machine-loss", "machine-lost") and first <= e["t"] < last}
    return [{**m, "lost": lost[m["machine"]][1] if m["machine"] in lost else None,
             "lost_at": lost[m["machine"]][0] if m["machine"] in lost else None,
             "host_names": [names.get(h, f"h{h}") for h in m["hosts"]]} for m in placed]


def _machine_line(m: dict[str, Any], indent: str) -> str:
    lost = f"; lost at {m['lost_at']:.2f}s ({m['lost']})" if m.get("lost") else ""
    hosts = f"{len(m['hosts'])} host{'' if len(m['hosts']) == 1 else 's'}"
    return f"{indent}m{m['machine']} {m['addr']} (worker {m['worker']}): {hosts} {' '.join(m['host_names'])}{lost}"


def _share_line(shares: list[dict[str, Any]], indent: str) -> list[str]:
    stretches = []
    for stretch in shares:
        text = " ".join(f"m{machine} {share * 100:.1f}%" if share is not None else f"m{machine} -"
                        for machine, share in stretch["share"].items())
        stretches.append(f"{stretch['from']:g}-{stretch['to']:g}s: {text}")
    return [f"{indent}share of good replies by machine: " + " | ".join(stretches)] if stretches else []


def machine_lines(section: dict[str, Any]) -> list[str]:
    out = ["machines (--cluster):"]
    for attempt in section.get("earlier", []):
        span = f"{attempt['from']:g}-{attempt['to']:g}s"
        if attempt["machines"] is None:
            out.append(f"  {span} (before a resume): on the command's machine (a local run)")
            continue
        out.append(f"  {span} (before a resume):")
        out += [_machine_line(m, "    ") for m in attempt["machines"]]
        out += _share_line(attempt["shares"], "    ")
    if section.get("local_from") is not None:
        out.append(f"  from {section['local_from']:g}s (resumed without --cluster): on the command's machine")
    elif section.get("earlier"):
        out.append(f"  from {section['from']:g}s (resumed over the cluster):")
    indent = "    " if section.get("earlier") else "  "
    out += [_machine_line(m, indent) for m in section["machines"]]
    out += _share_line(section["shares"], indent)
    for takeover in section.get("takeovers", []):
        first, until = takeover.get("counts_lost", [None, None])
        seconds = (f"second {first}" if until == first + 1 else f"seconds {first}-{until - 1}") \
            if first is not None and until > first else None
        lost = f"; what it counted in {seconds} (since its last report) was lost with it: those seconds' " \
            f"counts are the other shards' only" if seconds else ""
        out.append(f"  driver shard {takeover['shard']} (m{takeover['machine']}) lost at {takeover['t']:.2f}s: its "
                   f"share of the load taken over by a shard on this machine{lost}")
    return out
