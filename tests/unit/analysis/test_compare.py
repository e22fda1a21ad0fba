"""harness.analysis.compare over small synthetic run stores (no targets run): verdicts, JSON, expectations,
and how often an A-vs-A comparison cries wolf."""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from harness.analysis.compare import (COMPARE_SCHEMA, DEFAULT_METRICS, VariantExpectation, compare_runs,
                                      evaluate_variant_expectations, render_compare)
from harness.base.hist import new_histogram
from harness.store.runstore import HostSample, RunStore, Sample

HOSTS = 2
DURATION = 5
N_RESAMPLES = 2000   # the tests' bootstrap size (the default is 9999); results are still seeded


def make_run(root: Path, run_id: str, trials: list[dict[str, Any]], *, scenario: str = "synthetic",
             seed: int = 7) -> Path:
    """A run directory written through RunStore, as the runner would, from per-trial figures.

    Each trial: variant, p50 and p99 (seconds), rate (ok/s), rss (bytes), crashes [(t, host, bucket)],
    optional status (default complete).
    """
    run_dir = root / run_id
    run_dir.mkdir(parents=True)
    store = RunStore(run_dir / "run.db", create=True)
    store.begin_run(run_id=run_id, scenario=scenario, scenario_file=f"scenarios/{scenario}.yaml", seed=seed,
                    duration=DURATION, hosts=HOSTS, argv=["harness", "run"],
                    phases=[("hold", "hold", 0.0, float(DURATION), 100.0, 100.0)], pid=os.getpid())
    repeats: dict[str, int] = {}
    for number, trial in enumerate(trials, start=1):
        repeat = repeats.get(trial["variant"], 0)
        repeats[trial["variant"]] = repeat + 1
        store.begin_trial(number, trial["variant"], repeat, seed)
        ok = int(trial["rate"])
        samples, host_samples = [], []
        for t in range(DURATION):
            histogram = new_histogram()   # 90% of replies at p50, 10% at p99: the trial's percentiles
            histogram.record_value(int(trial["p50"] * 1e6), max(ok * 9 // 10, 1))
            histogram.record_value(int(trial["p99"] * 1e6), max(ok // 10, 1))
            samples.append(Sample(t=t, offered=ok, sent=ok, ok=ok, timeout=0, conn_error=0, no_host=0, bad_reply=0,
                                  p50=trial["p50"], p90=None, p99=trial["p99"], p999=None, max=None,
                                  hosts_alive=HOSTS, offered_rate=float(ok), hist=histogram.encode()))
            for host in range(HOSTS):
                host_samples.append(HostSample(t=t, host=host, state="up", pid=1000 + host, sent=ok // HOSTS,
                                               ok=ok // HOSTS, errors=0, inflight=1,
                                               rss=int(trial["rss"] * (1 - 0.01 * host)), fds=12))
        crashes = [{"t": t, "wall": time.time(), "host": host, "pid": 1000 + host, "signal": 11,
                    "signal_name": "SIGSEGV", "core_dumped": False, "uptime": t, "offered_rate": 100.0,
                    "host_inflight": 3, "hosts_alive": HOSTS - 1, "uid": f"{run_id}-{number}-{k}"}
                   for k, (t, host, _bucket) in enumerate(trial.get("crashes", []))]
        store.write_batch(number, samples=samples, host_samples=host_samples, crashes=crashes,
                          events=[{"wall": time.time(), "pid": None, "host": None, "detail": {}} | e
                                  for e in trial.get("events", [])])
        for k, (_t, _host, bucket) in enumerate(trial.get("crashes", [])):
            if bucket:
                store.record_triage(f"{run_id}-{number}-{k}", {"crash_class": "null-deref",
                                                               "signature": f"{bucket}_frame", "bucket": bucket})
        store.end_trial(number, trial.get("status", "complete"), {})
    store.end_run("complete", 0)
    store.close()
    return run_dir


def draw_trial(rng: np.random.Generator, variant: str, *, crash_mean: float = 1.5, p50: float = 0.002,
               p99: float = 0.02, rate: float = 200.0, rss: float = 50e6, bucket: str = "b-null") -> dict[str, Any]:
    crashes = [(float(rng.uniform(0, DURATION)), int(rng.integers(HOSTS)), bucket)
               for _ in range(int(rng.poisson(crash_mean)))]
    return {"variant": variant, "p50": float(p50 * rng.lognormal(0, 0.1)), "p99": float(p99 * rng.lognormal(0, 0.2)),
            "rate": float(rng.normal(rate, 5)), "rss": float(rss * rng.lognormal(0, 0.04)), "crashes": crashes}


def interleaved(rng: np.random.Generator, trials: int, specs: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """A B A B ...: as the runner orders trials."""
    return [draw_trial(rng, name, **spec) for _ in range(trials) for name, spec in specs.items()]


def rows_by(result: dict[str, Any], variant: str) -> dict[str, dict[str, Any]]:
    return {r["metric"]: r for r in result["rows"] if r["variant"] == variant}


@pytest.fixture(scope="module")
def ab_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """fixed (baseline, rare crashes) vs buggy (many crashes, new bucket, slower p50), 6 trials each."""
    rng = np.random.default_rng(11)
    trials = interleaved(rng, 6, {"fixed": {"crash_mean": 0.3, "bucket": "b-old"},
                                  "buggy": {"crash_mean": 6.0, "p50": 0.003, "bucket": "b-new"}})
    return make_run(tmp_path_factory.mktemp("ab"), "r-ab", trials)


@pytest.fixture(scope="module")
def ab_result(ab_run: Path) -> dict[str, Any]:
    return compare_runs([ab_run], n_resamples=N_RESAMPLES)


# --- verdicts ---------------------------------------------------------------------------------

def test_many_more_crashes_is_worse(ab_result: dict[str, Any]):
    assert ab_result["baseline"] == "fixed"   # the first variant by default
    rows = rows_by(ab_result, "buggy")
    assert list(rows) == list(DEFAULT_METRICS)
    crash = rows["crash_rate"]
    assert crash["verdict"] == "worse", crash["text"]
    assert crash["effect"] > 5 and crash["low"] > 1 and crash["p_holm"] < 0.05
    assert crash["text"].startswith("worse (")
    assert rows["p50_latency"]["verdict"] == "worse"       # 1.5x slower p50 in every trial
    assert rows["p50_latency"]["effect"] == pytest.approx(1.5, rel=0.15)
    for metric in ("throughput", "peak_rss"):
        assert rows[metric]["verdict"] == "no difference detected", rows[metric]["text"]
    buggy = next(v for v in ab_result["variants"] if v["name"] == "buggy")
    assert buggy["unique_buckets"] == ["b-new"]
    assert buggy["crashed_trials"] == 6


def test_reversed_baseline_says_better(ab_run: Path):
    result = compare_runs([ab_run], baseline="buggy", n_resamples=N_RESAMPLES)
    assert result["baseline"] == "buggy"
    assert rows_by(result, "fixed")["crash_rate"]["verdict"] == "better"


def test_a_vs_a_identical_distributions_no_difference(tmp_path: Path):
    rng = np.random.default_rng(5)
    run = make_run(tmp_path, "r-aa", interleaved(rng, 5, {"a": {}, "b": {}}))
    result = compare_runs([run], n_resamples=N_RESAMPLES)
    assert len(result["rows"]) == len(DEFAULT_METRICS)
    for row in result["rows"]:
        assert row["verdict"] == "no difference detected", row
        assert row["text"].startswith("no difference detected (")


@pytest.mark.slow
def test_a_vs_a_false_positive_rate(tmp_path: Path):
    """10 repetitions of A vs A, 5 trials each from one distribution: how many rows say better/worse?"""
    flagged, tests, rows = [], 0, 0
    for repetition in range(10):
        rng = np.random.default_rng(1000 + repetition)
        run = make_run(tmp_path, f"r-fp{repetition}", interleaved(rng, 5, {"a": {}, "b": {}}))
        result = compare_runs([run], n_resamples=N_RESAMPLES)
        rows += len(result["rows"])
        tests += result["holm_family"]
        flagged += [(repetition, r["metric"], r["verdict"]) for r in result["rows"] if r["verdict"] != "no difference detected"]
    print(f"A-vs-A: {len(flagged)} of {rows} rows better/worse ({tests} tests) over 10 repetitions: {flagged}")
    # Holm keeps the family-wise error per repetition at 5%: expect about 0.5 flagged repetitions in 10.
    assert len(flagged) <= 2


def test_zero_crashes_are_bounds_not_zero(tmp_path: Path):
    rng = np.random.default_rng(3)
    run = make_run(tmp_path, "r-zero", interleaved(rng, 4, {"a": {"crash_mean": 0}, "b": {"crash_mean": 0}}))
    result = compare_runs([run], n_resamples=N_RESAMPLES)
    variant = result["variants"][1]
    rate = variant["crash_rate"]["per_host_hour"]
    host_hours = 4 * HOSTS * DURATION / 3600
    assert variant["exposure"]["host_hours"] == pytest.approx(host_hours)
    assert rate["rate"] == 0 and rate["upper_bound"] == pytest.approx(-math.log(0.05) / host_hours)
    assert rate["rule_of_three"] == pytest.approx(3 / host_hours)
    assert variant["crashed_trials_bound"]["upper_bound"] == pytest.approx(1 - 0.05 ** (1 / 4))
    rows = rows_by(result, "b")
    assert rows["crash_rate"]["p_value"] is None and rows["crash_rate"]["p_holm"] is None
    assert "no crashes in either" in rows["crash_rate"]["text"] and "bound" in rows["crash_rate"]["text"]
    assert "no trial crashed in either" in rows["crashed_trials"]["text"]
    # 4 vs 4 trials: a rank test can reach 0.029 but not the Holm threshold: said so, and a warning
    assert "n too small to see any difference" in rows["p99_latency"]["text"]
    assert any("too few trials" in w for w in result["warnings"])
    text = render_compare(result)
    assert "0 (< " in text and "0%" not in text.split("vs a")[0].replace("95%", "")


# --- one trial per variant, ties, exposure from uptime -------------------------------------------

def test_one_trial_per_variant_counts_still_tested(tmp_path: Path):
    """What scripts/demo.sh gives (one trial each): no exception; the rank-test rows say n too small, the
    count-based rows keep their exact tests."""
    base = {"p50": 0.002, "p99": 0.02, "rate": 200.0, "rss": 50e6}
    run = make_run(tmp_path, "r-n1", [
        {"variant": "a", **base, "crashes": []},
        {"variant": "b", **base, "p50": 0.003, "crashes": [(0.2 * k, k % HOSTS, "b-x") for k in range(12)]}])
    result = compare_runs([run], n_resamples=N_RESAMPLES)
    rows = rows_by(result, "b")
    crash = rows["crash_rate"]
    assert crash["p_value"] is not None and crash["p_value"] < 1e-3 and crash["verdict"] == "worse", crash["text"]
    assert rows["crashed_trials"]["p_value"] == pytest.approx(1.0)      # Fisher on 1/1 vs 0/1
    assert rows["crashed_trials"]["verdict"] == "no difference detected"
    for metric in ("p50_latency", "p99_latency", "throughput", "peak_rss"):
        assert rows[metric]["p_value"] is None and "n too small: 1 vs 1" in rows[metric]["text"], rows[metric]
    assert rows["p50_latency"]["effect"] == pytest.approx(1.5, rel=0.05)   # the ratio is still shown
    assert any("one trial per variant" in w for w in result["warnings"])
    json.dumps(result, allow_nan=False)
    assert "n too small: 1 vs 1" in render_compare(result)
    first = compare_runs([run], metrics=("crash_rate", "first_crash"), n_resamples=N_RESAMPLES)
    assert rows_by(first, "b")["first_crash"]["verdict"] in ("worse", "no difference detected")


def test_ties_between_trials_do_not_break_the_rank_test(tmp_path: Path):
    """Identical per-trial values (peak RSS in whole pages, throughput), 1 vs 3 and 3 vs 3."""
    same = {"p50": 0.002, "p99": 0.02, "rate": 200.0, "rss": 50e6, "crashes": []}
    run = make_run(tmp_path, "r-ties", [{"variant": "a", **same}, {"variant": "b", **same},
                                        {"variant": "a", **same}, {"variant": "b", **same},
                                        {"variant": "a", **same}, {"variant": "c", **same}])
    result = compare_runs([run], n_resamples=N_RESAMPLES)
    b, c = rows_by(result, "b"), rows_by(result, "c")
    assert b["throughput"]["p_value"] == pytest.approx(1.0) and b["throughput"]["effect"] == pytest.approx(1.0)
    assert "n too small: 1 vs 3" in c["p99_latency"]["text"]
    assert all(r["verdict"] == "no difference detected" for r in result["rows"])


def _crash_loop(lives: list[float], *, host: int = 0, gap: float = 0.3) -> tuple[list[dict[str, Any]], list]:
    """Start and exit events of one host that lives `lives[i]` seconds at a time, and its crashes."""
    events, crashes, t = [], [], 0.0
    for k, life in enumerate(lives):
        pid = 5000 + k
        events.append({"t": t, "kind": "start", "host": host, "pid": pid})
        events.append({"t": t + life, "kind": "exit", "host": host, "pid": pid,
                       "detail": {"signal": 11, "uptime": life}})
        crashes.append((t + life, host, "b-loop"))
        t += life + gap
    return events, crashes


def test_exposure_is_uptime_not_sampled_seconds(tmp_path: Path):
    """A host that dies 0.9 s into each life is exposed 0.9 s per life, whatever the sampler saw."""
    lives = [0.9, 0.4, 0.9, 0.9]
    loop_events, loop_crashes = _crash_loop(lives)
    steady = [{"t": -0.2, "kind": "start", "host": h, "pid": 6000 + h} for h in range(HOSTS)] + \
             [{"t": DURATION + 0.1, "kind": "exit", "host": h, "pid": 6000 + h, "detail": {"signal": 15,
                                                                                        "uptime": DURATION + 0.3}}
              for h in range(HOSTS)]
    base = {"p50": 0.002, "p99": 0.02, "rate": 200.0, "rss": 50e6}
    run = make_run(tmp_path, "r-up", [{"variant": "steady", **base, "events": steady, "crashes": []},
                                      {"variant": "looping", **base, "events": loop_events,
                                       "crashes": loop_crashes}])
    result = compare_runs([run], n_resamples=N_RESAMPLES)
    steady_v, looping = result["variants"]
    assert looping["exposure"]["host_hours"] * 3600 == pytest.approx(sum(lives))
    assert looping["exposure"]["source"] == "uptime" and looping["exposure"]["incarnations"] == len(lives)
    assert steady_v["exposure"]["host_hours"] * 3600 == pytest.approx(HOSTS * (DURATION + 0.3))
    rate = looping["crash_rate"]["per_host_hour"]
    assert rate["rate"] == pytest.approx(len(lives) / (sum(lives) / 3600))
    row = rows_by(result, "looping")["crash_rate"]
    assert row["verdict"] == "worse" and row["p_value"] < 0.01, row["text"]


def test_uptime_exposure_unfinished_and_missing():
    from harness.analysis.exposure import uptime_exposure
    assert uptime_exposure([], 10.0) is None
    events = [{"t": 0.0, "kind": "start", "host": 0, "pid": 1}, {"t": 1.0, "kind": "start", "host": 1, "pid": 2},
              {"t": 0.9, "kind": "exit", "host": 0, "pid": 1, "detail": {"uptime": 0.9}},
              {"t": 2.0, "kind": "start", "host": 0, "pid": 3},
              {"t": 2.5, "kind": "exit", "host": 0, "pid": 3, "detail": {}}]     # no uptime: exit - start
    exposure = uptime_exposure(events, 6.0)
    assert exposure is not None
    assert exposure.host_seconds == pytest.approx(0.9 + 0.5 + 5.0)   # h1 never exited: counted to the end
    assert (exposure.incarnations, exposure.unfinished, exposure.shortest) == (3, 1, 0.5)


# --- several runs, names, exclusions ------------------------------------------------------------

@pytest.mark.slow
def test_two_runs_prefix_shared_names(tmp_path: Path):
    rng = np.random.default_rng(8)
    first = make_run(tmp_path, "r1", interleaved(rng, 3, {"a": {}, "b": {}}))
    second = make_run(tmp_path, "r2", interleaved(rng, 3, {"a": {"crash_mean": 5}, "c": {}}))
    result = compare_runs([first, second], n_resamples=N_RESAMPLES)
    assert [v["name"] for v in result["variants"]] == ["r1:a", "b", "r2:a", "c"]
    assert [v["variant"] for v in result["variants"]] == ["a", "b", "a", "c"]
    assert result["baseline"] == "r1:a"
    assert {r["variant"] for r in result["rows"]} == {"b", "r2:a", "c"}
    with pytest.raises(ValueError, match="several runs"):
        compare_runs([first, second], baseline="a")
    with pytest.raises(ValueError, match="no variant"):
        compare_runs([first, second], baseline="nope")
    assert compare_runs([first, second], baseline="c", n_resamples=N_RESAMPLES)["baseline"] == "c"
    assert compare_runs([first, second], baseline="r2:a", n_resamples=N_RESAMPLES)["baseline"] == "r2:a"


def test_different_scenarios_and_incomplete_trials_are_warned(tmp_path: Path):
    rng = np.random.default_rng(9)
    trials = interleaved(rng, 3, {"a": {}, "b": {}})
    trials[-1]["status"] = "interrupted"
    first = make_run(tmp_path, "r1", trials)
    second = make_run(tmp_path, "r2", interleaved(rng, 2, {"c": {}}), scenario="other")
    result = compare_runs([first, second], n_resamples=N_RESAMPLES)
    b = next(v for v in result["variants"] if v["name"] == "b")
    assert b["trials"] == 2 and b["excluded_trials"] == [{"run_id": "r1", "trial": 6, "status": "interrupted"}]
    assert any("different scenarios" in w for w in result["warnings"])
    assert any("not complete" in w for w in result["warnings"])


# --- JSON and text ------------------------------------------------------------------------------

def test_json_is_stable_and_strict(ab_run: Path, ab_result: dict[str, Any]):
    text = json.dumps(ab_result, allow_nan=False, sort_keys=True)
    again = json.dumps(compare_runs([ab_run], n_resamples=N_RESAMPLES), allow_nan=False, sort_keys=True)
    assert text == again      # seeded bootstrap: the same numbers every time
    assert ab_result["schema"] == COMPARE_SCHEMA
    assert set(ab_result) == {"schema", "runs", "scenario", "baseline", "alpha", "confidence", "min_difference",
                              "holm_family", "tarone_k", "settings", "variants", "rows", "warnings"}
    variant = ab_result["variants"][0]
    assert set(variant) == {"name", "run_id", "variant", "trials", "excluded_trials", "crashes", "crashed_trials",
                            "crashed_trials_bound", "exposure", "crash_rate", "overdispersion_p", "first_crash",
                            "metrics", "buckets", "unique_buckets", "per_trial", "loaded"}
    assert set(variant["metrics"]) == {"p50_latency", "p99_latency", "throughput", "peak_rss"}
    row = ab_result["rows"][0]
    assert set(row) == {"variant", "baseline", "metric", "label", "unit", "test", "lower_is_better", "variant_value",
                        "baseline_value", "effect", "effect_kind", "effect_text", "low", "high", "interval_text",
                        "p_value", "p_holm", "min_p", "threshold", "detectable", "detectable_trials", "verdict", "text",
                        "notes",
                        "min_difference", "within_min_difference"}
    assert ab_result["holm_family"] == sum(1 for r in ab_result["rows"] if r["p_holm"] is not None)


def test_peak_rss_is_max_over_hosts_median_over_trials(ab_result: dict[str, Any]):
    fixed = ab_result["variants"][0]
    per_trial = [t["peak_rss"] for t in fixed["per_trial"]]
    assert fixed["metrics"]["peak_rss"]["median"] == pytest.approx(float(np.median(per_trial)))
    assert all(isinstance(v, int) for v in per_trial)


def test_render_shows_table_and_verdicts(ab_result: dict[str, Any]):
    text = render_compare(ab_result)
    assert "fixed (baseline)" in text and "buggy" in text
    for label in ("crashes/host-hour", "crashed trials", "p99 latency ms", "peak RSS MiB", "first crash"):
        assert label in text
    assert "only in buggy: b-new" in text
    assert "worse (" in text


def test_min_difference_turns_small_significant_changes_into_no_difference(tmp_path: Path):
    rng = np.random.default_rng(21)
    trials = interleaved(rng, 8, {"a": {"crash_mean": 0}, "b": {"crash_mean": 0}})
    for i, trial in enumerate(trials):   # peak RSS 4% higher for b, every b trial above every a trial
        trial["rss"] = (50e6 if trial["variant"] == "a" else 52e6) * (1 + 0.004 * (i // 2))
    run = make_run(tmp_path, "r-md", trials)
    plain = rows_by(compare_runs([run], n_resamples=N_RESAMPLES), "b")["peak_rss"]
    assert plain["verdict"] == "worse", plain["text"]
    judged = rows_by(compare_runs([run], min_difference={"peak_rss": 0.1}, n_resamples=N_RESAMPLES), "b")["peak_rss"]
    assert judged["verdict"] == "no difference detected"
    assert "within the 10% minimum difference" in judged["text"]


def test_unknown_metric_and_no_runs():
    with pytest.raises(ValueError, match="unknown metric"):
        compare_runs([Path("x")], metrics=["p42"])
    with pytest.raises(ValueError, match="no runs"):
        compare_runs([])
    with pytest.raises(ValueError, match="positive fraction"):
        compare_runs([Path("x")], min_difference=-0.1)
    with pytest.raises(ValueError, match="unknown metric"):
        compare_runs([Path("x")], min_difference={"latency": 0.1})


def test_optional_first_crash_row(ab_run: Path):
    result = compare_runs([ab_run], metrics=("crash_rate", "first_crash"), n_resamples=N_RESAMPLES)
    row = rows_by(result, "buggy")["first_crash"]
    assert row["test"] == "log-rank" and row["p_value"] is not None
    assert row["verdict"] == "worse", row["text"]   # buggy crashes sooner


# --- expectations -------------------------------------------------------------------------------

def test_variant_expectations(ab_result: dict[str, Any]):
    expectations = [
        VariantExpectation.parse(["buggy", "fixed"], "crash_rate", "no worse", index=0, line=10),
        VariantExpectation.parse(["fixed", "buggy"], "crash_rate", "no worse", index=1, line=11),
        VariantExpectation.parse(["fixed", "buggy"], "crash_rate", "better"),
        VariantExpectation.parse(["buggy", "fixed"], "p50_latency", "< 1.1x"),
        VariantExpectation.parse(["buggy", "fixed"], "p50_latency", "< 2x"),
        VariantExpectation.parse(["buggy", "fixed"], "throughput", "no worse"),
        VariantExpectation.parse(["buggy", "ghost"], "throughput", "no worse"),
    ]
    results = evaluate_variant_expectations(expectations, ab_result)
    held = [r["held"] for r in results]
    assert held == [False, True, True, False, True, True, False]
    assert results[0]["conclusive"] and results[0]["verdict"] == "worse" and results[0]["line"] == 10
    assert results[1]["conclusive"]
    # pairs not against the baseline are compared on their own, from the stored per-trial numbers
    assert results[2]["verdict"] == "better"
    assert results[3]["conclusive"] and results[4]["conclusive"]
    assert results[5]["held"] and not results[5]["conclusive"]     # held only because nothing was detected
    assert "no variant 'ghost'" in results[6]["observed_text"]
    json.dumps(results, allow_nan=False)


def test_variant_expectation_parse_errors():
    with pytest.raises(ValueError, match="two variant names"):
        VariantExpectation.parse(["a"], "crash_rate", "no worse")
    with pytest.raises(ValueError, match="the same"):
        VariantExpectation.parse(["a", "a"], "crash_rate", "no worse")
    with pytest.raises(ValueError, match="unknown metric"):
        VariantExpectation.parse(["a", "b"], "latency", "no worse")
    with pytest.raises(ValueError, match="ratio like"):
        VariantExpectation.parse(["a", "b"], "p99_latency", "faster")
    with pytest.raises(ValueError, match="not a ratio"):
        VariantExpectation.parse(["a", "b"], "crashed_trials", "< 2x")
    parsed = VariantExpectation.parse(["a", "b"], "p99_latency", "<= 1.1x")
    assert (parsed.claim, parsed.factor, parsed.text) == ("<=", 1.1, "a vs b: p99_latency <= 1.1x")
