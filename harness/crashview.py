"""`harness crashes`: the buckets of a run, or one bucket's backtrace and injection context."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tabulate import tabulate

from harness.errors import HarnessError
from harness.store import RunStore, open_run


def render_buckets(report: dict[str, Any]) -> str:
    rows = []
    for trial in report["trials"]:
        for b in trial["buckets"]:
            rows.append([b["bucket"], trial["variant"], b["count"], b["crash_class"], b["signature"] or "-",
                         " ".join(b["hosts"]), b["cores_kept"]])
    if not rows:
        return f"no crashes in {report['run_dir']}"
    return tabulate(rows, headers=["bucket", "variant", "crashes", "class", "signature", "hosts", "cores kept"])


def _host_names(store: RunStore) -> dict[tuple[int, int], str]:
    """(trial, host index) -> name, for a mixed fleet's hosts (estats-0); others are h<index>."""
    names = {}
    for row in store.query("SELECT trial, host, detail FROM events WHERE kind='start'"):
        name = json.loads(row["detail"] or "{}").get("name")
        if name:
            names[(row["trial"], row["host"])] = name
    return names


def bucket_example(run_dir: Path, bucket: str) -> tuple[dict[str, Any], dict[str, Any]] | None:
    """(crash row, triage) of the bucket's example: the first crash whose core was kept."""
    store = open_run(run_dir)
    try:
        rows = [dict(r) for r in store.query(
            "SELECT c.*, x.bucket, x.data FROM crashes c LEFT JOIN triage x ON x.uid = c.uid "
            "WHERE x.bucket LIKE ? ORDER BY c.t", (bucket + "%",))]
    finally:
        store.close()
    if not rows:
        return None
    if len({r["bucket"] for r in rows}) > 1:
        raise HarnessError(f"{bucket!r} names several buckets ({', '.join(sorted({r['bucket'] for r in rows}))}): "
                           f"give more of the id")
    triaged = [json.loads(r["data"]) for r in rows]
    index = next((i for i, t in enumerate(triaged) if t.get("core_kept", True) and
                  (t.get("core_file") or rows[i]["core_path"])), 0)
    return rows[index], triaged[index]


def render_bucket(run_dir: Path, bucket: str) -> str | None:
    store = open_run(run_dir)
    try:
        rows = [dict(r) for r in store.query(
            "SELECT c.*, t.variant, x.bucket, x.data FROM crashes c JOIN trials t ON t.id = c.trial "
            "LEFT JOIN triage x ON x.uid = c.uid WHERE x.bucket LIKE ? ORDER BY c.t", (bucket + "%",))]
        names = _host_names(store)
    finally:
        store.close()
    if not rows:
        return None
    triaged = [json.loads(r["data"]) for r in rows]
    example_index = next((i for i, t in enumerate(triaged) if t.get("core_kept", True)), 0)
    example, row = triaged[example_index], rows[example_index]
    def host_name(r: dict[str, Any]) -> str:
        return names.get((r["trial"], r["host"]), f"h{r['host']}")
    hosts = ", ".join(sorted({host_name(r) for r in rows}))
    variants = ", ".join(sorted({r["variant"] for r in rows}))
    out = [f"bucket {row['bucket']}: {example.get('crash_class')} — {example.get('class_detail', '')}",
           f"signature: {example.get('signature')}  (version {example.get('signature_version')}, "
           f"method {example.get('signature_method')}){'  [inside the allocator]' if example.get('in_allocator') else ''}",
           f"crashes: {len(rows)} on {hosts} (variants: {variants})",
           "",
           f"example: host {host_name(row)} pid {row['pid']} at t={row['t']:.2f}s, {example.get('signal_name')} "
           f"({example.get('si_code_name')}), uptime {row['uptime']:.1f}s, offered {row['offered_rate']:.0f}/s, "
           f"{row['host_inflight']} requests in flight on the host",
           f"fault address: {example.get('fault_address')} (from {example.get('address_source')}; "
           f"si_addr {example.get('reported_si_addr')})",
           f"instruction: {example.get('instruction') or '-'}",
           f"executable: {row['executable']}",
           f"allocator (proof of this incarnation): {_proof_text(json.loads(row['detail'] or '{}').get('proof'))}",
           f"core: {example.get('core_file') or row['core_path'] or '-'}"
           + ("" if example.get("core_kept", True) else f" (dropped: {example.get('core_dropped')})"),
           "", "crashing thread:"]
    for index, frame in enumerate(example.get("crashing_thread", [])[:30]):
        where = frame.get("source") or frame.get("module") or ""
        out.append(f"  #{index:<2} {frame.get('function') or '??'}  {where}")
    threads = example.get("threads", [])
    if len(threads) > 1:
        out.append(f"  ({len(threads) - 1} other threads: harness report --json has them)")
    detail = json.loads(row["detail"] or "{}")
    shim = detail.get("shim")
    if shim:
        out += ["", "faults armed at the crash:"]
        for slot in shim.get("armed", []):
            params = {k: v for k, v in slot.items() if v not in (0, -1, (), [], None, "") and k not in ("slot",)}
            out.append(f"  slot {slot['slot']}: {params}  injected so far: {shim['injected'][slot['slot']]}")
        if not shim.get("armed"):
            out.append("  none")
        out.append(f"  heap: live {shim.get('live_bytes')} bytes, peak {shim.get('peak_bytes')} bytes")
    tail = (row.get("stderr_tail") or "").strip().splitlines()[-5:]
    if tail:
        out += ["", "stderr (last lines):"] + [f"  {line}" for line in tail]
    return "\n".join(out)


def _proof_text(proof: dict[str, Any] | None) -> str:
    if not proof:
        return "unknown (no proof was recorded for this incarnation)"
    from harness.proof.binding import summarize
    text = summarize(proof) + f" [{proof.get('stage')}]"
    for warning in proof.get("warnings") or []:
        text += f"; warning: {warning}"
    return text
