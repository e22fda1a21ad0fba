"""Leak trends over a run store: does RSS, heap, fds or threads grow while the fleet serves?

run_trends(run_dir) reads host_samples (and harness_samples) and fits, per process, a Theil-Sen slope
(scipy.stats.theilslopes) in units per hour with an interval, then combines the processes of each
variant into one verdict per metric. Pure reads. Method and rules: docs/soak.md.

Returned dict (JSON-safe; every slope is in units per hour, bytes for rss/heap):

    {
      "schema": 1, "run_id": str, "run_dir": str,
      "settings": {"confidence", "bin_seconds", "warmup_seconds", "warmup_fraction", "min_points",
                   "min_seconds", "bytes_floor", "relative_floor", "count_floor", "count_min_change",
                   "max_autocorrelation", "n_resamples", "seed"},
      "metrics": ["rss", "heap", "fds", "threads"],
      "series": [{                      # one per process: (trial, host, pid); a restart starts a new one
          "trial": 1, "variant": "a", "trial_status": "complete", "host": 0, "pid": 4242,
          "start": 0.0, "end": 28800.0, # seconds from load start (first sample, value time of the last)
          "metrics": {"rss": SLOPE, "heap": SLOPE | None, "fds": SLOPE, "threads": SLOPE}}],
      "variants": {"a": {"trials": [1, 3], "series": 8,   # in trial order; series of failed trials not counted
                         "metrics": {"rss": COMBINED, "heap": COMBINED | None, ...}}},
      "harness": {"samples": 2880, "segments": 1,           # the harness process itself (harness_samples)
                  "metrics": {"rss": COMBINED | None, "fds": ..., "threads": ...}},
    }

    SLOPE = {"slope": float | None, "low": float | None, "high": float | None,   # per hour, interval at confidence
             "n": points fitted (one per minute), "seconds": time covered after the warm-up,
             "warmup": seconds skipped, "level": median value, "autocorrelation": lag-1 of residuals | None,
             "unit": "bytes" | "fds" | "threads",
             "verdict": "leaks" | "shrinks" | "flat" | "too short", "text": "leaks 3.2 MiB/h"}
    COMBINED = {"slope", "low", "high", "level", "unit", "verdict",   # slope: median of the series' slopes
                "text": "leaks 3.2 MiB/h" | "flat (1 of 8 processes leak)" | ...,
                "method": "single series" | "median of series" | "none" (all too short),
                "series": series with a verdict, "too_short": series too short to judge,
                "leaking": series that leak on their own, "shrinking": series that shrink on their own}

A metric is None where it was never recorded (heap needs the LD_PRELOAD shim). render_trends() prints
a short table.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from scipy import stats
from tabulate import tabulate

from harness.analysis.compare import NOT_RUNNING, json_safe
from harness.store import reads
from harness.store.runstore import open_run
from harness.base.units import format_duration, format_size

TRENDS_SCHEMA = 1
METRICS = ("rss", "heap", "fds", "threads")
HARNESS_METRICS = ("rss", "fds", "threads")
UNITS = {"rss": "bytes", "heap": "bytes", "fds": "fds", "threads": "threads"}

CONFIDENCE = 0.95
BIN_SECONDS = 60            # per-second values are reduced to per-minute medians before fitting
WARMUP_SECONDS = 60.0       # skipped at the start of every process: start-up allocation, caches filling
WARMUP_FRACTION = 0.10      # ... or this share of the process's life, whichever is longer
MIN_POINTS = 10             # fewer per-minute points after the warm-up: "too short"
MIN_SECONDS = 600.0         # less time covered after the warm-up: "too short"
BYTES_FLOOR = float(2**20)  # a leak of bytes must be at least 1 MiB/h ...
RELATIVE_FLOOR = 0.01       # ... and at least 1%/h of the series' median level
COUNT_FLOOR = 1.0           # fds, threads: at least 1 per hour ...
COUNT_MIN_CHANGE = 3.0      # ... and a fitted change of at least 3 over the time covered (one lazy open is not a leak)
MAX_AUTOCORRELATION = 0.95  # caps the interval widening at sqrt(1.95/0.05) = 6.2x
N_RESAMPLES = 9999
SEED = 0
HARNESS_GAP = 120.0         # harness samples further apart than this: a new harness process (resume)

LEAKS, SHRINKS, FLAT, TOO_SHORT = "leaks", "shrinks", "flat", "too short"


# --- one series -------------------------------------------------------------------------------

def _per_minute(t: np.ndarray, when: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(times, values): the median of each BIN_SECONDS bin of sample start `t` (a rolled-up row is its own
    bin); `when` is the time of each value, `t` sorted ascending. Medians: one page fault or one
    burst of requests does not move a minute."""
    key = np.floor_divide(t, BIN_SECONDS)
    starts = np.flatnonzero(np.r_[True, key[1:] != key[:-1]])
    ends = np.r_[starts[1:], key.size]
    lo, hi = starts + (ends - starts - 1) // 2, starts + (ends - starts) // 2
    order = np.lexsort((y, key))                      # values sorted within each bin, bins in order
    ys = y[order]
    return (when[lo] + when[hi]) / 2.0, (ys[lo] + ys[hi]) / 2.0


