"""Variant comparison over run stores: `harness compare RUN [RUN...]` (JSON schema in docs/compare.md).

compare_runs() reads only the stores (through harness.analysis.report and a few direct queries), reduces each
trial to one row of numbers, and compares every variant with the baseline using harness.analysis.stats:
crash rate over host-hours (exact conditional rate ratio), crashed trials (Fisher), and per-trial
latency, throughput and peak RSS (Mann-Whitney U + bootstrap ratio of medians), corrected over the
whole variant x metric table by Holm's step-down with Tarone's K (discrete tests that cannot reach
significance do not dilute the others). render_compare() prints it; evaluate_variant_expectations()
judges `{compare: [a, b], metric: claim}` expectations over the result (pure).
"""

from __future__ import annotations

import json

import math
import operator
import zlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from scipy import stats as scipy_stats
from tabulate import tabulate

from harness.analysis import stats
from harness.scenario.claims import METRICS, VERDICT_CLAIMS, VariantExpectation  # noqa: F401 (re-exported)
from harness.analysis.exposure import uptime_exposure
from harness.analysis.report import build_report
from harness.store import reads
from harness.store.runstore import open_run

COMPARE_SCHEMA = 1

DEFAULT_METRICS = ("crash_rate", "crashed_trials", "p50_latency", "p99_latency", "throughput", "peak_rss")
TRIAL_METRICS = ("p50_latency", "p99_latency", "throughput", "peak_rss")
NOT_RUNNING = ("down", "stopped")       # host_samples states that are *not* exposure


# --- reading the stores ------------------------------------------------------------------------

def trial_exposures(store: Any, ends: Mapping[int, float], hosts: int) -> dict[int, dict[str, Any]]:
    """Host-seconds per trial: every process's uptime from its start and exit events; from an older store
    without them, seconds each host was seen running in the per-host samples, else hosts alive per second,
    else the whole fleet for the trial's length (`ends`: trial id -> its length). Also the source used
    and how many processes were started."""
    per_host = {row["trial"]: row["host_seconds"] or 0 for row in reads.host_seconds(store, NOT_RUNNING)}
    fleet = {row["trial"]: (row["alive_seconds"] or 0, row["last"]) for row in reads.fleet_seconds(store)}
    # a simulated crash storm counts most exits and restarts instead of storing them: its uptime is the
    # simulator's own sum over every exit, by the same rule (harness/sim/run.py)
    simulated = {row["id"]: json.loads(row["exposure"]) for row in reads.simulated_exposures(store)
                 if row["exposure"]} if "event_counts" in reads.tables(store) else {}
    lives: dict[int, list[dict[str, Any]]] = {}
    for row in reads.lifecycle_events(store):
        lives.setdefault(row["trial"], []).append(
            {"t": row["t"], "kind": row["kind"], "host": row["host"], "pid": row["pid"],
             "detail": {} if row["uptime"] is None else {"uptime": row["uptime"]}})
    out = {}
    for trial, end in ends.items():
        alive_seconds, last = fleet.get(trial, (None, None))
        # a process that never exited (a SIGKILLed harness) ran until the last second the store holds
        uptime = uptime_exposure(lives.get(trial, []), float(last if last is not None else end))
        if trial in simulated:
            out[trial] = {"host_seconds": simulated[trial]["host_seconds"], "source": "uptime",
                          "incarnations": simulated[trial]["incarnations"]}
        elif uptime is not None:
            out[trial] = {"host_seconds": uptime.host_seconds, "source": "uptime",
                          "incarnations": uptime.incarnations}
        elif trial in per_host:
            out[trial] = {"host_seconds": per_host[trial], "source": "host samples", "incarnations": None}
        elif alive_seconds is not None:
            out[trial] = {"host_seconds": alive_seconds, "source": "fleet samples", "incarnations": None}
        else:
            out[trial] = {"host_seconds": hosts * max(end, 0.0), "source": "planned", "incarnations": None}
    return out


