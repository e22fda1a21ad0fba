"""Regressions against a baseline (harness.analysis.regress): synthetic stores for the rules, one real pair of runs."""

from __future__ import annotations

import json
import subprocess
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from conftest import HARNESS, write_scenario
from harness.base.hist import new_histogram
from harness.base.errors import HarnessError
from harness.present.junit import write_junit
from harness.analysis.regress import compare_to_baseline, find_baseline, leak_change, render_regressions
from harness.analysis.report import build_report
from harness.store.runstore import RunStore, Sample
from test_trends import MIB, host_rows, new_store, noise, write_hosts


def _histograms(median_us: float) -> list[bytes]:
    """Three slightly different latency histograms around a median, encoded once (cheap to reuse)."""
    out = []
    for spread in (0.9, 1.0, 1.1):
        histogram = new_histogram()
        for value in np.random.default_rng(int(spread * 10)).exponential(median_us * spread / 0.69, 200):
            histogram.record_value(int(value) + 1)
        out.append(histogram.encode())
    return out


def _samples(seconds: int, median_us: float, seed: int) -> list[Sample]:
    hists = _histograms(median_us)
    rng = np.random.default_rng(seed)
    return [Sample(t=t, offered=100, sent=100, ok=100, timeout=0, conn_error=0, no_host=0, bad_reply=0, p50=None,
                   p90=None, p99=None, p999=None, max=None, hosts_alive=2, offered_rate=100.0,
                   hist=hists[int(rng.integers(3))]) for t in range(seconds)]


def _crash(uid: str, t: float, host: int, bucket: str, signature: str, crash_class: str, core: str) -> dict[str, Any]:
    return {"crash": {"t": t, "wall": 1.7e9 + t, "host": host, "pid": 5000 + int(t), "signal": 11,
                      "signal_name": "SIGSEGV", "core_dumped": True, "uptime": t, "offered_rate": 100.0,
                      "host_inflight": 3, "hosts_alive": 1, "core_path": core, "uid": uid},
            "triage": {"crash_class": crash_class, "signature": signature, "bucket": bucket, "core_file": core}}


def soak_run(results: Path, run_id: str, *, variants: dict[str, dict[str, Any]], seconds: int = 2400,
             scenario: str = "soak", status: str = "complete", exit_code: int = 0, started: float = 1.7e9) -> Path:
    """A synthetic soak: per variant one trial of 2 hosts with an rss slope (MiB/h), a median latency
    (µs), and crashes [(t, host, bucket, signature, class)]."""
    run_dir = results / run_id
    store = new_store(run_dir, scenario=scenario, duration=seconds, hosts=2)
    for trial, (name, spec) in enumerate(variants.items(), start=1):
        store.begin_trial(trial, name, 0, 1)
        rows = []
        for host in range(2):
            jitter = noise(trial * 10 + host, 128 * 1024)
            slope = spec.get("leak_mib_h", 0.0)
            rows += host_rows(host, 100 * trial + host, range(seconds),
                              lambda t, j=jitter, s=slope: 40 * MIB + s * MIB * t / 3600 + j(t))
        write_hosts(store, trial, rows)
        store.write_batch(trial, samples=_samples(seconds, spec.get("latency_us", 1000.0), trial))
        crashes = [_crash(f"{run_id}-{trial}-{i}", t, host, bucket, signature, klass, f"{run_dir}/core.{i}")
                   for i, (t, host, bucket, signature, klass) in enumerate(spec.get("crashes", []))]
        store.write_batch(trial, crashes=[c["crash"] for c in crashes])
        for c in crashes:
            store.record_triage(c["crash"]["uid"], c["triage"])
        store.end_trial(trial, "complete")
    store.end_run(status, exit_code)
    store.db.execute("UPDATE runs SET started=?", (started,))
    store.close()
    return run_dir


NULL_DEREF = ("abc123", "estats_update < handle_request < serve_loop", "null-deref")
UAF = ("def456", "cache_touch < handle_line < conn_process", "poison-address")


# --- finding the baseline -----------------------------------------------------------------------------

def test_latest_good_is_the_newest_complete_run_with_exit_code_0(tmp_path: Path) -> None:
    results = tmp_path / "results"
    one = {"a": {}}
    old = soak_run(results, "r1-old", variants=one, seconds=30, started=1.0)
    good = soak_run(results, "r2-good", variants=one, seconds=30, started=2.0)
    soak_run(results, "r3-failed", variants=one, seconds=30, started=3.0, exit_code=1)
    soak_run(results, "r4-interrupted", variants=one, seconds=30, started=4.0, status="interrupted", exit_code=130)
    soak_run(results, "r5-other", variants=one, seconds=30, started=5.0, scenario="other")
    current = soak_run(results, "r6-now", variants=one, seconds=30, started=6.0)
    (results / "junk").mkdir()
    (results / "junk" / "run.db").write_text("not a database")
    assert find_baseline(results, "soak", "latest-good", current) == good
    assert find_baseline(results, "soak", "latest-good", good) == current     # excluded: the next newest
    assert find_baseline(results, "soak", "r1-old", current) == old             # a run id
    assert find_baseline(results, "soak", str(old), current) == old             # a directory
    with pytest.raises(HarnessError, match="no good run of scenario 'nightly'"):
        find_baseline(results, "nightly", "latest-good", None)
    with pytest.raises(HarnessError, match="baseline nope: no run there") as info:
        find_baseline(results, "soak", "nope", None)
    assert "\n" not in str(info.value)
    with pytest.raises(HarnessError, match="is the run itself"):
        find_baseline(results, "soak", "r6-now", current)


