"""`harness crashes`: the buckets of a run, or one bucket's backtrace and injection context."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tabulate import tabulate

from harness.store.crashcounts import read_crashes
from harness.base.errors import HarnessError
from harness.store import reads
from harness.store.runstore import RunStore, open_run


def render_buckets(report: dict[str, Any]) -> str:
    rows = []
    for trial in report["trials"]:
        for b in trial["buckets"]:
            hosts = " ".join(b["hosts"]) if len(b["hosts"]) <= 16 else f"{len(b['hosts'])} hosts"
            rows.append([b["bucket"], trial["variant"], b["count"], b["crash_class"], b["signature"] or "-",
                         hosts, b["cores_kept"]])
    if not rows:
        return f"no crashes in {report['run_dir']}"
    return tabulate(rows, headers=["bucket", "variant", "crashes", "class", "signature", "hosts", "cores kept"])


def _host_names(store: RunStore) -> dict[tuple[int, int], str]:
    """(trial, host index) -> name, for a mixed fleet's hosts (estats-0); others are h<index>."""
    names = {}
    for row in reads.start_events(store):
        name = json.loads(row["detail"] or "{}").get("name")
        if name:
            names[(row["trial"], row["host"])] = name
    return names


def bucket_example(run_dir: Path, bucket: str) -> tuple[dict[str, Any], dict[str, Any]] | None:
    """(crash row, triage) of the bucket's example: the first crash whose core was kept."""
    store = open_run(run_dir)
    try:
        rows = reads.bucket_crashes(store, bucket)
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


def buckets_json(report: dict[str, Any]) -> dict[str, Any]:
    """`harness crashes RUN --json`: every bucket of every trial (the report's bucket rows)."""
    return {"run_id": report["run_id"], "run_dir": report["run_dir"],
            "buckets": [{"trial": trial["id"], "variant": trial["variant"], **bucket}
                        for trial in report["trials"] for bucket in trial["buckets"]]}


def bucket_json(run_dir: Path, bucket: str) -> dict[str, Any]:
    """`harness crashes RUN BUCKET --json`: the bucket's crashes, each with its triage and fault context."""
    store = open_run(run_dir)
    try:
        rows = reads.bucket_crashes_by_variant(store, bucket)
        names = _host_names(store)
    finally:
        store.close()
    crashes = []
    for row in rows:
        detail = json.loads(row.pop("detail") or "{}")
        triage = json.loads(row.pop("data") or "{}")
        crashes.append(row | {"host_name": names.get((row["trial"], row["host"]), f"h{row['host']}"),
                              "detail": detail, "triage": triage})
    return {"run_dir": str(run_dir), "bucket": rows[0]["bucket"] if rows else bucket, "crashes": crashes}


def _known(value: Any) -> str:
    """What the harness could not find out is "unknown", never Python's None."""
    return "unknown" if value is None or value == "" else str(value)


def _nth(values: list[Any] | None, index: int) -> Any:
    return values[index] if values and index < len(values) else None


def _stopping(row: dict[str, Any]) -> str:
    stopping = json.loads(row["detail"] or "{}").get("stopping")
    if not stopping:
        return ""
    if stopping.get("dead_before_stop"):
        return f" (found dead when the harness came to stop it at {stopping['since']:.2f}s)"
    return f" (while the harness stopped it, from {stopping['since']:.2f}s)"


def _address_line(triage: dict[str, Any]) -> str:
    """The faulting address and where it came from; a signal that has none (SIGABRT) says so."""
    address, source = triage.get("fault_address"), triage.get("address_source")
    if address is None and source in (None, "none"):
        why = "no faulting address" if triage.get("signal_name") in ("SIGABRT", "SIGKILL", "SIGTERM") else "unknown"
        return f"fault address: {why} (si_addr {_known(triage.get('reported_si_addr'))})"
    return (f"fault address: {_known(address)} (from {_known(source)}; "
            f"si_addr {_known(triage.get('reported_si_addr'))})")