def _trial_numbers(run_dir: Path) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """(run, per-trial rows) of one run directory."""
    report = build_report(run_dir)
    store = open_run(run_dir)
    try:
        peak_rss = reads.peak_rss(store)
        exposures = trial_exposures(store, {t["id"]: float(t["end"]) for t in report["trials"]}, report["hosts"])
        # Proof of what ran: the allocator malloc was bound to in each host (harness.collect.proof), with where it
        # came from, and "+shim" when malloc went through the fault shim.
        proofs: dict[int, set[str]] = {}
        for row in reads.proof_events(store):
            detail = json.loads(row["detail"] or "{}")
            source = detail.get("source")
            proofs.setdefault(row["trial"], set()).add(
                detail.get("allocator", "?") + (f" ({source})" if source and source != "glibc" else "")
                + ("+shim" if detail.get("shim") else ""))
    finally:
        store.close()
    trials = []
    for trial in report["trials"]:
        overall = trial["overall"]
        exposure = exposures[trial["id"]]
        # the first crash from the exact totals: the crash list is capped (or a sample)
        crash_times = [b["first_seen"] for b in trial["buckets"]]
        trials.append({
            "run_id": report["run_id"], "trial": trial["id"], "variant": trial["variant"],
            "repeat": trial["repeat"], "seed": trial["seed"], "status": trial["status"],
            "crashes": trial["crashes_total"],       # the listed crashes are capped, the count is not
            "first_crash": max(min(crash_times), 0.0) if crash_times else None,
            "end": float(trial["end"]),
            "host_hours": exposure["host_seconds"] / 3600.0, "exposure_source": exposure["source"],
            "incarnations": exposure["incarnations"],
            "requests": overall["sent"],
            "p50_latency": overall["latency"]["p50"], "p99_latency": overall["latency"]["p99"],
            "throughput": overall["achieved_rate"],
            "peak_rss": peak_rss.get(trial["id"]),
            "loaded": sorted(proofs.get(trial["id"], set())),
            "buckets": {b["bucket"]: {"count": b["count"], "crash_class": b["crash_class"],
                                      "signature": b["signature"]} for b in trial["buckets"]},
        })
    run = {"run_id": report["run_id"], "run_dir": str(run_dir), "scenario": report["scenario"],
           "seed": report["seed"], "duration": report["duration"], "hosts": report["hosts"],
           "status": report["status"], "trials": len(report["trials"])}
    return run, trials


# --- per-variant summaries ---------------------------------------------------------------------

def spread_of(values: Sequence[float | None]) -> dict[str, Any]:
    present = sorted(float(v) for v in values if v is not None)
    if not present:
        return {"median": None, "min": None, "max": None, "n": 0, "missing": len(values)}
    return {"median": float(np.median(present)),
            "min": present[0], "max": present[-1], "n": len(present), "missing": len(values) - len(present)}


def _rate_dict(rate: stats.Rate) -> dict[str, Any]:
    return {"events": rate.events, "exposure": rate.exposure, "rate": rate.rate, "low": rate.low, "high": rate.high,
            "upper_bound": rate.upper_bound, "rule_of_three": rate.rule_of_three}


def summarize_variant(name: str, run_id: str, source: str, trials: list[dict[str, Any]], excluded: list[dict[str, Any]],
               confidence: float) -> dict[str, Any]:
    crashes = sum(t["crashes"] for t in trials)
    host_hours = sum(t["host_hours"] for t in trials)
    requests = sum(t["requests"] for t in trials)
    crashed = sum(1 for t in trials if t["crashes"])
    per_million = stats.poisson_rate(crashes, requests / 1e6, confidence)
    dispersion = None
    if crashes and len(trials) > 1 and all(t["host_hours"] > 0 for t in trials):
        # Do crashes cluster within trials beyond what a Poisson process would give? (cascades do)
        expected = [crashes * t["host_hours"] / host_hours for t in trials]
        dispersion = float(scipy_stats.chisquare([t["crashes"] for t in trials], expected).pvalue)
    first = stats.first_crash_summary([t["first_crash"] for t in trials], [t["end"] for t in trials])
    buckets: dict[str, dict[str, Any]] = {}
    for trial in trials:
        for bucket, info in trial["buckets"].items():
            entry = buckets.setdefault(bucket, {"bucket": bucket, "crashes": 0, "trials": 0,
                                                "crash_class": info["crash_class"], "signature": info["signature"]})
            entry["crashes"] += info["count"]
            entry["trials"] += 1
    bound = stats.zero_of_n_bound(len(trials), confidence) if trials and not crashed else None
    return {
        "name": name, "run_id": run_id, "variant": source, "trials": len(trials),
        "excluded_trials": excluded,
        "crashes": crashes, "crashed_trials": crashed,
        "crashed_trials_bound": None if bound is None else {"upper_bound": bound.upper_bound,
                                                            "rule_of_three": bound.rule_of_three},
        "exposure": {"host_hours": host_hours, "requests": requests,
                     # how the host-hours were counted: "uptime" (start to exit of every process), or
                     # from an older store "host samples" / "fleet samples" / "planned"
                     "source": "+".join(sorted({t["exposure_source"] for t in trials})) or None,
                     "incarnations": sum(t["incarnations"] or 0 for t in trials)},
        "crash_rate": {"per_host_hour": _rate_dict(stats.poisson_rate(crashes, host_hours, confidence)),
                       "per_million_requests": _rate_dict(per_million)},
        "overdispersion_p": dispersion,
        "first_crash": {"trials": first.trials, "crashed": first.crashed, "censored": first.censored,
                        "median": first.median, "earliest": first.earliest, "latest": first.latest,
                        "censored_at": first.censored_at},
        "metrics": {m: spread_of([t[m] for t in trials]) for m in TRIAL_METRICS},
        "buckets": sorted(buckets.values(), key=lambda b: (-b["crashes"], b["bucket"])),
        "unique_buckets": [],
        "loaded": sorted({name for t in trials for name in t.get("loaded", [])}),
        "per_trial": [{k: t[k] for k in ("run_id", "trial", "repeat", "seed", "crashes", "first_crash", "end",
                                         "host_hours", "requests") + TRIAL_METRICS}
                      | {"buckets": {b: i["count"] for b, i in t["buckets"].items()}} for t in trials],
    }