def leak_floor(unit: str, level: float) -> float:
    """The smallest slope per hour that counts as a leak (practical significance)."""
    if unit == "bytes":
        return max(BYTES_FLOOR, RELATIVE_FLOOR * abs(level))
    return COUNT_FLOOR


def _number(value: float) -> str:
    """Two significant figures at most, no exponent: 3.2, 5, 12, 480."""
    return f"{value:.1f}".removesuffix(".0") if value < 10 else f"{value:.0f}"


def human(unit: str, value: float) -> str:
    """3.2 MiB, 480 KiB, 6 fds (absolute value)."""
    value = abs(value)
    if unit == "bytes":
        for name, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
            if value >= scale:
                return f"{_number(value / scale)} {name}"
        return f"{_number(value)} B"
    return f"{_number(value)} {unit}"


def per_hour_text(unit: str, per_hour: float) -> str:
    """3.2 MiB/h, 6 fds/h (absolute value)."""
    return f"{human(unit, per_hour)}/h"


def _judge(unit: str, slope: float | None, low: float | None, high: float | None, level: float,
           seconds: float) -> tuple[str, str]:
    """The verdict: a leak needs the whole interval above 0 AND a slope above the practical floor."""
    if slope is None or low is None or high is None:
        return TOO_SHORT, TOO_SHORT
    floor = leak_floor(unit, level)
    change = abs(slope) * seconds / 3600.0
    big = abs(slope) >= floor and (unit == "bytes" or change >= COUNT_MIN_CHANGE)
    if low > 0 and big:
        return LEAKS, f"{LEAKS} {per_hour_text(unit, slope)}"
    if high < 0 and big:
        return SHRINKS, f"{SHRINKS} {per_hour_text(unit, slope)}"
    return FLAT, FLAT


def lag1_autocorrelation(residuals: np.ndarray) -> float:
    """Correlation of successive values (0 when undefined: too few, or constant)."""
    if residuals.size < 3 or np.ptp(residuals) == 0:
        return 0.0
    with np.errstate(invalid="ignore", divide="ignore"):
        rho = float(np.corrcoef(residuals[:-1], residuals[1:])[0, 1])
    return 0.0 if math.isnan(rho) else rho


