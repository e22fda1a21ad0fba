"""A fleet spread over a cluster's machines, in the report: where the hosts ran, which machines were lost
when, and each machine's share of the good replies between losses (so the share moving off a lost machine
onto the others is there to see). From the trial's `machines` detail and its per-host samples.
"""

from __future__ import annotations

import math
from typing import Any


def machine_shares(machines: list[dict[str, Any]], host_rows: list[dict[str, Any]], end: float) -> list[dict[str, Any]]:
    """Per stretch between machine losses: each machine's good replies and share of them. The second a
    machine was lost in belongs to neither side (part before, part after), so it is left out."""
    machine_of = {host: m["machine"] for m in machines for host in m["hosts"]}
    losses = sorted(m["lost_at"] for m in machines if m.get("lost_at") is not None)
    stretches: list[tuple[float, float]] = []
    start = 0.0
    for lost in losses:
        if math.floor(lost) > start:
            stretches.append((start, float(math.floor(lost))))
        start = float(math.floor(lost) + 1)
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
                     names: dict[int, str]) -> dict[str, Any] | None:
    machines = detail.get("machines")
    if not machines:
        return None
    listed = [{**m, "host_names": [names.get(h, f"h{h}") for h in m["hosts"]]} for m in machines]
    return {"machines": listed, "shares": machine_shares(machines, host_rows, end)}


def machine_lines(section: dict[str, Any]) -> list[str]:
    out = ["machines (--cluster):"]
    for m in section["machines"]:
        lost = ""
        if m.get("lost"):
            lost = f"; lost at {m['lost_at']:.2f}s ({m['lost']})"
        hosts = f"{len(m['hosts'])} host{'' if len(m['hosts']) == 1 else 's'}"
        out.append(f"  m{m['machine']} {m['addr']} (worker {m['worker']}): {hosts} {' '.join(m['host_names'])}{lost}")
    stretches = []
    for stretch in section["shares"]:
        shares = " ".join(f"m{machine} {share * 100:.1f}%" if share is not None else f"m{machine} -"
                          for machine, share in stretch["share"].items())
        stretches.append(f"{stretch['from']:g}-{stretch['to']:g}s: {shares}")
    if stretches:
        out.append("  share of good replies by machine: " + " | ".join(stretches))
    for takeover in section.get("takeovers", []):
        first, until = takeover.get("counts_lost", [None, None])
        seconds = (f"second {first}" if until == first + 1 else f"seconds {first}-{until - 1}") \
            if first is not None and until > first else None
        lost = f"; what it counted in {seconds} (since its last report) was lost with it: those seconds' " \
            f"counts are the other shards' only" if seconds else ""
        out.append(f"  driver shard {takeover['shard']} (m{takeover['machine']}) lost at {takeover['t']:.2f}s: its "
                   f"share of the load taken over by a shard on this machine{lost}")
    return out