# --- comparison rows ---------------------------------------------------------------------------

def _row_seed(seed: int, variant: str, baseline: str, metric: str) -> list[int]:
    return [seed, zlib.crc32(f"{variant}\0{baseline}\0{metric}".encode())]


def _min_p(metric: str, v: dict[str, Any], b: dict[str, Any]) -> float:
    """The smallest p-value this row's test could give, from sample sizes and margins alone (1: no test)."""
    if not v["trials"] or not b["trials"]:
        return 1.0
    if metric == "crash_rate":
        e1, e2 = v["exposure"]["host_hours"], b["exposure"]["host_hours"]
        if e1 <= 0 or e2 <= 0:
            return 1.0
        return stats.rate_min_p(v["crashes"] + b["crashes"], e1 / (e1 + e2))
    if metric == "crashed_trials":
        return stats.fisher_min_p(v["crashed_trials"] + b["crashed_trials"], v["trials"], b["trials"])
    if metric == "first_crash":
        return 0.0 if v["crashed_trials"] + b["crashed_trials"] > 0 else 1.0   # not a discrete test
    return stats.min_rank_p(v["metrics"][metric]["n"], b["metrics"][metric]["n"])


def _trials_needed(family: int, alpha: float) -> int:
    n = 2
    while stats.min_rank_p(n, n) >= alpha / family and n < 100:
        n += 1
    return n


def _fmt_rate(value: float | None) -> str:
    return "-" if value is None or math.isnan(value) else f"{value:.3g}"


@dataclass
class Detectable:
    """What a row's test could have detected at a threshold: a factor (None: not a ratio), or a text."""
    factor: float | None
    text: str | None = None
    trials: dict[str, int | None] | None = None   # crashed trials: the counts that would have been significant


@dataclass
class PairRow:
    """One comparison row before the multiplicity correction: estimates, raw p-value, smallest possible p.
    finish_rows() turns it into the row of the JSON output (docs/compare.md)."""
    variant: str
    baseline: str
    metric: str
    label: str
    unit: str
    test: str
    lower_is_better: bool
    min_p: float
    variant_value: float | None = None
    baseline_value: float | None = None
    effect: float | None = None
    effect_kind: str | None = None
    low: float | None = None
    high: float | None = None
    p_value: float | None = None
    notes: list[str] = field(default_factory=list)
    blocks: list[int] | None = None          # harness.analysis.regress: blocks a side (in the output when set)
    # What finish_rows needs and the output does not show:
    direction: int = 0                       # +1 the variant's value is higher, -1 lower
    reason: str | None = None                # why there is no test (None: p_value is a test's)
    detect: Callable[[float], Detectable] | None = None   # what the test could detect at a threshold
    effect_note: str | None = None           # the effect in words, for the verdict's text


def pair_row(metric: str, v: dict[str, Any], b: dict[str, Any], *, confidence: float, seed: int,
             n_resamples: int) -> PairRow:
    """The row comparing variant `v` with baseline `b` on `metric` (see PairRow)."""
    label, unit, lower_is_better, test = METRICS[metric]
    row = PairRow(variant=v["name"], baseline=b["name"], metric=metric, label=label, unit=unit, test=test,
                  lower_is_better=lower_is_better, min_p=_min_p(metric, v, b))
    if not v["trials"] or not b["trials"]:
        row.reason = "no trials"
        return row
    if metric == "crash_rate":
        return _crash_rate_row(row, v, b, confidence)
    if metric == "crashed_trials":
        return _crashed_trials_row(row, v, b, confidence)
    if metric == "first_crash":
        return _first_crash_row(row, v, b)
    return _per_trial_row(row, v, b, confidence=confidence, seed=seed, n_resamples=n_resamples)


def _crash_rate_row(row: PairRow, v: dict[str, Any], b: dict[str, Any], confidence: float) -> PairRow:
    """Crashes per host-hour: the exact conditional rate ratio."""
    vr, br = v["crash_rate"]["per_host_hour"], b["crash_rate"]["per_host_hour"]
    row.variant_value, row.baseline_value, row.effect_kind = vr["rate"], br["rate"], "rate_ratio"
    if v["crashes"] + b["crashes"] == 0:
        row.reason = (f"no crashes in either; {confidence:.0%} bounds {_fmt_rate(vr['upper_bound'])} and "
                      f"{_fmt_rate(br['upper_bound'])} per host-hour")
        return row
    if vr["exposure"] <= 0 or br["exposure"] <= 0:
        row.reason = "no exposure (no host ran: no start events and no host-seconds recorded)"
        return row
    result = stats.rate_ratio(v["crashes"], vr["exposure"], b["crashes"], br["exposure"], confidence)
    row.effect, row.low, row.high, row.p_value = result.ratio, result.low, result.high, result.p_value
    row.direction = (1 if vr["rate"] > br["rate"] else -1 if vr["rate"] < br["rate"] else 0)
    if b["crashes"] == 0:
        row.effect_note = f"{v['crashes']} vs 0 crashes"
    total, e1, e2 = v["crashes"] + b["crashes"], vr["exposure"], br["exposure"]
    lean = row.direction
    row.detect = lambda alpha: Detectable(stats.rate_ratio_detectable(total, e1, e2, alpha, lean))
    for side in (v, b):
        if side["overdispersion_p"] is not None and side["overdispersion_p"] < 0.05:
            row.notes.append(f"{side['name']}: crashes cluster within trials (dispersion p="
                             f"{side['overdispersion_p']:.2g}); the Poisson interval is too narrow, "
                             "trust the crashed-trials row more")
    return row