def fit_series(t: np.ndarray, when: np.ndarray, y: np.ndarray, unit: str) -> dict[str, Any]:
    """SLOPE of one process's metric: t = sample starts (sorted), when = value times, y = values (seconds,
    units). Skips the warm-up, reduces to per-minute medians, Theil-Sen, then widens the interval by the
    lag-1 autocorrelation of the residuals (minutes of RSS are not independent draws)."""
    start = float(t[0])
    warmup = max(WARMUP_SECONDS, WARMUP_FRACTION * (float(when[-1]) - start))
    keep = t >= start + warmup
    t, when, y = t[keep], when[keep], y[keep]
    result: dict[str, Any] = {"slope": None, "low": None, "high": None, "n": 0, "seconds": 0.0, "warmup": warmup,
                              "level": float(np.median(y)) if y.size else None, "autocorrelation": None,
                              "unit": unit, "verdict": TOO_SHORT, "text": TOO_SHORT}
    if y.size == 0:
        return result
    x, v = _per_minute(t, when, y)
    seconds = float(when[-1] - t[0])
    result.update(n=int(x.size), seconds=seconds)
    if x.size < 3 or np.ptp(x) == 0:
        return result
    fit = stats.theilslopes(v, x, alpha=CONFIDENCE)
    slope, low, high = float(fit.slope), float(fit.low_slope), float(fit.high_slope)
    # Theil-Sen's interval assumes independent residuals; with lag-1 autocorrelation rho the effective
    # number of points is n (1 - rho) / (1 + rho), so the half-widths grow by sqrt((1 + rho) / (1 - rho)).
    rho = min(max(lag1_autocorrelation(v - (fit.intercept + slope * x)), 0.0), MAX_AUTOCORRELATION)
    widen = math.sqrt((1 + rho) / (1 - rho))
    low, high = slope - (slope - low) * widen, slope + (high - slope) * widen
    result.update(slope=slope * 3600, low=low * 3600, high=high * 3600, autocorrelation=rho)
    if x.size >= MIN_POINTS and seconds >= MIN_SECONDS:
        result["verdict"], result["text"] = _judge(unit, result["slope"], result["low"], result["high"],
                                                   result["level"], seconds)
    else:
        result["text"] = f"{TOO_SHORT} ({format_duration(seconds)}, {x.size} min)"
    return result


# --- several series -> one verdict ----------------------------------------------------------------

def combine(fits: Sequence[dict[str, Any] | None]) -> dict[str, Any] | None:
    """COMBINED of several processes' SLOPEs of one metric (None: the metric was never recorded).

    The slope is the median of the per-series slopes. Processes are independent replicates, so the
    spread of their slopes is an honest measure of uncertainty even though each series is autocorrelated:
    the interval is the percentile bootstrap of that median over series (seeded), widened to contain
    the median of the per-series intervals too (with 2-5 series the bootstrap collapses to about
    [min, max] and cannot see how noisy each series is).
    """
    present = [f for f in fits if f is not None]
    if not present:
        return None
    unit = present[0]["unit"]
    usable = [f for f in present if f["verdict"] != TOO_SHORT]
    counts = {"series": len(usable), "too_short": len(present) - len(usable),
              "leaking": sum(f["verdict"] == LEAKS for f in usable),
              "shrinking": sum(f["verdict"] == SHRINKS for f in usable)}
    if not usable:
        return {"slope": None, "low": None, "high": None, "level": None, "unit": unit, "verdict": TOO_SHORT,
                "text": TOO_SHORT, "method": "none", **counts}
    if len(usable) == 1:
        only = usable[0]
        return {k: only[k] for k in ("slope", "low", "high", "level", "unit", "verdict", "text")} | {
            "method": "single series", **counts}
    slopes = np.array([f["slope"] for f in usable])
    slope = float(np.median(slopes))
    if np.ptp(slopes) == 0:
        low_b = high_b = slope
    else:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            boot = stats.bootstrap((slopes,), np.median, confidence_level=CONFIDENCE, method="percentile",
                                   n_resamples=N_RESAMPLES, rng=np.random.default_rng(SEED))
        low_b, high_b = float(boot.confidence_interval.low), float(boot.confidence_interval.high)
    low = min(low_b, float(np.median([f["low"] for f in usable])))
    high = max(high_b, float(np.median([f["high"] for f in usable])))
    level = float(np.median([f["level"] for f in usable]))
    seconds = float(np.median([f["seconds"] for f in usable]))
    verdict, text = _judge(unit, slope, low, high, level, seconds)
    if verdict == FLAT and counts["leaking"]:     # the typical process is flat; say that some are not
        text = f"{FLAT} ({counts['leaking']} of {len(usable)} processes leak)"
    return {"slope": slope, "low": low, "high": high, "level": level, "unit": unit, "verdict": verdict,
            "text": text, "method": "median of series", **counts}


