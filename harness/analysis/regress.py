"""Regressions of a run against a baseline run of the same scenario (`harness soak --baseline`).

find_baseline() resolves a run dir, a run id or `latest-good`; compare_to_baseline() reads both stores
and reports new and disappeared crash buckets, crash-rate changes (exact conditional rate ratio over
host-hours), latency and throughput changes (per-block values, Mann-Whitney + bootstrap ratio of
medians), all corrected together by Holm-Tarone as in `harness compare`, and leak-slope changes
(harness.analysis.trends). render_regressions() is the one-screen morning summary. Method: docs/soak.md.

compare_to_baseline() returns (JSON-safe):

    {
      "schema": 1,
      "run": RUN, "baseline": RUN,        # RUN = {"run_id", "run_dir", "scenario", "status", "exit_code",
                                          #        "started", "ended", "trials", "excluded_trials": [ids]}
      "variants": ["a", "b"],             # matched by name, in the run's order
      "only_in_run": ["c"], "only_in_baseline": ["d"],
      "new_buckets": [NEW],               # crash buckets new to a variant (see "new_overall")
      "gone_buckets": [GONE],             # buckets of the baseline seen nowhere in the run
      "per_variant": {"a": {"in_run": true, "in_baseline": true, "new_buckets": [ids], "gone_buckets": [ids],
                            "crashes": 12, "baseline_crashes": 0}},
      "crash_rate": [ROW],                # one per matched variant (rows as in `harness compare --json`,
      "performance": [ROW],               #  variant = name, baseline = "name (baseline)"); p50_latency,
                                          #  p99_latency, throughput per matched variant, one value per block
      "leaks": [LEAK],                    # per matched variant x metric, and the harness itself (variant null)
      "block_seconds": 600.0,             # the block length used for latency and throughput
      "holm_family": 6, "alpha": 0.05, "confidence": 0.95, "min_difference": {"p50_latency": 0.1, ...},
      "failed": true, "reasons": ["new crash bucket abc123 ... in variant a"],   # a new bucket appeared
      "attention": [{"kind": "leak" | "crash_rate" | "performance", "variant", "metric", "text"}],
      "warnings": ["..."],
    }

    NEW = {"bucket", "signature", "crash_class", "signal", "count", "variants": {name: count},
           "new_in": [variant names it is new to], "new_overall": bool (in no variant of the baseline),
           "hosts": ["h3"], "first_seen": {"variant", "trial", "t"}, "example_core": path | None}
    GONE = {"bucket", "signature", "crash_class", "signal", "count" (in the baseline), "variants": {name: count}}
    LEAK = {"variant": name | None (the harness), "metric", "unit", "run": TREND, "baseline": TREND,
            "change": slope difference per hour | None,
            "verdict": "new leak" | "leaks faster" | "still leaks" | "leaks slower" | "fixed" | "unchanged"
                       | "no leak" (none now, the baseline cannot tell) | "not comparable" (this run cannot tell),
            "regression": bool, "text": str}
    TREND = {"slope", "low", "high", "verdict", "text", "series", "leaking"} | None   # as in harness.analysis.trends

`failed` is only about new buckets (the exit-code decision); `attention` lists the other significant
regressions (a new or faster leak, a worse crash rate, worse latency or throughput), which JUnit
reports as failures too.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from harness.analysis import stats
from harness.analysis import trends as trends_module
from harness.analysis.compare import PairRow, json_safe, trial_exposures, finish_rows, pair_row, spread_of, summarize_variant
from harness.store.crashcounts import read_crashes
from harness.analysis.histmerge import merge_encoded
from harness.base.errors import HarnessError
from harness.store import reads
from harness.store.runstore import open_run
from harness.base.units import format_duration

REGRESS_SCHEMA = 1
LATEST_GOOD = "latest-good"
PERF_METRICS = ("p50_latency", "p99_latency", "throughput")
MIN_DIFFERENCE = {"p50_latency": 0.10, "p99_latency": 0.10, "throughput": 0.10}
BLOCK_MAX = 600.0           # latency/throughput are compared over blocks of this length (s) ...
BLOCK_MIN = 60.0            # ... shorter for shorter runs (a sixth of the shortest trial), never under a minute
MIN_BLOCKS = 6              # per side: 6 vs 6 can give a rank-test p of 0.0022, room for Holm over ~20 rows
AUTOCORR_NOTE = 0.5         # lag-1 autocorrelation of block values above this: say the p-value is optimistic
SETTINGS = {"alpha": stats.ALPHA, "confidence": stats.CONFIDENCE, "seed": 0, "n_resamples": 9999}


# --- finding the baseline -----------------------------------------------------------------------

def _run_row(db_path: Path) -> dict[str, Any] | None:
    """The runs row of a store, read-only (other runs, possibly still being written, are never touched)."""
    return reads.run_record(db_path)


def _same(a: Path, b: Path | None) -> bool:
    return b is not None and a.resolve() == b.resolve()


def find_baseline(results_dir: Path, scenario: str, spec: str, exclude: Path | None) -> Path:
    """The baseline run directory: `spec` is a run directory, a run id under results_dir, or `latest-good`
    (the newest run of `scenario` whose status is complete and exit code 0, other than `exclude`).
    Raises HarnessError with a one-line message when there is none."""
    if spec == LATEST_GOOD:
        good = []
        for db_path in results_dir.glob("*/run.db"):
            row = _run_row(db_path)
            if (row and row["scenario"] == scenario and row["status"] == "complete" and row["exit_code"] == 0
                    and not _same(db_path.parent, exclude)):
                good.append((row["started"] or 0.0, db_path.parent.name, db_path.parent))
        if not good:
            raise HarnessError(f"no good run of scenario {scenario!r} in {results_dir} to use as the baseline "
                               "(latest-good needs an earlier run that completed with exit code 0)")
        return max(good)[2]
    for candidate in (Path(spec), results_dir / spec):
        if candidate.is_dir() and (candidate / "run.db").exists():
            if _same(candidate, exclude):
                raise HarnessError(f"baseline {spec} is the run itself")
            return candidate
    raise HarnessError(f"baseline {spec}: no run there (expected a results/<run-id> directory holding run.db, "
                       f"a run id under {results_dir}, or {LATEST_GOOD})")


# --- reading one run ------------------------------------------------------------------------------

def _blocks(samples: Sequence[Mapping[str, Any]], block: float) -> list[dict[str, Any]]:
    """One value per block of `block` seconds from the load's start: p50 and p99 of the block's merged
    histograms (exact), throughput = ok replies per second. Blocks less than half covered are dropped."""
    groups: dict[int, list[Mapping[str, Any]]] = {}
    for sample in samples:
        if sample["t"] >= 0:
            groups.setdefault(int(sample["t"] // block), []).append(sample)
    out = []
    for index in sorted(groups):
        members = groups[index]
        seconds = sum(m["span"] for m in members)
        if seconds < block / 2:
            continue
        histogram = merge_encoded(member["hist"] for member in members if member["hist"])
        has = histogram.get_total_count() > 0
        out.append({"block": index, "p50_latency": histogram.get_value_at_percentile(50) / 1e6 if has else None,
                    "p99_latency": histogram.get_value_at_percentile(99) / 1e6 if has else None,
                    "throughput": sum(m["ok"] for m in members) / seconds, "peak_rss": None})
    return out


def _trial(store: Any, row: Mapping[str, Any], run: dict[str, Any]) -> dict[str, Any]:
    """One trial's numbers as compare counts them (exposure filled in later), its buckets as the report
    groups them, and its samples (for blocks). No histogram is merged here."""
    samples = reads.sample_counts(store, row["id"])
    crashes = read_crashes(store, row["id"])        # exact counts, also for a compactly stored cascade
    buckets = crashes.buckets()
    return {
        "run_id": run["id"], "trial": row["id"], "variant": row["variant"], "repeat": row["repeat"],
        "seed": row["seed"], "status": "incomplete" if row["status"] == "running" else row["status"],
        "crashes": crashes.total, "first_crash": max(crashes.first, 0.0) if crashes.first is not None else None,
        "end": float(max([run["duration"]] + [s["t"] + s["span"] for s in samples])),
        "requests": sum(s["sent"] for s in samples), "host_hours": 0.0,
        "p50_latency": None, "p99_latency": None, "throughput": None, "peak_rss": None, "loaded": [],
        "buckets": {b["bucket"]: {"count": b["count"], "crash_class": b["crash_class"], "signature": b["signature"]}
                    for b in buckets},
        "bucket_details": buckets, "samples": samples}


def _read(run_dir: Path) -> dict[str, Any]:
    """Run facts and per-trial numbers of one run; failed trials (the set-up was not what was asked, e.g.
    the allocator was not bound) are left out and listed."""
    store = open_run(run_dir)
    try:
        rows = reads.runs(store)
        if not rows:
            raise HarnessError(f"{run_dir} holds no run record (the run stopped before it began)")
        run = dict(rows[0])
        trials = [_trial(store, row, run) for row in reads.trial_rows(store)]
        exposure = trial_exposures(store, {t["trial"]: t["end"] for t in trials}, run["hosts"])
    finally:
        store.close()
    for trial in trials:
        trial["host_hours"] = exposure[trial["trial"]]["host_seconds"] / 3600.0
        trial["exposure_source"] = exposure[trial["trial"]]["source"]
        trial["incarnations"] = exposure[trial["trial"]]["incarnations"]
    info = {"run_id": run["id"], "run_dir": str(run_dir), "scenario": run["scenario"],
            "status": "incomplete" if run["status"] == "running" else run["status"], "exit_code": run["exit_code"],
            "started": run["started"], "ended": run["ended"], "trials": len(trials),
            "excluded_trials": [t["trial"] for t in trials if t["status"] == "failed"]}
    return {"info": info, "trials": [t for t in trials if t["status"] != "failed"],
            "variants": list(dict.fromkeys(t["variant"] for t in trials))}


# --- buckets ---------------------------------------------------------------------------------------

def _bucket_index(trials: Sequence[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """bucket id -> totals over the run's (not failed) trials, with per-variant counts and the first crash."""
    index: dict[str, dict[str, Any]] = {}
    for trial in trials:
        for b in trial["bucket_details"]:
            entry = index.setdefault(b["bucket"], {
                "bucket": b["bucket"], "signature": b["signature"], "crash_class": b["crash_class"],
                "signal": b["signal"], "count": 0, "variants": {}, "hosts": set(), "first_seen": None,
                "example_core": None})
            entry["count"] += b["count"]
            entry["variants"][trial["variant"]] = entry["variants"].get(trial["variant"], 0) + b["count"]
            entry["hosts"].update(b["hosts"])
            if entry["first_seen"] is None:     # trials in id order: the first trial that saw it
                entry["first_seen"] = {"variant": trial["variant"], "trial": trial["trial"], "t": b["first_seen"]}
            entry["example_core"] = entry["example_core"] or b["example_core"]
    for entry in index.values():
        entry["hosts"] = sorted(entry["hosts"], key=lambda h: int(h[1:]) if h[1:].isdigit() else 0)
    return index