def _crashed_trials_row(row: PairRow, v: dict[str, Any], b: dict[str, Any], confidence: float) -> PairRow:
    """The fraction of trials with a crash: Fisher's exact test."""
    k1, n1, k2, n2 = v["crashed_trials"], v["trials"], b["crashed_trials"], b["trials"]
    row.variant_value, row.baseline_value, row.effect_kind = k1 / n1, k2 / n2, "odds_ratio"
    if k1 + k2 == 0:
        row.reason = (f"no trial crashed in either, 0/{n1} and 0/{n2}; {confidence:.0%} bounds "
                      f"{v['crashed_trials_bound']['upper_bound']:.0%} and "
                      f"{b['crashed_trials_bound']['upper_bound']:.0%} per trial")
        return row
    if k1 + k2 == n1 + n2:
        row.reason = f"every trial crashed in both ({n1}/{n1} and {n2}/{n2}): compare the crash rates"
        return row
    result = stats.fisher_trials(k1, n1, k2, n2, confidence)
    row.effect, row.low, row.high, row.p_value = result.odds_ratio, result.low, result.high, result.p_value
    row.direction = 1 if k1 / n1 > k2 / n2 else -1 if k1 / n1 < k2 / n2 else 0
    row.effect_note = f"{k1}/{n1} vs {k2}/{n2} trials crashed, odds ratio"

    def detect_trials(alpha: float) -> Detectable:
        low_k, high_k = stats.fisher_detectable(k2, n1, n2, alpha)
        reach = []
        if low_k is not None:
            reach.append(("" if low_k == 0 else "<=") + f"{low_k}/{n1}")
        if high_k is not None:
            reach.append((">=" if high_k < n1 else "") + f"{high_k}/{n1}")
        return Detectable(None, f"less than a move to {' or '.join(reach)} crashed trials, baseline {k2}/{n2}"
                          if reach else f"any difference in crashed trials with {n1} and {n2} trials",
                          trials={"low": low_k, "high": high_k})

    row.detect = detect_trials
    return row


def _first_crash_row(row: PairRow, v: dict[str, Any], b: dict[str, Any]) -> PairRow:
    """Time to the first crash (Kaplan-Meier medians): the log-rank test."""
    vf, bf = v["first_crash"], b["first_crash"]
    row.variant_value, row.baseline_value, row.effect_kind = vf["median"], bf["median"], "time_ratio"
    times = [[t["first_crash"] for t in side["per_trial"]] for side in (v, b)]
    ends = [[t["end"] for t in side["per_trial"]] for side in (v, b)]
    if vf["crashed"] + bf["crashed"] == 0:
        row.reason = "no trial crashed in either"
        return row
    result = stats.first_crash_test(times[0], ends[0], times[1], ends[1])
    row.effect, row.p_value = result.time_ratio, None if math.isnan(result.p_value) else result.p_value
    # log-rank statistic > 0: the variant crashes sooner; "higher is better" is about the time.
    row.direction = -1 if result.statistic > 0 else 1 if result.statistic < 0 else 0
    events, n1, n2 = result.events, len(times[0]), len(times[1])
    row.detect = lambda alpha: Detectable(stats.first_crash_detectable(events, n1, n2, alpha))
    if row.p_value is None:
        row.reason = "log-rank test undefined"
    return row


def _per_trial_row(row: PairRow, v: dict[str, Any], b: dict[str, Any], *, confidence: float, seed: int,
                   n_resamples: int) -> PairRow:
    """A per-trial figure (latency, throughput, peak RSS): Mann-Whitney U and a bootstrap ratio of medians."""
    metric, label = row.metric, row.label
    x = [t[metric] for t in v["per_trial"] if t[metric] is not None]
    y = [t[metric] for t in b["per_trial"] if t[metric] is not None]
    for side, values in ((v, x), (b, y)):
        if len(values) < side["trials"]:
            row.notes.append(f"{side['name']}: {side['trials'] - len(values)} trial(s) without {label} left out")
    if not x or not y:
        row.reason = f"no {label} recorded"
        return row
    if len(x) < 2 or len(y) < 2:
        # One value a side: the ratio is shown, but no rank test can say anything about it.
        mx, my = float(np.median(x)), float(np.median(y))
        row.variant_value, row.baseline_value, row.effect_kind = mx, my, "ratio_of_medians"
        row.effect = mx / my if my else None
        row.reason = (f"n too small: {len(x)} vs {len(y)} trial(s), a rank test needs at least 2 a side; "
                      f"run more trials (--trials)")
        return row
    result = stats.compare_samples(x, y, seed=_row_seed(seed, v["name"], b["name"], metric), confidence=confidence,
                                   alpha=None, n_resamples=n_resamples)
    row.variant_value, row.baseline_value, row.effect = result.medians[0], result.medians[1], result.ratio
    row.effect_kind, row.low, row.high, row.p_value = "ratio_of_medians", result.low, result.high, result.p_value
    row.direction = result.direction

    def detect_shift(alpha: float) -> Detectable:
        factor = stats.rank_detectable(x, y, alpha, result.direction)
        if math.isinf(factor):
            return Detectable(factor, f"any difference: {len(x)} vs {len(y)} trials with tied values cannot reach "
                                      f"p<{alpha:.2g}")
        return Detectable(factor)

    row.detect = detect_shift
    if result.interval_method == "percentile":
        row.notes.append("BCa interval degenerate (few distinct values): percentile interval")
    return row


