"""A trial's crashes as every report counts them (pure reads of the store).

A real run stores every crash as a row. A simulated cascade (hundreds of thousands of crashes) stores
them compactly: exact counts per slot x bucket x host group (`crash_counts`) and per host x bucket
(`crash_hosts`), with only a sample of rows (harness/sim/crashes.py). read_crashes() gives one view of
either: counts, windows, hosts, signals and buckets are exact in both; `rows` are all the crashes or,
when `sampled`, the stored sample (every bucket's first crash among them).
"""

from __future__ import annotations

import json
import sqlite3
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from harness.store.runstore import RunStore

ROWS = ("SELECT c.*, x.crash_class, x.signature, x.bucket, x.in_allocator, x.fault_address, x.data AS triage "
        "FROM crashes c LEFT JOIN triage x ON x.uid = c.uid WHERE c.trial=? ORDER BY c.t")


@dataclass
class BucketCount:
    count: int = 0
    hosts: set[int] = field(default_factory=set)
    first: float = float("inf")
    last: float = float("-inf")
    cores_kept: int = 0


@dataclass
class Crashes:
    rows: list[dict[str, Any]]            # time order; all the crashes, or a sample when `sampled`
    total: int
    sampled: bool
    times: np.ndarray                     # crash times (rows) or slot starts (aggregates), ascending
    counts: np.ndarray                    # crashes at each of `times`
    by_host: dict[int, int]               # host index -> crashes, in host order
    by_signal: dict[str, int]             # in order of first appearance
    by_bucket: dict[str, BucketCount] | None     # exact counts per bucket (None: count the rows)
    first: float | None                   # the earliest crash time

    def in_window(self, start: float, end: float) -> int:
        """Crashes with start <= t < end (aggregate slots never straddle a phase boundary)."""
        low, high = np.searchsorted(self.times, [start, end], side="left")
        return int(self.counts[low:high].sum())

    def per_bin(self, width: float) -> dict[float, int]:
        """Crashes per bin of `width` seconds (a whole number of seconds, or any width for rows)."""
        bins: dict[float, int] = {}
        starts = np.floor(self.times / width) * width
        for start, count in zip(starts.tolist(), self.counts.tolist()):
            bins[start] = bins.get(start, 0) + count
        return bins

    def buckets(self, names: dict[int, str] | None = None) -> list[dict[str, Any]]:
        """Crashes grouped by signature bucket (untriaged ones by signal), most frequent first."""
        return bucket_rows(self.rows, self.by_bucket, names or {})


def bucket_key(crash: dict[str, Any]) -> str:
    return crash["bucket"] or f"untriaged:{crash['signal_name']}"


def _core_kept(crash: dict[str, Any]) -> bool:
    if not crash["core_path"]:
        return False
    return json.loads(crash["triage"]).get("core_kept", True) if crash.get("triage") else True


def _host_name(names: dict[int, str], host: int) -> str:
    return names.get(host, f"h{host}")