def _bucket_changes(now: dict[str, dict[str, Any]], before: dict[str, dict[str, Any]],
                    matched: set[str]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(new, gone). A bucket is new to a variant seen in both runs when that variant did not have it in the
    baseline (even if another variant did: it spread), and new overall when no baseline variant had it;
    a variant only in the run has no baseline, so only its buckets new overall count."""
    new = []
    for bucket_id, entry in now.items():
        old = before.get(bucket_id)
        new_in = [v for v in entry["variants"]
                  if (v in matched and (old is None or v not in old["variants"])) or (v not in matched and old is None)]
        if new_in:
            new.append(entry | {"new_in": new_in, "new_overall": old is None})
    gone = [{k: entry[k] for k in ("bucket", "signature", "crash_class", "signal", "count", "variants")}
            for bucket_id, entry in before.items() if bucket_id not in now]
    return (sorted(new, key=lambda b: (-b["count"], b["bucket"])), sorted(gone, key=lambda b: (-b["count"], b["bucket"])))


# --- crash rate, latency, throughput -----------------------------------------------------------------

def _block_length(runs: Sequence[dict[str, Any]]) -> float:
    ends = [t["end"] for run in runs for t in run["trials"]]
    shortest = min(ends) if ends else 0.0
    return float(min(BLOCK_MAX, max(BLOCK_MIN, math.floor(shortest / MIN_BLOCKS))))


def _block_autocorrelation(values: Sequence[float]) -> float:
    if len(values) < 3:
        return 0.0
    return trends_module.lag1_autocorrelation(np.asarray(values, dtype=float) - np.median(values))


def _side(name: str, run: dict[str, Any], variant: str, block: float) -> dict[str, Any]:
    """compare's per-variant summary of this run's trials of `variant`, with per-block values standing in
    for per-trial values (a soak has one or two long trials: its blocks are the repeats)."""
    trials = [t for t in run["trials"] if t["variant"] == variant]
    side = summarize_variant(name, run["info"]["run_id"], variant, trials, [], SETTINGS["confidence"])
    blocks = [b for t in trials for b in _blocks(t["samples"], block)]
    side["per_trial"] = blocks
    side["metrics"] = {m: spread_of([b[m] for b in blocks]) for m in PERF_METRICS} | {"peak_rss": spread_of([])}
    side["blocks"] = len(blocks)
    return side


def _rate_and_performance(names: Sequence[str], run: dict[str, Any], base: dict[str, Any],
                          block: float) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Crash-rate rows and per-block latency/throughput rows of every matched variant, corrected together."""
    pending: list[PairRow] = []
    by_name: dict[str, dict[str, Any]] = {}
    for name in names:
        v, b = _side(name, run, name, block), _side(f"{name} (baseline)", base, name, block)
        by_name[v["name"]], by_name[b["name"]] = v, b
        pending.append(pair_row("crash_rate", v, b, confidence=SETTINGS["confidence"], seed=SETTINGS["seed"],
                                n_resamples=SETTINGS["n_resamples"]))
        for metric in PERF_METRICS:
            row = pair_row(metric, v, b, confidence=SETTINGS["confidence"], seed=SETTINGS["seed"],
                           n_resamples=SETTINGS["n_resamples"])
            if min(v["metrics"][metric]["n"], b["metrics"][metric]["n"]) < MIN_BLOCKS:
                row.reason = (f"too short to compare: {v['metrics'][metric]['n']} and {b['metrics'][metric]['n']}"
                              f" blocks of {block:.0f}s, {MIN_BLOCKS} a side needed")
            for side in (v, b):
                values = [x[metric] for x in side["per_trial"] if x[metric] is not None]
                rho = _block_autocorrelation(values)
                if rho > AUTOCORR_NOTE:
                    row.notes.append(f"{side['name']}: successive blocks correlate (lag-1 r={rho:.2f}): "
                                     "the p-value is optimistic")
            row.blocks = [v["metrics"][metric]["n"], b["metrics"][metric]["n"]]
            pending.append(row)
    rows = finish_rows(pending, by_name, alpha=SETTINGS["alpha"], min_difference=MIN_DIFFERENCE)
    for out in rows:
        if out["metric"] in PERF_METRICS:   # compare's wording is about trials; here the repeats are blocks
            out["text"] = out["text"].replace(" trials", " blocks")
    return ([r for r in rows if r["metric"] == "crash_rate"], [r for r in rows if r["metric"] in PERF_METRICS])


# --- leaks -----------------------------------------------------------------------------------------------

def _trend(fit: dict[str, Any] | None) -> dict[str, Any] | None:
    keys = ("slope", "low", "high", "verdict", "text", "series", "leaking")
    return None if fit is None else {k: fit.get(k) for k in keys}


def _some_leak(row: dict[str, Any]) -> bool:
    """The typical process is not a (new) leak, but some processes leak on their own and none did before."""
    now, before = row["run"] or {}, row["baseline"] or {}
    return not row["regression"] and bool(now.get("leaking")) and not before.get("leaking")


def leak_change(variant: str | None, metric: str, now: dict[str, Any] | None,
                before: dict[str, Any] | None) -> dict[str, Any]:
    """LEAK: how a variant's trend moved. A regression is a leak the baseline did not have (new leak) or a
    leak faster than before by more than the practical floor with disjoint intervals (leaks faster)."""
    unit = (now or before or {}).get("unit", trends_module.UNITS.get(metric, ""))
    row = {"variant": variant, "metric": metric, "unit": unit, "run": _trend(now), "baseline": _trend(before),
           "change": None, "verdict": "not comparable", "regression": False}
    if now is None or now["verdict"] == trends_module.TOO_SHORT:
        row["text"] = "not comparable (" + ("not recorded" if now is None else "too short") + " in this run)"
        return row
    leaks_now = now["verdict"] == trends_module.LEAKS
    usable_before = before is not None and before["verdict"] != trends_module.TOO_SHORT
    leaked = usable_before and before["verdict"] == trends_module.LEAKS
    if usable_before:
        row["change"] = now["slope"] - before["slope"]
    rate = trends_module.per_hour_text(unit, now["slope"])
    if leaks_now and not leaked:
        row["verdict"], row["regression"] = "new leak", True
        row["text"] = f"new leak {rate} (baseline {before['text'] if before is not None else 'not recorded'})"
    elif leaks_now:
        floor = trends_module.leak_floor(unit, now["level"] or 0.0)
        if now["low"] > before["high"] and row["change"] >= floor:
            row["verdict"], row["regression"] = "leaks faster", True
        elif now["high"] < before["low"] and -row["change"] >= floor:
            row["verdict"] = "leaks slower"
        else:
            row["verdict"] = "still leaks"
        row["text"] = f"{row['verdict']} {rate} (baseline {trends_module.per_hour_text(unit, before['slope'])})"
    elif leaked:
        row["verdict"], row["text"] = "fixed", f"fixed: {now['text']} (baseline {before['text']})"
    elif usable_before:
        row["verdict"], row["text"] = "unchanged", f"unchanged: {now['text']}"
    else:   # no leak now; nothing to compare with
        row["verdict"], row["text"] = "no leak", f"no leak: {now['text']} (baseline " + (
            "too short)" if before is not None else "not recorded)")
    return row


def _leaks(names: Sequence[str], now: dict[str, Any], before: dict[str, Any]) -> list[dict[str, Any]]:
    rows = []
    for name in names:
        for metric in now["metrics"]:
            rows.append(leak_change(name, metric, now["variants"][name]["metrics"].get(metric),
                                    before["variants"].get(name, {}).get("metrics", {}).get(metric)))
    for metric, fit in now["harness"]["metrics"].items():
        if fit is not None:
            rows.append(leak_change(None, metric, fit, before["harness"]["metrics"].get(metric)))
    return rows


# --- the comparison --------------------------------------------------------------------------------

def compare_to_baseline(run_dir: Path, baseline_dir: Path) -> dict[str, Any]:
    """What changed in `run_dir` against `baseline_dir` (variants matched by name). Pure reads."""
    run, base = _read(Path(run_dir)), _read(Path(baseline_dir))
    if run["info"]["run_id"] == base["info"]["run_id"]:
        raise HarnessError(f"baseline {baseline_dir} is the run itself")
    names_now, names_before = run["variants"], base["variants"]
    matched = [n for n in names_now if n in names_before]
    buckets_now, buckets_before = _bucket_index(run["trials"]), _bucket_index(base["trials"])
    new, gone = _bucket_changes(buckets_now, buckets_before, set(matched))
    block = _block_length([run, base])
    crash_rows, perf_rows = _rate_and_performance(matched, run, base, block)
    leaks = _leaks(matched, trends_module.run_trends(Path(run_dir)), trends_module.run_trends(Path(baseline_dir)))
    per_variant = _per_variant(names_now, names_before, run, base, new, buckets_now, buckets_before)
    reasons = [f"new crash bucket {b['bucket']} {b['signature'] or b['signal']} ({b['crash_class']}) "
               f"x{b['count']} in variant {', '.join(b['new_in'])}" for b in new]
    return json_safe({
        "schema": REGRESS_SCHEMA, "run": run["info"], "baseline": base["info"], "variants": matched,
        "only_in_run": [n for n in names_now if n not in names_before],
        "only_in_baseline": [n for n in names_before if n not in names_now],
        "new_buckets": new, "gone_buckets": gone, "per_variant": per_variant,
        "crash_rate": crash_rows, "performance": perf_rows, "leaks": leaks, "block_seconds": block,
        "holm_family": sum(1 for r in crash_rows + perf_rows if r["p_holm"] is not None),
        "alpha": SETTINGS["alpha"], "confidence": SETTINGS["confidence"], "min_difference": MIN_DIFFERENCE,
        "failed": bool(new), "reasons": reasons, "attention": _attention(leaks, crash_rows + perf_rows),
        "warnings": _warnings(run["info"], base["info"])})


def _warnings(run: dict[str, Any], base: dict[str, Any]) -> list[str]:
    warnings = []
    if run["scenario"] != base["scenario"]:
        warnings.append(f"different scenarios: {run['scenario']} vs baseline {base['scenario']}: the load and "
                        "faults differ")
    if base["status"] != "complete":
        warnings.append(f"the baseline is {base['status']}")
    for which, info in (("run", run), ("baseline", base)):
        if info["excluded_trials"]:
            warnings.append(f"{which}: failed trial(s) {info['excluded_trials']} left out")
    return warnings


def _per_variant(names_now: Sequence[str], names_before: Sequence[str], run: dict[str, Any], base: dict[str, Any],
                 new: Sequence[dict[str, Any]], buckets_now: dict[str, dict[str, Any]],
                 buckets_before: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    out = {}
    for name in dict.fromkeys([*names_now, *names_before]):
        out[name] = {
            "in_run": name in names_now, "in_baseline": name in names_before,
            "new_buckets": [b["bucket"] for b in new if name in b["new_in"]],
            "gone_buckets": sorted(b for b, e in buckets_before.items()
                                   if name in e["variants"] and name not in buckets_now.get(b, {}).get("variants", {})),
            "crashes": sum(t["crashes"] for t in run["trials"] if t["variant"] == name),
            "baseline_crashes": sum(t["crashes"] for t in base["trials"] if t["variant"] == name)}
    return out


def _attention(leaks: Sequence[dict[str, Any]], rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """The significant regressions other than new buckets (JUnit fails them too)."""
    return ([{"kind": "leak", "variant": r["variant"], "metric": r["metric"], "text": r["text"]}
             for r in leaks if r["regression"]]
            + [{"kind": "crash_rate" if r["metric"] == "crash_rate" else "performance", "variant": r["variant"],
                "metric": r["metric"], "text": r["text"]} for r in rows if r["verdict"] == stats.WORSE])


# --- the morning summary ------------------------------------------------------------------------------

def _when(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds:.1f}s" if seconds < 120 else format_duration(seconds)


def _new_line(b: dict[str, Any]) -> str:
    first = b["first_seen"]
    where = ", ".join(f"{v} x{n}" for v, n in b["variants"].items())
    line = (f"NEW bucket {b['bucket']} {b['signature'] or b['signal']} ({b['crash_class']}) x{b['count']} in variant "
            f"{', '.join(b['new_in'])}")
    if len(b["variants"]) > 1 or set(b["variants"]) != set(b["new_in"]):
        line += f" [all: {where}]"
    if not b["new_overall"]:
        line += " (known from other baseline variants)"
    core = f"; core {b['example_core']}" if b["example_core"] else ""
    return (line + f"\n    first at {_when(first['t'])} in trial {first['trial']} on {', '.join(b['hosts'][:4])}"
            + ("..." if len(b["hosts"]) > 4 else "") + core)


def render_regressions(result: dict[str, Any]) -> str:
    """One screen: verdict, new buckets, gone buckets, crash rates, leaks, latency/throughput, warnings."""
    run, base = result["run"], result["baseline"]
    out = [f"run {run['run_id']} ({run['status']}) vs baseline {base['run_id']} ({base['status']}), "
           f"scenario {run['scenario']}"]
    out.append(("FAILED: " + f"{len(result['new_buckets'])} new crash bucket(s)") if result["failed"]
               else "OK: no new crash bucket")
    out += [_new_line(b) for b in result["new_buckets"]]
    for b in result["gone_buckets"]:
        out.append(f"gone: bucket {b['bucket']} {b['signature'] or b['signal']} ({b['crash_class']}) "
                   f"x{b['count']} in the baseline ({', '.join(b['variants'])}), not seen in this run")
    rows = result["crash_rate"] + result["performance"]
    changed = [r for r in rows if r["verdict"] != stats.NO_DIFFERENCE]
    out += [f"{r['variant']}: {r['label']} {r['text']}" for r in changed]
    if len(rows) > len(changed):
        short = sum(1 for r in rows if r["verdict"] == stats.NO_DIFFERENCE and "too short" in r["text"])
        out.append(f"crash rate, latency, throughput: no difference detected in {len(rows) - len(changed)} row(s)"
                   + (f" ({short} too short to compare)" if short else ""))
    quiet_leaks = ("unchanged", "no leak", "not comparable")
    moved = [r for r in result["leaks"] if r["verdict"] not in quiet_leaks or _some_leak(r)]
    for r in moved:
        who = r["variant"] if r["variant"] is not None else "harness itself"
        some = (f"; {r['run']['leaking']} of {r['run']['series']} processes leak on their own (baseline none)"
                if _some_leak(r) else "")
        out.append(f"{who}: {r['metric']} {r['text']}{some}")
    short = sum(1 for r in result["leaks"] if r["verdict"] == "not comparable")
    calm = len(result["leaks"]) - len(moved) - short
    parts = ([f"{calm} without change"] if calm else []) + (
        [f"{short} not comparable (too short or not recorded)"] if short else [])
    if parts:
        out.append("leak trends: " + ", ".join(parts))
    if result["only_in_run"] or result["only_in_baseline"]:
        out.append(f"variants only in this run: {', '.join(result['only_in_run']) or '-'}; only in the baseline: "
                   f"{', '.join(result['only_in_baseline']) or '-'}")
    out += [f"warning: {w}" for w in result["warnings"]]
    return "\n".join(out)