def _cannot_reach(row: PairRow, threshold: float, variants: Mapping[str, dict[str, Any]], alpha: float) -> str:
    """Why a row could not have been significant whatever its data."""
    if row.metric in TRIAL_METRICS:
        n1 = variants[row.variant]["metrics"][row.metric]["n"]
        n2 = variants[row.baseline]["metrics"][row.metric]["n"]
        text = f"any difference: {n1} vs {n2} trials cannot give a rank-test p below {row.min_p:.2g}"
    else:
        text = f"any difference: the smallest p-value these counts can give is {row.min_p:.2g}"
    return text + (f", p<{threshold:.2g} needed" if row.min_p < alpha else "")


def finish_rows(rows: Sequence[PairRow], variants: Mapping[str, dict[str, Any]], *, alpha: float,
                min_difference: float | Mapping[str, float] | None) -> list[dict[str, Any]]:
    """Holm-Tarone over every row that is a test, then what each row could detect, then the verdicts: the
    rows of the output, in order."""
    adjusted, thresholds = stats.holm_tarone(
        [r.p_value if r.reason is None else None for r in rows], [r.min_p for r in rows], alpha)
    return [_finished(row, p_holm, threshold, variants, alpha, min_difference)
            for row, p_holm, threshold in zip(rows, adjusted, thresholds)]


def _finished(row: PairRow, p_holm: float | None, threshold: float, variants: Mapping[str, dict[str, Any]],
              alpha: float, min_difference: float | Mapping[str, float] | None) -> dict[str, Any]:
    md = (min_difference.get(row.metric) if isinstance(min_difference, Mapping) else min_difference)
    if row.metric == "crashed_trials":
        md = None   # odds ratios of a few trials: a relative minimum means little
    detectable, detectable_text, detectable_trials = None, None, None
    if p_holm is not None and p_holm >= alpha:
        if row.min_p >= threshold:
            detectable, detectable_text = math.inf, _cannot_reach(row, threshold, variants, alpha)
        elif row.detect is not None:
            found = row.detect(threshold)
            detectable, detectable_text, detectable_trials = found.factor, found.text, found.trials
            if detectable_text is None and detectable is not None and math.isinf(detectable):
                detectable_text = "any difference with these counts"
    verdict = stats.decide(p_adjusted=p_holm, alpha=alpha, direction=row.direction,
                           lower_is_better=row.lower_is_better, effect=row.effect, low=row.low,
                           high=row.high, min_difference=md, detectable=detectable,
                           detectable_text=detectable_text, no_test_reason=row.reason,
                           effect_text=row.effect_note)
    band = None if md is None else 1.0 + md
    out: dict[str, Any] = {
        "variant": row.variant, "baseline": row.baseline, "metric": row.metric, "label": row.label,
        "unit": row.unit, "test": row.test, "lower_is_better": row.lower_is_better,
        "variant_value": row.variant_value, "baseline_value": row.baseline_value, "effect": row.effect,
        "effect_kind": row.effect_kind, "low": row.low, "high": row.high, "p_value": row.p_value,
        "p_holm": p_holm, "min_p": row.min_p, "threshold": threshold, "detectable": detectable,
        "detectable_trials": detectable_trials, "verdict": verdict.verdict, "text": verdict.text,
        "notes": row.notes}
    if row.blocks is not None:
        out["blocks"] = row.blocks
    out["min_difference"] = md
    out["within_min_difference"] = bool(
        band is not None and row.low is not None and row.high is not None
        and 1.0 / band <= row.low and row.high <= band)
    out["effect_text"] = stats.fmt_ratio(row.effect)
    out["interval_text"] = ("-" if row.low is None or row.high is None or math.isnan(row.low)
                            else f"{stats.fmt_ratio(row.low)}-{stats.fmt_ratio(row.high)}")
    return out


def _rows_for(pairs: Sequence[tuple[dict[str, Any], dict[str, Any]]], metrics: Sequence[str], settings: dict[str, Any],
              min_difference: float | Mapping[str, float] | None) -> tuple[list[dict[str, Any]], int]:
    """The rows of these (variant, baseline) pairs, corrected together; and Tarone's K at the first step."""
    pending = [pair_row(m, v, b, confidence=settings["confidence"], seed=settings["seed"],
                        n_resamples=settings["n_resamples"]) for v, b in pairs for m in metrics]
    by_name = {side["name"]: side for pair in pairs for side in pair}
    rows = finish_rows(pending, by_name, alpha=settings["alpha"], min_difference=min_difference)
    tested = [r["min_p"] for r in rows if r["p_holm"] is not None]
    return rows, stats.tarone_size(tested, settings["alpha"]) if tested else 0