def render_bucket(run_dir: Path, bucket: str) -> str | None:
    store = open_run(run_dir)
    try:
        rows = reads.bucket_crashes_by_variant(store, bucket)
        names = _host_names(store)
        # exact counts (the rows of a compactly stored cascade are a sample)
        count, hosts_seen = 0, set()
        for trial in sorted({r["trial"] for r in rows}):
            trial_names = {h: n for (t, h), n in names.items() if t == trial}
            for b in read_crashes(store, trial).buckets(trial_names):
                if b["bucket"].startswith(bucket):
                    count += b["count"]
                    hosts_seen |= set(b["hosts"])
    finally:
        store.close()
    if not rows:
        return None
    triaged = [json.loads(r["data"]) for r in rows]
    example_index = next((i for i, t in enumerate(triaged) if t.get("core_kept", True)), 0)
    example, row = triaged[example_index], rows[example_index]
    def host_name(r: dict[str, Any]) -> str:
        return names.get((r["trial"], r["host"]), f"h{r['host']}")
    hosts = ", ".join(sorted(hosts_seen)) if len(hosts_seen) <= 16 else f"{len(hosts_seen)} hosts"
    variants = ", ".join(sorted({r["variant"] for r in rows}))
    out = [f"bucket {row['bucket']}: {example.get('crash_class')} — {example.get('class_detail', '')}",
           f"signature: {example.get('signature')}  (version {example.get('signature_version')}, "
           f"method {example.get('signature_method')}){'  [inside the allocator]' if example.get('in_allocator') else ''}",
           f"crashes: {count} on {hosts} (variants: {variants})",
           "",
           f"example: host {host_name(row)} pid {row['pid']} at t={row['t']:.2f}s{_stopping(row)}, "
           f"{example.get('signal_name') or row['signal_name']} ({_known(example.get('si_code_name'))}), "
           f"uptime {row['uptime']:.2f}s, offered {row['offered_rate']:.0f}/s, "
           f"{row['host_inflight']} requests in flight on the host",
           _address_line(example),
           f"instruction: {example.get('instruction') or 'unknown'}",
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
        out += ["", f"faults armed at the crash (t={row['t']:.2f}s):"]
        for slot in shim.get("armed", []):
            index = slot["slot"]
            params = {k: v for k, v in slot.items()
                      if v not in (0, -1, (), [], None, "") and k not in ("slot", "fault", "window", "armed_at")}
            last = _nth(shim.get("last_injected"), index)
            where = f"fault {slot['fault']}" if slot.get("fault") is not None else f"slot {index}"
            since = f" (armed at {slot['armed_at']:.2f}s)" if slot.get("armed_at") is not None else ""
            out.append(f"  {where}{since}: {params}  injected on this host so far: "
                       f"{_known(_nth(shim.get('injected'), index))} of {_known(_nth(shim.get('eligible'), index))} "
                       f"eligible calls" + (f", last at {last:.2f}s" if last is not None else ""))
        if not shim.get("armed"):
            stopping = detail.get("stopping")
            out.append("  none" + (f" (the faults were disarmed when the trial ended; the host was being stopped "
                                   f"since {stopping['since']:.2f}s)" if stopping else ""))
            injected = [(i, n) for i, n in enumerate(shim.get("injected") or []) if n]
            for index, count in injected:
                last = _nth(shim.get("last_injected"), index)
                out.append(f"  earlier, slot {index} had injected {count} failure(s) on this host"
                           + (f", the last at {last:.2f}s" if last is not None else ""))
        out.append(f"  heap: live {_known(shim.get('live_bytes'))} bytes, peak {_known(shim.get('peak_bytes'))} bytes")
    tail = (row.get("stderr_tail") or "").strip().splitlines()[-5:]
    if tail:
        out += ["", "stderr (last lines):"] + [f"  {line}" for line in tail]
    return "\n".join(out)


def _proof_text(proof: dict[str, Any] | None) -> str:
    if not proof:
        return "unknown (no proof was recorded for this incarnation)"
    from harness.collect.proof.binding import summarize
    text = summarize(proof) + f" [{proof.get('stage')}]"
    for warning in proof.get("warnings") or []:
        text += f"; warning: {warning}"
    return text