# --- reading the store ----------------------------------------------------------------------------

def _host_rows(store: Any) -> np.ndarray:
    """host_samples as a float array: trial, host, pid, t, span, rss, heap, fds, threads (NULL -> nan).
    heap is the shim's live_bytes, read by SQLite's JSON functions (fast) when it has them."""
    return np.array(reads.process_series(store, NOT_RUNNING), dtype=float).reshape(-1, 9)


def _series(data: np.ndarray) -> list[tuple[int, int]]:
    """[start, end) row ranges of each process: a new trial, host or pid starts a new series (a restart
    resets the trend: the new process's memory starts from scratch)."""
    if data.size == 0:
        return []
    ident = data[:, :3]
    change = np.flatnonzero(np.any(ident[1:] != ident[:-1], axis=1)) + 1
    bounds = np.r_[0, change, data.shape[0]]
    return list(zip(bounds[:-1].tolist(), bounds[1:].tolist()))


def _fit_rows(block: np.ndarray, column: int, unit: str) -> dict[str, Any] | None:
    values = block[:, column]
    ok = ~np.isnan(values)
    if not ok.any():
        return None
    t = block[ok, 3]
    return fit_series(t, t + block[ok, 4], values[ok], unit)


def _harness(store: Any) -> dict[str, Any]:
    """The harness process's own footprint, split where samples stop for a while (a resumed run)."""
    rows = np.array(reads.harness_footprint(store), dtype=float).reshape(-1, 4)
    out: dict[str, Any] = {"samples": int(rows.shape[0]), "segments": 0, "metrics": {m: None for m in HARNESS_METRICS}}
    if rows.shape[0] == 0:
        return out
    cuts = np.flatnonzero(np.diff(rows[:, 0]) > HARNESS_GAP) + 1
    segments = np.split(rows, cuts)
    out["segments"] = len(segments)
    for column, metric in enumerate(HARNESS_METRICS, start=1):
        fits = []
        for segment in segments:
            t = segment[:, 0] - segment[0, 0]
            fits.append(fit_series(t, t, segment[:, column], UNITS[metric]))
        out["metrics"][metric] = combine(fits)
    return out