# --- the comparison on synthetic stores ----------------------------------------------------------------

@pytest.fixture(scope="module")
def night(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Baseline: a (one known bucket), c (one bucket). Tonight: a (the known bucket + 12 new null-derefs,
    twice the latency, a 20 MiB/h leak), b (new variant, no crash). c is gone, and its bucket with it."""
    results = tmp_path_factory.mktemp("results")
    base = soak_run(results, "base", started=1.0, variants={
        "a": {"crashes": [(100.0, 0, *UAF)]},
        "c": {"crashes": [(300.0, 1, "fed789", "tw_remove < tw_reap", "poison-address")]}})
    now = soak_run(results, "now", started=2.0, variants={
        "a": {"latency_us": 2000.0, "leak_mib_h": 20.0,
              "crashes": [(100.0, 0, *UAF)] + [(200.0 + 60 * i, i % 2, *NULL_DEREF) for i in range(12)]},
        "b": {}})
    result = compare_to_baseline(now, base)
    return {"result": result, "now": now, "base": base}


@pytest.mark.slow
def test_new_and_gone_buckets(night: dict[str, Any]) -> None:
    result = night["result"]
    assert result["variants"] == ["a"] and result["only_in_run"] == ["b"] and result["only_in_baseline"] == ["c"]
    assert [b["bucket"] for b in result["new_buckets"]] == ["abc123"]
    new = result["new_buckets"][0]
    assert new["signature"] == NULL_DEREF[1] and new["crash_class"] == "null-deref" and new["count"] == 12
    assert new["new_in"] == ["a"] and new["new_overall"] and new["variants"] == {"a": 12}
    assert new["first_seen"] == {"variant": "a", "trial": 1, "t": 200.0}
    assert new["example_core"].endswith("core.1") and new["hosts"] == ["h0", "h1"]
    assert [b["bucket"] for b in result["gone_buckets"]] == ["fed789"]
    assert result["per_variant"]["a"]["new_buckets"] == ["abc123"] and result["per_variant"]["a"]["crashes"] == 13
    assert result["per_variant"]["c"] == {"in_run": False, "in_baseline": True, "new_buckets": [],
                                          "gone_buckets": ["fed789"], "crashes": 0, "baseline_crashes": 1}
    assert result["failed"] and result["reasons"] == [
        "new crash bucket abc123 estats_update < handle_request < serve_loop (null-deref) x12 in variant a"]
    json.dumps(result)   # JSON-safe


def test_crash_rate_latency_and_leak_regressions(night: dict[str, Any]) -> None:
    result = night["result"]
    rate = result["crash_rate"][0]
    assert rate["variant"] == "a" and rate["verdict"] == "worse" and rate["p_holm"] < 0.05   # 13 vs 1 crashes
    perf = {r["metric"]: r for r in result["performance"]}
    assert result["block_seconds"] == 400 and perf["p50_latency"]["blocks"] == [6, 6]
    assert perf["p50_latency"]["verdict"] == "worse" and perf["p50_latency"]["low"] > 1.5
    assert perf["throughput"]["verdict"] == "no difference detected"
    leaks = {(r["variant"], r["metric"]): r for r in result["leaks"]}
    assert leaks[("a", "rss")]["verdict"] == "new leak" and leaks[("a", "rss")]["regression"]
    assert leaks[("a", "fds")]["verdict"] == "unchanged"
    assert {a["kind"] for a in result["attention"]} == {"leak", "crash_rate", "performance"}
    text = render_regressions(result)
    assert text.splitlines()[1] == "FAILED: 1 new crash bucket(s)"
    assert ("NEW bucket abc123 estats_update < handle_request < serve_loop (null-deref) x12 in variant a"
            in text)
    assert "gone: bucket fed789 tw_remove < tw_reap" in text
    assert "a: rss new leak 20 MiB/h (baseline flat)" in text
    assert "a: p50 latency worse (2x" in text and "a: crash rate worse (13x" in text
    assert "only in the baseline: c" in text
    assert len(text.splitlines()) <= 25, text      # one screen


def test_junit_names_the_new_bucket(night: dict[str, Any], tmp_path: Path) -> None:
    path = tmp_path / "junit.xml"
    write_junit(path, build_report(night["now"]), [], night["result"])
    suite = ET.parse(path).getroot()
    cases = {c.get("name"): c for c in suite.iter("testcase") if c.get("classname") == "harness.regressions"}
    new = cases["new bucket abc123 estats_update < handle_request < serve_loop [variant a]"]
    assert new.find("failure") is not None and "null-deref" in new.find("failure").get("message")
    assert cases["gone bucket fed789 tw_remove < tw_reap"].find("failure") is None
    assert cases["leak rss [variant a]"].find("failure") is not None
    assert cases["leak fds [variant a]"].find("failure") is None
    assert cases["p50 latency [variant a]"].find("failure") is not None
    assert cases["throughput [variant a]"].find("failure") is None
    failures = sum(1 for c in suite.iter("testcase") if c.find("failure") is not None)
    assert suite.get("failures") == str(failures) and suite.get("tests") == str(len(list(suite.iter("testcase"))))


def test_same_night_twice_is_not_a_regression(tmp_path: Path) -> None:
    spec = {"a": {"crashes": [(100.0, 0, *UAF)]}}
    base = soak_run(tmp_path, "base", variants=spec)
    now = soak_run(tmp_path, "now", variants=spec)
    result = compare_to_baseline(now, base)
    assert not result["failed"] and not result["new_buckets"] and not result["gone_buckets"]
    assert not result["attention"], result["attention"]
    assert render_regressions(result).splitlines()[1] == "OK: no new crash bucket"


def test_leak_change_rules() -> None:
    def trend(verdict: str, slope: float, low: float, high: float) -> dict[str, Any]:
        return {"slope": slope * MIB, "low": low * MIB, "high": high * MIB, "level": 100 * MIB, "unit": "bytes",
                "verdict": verdict, "text": verdict, "series": 8, "leaking": 8 if verdict == "leaks" else 0}

    assert leak_change("a", "rss", trend("leaks", 20, 18, 22), trend("leaks", 5, 4, 6))["verdict"] == "leaks faster"
    assert leak_change("a", "rss", trend("leaks", 5.5, 4, 7), trend("leaks", 5, 4, 6))["verdict"] == "still leaks"
    assert leak_change("a", "rss", trend("flat", 0, -1, 1), trend("leaks", 5, 4, 6))["verdict"] == "fixed"
    assert leak_change("a", "rss", trend("leaks", 5, 4, 6), None)["verdict"] == "new leak"
    assert leak_change("a", "rss", trend("too short", 5, 4, 6), trend("flat", 0, -1, 1))["verdict"] == "not comparable"
    assert not leak_change("a", "rss", trend("leaks", 5.5, 4, 7), trend("leaks", 5, 4, 6))["regression"]


# --- one real pair of runs --------------------------------------------------------------------------------

REAL = """
name: regress-e2e
seed: 99
target:
  root: @REPO@
  command: [targets/estats/estats-server, --port, "{port}", --estats, "@ESTATS@", --service-ms, "100",
            --scratch-kb, "16", --stats-kb, "4"]
  restart: {policy: always, backoff: 300ms}
  expect_reply: "^OK"
fleet: {hosts: 3, balancer: least-loaded}
load:
  - {hold: {rate: 150, for: 2s}}
  - {spike: {factor: 6, for: 4s, name: midnight}}
faults:
  - {kind: alloc-fail, mode: budget, budget: 400KiB}
variants:
  - {name: nightly}
"""


@pytest.mark.slow
def test_a_real_night_that_starts_crashing_fails_against_last_good(targets: Path, tmp_path: Path) -> None:
    """Last night estats ran with its stats block off (allocation failures become ERR replies); tonight's
    build turns it on, and the unchecked allocation crashes under the same budget: a new bucket."""
    results = tmp_path / "results"
    runs = []
    for estats in ("off", "on"):
        scenario = write_scenario(tmp_path, REAL.replace("@ESTATS@", estats), name=f"{estats}.yaml")
        ran = subprocess.run([*HARNESS, "run", str(scenario), "--out", str(results), "--quiet", "--json"],
                             cwd=tmp_path, capture_output=True, text=True, timeout=300)
        assert ran.returncode == 0, ran.stderr
        runs.append(Path(json.loads(ran.stdout)["run_dir"]))
    baseline = find_baseline(results, "regress-e2e", "latest-good", exclude=runs[1])
    assert baseline == runs[0]
    result = compare_to_baseline(runs[1], baseline)
    assert result["failed"] and result["variants"] == ["nightly"]
    new = result["new_buckets"]
    assert len(new) == 1 and new[0]["signature"].startswith("estats_update < handle_request")
    assert new[0]["crash_class"] == "null-deref" and new[0]["new_overall"] and new[0]["example_core"]
    assert result["crash_rate"][0]["baseline_value"] == 0 and result["crash_rate"][0]["variant_value"] > 0
    assert all("too short" in r["text"] for r in result["performance"])   # seconds, not minutes: no claim
    assert all(r["verdict"] == "not comparable" for r in result["leaks"])
    text = render_regressions(result)
    assert f"NEW bucket {new[0]['bucket']} estats_update < handle_request" in text and "(null-deref)" in text
    junit = tmp_path / "junit.xml"
    write_junit(junit, build_report(runs[1]), [], result)
    names = [c.get("name") for c in ET.parse(junit).getroot().iter("testcase")
             if c.get("classname") == "harness.regressions" and c.find("failure") is not None]
    assert any(n.startswith(f"new bucket {new[0]['bucket']} estats_update < handle_request") for n in names), names