def bucket_rows(rows: list[dict[str, Any]], counts: dict[str, BucketCount] | None,
                names: dict[int, str]) -> list[dict[str, Any]]:
    """The report's bucket rows: counts from `counts` (exact aggregates) or from the rows themselves;
    what a count cannot hold (class, signature, signal, example) from the bucket's first row (a sample
    always holds each bucket's first crash)."""
    members: dict[str, list[dict[str, Any]]] = {}
    for crash in rows:
        members.setdefault(bucket_key(crash), []).append(crash)
    hosts: dict[str, set[str]] = {}
    if counts is None:
        counts = {}
        for key, group in members.items():
            counts[key] = BucketCount(len(group), set(), group[0]["t"], group[-1]["t"],
                                      sum(1 for m in group if _core_kept(m)))
            hosts[key] = {m.get("host_name") or _host_name(names, m["host"]) for m in group}
    else:
        hosts = {key: {_host_name(names, h) for h in count.hosts} for key, count in counts.items()}
    result = []
    for key, count in counts.items():
        group = members.get(key, [])
        first: dict[str, Any] = group[0] if group else {}
        triage = json.loads(first["triage"]) if first.get("triage") else {}
        example = next((m for m in group if _core_kept(m)), first)
        result.append({
            "bucket": key, "count": count.count, "crash_class": first.get("crash_class") or "untriaged",
            "signature": first.get("signature") or "", "signal": first.get("signal_name"),
            "in_allocator": bool(first.get("in_allocator")), "fault_address": first.get("fault_address"),
            "hosts": sorted(hosts[key]),
            "first_seen": count.first, "last_seen": count.last,
            "example_core": (json.loads(example["triage"]).get("core_file") if example.get("triage") else None)
            or (example["core_path"] if example and _core_kept(example) else None),
            "example_frames": [f.get("function") or "??" for f in triage.get("crashing_thread", [])][:12],
            "cores_kept": count.cores_kept,
            "signature_version": triage.get("signature_version"),
        })
    return sorted(result, key=lambda b: (-b["count"], b["first_seen"]))


def _table_rows(store: RunStore, sql: str, args: tuple[Any, ...]) -> list[sqlite3.Row]:
    try:
        return store.query(sql, args)
    except sqlite3.OperationalError:
        return []                          # an old store on read-only media: no aggregate tables


def read_crashes(store: RunStore, trial: int) -> Crashes:
    """One trial's crashes: rows (with their triage joined) and exact counts."""
    rows = [dict(r) for r in store.query(ROWS, (trial,))]
    slots = _table_rows(store, "SELECT t, bucket, grp, signal_name, count, cores_kept FROM crash_counts WHERE trial=? "
                               "ORDER BY t", (trial,))
    if not slots:
        times = np.array([r["t"] for r in rows], dtype=np.float64)
        by_signal = dict(Counter(r["signal_name"] for r in rows))
        return Crashes(rows, len(rows), False, times, np.ones(len(rows), dtype=np.int64),
                       dict(sorted(Counter(r["host"] for r in rows).items())), by_signal, None,
                       rows[0]["t"] if rows else None)
    per_slot: dict[float, int] = {}
    by_bucket: dict[str, BucketCount] = {}
    signal_of: dict[str, str] = {}
    signals: dict[str, int] = {}
    for slot in slots:
        per_slot[slot["t"]] = per_slot.get(slot["t"], 0) + slot["count"]
        bucket = by_bucket.setdefault(slot["bucket"], BucketCount())
        bucket.cores_kept += slot["cores_kept"]
        signals[slot["signal_name"]] = signals.get(slot["signal_name"], 0) + slot["count"]
        signal_of.setdefault(slot["bucket"], slot["signal_name"])
    by_host: dict[int, int] = {}
    for row in _table_rows(store, "SELECT host, bucket, count, first_t, last_t FROM crash_hosts WHERE trial=? "
                                  "ORDER BY host", (trial,)):
        bucket = by_bucket.setdefault(row["bucket"], BucketCount())
        bucket.count += row["count"]
        bucket.hosts.add(row["host"])
        bucket.first, bucket.last = min(bucket.first, row["first_t"]), max(bucket.last, row["last_t"])
        by_host[row["host"]] = by_host.get(row["host"], 0) + row["count"]
    first_of = {name: min(b.first for key, b in by_bucket.items() if signal_of.get(key) == name) for name in signals}
    times = np.array(list(per_slot), dtype=np.float64)
    first = min((b.first for b in by_bucket.values()), default=None)
    total = int(sum(per_slot.values()))
    return Crashes(rows, total, len(rows) < total, times, np.array(list(per_slot.values()), dtype=np.int64),
                   by_host, {name: signals[name] for name in sorted(signals, key=lambda s: first_of[s])}, by_bucket,
                   first)