# --- the whole comparison ----------------------------------------------------------------------

def _resolve(name: str, variants: list[dict[str, Any]]) -> dict[str, Any]:
    exact = [v for v in variants if v["name"] == name]
    if exact:
        return exact[0]
    by_source = [v for v in variants if v["variant"] == name]
    if len(by_source) == 1:
        return by_source[0]
    known = ", ".join(v["name"] for v in variants)
    if by_source:
        raise ValueError(f"variant {name!r} is in several runs; name one of: {known}")
    raise ValueError(f"no variant {name!r} (variants: {known})")


def compare_runs(run_dirs: Sequence[Path], baseline: str | None = None,
                 min_difference: float | Mapping[str, float] | None = None, *,
                 metrics: Sequence[str] = DEFAULT_METRICS, alpha: float = stats.ALPHA,
                 confidence: float = stats.CONFIDENCE, seed: int = 0, n_resamples: int = 9999) -> dict[str, Any]:
    """Compare the variants of one or more runs (of the same scenario) with a baseline.

    baseline: a variant name (first variant by default); min_difference: the smallest relative change that
    matters (0.1 = 10%), for every ratio metric or per metric ({"p99_latency": 0.1}).
    """
    if not run_dirs:
        raise ValueError("no runs to compare")
    for metric in metrics:
        if metric not in METRICS:
            raise ValueError(f"unknown metric {metric!r} (known: {', '.join(METRICS)})")
    if not 0 < alpha < 1 or not 0 < confidence < 1:
        raise ValueError("alpha and confidence must be between 0 and 1")
    for metric, value in (min_difference.items() if isinstance(min_difference, Mapping)
                          else [] if min_difference is None else [("", min_difference)]):
        if metric and metric not in METRICS:
            raise ValueError(f"min_difference: unknown metric {metric!r} (known: {', '.join(METRICS)})")
        if not isinstance(value, (int, float)) or not 0 < value < 10:
            raise ValueError(f"min_difference must be a positive fraction (0.1 = 10%), got {value!r}")
    settings = {"alpha": alpha, "confidence": confidence, "seed": seed, "n_resamples": n_resamples,
                "metrics": list(metrics)}
    runs, groups, warnings = [], {}, []
    for run_dir in run_dirs:
        run, trials = _trial_numbers(Path(run_dir))
        if any(r["run_id"] == run["run_id"] for r in runs):
            raise ValueError(f"run {run['run_id']} given twice")
        runs.append(run)
        if run["status"] != "complete":
            warnings.append(f"run {run['run_id']} is {run['status']}: only its complete trials are compared")
        for trial in trials:
            groups.setdefault((run["run_id"], trial["variant"]), []).append(trial)
    if len({r["scenario"] for r in runs}) > 1:
        warnings.append("the runs are of different scenarios (" + ", ".join(sorted({r["scenario"] for r in runs}))
                        + "): their variants did not see the same load and faults")
    name_runs: dict[str, set[str]] = {}
    for run_id, name in groups:
        name_runs.setdefault(name, set()).add(run_id)
    variants = []
    for (run_id, name), trials in groups.items():
        display = f"{run_id}:{name}" if len(name_runs[name]) > 1 else name
        complete = [t for t in trials if t["status"] == "complete"]
        excluded = [{"run_id": t["run_id"], "trial": t["trial"], "status": t["status"]}
                    for t in trials if t["status"] != "complete"]
        if excluded:
            warnings.append(f"{display}: {len(excluded)} trial(s) not complete, left out")
        variants.append(summarize_variant(display, run_id, name, complete, excluded, confidence))
    for variant in variants:
        others = {b for other in variants if other is not variant for b in (x["bucket"] for x in other["buckets"])}
        variant["unique_buckets"] = [b["bucket"] for b in variant["buckets"] if b["bucket"] not in others]
    base = _resolve(baseline, variants) if baseline is not None else variants[0]
    seeds = {tuple(sorted({t["seed"] for t in v["per_trial"]})) for v in variants if v["per_trial"]}
    if len(seeds) > 1:
        warnings.append("variants ran with different seeds: arrivals and fault schedules differ between them")
    others = [v for v in variants if v is not base]
    if not others:
        warnings.append("only one variant: nothing to compare")
    rows, tarone = _rows_for([(v, base) for v in others], metrics, settings, min_difference)
    family = sum(1 for r in rows if r["p_holm"] is not None)
    short = [r for r in rows if r["metric"] in TRIAL_METRICS and r["p_holm"] is not None and r["min_p"] >= r["threshold"]]
    if short:
        planned = sum(1 for r in rows if r["metric"] in TRIAL_METRICS) or 1
        warnings.append(f"too few trials for the per-trial metrics: {' vs '.join(map(str, _trial_counts(short[0], variants)))}"
                        f" trials cannot give a rank-test p below {short[0]['min_p']:.2g}, p<{short[0]['threshold']:.2g}"
                        f" is needed, so those rows cannot be significant; {_trials_needed(planned, alpha)} trials per "
                        f"variant are enough for {planned} such rows")
    single = sorted({r["variant"] for r in rows if r["metric"] in TRIAL_METRICS and r["p_holm"] is None
                     and (r["text"] or "").startswith(f"{stats.NO_DIFFERENCE} (n too small:")})
    if single:
        warnings.append(f"one trial per variant ({', '.join(single)} or the baseline): the per-trial metrics "
                        "(latency, throughput, RSS) are shown but not tested; the crash counts still are")
    return json_safe({
        "schema": COMPARE_SCHEMA, "runs": runs, "scenario": runs[0]["scenario"], "baseline": base["name"],
        "alpha": alpha, "confidence": confidence, "min_difference": min_difference,
        "holm_family": family, "tarone_k": tarone,
        "settings": settings, "variants": variants, "rows": rows, "warnings": warnings,
    })


