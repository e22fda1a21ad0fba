"""Leak trends (harness.analysis.trends) on synthetic stores: known slopes found, noise and restarts not called leaks."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import harness.store.runstore
from harness.store.runstore import HostSample, RunStore
from harness.analysis.trends import COUNT_MIN_CHANGE, fit_series, render_trends, run_trends

MIB = 2**20


# --- synthetic stores (test_regress.py uses these too) -----------------------------------------------------

def new_store(run_dir: Path, *, run_id: str | None = None, scenario: str = "soak", duration: float = 3600.0,
              hosts: int = 4) -> RunStore:
    run_dir.mkdir(parents=True, exist_ok=True)
    store = RunStore(run_dir / "run.db", create=True)
    store.begin_run(run_id=run_id or run_dir.name, scenario=scenario, scenario_file=f"{scenario}.yaml", seed=1,
                    duration=duration, hosts=hosts, argv=[], phases=[("hold", "hold", 0.0, duration, 100.0, 100.0)],
                    pid=1)
    return store


def host_rows(host: int, pid: int, seconds: Iterable[int], rss: Callable[[np.ndarray], np.ndarray], *,
              fds: Callable[[np.ndarray], np.ndarray] | None = None, heap: bool = False,
              state: str = "up") -> list[HostSample]:
    """Per-second rows of one process; rss/fds are functions of the second (vectorised)."""
    t = np.fromiter(seconds, dtype=int)
    memory = rss(t.astype(float)).astype(int)
    files = fds(t.astype(float)).astype(int) if fds is not None else np.full(t.size, 12)
    return [HostSample(t=int(s), host=host, state=state, pid=pid, sent=10, ok=10, errors=0, inflight=1, rss=int(m),
                       fds=int(f), threads=4, shim={"loaded": True, "live_bytes": int(m) // 2} if heap else None)
            for s, m, f in zip(t, memory, files)]


def write_hosts(store: RunStore, trial: int, rows: list[HostSample], *, rollup_before: int | None = None) -> None:
    """Write the rows, then roll up everything before `rollup_before` into minutes as a long run does."""
    for i in range(0, len(rows), 20000):
        store.write_batch(trial, host_samples=rows[i:i + 20000])
    if rollup_before is not None:
        store.rollup(trial, rollup_before, 60)


def noise(seed: int, sd: float) -> Callable[[np.ndarray], np.ndarray]:
    rng = np.random.default_rng(seed)
    return lambda t: rng.normal(0.0, sd, t.size)


# --- the tests ------------------------------------------------------------------------------------------------

def test_linear_leak_of_5_mib_per_hour_is_found_through_rolled_up_rows(tmp_path: Path) -> None:
    store = new_store(tmp_path / "run", duration=7200)
    store.begin_trial(1, "leaky", 0, 1)
    rows = []
    for host in range(4):
        jitter = noise(host, 300 * 1024)
        rows += host_rows(host, 100 + host, range(7200), lambda t, j=jitter: 60 * MIB + 5 * MIB * t / 3600 + j(t),
                          heap=True)
    write_hosts(store, 1, rows, rollup_before=3600)   # the first hour as per-minute rows, as a soak keeps it
    store.close()
    spans = {r["span"] for r in harness.store.runstore.open_run(tmp_path / "run").query("SELECT DISTINCT span FROM host_samples")}
    assert spans == {1, 60}
    trends = run_trends(tmp_path / "run")
    assert len(trends["series"]) == 4
    for series in trends["series"]:
        rss = series["metrics"]["rss"]
        assert rss["verdict"] == "leaks" and rss["text"].startswith("leaks 5")
        assert rss["low"] <= 5 * MIB <= rss["high"]
        assert rss["n"] >= 100 and rss["warmup"] == pytest.approx(720)   # 10% of two hours
        assert series["metrics"]["heap"]["verdict"] == "leaks"            # the shim's live bytes: 2.5 MiB/h
        assert series["metrics"]["fds"]["verdict"] == "flat"
    combined = trends["variants"]["leaky"]["metrics"]["rss"]
    assert combined["verdict"] == "leaks" and combined["series"] == 4 and combined["leaking"] == 4
    assert combined["low"] <= 5 * MIB <= combined["high"] and combined["low"] > 0
    assert trends["variants"]["leaky"]["metrics"]["heap"]["low"] <= 2.5 * MIB <= trends["variants"]["leaky"]["metrics"]["heap"]["high"]
    text = render_trends(trends)
    assert "leaky" in text and "leaks 5" in text


def test_flat_noise_with_outliers_and_restarts_is_flat(tmp_path: Path) -> None:
    store = new_store(tmp_path / "run", duration=7200)
    store.begin_trial(1, "steady", 0, 1)
    rows = []
    rng = np.random.default_rng(7)
    for host in range(4):
        jitter = noise(10 + host, 2 * MIB)

        def rss(t: np.ndarray, j: Callable[[np.ndarray], np.ndarray] = jitter) -> np.ndarray:
            spikes = np.where(rng.random(t.size) < 0.01, rng.uniform(20 * MIB, 200 * MIB, t.size), 0.0)
            return 80 * MIB + j(t) + spikes           # 1% of seconds: a transient 20-200 MiB burst

        restart = 2400 + 900 * host                   # every host restarts once, at a different time
        rows += host_rows(host, 100 + host, range(restart), rss)
        rows += host_rows(host, 200 + host, range(restart + 2, 7200), rss)
    write_hosts(store, 1, rows, rollup_before=3600)
    store.close()
    trends = run_trends(tmp_path / "run")
    assert len(trends["series"]) == 8                 # a restart starts a new series
    verdicts = {s["metrics"]["rss"]["verdict"] for s in trends["series"]}
    assert verdicts <= {"flat", "too short"} and "flat" in verdicts
    assert trends["variants"]["steady"]["metrics"]["rss"]["verdict"] == "flat"
    assert trends["variants"]["steady"]["metrics"]["heap"] is None      # no shim: not recorded


def test_restart_mid_series_is_not_a_leak_or_a_shrink(tmp_path: Path) -> None:
    """A process that settles high, then its successor that settles low: over the host it looks like a
    shrink, per process both are flat."""
    store = new_store(tmp_path / "run", duration=7200, hosts=1)
    store.begin_trial(1, "a", 0, 1)
    jitter = noise(3, 256 * 1024)
    rows = host_rows(0, 100, range(3600), lambda t: 300 * MIB + jitter(t))
    rows += host_rows(0, 0, [3600], lambda t: 0 * t, state="down")       # the gap: no process
    rows += host_rows(0, 101, range(3601, 7200), lambda t: 40 * MIB + jitter(t))
    write_hosts(store, 1, rows)
    store.close()
    trends = run_trends(tmp_path / "run")
    assert [s["pid"] for s in trends["series"]] == [100, 101]
    assert [s["metrics"]["rss"]["verdict"] for s in trends["series"]] == ["flat", "flat"]
    assert trends["variants"]["a"]["metrics"]["rss"]["verdict"] == "flat"


def test_short_series_are_too_short(tmp_path: Path) -> None:
    store = new_store(tmp_path / "run", duration=300, hosts=1)
    store.begin_trial(1, "a", 0, 1)
    write_hosts(store, 1, host_rows(0, 100, range(300), lambda t: 10 * MIB + 100 * MIB * t / 3600))
    store.close()
    trends = run_trends(tmp_path / "run")
    rss = trends["series"][0]["metrics"]["rss"]
    assert rss["verdict"] == "too short" and rss["text"].startswith("too short (")
    assert trends["variants"]["a"]["metrics"]["rss"]["verdict"] == "too short"
    assert trends["harness"]["samples"] == 0 and trends["harness"]["metrics"]["rss"] is None


def test_fd_leak_counts_and_one_lazy_open_does_not(tmp_path: Path) -> None:
    store = new_store(tmp_path / "run", duration=7200, hosts=2)
    store.begin_trial(1, "a", 0, 1)
    flat = noise(1, 64 * 1024)
    rows = host_rows(0, 100, range(7200), lambda t: 30 * MIB + flat(t), fds=lambda t: 12 + np.floor(t / 600))
    rows += host_rows(1, 101, range(7200), lambda t: 30 * MIB + flat(t), fds=lambda t: 12 + (t > 3000))
    write_hosts(store, 1, rows)
    store.close()
    leaking, lazy = (s["metrics"]["fds"] for s in run_trends(tmp_path / "run")["series"])
    assert leaking["verdict"] == "leaks" and leaking["text"] == "leaks 6 fds/h"
    assert lazy["verdict"] == "flat"


def test_the_harness_own_footprint_and_a_resume_gap(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = new_store(tmp_path / "run", duration=7200, hosts=1)
    store.begin_trial(1, "a", 0, 1)
    clock = [1.7e9]
    monkeypatch.setattr(harness.store.runstore.time, "time", lambda: clock[0])
    rng = np.random.default_rng(4)
    for i in range(720):                               # every 10 s for two hours, growing 8 MiB/h
        clock[0] = 1.7e9 + 10 * i
        store.harness_sample(1, int(100 * MIB + 8 * MIB * i * 10 / 3600 + rng.normal(0, 100 * 1024)), 30, 6)
    for i in range(400):                               # a resumed harness, an hour later, starting small again
        clock[0] = 1.7e9 + 7200 + 3600 + 10 * i
        store.harness_sample(1, int(60 * MIB + rng.normal(0, 100 * 1024)), 30, 6)
    store.close()
    harness_trends = run_trends(tmp_path / "run")["harness"]
    assert harness_trends["samples"] == 1120 and harness_trends["segments"] == 2
    rss = harness_trends["metrics"]["rss"]
    assert rss["series"] == 2 and rss["leaking"] == 1        # the first harness process leaks, the second not
    assert harness_trends["metrics"]["fds"]["verdict"] == "flat"


@settings(max_examples=60, deadline=None, derandomize=True)
@given(level=st.floats(8 * MIB, 16 * 2**30), relative_sd=st.floats(0.0, 0.01), hours=st.floats(1.0, 4.0),
       outliers=st.floats(0.0, 0.05), seed=st.integers(0, 2**32 - 1))
def test_iid_noise_without_a_slope_never_leaks(level: float, relative_sd: float, hours: float, outliers: float,
                                               seed: int) -> None:
    """Sound because the floor is far out of noise's reach here: with sd <= 1% of the level over >= 1 h, a
    fitted per-minute slope has a standard error under ~0.1%/h of the level, and a leak needs >= 1%/h
    (and >= 1 MiB/h): more than 10 standard errors. Outliers (up to 5% of seconds, up to +50%) are what
    Theil-Sen on per-minute medians ignores."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(hours * 3600), dtype=float)
    y = level + rng.normal(0.0, relative_sd * level, t.size)
    y += np.where(rng.random(t.size) < outliers, rng.uniform(0, 0.5 * level, t.size), 0.0)
    fit = fit_series(t, t + 1, np.round(y), "bytes")
    assert fit["verdict"] == "flat", fit
    counts = np.round(40 + rng.normal(0.0, 1.0, t.size))
    assert fit_series(t, t + 1, counts, "fds")["verdict"] == "flat"


def test_count_floor_needs_a_real_change() -> None:
    t = np.arange(3600 * 2, dtype=float)
    steps = 10 + np.floor(t / 3600 * (COUNT_MIN_CHANGE - 1) / 2)       # under the minimum change in 2 h
    assert fit_series(t, t + 1, steps, "threads")["verdict"] == "flat"