def run_trends(run_dir: Path) -> dict[str, Any]:
    """Per process and per variant: slope per hour of rss, heap, fds and threads, with verdicts."""
    store = open_run(run_dir)
    try:
        run = reads.run_ids(store)
        trials = {row["id"]: dict(row) for row in reads.trial_variants(store)}
        data = _host_rows(store)
        harness = _harness(store)
    finally:
        store.close()
    series = []
    for lo, hi in _series(data):
        block = data[lo:hi]
        trial, host, pid = (int(v) for v in block[0, :3])
        info = trials.get(trial, {"variant": "?", "status": "?"})
        series.append({"trial": trial, "variant": info["variant"], "trial_status": info["status"], "host": host,
                       "pid": pid, "start": float(block[0, 3]), "end": float(block[-1, 3] + block[-1, 4]),
                       "metrics": {m: _fit_rows(block, 5 + i, UNITS[m]) for i, m in enumerate(METRICS)}})
    variants: dict[str, Any] = {}
    for trial in trials.values():
        entry = variants.setdefault(trial["variant"], {"trials": [], "series": 0, "metrics": {}})
        entry["trials"].append(trial["id"])
    for name, entry in variants.items():
        # A failed trial ran a different set-up than asked (e.g. the allocator was not bound): listed, not counted.
        mine = [s for s in series if s["variant"] == name and s["trial_status"] != "failed"]
        entry["series"] = len(mine)
        entry["metrics"] = {m: combine([s["metrics"][m] for s in mine]) for m in METRICS}
    settings = {"confidence": CONFIDENCE, "bin_seconds": BIN_SECONDS, "warmup_seconds": WARMUP_SECONDS,
                "warmup_fraction": WARMUP_FRACTION, "min_points": MIN_POINTS, "min_seconds": MIN_SECONDS,
                "bytes_floor": BYTES_FLOOR, "relative_floor": RELATIVE_FLOOR, "count_floor": COUNT_FLOOR,
                "count_min_change": COUNT_MIN_CHANGE, "max_autocorrelation": MAX_AUTOCORRELATION,
                "n_resamples": N_RESAMPLES, "seed": SEED}
    return json_safe({"schema": TRENDS_SCHEMA, "run_id": run[0]["id"] if run else Path(run_dir).name,
                   "run_dir": str(run_dir), "settings": settings, "metrics": list(METRICS), "series": series,
                   "variants": variants, "harness": harness})


# --- text -------------------------------------------------------------------------------------------

def fmt_rate(unit: str, value: float | None) -> str:
    """+3.2MiB/h, -4 fds/h; '-' for None."""
    if value is None:
        return "-"
    sign = "+" if value >= 0 else "-"
    if unit == "bytes":
        return f"{sign}{format_size(abs(value))}"
    return f"{sign}{abs(value):.3g}"


def slope_text(fit: dict[str, Any] | None) -> str:
    """'+5MiB/h [4.8MiB, 5.2MiB]' (bytes) or '+2 /h [1, 3]' (counts); '-' when there is no slope."""
    if fit is None or fit["slope"] is None:
        return "-"
    unit = fit["unit"]
    per = "/h" if unit == "bytes" else f" {unit}/h"
    return f"{fmt_rate(unit, fit['slope'])}{per} [{fmt_rate(unit, fit['low'])}, {fmt_rate(unit, fit['high'])}]"


def render_trends(trends: dict[str, Any]) -> str:
    """A short table: one row per variant and metric, the harness itself, then the processes that moved."""
    conf = f"{trends['settings']['confidence']:.0%}"
    rows = []
    for name, entry in trends["variants"].items():
        for metric in trends["metrics"]:
            fit = entry["metrics"].get(metric)
            if fit is None:
                continue
            counted = f"{fit['series']}" + (f" (+{fit['too_short']} short)" if fit["too_short"] else "")
            rows.append([name, metric, slope_text(fit), counted, fit["text"]])
    for metric, fit in trends["harness"]["metrics"].items():
        if fit is not None:
            rows.append(["(harness)", metric, slope_text(fit), str(fit["series"]), fit["text"]])
    out = [f"trends: run {trends['run_id']} (slope per hour, {conf} interval; per variant: median over processes)"]
    if not rows:
        return "\n".join(out + ["no memory samples"])
    out.append(tabulate(rows, headers=["variant", "metric", f"slope [{conf}]", "processes", "verdict"],
                        disable_numparse=True))
    moved = [f"  t{s['trial']} h{s['host']} pid {s['pid']} {metric}: {fit['text']} ({slope_text(fit)})"
             for s in trends["series"] for metric, fit in s["metrics"].items()
             if fit is not None and fit["verdict"] in (LEAKS, SHRINKS)]
    if moved:
        out += ["processes that moved on their own:"] + moved[:20] + (
            [f"  ... and {len(moved) - 20} more"] if len(moved) > 20 else [])
    return "\n".join(out)