def _trial_counts(row: dict[str, Any], variants: list[dict[str, Any]]) -> tuple[int, int]:
    by_name = {v["name"]: v for v in variants}
    return (by_name[row["variant"]]["metrics"][row["metric"]]["n"],
            by_name[row["baseline"]]["metrics"][row["metric"]]["n"])


def json_safe(value: Any) -> Any:
    """JSON-safe: nan and inf become null, numpy scalars plain numbers, tuples lists."""
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return value
    if isinstance(value, int):
        return int(value)
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    return value


# --- text ----------------------------------------------------------------------------------------

def _num(value: float | None, scale: float = 1.0, digits: int = 3) -> str:
    return "-" if value is None else f"{value * scale:.{digits}g}"


def _spread_text(spread: dict[str, Any], scale: float) -> str:
    if spread["n"] == 0:
        return "-"
    text = _num(spread["median"], scale)
    if spread["n"] > 1:
        text += f" [{_num(spread['min'], scale)}-{_num(spread['max'], scale)}]"
    return text


def _rate_text(rate: dict[str, Any]) -> str:
    if rate["rate"] is None:
        return "-"
    if rate["events"] == 0:
        return f"0 (< {_num(rate['upper_bound'])})"
    return f"{_num(rate['rate'])} [{_num(rate['low'])}-{_num(rate['high'])}]"


def _first_text(first: dict[str, Any]) -> str:
    if first["crashed"] == 0:
        return f"none (all {first['censored']} ran {_num(first['censored_at'])}s+)" if first["trials"] else "-"
    median = f"{_num(first['median'])}s" if first["median"] is not None else "> half survived"
    return f"{median} ({first['crashed']}/{first['trials']} crashed)"


def _exposure_text(exposure: dict[str, Any]) -> str:
    seconds = exposure["host_hours"] * 3600
    text = f"{seconds:.3g} host-s" if seconds < 3600 else f"{exposure['host_hours']:.3g} host-h"
    text += f", {exposure['requests']} req"
    if exposure.get("source") not in (None, "uptime"):
        text += f" (from {exposure['source']})"
    return text


def render_compare(result: dict[str, Any]) -> str:
    variants = result["variants"]
    runs = ", ".join(r["run_id"] for r in result["runs"])
    conf = f"{result['confidence']:.0%}"
    out = [f"compare: scenario {result['scenario']}  runs {runs}",
           f"baseline {result['baseline']}; {conf} intervals; alpha {result['alpha']:g}, "
           + (f"Holm-Tarone step-down over {result['holm_family']} test(s), Tarone K={result['tarone_k']} at the "
              "first step" if result["holm_family"] else "no row is a test") + (f"; minimum difference {result['min_difference']}"
                                                 if result["min_difference"] else "")]
    table = [
        ["trials"] + [str(v["trials"]) for v in variants],
        ["crashes"] + [str(v["crashes"]) for v in variants],
        ["exposure"] + [_exposure_text(v["exposure"]) for v in variants],
        ["crashed trials"] + [f"{v['crashed_trials']}/{v['trials']}" + (
            f" (< {v['crashed_trials_bound']['upper_bound']:.0%})" if v["crashed_trials_bound"] else "")
            for v in variants],
        [f"crashes/host-hour [{conf}]"] + [_rate_text(v["crash_rate"]["per_host_hour"]) for v in variants],
        [f"crashes/M requests [{conf}]"] + [_rate_text(v["crash_rate"]["per_million_requests"]) for v in variants],
        ["first crash (KM median)"] + [_first_text(v["first_crash"]) for v in variants],
        ["p50 latency ms"] + [_spread_text(v["metrics"]["p50_latency"], 1e3) for v in variants],
        ["p99 latency ms"] + [_spread_text(v["metrics"]["p99_latency"], 1e3) for v in variants],
        ["throughput ok/s"] + [_spread_text(v["metrics"]["throughput"], 1.0) for v in variants],
        ["peak RSS MiB"] + [_spread_text(v["metrics"]["peak_rss"], 1 / 2**20) for v in variants],
        ["unique buckets"] + [str(len(v["unique_buckets"])) for v in variants],
        ["loaded (proof)"] + [", ".join(v.get("loaded") or ["-"]) for v in variants],
    ]
    headers = [""] + [v["name"] + (" (baseline)" if v["name"] == result["baseline"] else "") for v in variants]
    out += ["", tabulate(table, headers=headers, disable_numparse=True),
            "per-trial metrics: median [min-max] across trials; rates: estimate [interval], 0 as (< upper bound)"]
    for v in variants:
        for bucket_id in v["unique_buckets"]:
            bucket = next(b for b in v["buckets"] if b["bucket"] == bucket_id)
            out.append(f"  only in {v['name']}: {bucket_id} ({bucket['crash_class']}, {bucket['crashes']} crashes "
                       f"in {bucket['trials']} trial(s)) {bucket['signature'] or ''}".rstrip())
    if result["rows"]:
        rows = []
        for r in result["rows"]:
            rows.append([r["variant"], r["label"], r["effect_text"], r["interval_text"], _num(r["p_value"], digits=2),
                         _num(r["p_holm"], digits=2), r["text"]])
        out += ["", f"vs {result['baseline']} (ratios are variant / baseline; crashed trials: odds ratio):",
                tabulate(rows, headers=["variant", "metric", "ratio", f"{conf} CI", "p", "Holm p", "verdict"],
                         disable_numparse=True)]
        notes = [f"  {r['variant']} {r['label']}: {n}" for r in result["rows"] for n in r["notes"]]
        if notes:
            out += ["notes:"] + notes
    if result["warnings"]:
        out += [""] + [f"warning: {w}" for w in result["warnings"]]
    return "\n".join(out)


