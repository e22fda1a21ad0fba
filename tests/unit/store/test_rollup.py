"""Rolling per-second rows into per-minute windows keeps a night-long store small without changing
what the report says: counts are conserved, latency percentiles stay exact (histograms merge),
memory series still break at restarts."""

from __future__ import annotations

import random
from pathlib import Path

from harness.base.hist import new_histogram
from harness.analysis.report import build_report
from harness.store.runstore import HostSample, RunStore, Sample


def _store(tmp_path: Path, seconds: int) -> RunStore:
    rng = random.Random(5)
    store = RunStore(tmp_path / "run.db", create=True)
    store.begin_run(run_id="r", scenario="s", scenario_file="s.yaml", seed=1, duration=seconds, hosts=2, argv=[],
                    phases=[("hold", "hold", 0, seconds, 100, 100)], pid=1)
    store.begin_trial(1, "default", 0, 1)
    samples, hosts = [], []
    for t in range(seconds):
        histogram = new_histogram()
        for _ in range(rng.randrange(1, 40)):
            histogram.record_value(rng.randrange(100, 5_000_000))
        ok = histogram.get_total_count()
        samples.append(Sample(t, ok + 2, ok + 2, ok, 1, 1, 0, 0, None, None, None, None, None,
                              rng.randrange(1, 3), 100.0, histogram.encode()))
        for host in range(2):
            pid = 100 + host if t < 70 else 200 + host        # both hosts restart at t=70
            hosts.append(HostSample(t, host, "up", pid, 5, 4, 1, rng.randrange(5), 1000 + t, 10, None, 3))
    store.write_batch(1, samples=samples, host_samples=hosts)
    return store


def test_rollup_conserves_counts_and_exact_percentiles(tmp_path: Path) -> None:
    store = _store(tmp_path, 150)
    before = build_report(tmp_path)["trials"][0]["overall"]
    removed = store.rollup(1, before=125, every=60)
    assert removed > 0
    spans = [(r["t"], r["span"]) for r in store.query("SELECT t, span FROM samples WHERE span > 1 ORDER BY t")]
    assert spans == [(0, 60), (60, 60)]
    assert store.query("SELECT MIN(t) AS t FROM samples WHERE span = 1")[0]["t"] == 120
    after = build_report(tmp_path)["trials"][0]["overall"]
    for key in ("offered", "sent", "ok", "errors", "seconds", "offered_rate", "achieved_rate", "latency",
                "hosts_alive_min", "hosts_alive_max"):
        assert after[key] == before[key], key
    # A second pass finds nothing new to roll.
    assert store.rollup(1, before=125, every=60) == 0
    store.close()


def test_host_rows_roll_per_process_so_restarts_still_break_the_series(tmp_path: Path) -> None:
    store = _store(tmp_path, 150)
    store.rollup(1, before=125, every=60)
    rows = [(r["t"], r["span"], r["pid"], r["rss"], r["sent"]) for r in
            store.query("SELECT * FROM host_samples WHERE host = 0 AND span > 1 ORDER BY t")]
    # Minute 1 holds the old process for 10 s and the new one for 50 s; rss is each window's last value.
    assert rows == [(0, 60, 100, 1059, 300), (60, 10, 100, 1069, 50), (70, 50, 200, 1119, 250)]
    assert store.query("SELECT SUM(sent) AS n FROM host_samples")[0]["n"] == 150 * 2 * 5
    store.close()


def test_a_schema_1_store_is_upgraded_on_open(tmp_path: Path) -> None:
    import sqlite3
    db = sqlite3.connect(str(tmp_path / "run.db"))
    db.executescript("CREATE TABLE samples (trial INTEGER, t INTEGER, hosts_alive INTEGER);"
                     "CREATE TABLE host_samples (trial INTEGER, t INTEGER, host INTEGER, rss INTEGER);"
                     "INSERT INTO samples VALUES (1, 0, 3);")
    db.close()
    store = RunStore(tmp_path / "run.db")
    assert [tuple(r) for r in store.query("SELECT t, span FROM samples")] == [(0, 1)]
    assert store.query("SELECT COUNT(*) AS n FROM harness_samples")[0]["n"] == 0
    store.close()