# --- expectations over a comparison ---------------------------------------------------------------

def _row_for(result: dict[str, Any], variant: dict[str, Any], reference: dict[str, Any], metric: str) -> dict[str, Any]:
    """The table's row when the reference is the baseline; else this pair compared on its own
    (Holm over the pair's metrics, with the result's settings)."""
    if reference["name"] == result["baseline"]:
        for row in result["rows"]:
            if row["variant"] == variant["name"] and row["metric"] == metric:
                return row
    settings = result["settings"]
    metrics = list(dict.fromkeys(list(settings["metrics"]) + [metric]))
    rows, _ = _rows_for([(variant, reference)], metrics, settings, result["min_difference"])
    return next(r for r in json_safe(rows) if r["metric"] == metric)


def evaluate_variant_expectations(expectations: Sequence[VariantExpectation],
                                  result: dict[str, Any]) -> list[dict[str, Any]]:
    """Judge each expectation over a compare_runs() result (pure; no store access).

    held: verdict claims by the verdict ("no worse" holds unless the row says worse); ratio claims by the
    point estimate. conclusive: whether the evidence settles it (a significant verdict, or an interval
    wholly on one side of the ratio limit); a claim that holds only because n is small is held but not
    conclusive.
    """
    out = []
    for e in expectations:
        base = {"index": e.index, "line": e.line, "text": e.text, "variant": e.variant, "reference": e.reference,
                "metric": e.metric, "claim": e.claim, "factor": e.factor}
        try:
            variant = _resolve(e.variant, result["variants"])
            reference = _resolve(e.reference, result["variants"])
        except ValueError as exc:
            out.append(base | {"held": False, "conclusive": False, "observed": None, "low": None, "high": None,
                               "verdict": None, "observed_text": str(exc)})
            continue
        row = _row_for(result, variant, reference, e.metric)
        verdict, ratio, low, high = row["verdict"], row["effect"], row["low"], row["high"]
        if ratio is None and row["effect_text"] == "inf":
            ratio = math.inf
        if high is None and low is not None and row["interval_text"] != "-":
            high = math.inf     # an unbounded interval (JSON null)
        decided = verdict != stats.NO_DIFFERENCE
        if e.claim in VERDICT_CLAIMS:
            held = {"better": verdict == stats.BETTER, "worse": verdict == stats.WORSE,
                    "no worse": verdict != stats.WORSE, "no better": verdict != stats.BETTER,
                    "no difference": verdict == stats.NO_DIFFERENCE}[e.claim]
            conclusive = decided or row["within_min_difference"]
            observed_text = row["text"]
        else:
            compare = {"<": operator.lt, "<=": operator.le, ">": operator.gt, ">=": operator.ge}[e.claim]
            if ratio is None:
                held, conclusive = False, False
                observed_text = f"no ratio ({row['text']})"
            else:
                held = bool(compare(ratio, e.factor))
                bounds = [b for b in (low, high) if b is not None]
                conclusive = len(bounds) == 2 and (all(compare(b, e.factor) for b in bounds)
                                                   or not any(compare(b, e.factor) for b in bounds))
                interval = (f", CI {stats.fmt_ratio(low)}-{stats.fmt_ratio(high)}" if len(bounds) == 2 else "")
                observed_text = f"{stats.fmt_ratio(ratio)}{interval}" + ("" if conclusive else " (inconclusive)")
        out.append(base | {"held": held, "conclusive": conclusive, "observed": ratio, "low": low, "high": high,
                           "verdict": verdict, "observed_text": observed_text})
    return json_safe(out)
