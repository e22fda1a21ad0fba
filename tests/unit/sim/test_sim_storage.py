"""Simulated crash storms stored compactly (harness/sim/crashes.py, harness/store/crashcounts.py): the counts
per slot x bucket and per host are those of the crash rows, and every reader (report, compare, regress,
HTML, `harness crashes`) prints the same numbers from a store holding a sample of rows plus the counts
as from one holding every crash as a row. The sample limits are lowered so that a small, quick fleet
overflows them."""

from __future__ import annotations

import collections
import json
import math
import shutil
import sqlite3
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from harness.present import crashview, html as htmlreport
from harness.analysis import regress
from harness.analysis.compare import compare_runs
from harness.scenario.loader import load_scenario_text
from harness.analysis.report import build_report, render_text
from harness.sim import crashes as sim_crashes
from harness.sim.engine import uniform_at
from harness.sim.run import run_to_dir
from harness.store.runstore import RunStore

# 40 hosts that crash-loop through a spike (memory) with a background hazard that the spike raises;
# phase boundaries inside a second (42.5, 62.5, 82.5 s) check that counts per phase stay exact.
NIGHT = """
name: storm
seed: {seed}
target: {{command: [model]}}
fleet:
  balancer: least-loaded
  simulated:
    hosts: {hosts}
    capacity: 100/s
    service_time: 100ms
    queue: 40
    memory: {{base: 8MiB, per_request: 256KiB, budget: 12MiB, spread: 25%}}
    hazard: {{base: 0.004/s, scale: 0.05/s, exponent: 2}}
    restart: {{time: 3s}}
    warmup: {{for: 5s, from: 40%}}
    retries: {{max: 1, budget: 20%}}
client: {{timeout: 1s}}
load:
  - {{ramp: {{from: {low}, to: {high}, over: 30s}}}}
  - {{hold: {{for: 12500ms, name: late}}}}
  - {{spike: {{factor: 2.5, for: 20s, name: midnight}}}}
  - {{hold: {{for: 20s, name: after}}}}
variants:
  - {{name: tight}}
  - {{name: roomy, args: {{memory.budget: 13MiB}}}}
"""


def night(hosts: int, seed: int = 5):
    return load_scenario_text(NIGHT.format(seed=seed, hosts=hosts, low=hosts * 16, high=hosts * 72), "storm.yaml")


def rows(run: Path, sql: str) -> list[tuple]:
    db = sqlite3.connect(str(run / "run.db"))
    try:
        return db.execute(sql).fetchall()
    finally:
        db.close()


@pytest.fixture
def small_sample(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sim_crashes, "FIRST_ROWS", 30)
    monkeypatch.setattr(sim_crashes, "BUCKET_ROWS", 5)
    monkeypatch.setattr(sim_crashes, "SPREAD_ROWS", 20)


def every_row(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sim_crashes, "FIRST_ROWS", 10**9)


def strip_counts(run: Path, into: Path) -> Path:
    """A copy of a run whose crashes are all rows, without the aggregate tables: the per-row store that a
    simulated run wrote before crash storms were stored compactly (and that a real run writes)."""
    shutil.copytree(run, into)
    db = sqlite3.connect(str(into / "run.db"))
    with db:
        for table in ("crash_counts", "crash_hosts", "event_counts"):
            db.execute(f"DROP TABLE {table}")
    db.close()
    return into


def runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, hosts: int) -> tuple[Path, Path]:
    """(the night with every crash a row and no counts, the same night with counts and a sample)."""
    with monkeypatch.context() as patch:
        every_row(patch)
        full = run_to_dir(night(hosts), tmp_path / "full")
    with monkeypatch.context() as patch:
        patch.setattr(sim_crashes, "FIRST_ROWS", 30)
        patch.setattr(sim_crashes, "BUCKET_ROWS", 5)
        patch.setattr(sim_crashes, "SPREAD_ROWS", 20)
        sampled = run_to_dir(night(hosts), tmp_path / "sampled")
    return strip_counts(full, tmp_path / "rows"), sampled


SKIP = {"run_id", "run_dir", "started", "ended", "wall_seconds", "digest", "crash_rows", "crashes_sampled"}


def same_numbers(old: Any, new: Any, path: str = "") -> None:
    """Everything in the old report is in the new one, equal, except ids, paths, wall-clock times and
    the crash list (the new one is a sample of the old one's rows)."""
    if isinstance(old, dict):
        for key, value in old.items():
            if key in SKIP:
                continue
            if key == "crashes" and isinstance(value, list):
                listed = [json.dumps(c, sort_keys=True) for c in value]
                assert all(json.dumps(c, sort_keys=True) in listed for c in new[key]), f"{path}.crashes"
                continue
            same_numbers(value, new[key], f"{path}.{key}")
    elif isinstance(old, list):
        assert len(old) == len(new), path
        for i, (a, b) in enumerate(zip(old, new)):
            same_numbers(a, b, f"{path}[{i}]")
    else:
        assert old == new, f"{path}: {old!r} != {new!r}"


@pytest.mark.slow
@pytest.mark.parametrize("hosts", [40, 80])     # 40: per-host samples too; 80: fleet samples only
def test_readers_print_the_same_numbers_from_counts_and_a_sample_as_from_every_row(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, hosts: int) -> None:
    old, new = runs(tmp_path, monkeypatch, hosts)
    assert rows(old, "SELECT * FROM samples ORDER BY trial, t") == rows(new, "SELECT * FROM samples ORDER BY trial, t")
    report_old, report_new = build_report(old), build_report(new)
    for trial in report_new["trials"]:
        assert trial["crashes_sampled"] and trial["crashes_total"] > 2 * len(trial["crashes"])
        assert {b["bucket"] for b in trial["buckets"]} == {"model-memory", "model-hazard"}
        assert trial["restarts"] > 0
    same_numbers(report_old, report_new)
    # the phase with its boundary inside a second (42.5 s) still counts its own crashes
    late = [p for p in report_new["trials"][0]["phases"] if p["name"] == "late"][0]
    times = [r[0] for r in rows(old, "SELECT t FROM crashes WHERE trial=1")]
    assert late["start"] == 30.0 and late["end"] == 42.5
    assert late["crashes"] == sum(1 for t in times if 30.0 <= t < 42.5) > 0
    text_old, text_new = render_text(report_old).splitlines(), render_text(report_new).splitlines()
    assert [line for line in text_old[2:] if "more (harness report" not in line] == \
        [line for line in text_new[2:] if "more (harness report" not in line]
    # compare: crash rates, first crashes, buckets
    metrics = ("crash_rate", "crashed_trials", "first_crash")
    compared_old, compared_new = compare_runs([old], metrics=metrics), compare_runs([new], metrics=metrics)
    assert compared_new["variants"][0]["crashes"] > 100
    for key in ("variants", "rows"):
        same_numbers(compared_old[key], compared_new[key], key)
    # regress: what a soak's baseline comparison reads of each run
    read_old, read_new = regress._read(old), regress._read(new)
    for a, b in zip(read_old["trials"], read_new["trials"]):
        assert (a["crashes"], a["first_crash"], a["buckets"]) == (b["crashes"], b["first_crash"], b["buckets"])
    # HTML: crashes per bar
    for store_dir in (old, new):
        store = RunStore(store_dir / "run.db")
        try:
            trial = htmlreport._read_trial(store, {"id": 1, "end": 100.0, "variant": "tight", "repeat": 0}, hosts)
        finally:
            store.close()
        bins = {width: htmlreport._crash_bins(trial, width) for width in (1.0, 5.0)}
        # host lanes (small fleets): down where the per-second samples say so; a simulated host never
        # waits for readiness, and a storm's exits are not all event rows
        lanes = {host: [(r["t"], r["span"], r["state"]) for r in rows] for host, rows in trial.lanes.items()}
        if store_dir == old:
            expected, expected_lanes = bins, lanes
    assert bins == expected and sum(bins[1.0].values()) == report_old["trials"][0]["crashes_total"]
    assert lanes == expected_lanes
    assert (hosts <= 64) == bool(lanes) and all(state in ("down", "paused") for rows in lanes.values()
                                                for _, _, state in rows)
    # harness crashes BUCKET: the exact count, not the sample's
    def counted(run: Path) -> list[str]:
        return [line for line in crashview.render_bucket(run, "model-memory").splitlines()
                if line.startswith("crashes:")]
    assert counted(old) == counted(new)


@pytest.mark.slow
def test_counts_are_those_of_the_rows(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """With every crash also a row, the per-second x bucket and per-host counts are the rows' counts."""
    every_row(monkeypatch)
    run = run_to_dir(night(40), tmp_path)
    for trial in (1, 2):
        crash_rows = rows(run, f"SELECT c.t, c.host, x.bucket, c.signal_name FROM crashes c JOIN triage x "
                               f"ON x.uid = c.uid WHERE trial={trial}")
        assert len(crash_rows) > 100
        per_slot = collections.Counter()
        for t, _, bucket, signal in crash_rows:
            # phase boundaries inside a second (42.5, 62.5, 82.5 s) cut it in two slots
            start = next((cut for cut in (42.5, 62.5, 82.5) if cut <= t < math.ceil(cut)), float(math.floor(t)))
            per_slot[(start, bucket, signal)] += 1
        stored = {(t, bucket, signal): n for t, bucket, signal, n in
                  rows(run, f"SELECT t, bucket, signal_name, count FROM crash_counts WHERE trial={trial}")}
        assert stored == dict(per_slot)
        per_host: dict[tuple[int, str], list[Any]] = {}
        for t, host, bucket, _ in crash_rows:
            entry = per_host.setdefault((host, bucket), [0, math.inf, -math.inf])
            entry[0] += 1
            entry[1], entry[2] = min(entry[1], t), max(entry[2], t)
        assert {(h, b): [n, f, last] for h, b, n, f, last in rows(
            run, f"SELECT host, bucket, count, first_t, last_t FROM crash_hosts WHERE trial={trial}")} == per_host
        assert rows(run, f"SELECT count(*) FROM event_counts WHERE trial={trial}") == [(0,)]   # all exits are rows


@pytest.mark.slow
def test_the_sample_is_bounded_holds_each_buckets_first_crashes_and_is_seeded(
        tmp_path: Path, small_sample: None) -> None:
    first = run_to_dir(night(80), tmp_path / "a")
    second = run_to_dir(night(80), tmp_path / "b")
    other = run_to_dir(night(80, seed=6), tmp_path / "c")
    columns = "trial, t, host, pid, signal, uptime, offered_rate, host_inflight, hosts_alive, detail"
    for table in ("crashes", "crash_counts", "crash_hosts", "event_counts"):
        query = (f"SELECT {columns} FROM crashes ORDER BY id" if table == "crashes"
                 else f"SELECT * FROM {table} ORDER BY 1, 2, 3")
        assert rows(first, query) == rows(second, query), table
    detail = json.loads(rows(first, "SELECT detail FROM trials WHERE id=1")[0][0])
    assert detail["digest"] == json.loads(rows(second, "SELECT detail FROM trials WHERE id=1")[0][0])["digest"]
    assert detail["digest"] != json.loads(rows(other, "SELECT detail FROM trials WHERE id=1")[0][0])["digest"]
    for trial in (1, 2):
        sample = [(int(uid.rsplit(":c", 1)[1]), bucket) for uid, bucket in rows(
            first, f"SELECT c.uid, x.bucket FROM crashes c JOIN triage x ON x.uid = c.uid WHERE trial={trial}")]
        numbers = [n for n, _ in sample]
        total = rows(first, f"SELECT sum(count) FROM crash_counts WHERE trial={trial}")[0][0]
        assert total > 200 and len(numbers) <= 30 + 2 * 5 + 20
        assert numbers[:30] == list(range(30))                    # the first crashes of the trial
        firsts = {n for bucket in ("model-memory", "model-hazard")
                  for n in sorted(n for n, b in sample if b == bucket)[:5]}
        spread = [n for n in numbers if n >= 30 and n not in firsts]
        assert len(spread) == 20 and max(spread) > total / 2      # and a sample spread over the rest
        for bucket in ("model-memory", "model-hazard"):           # each bucket's first crash is a row
            first_t = rows(first, f"SELECT min(first_t) FROM crash_hosts WHERE trial={trial} AND bucket='{bucket}'")
            assert rows(first, f"SELECT min(c.t) FROM crashes c JOIN triage x ON x.uid = c.uid "
                               f"WHERE trial={trial} AND x.bucket='{bucket}'") == first_t
        # each row's exit and restart are event rows only for the first crashes; the rest are counted
        exits = rows(first, f"SELECT count(*) FROM events WHERE trial={trial} AND kind='exit'")[0][0]
        counted = rows(first, f"SELECT sum(count) FROM event_counts WHERE trial={trial} AND kind='exit'")[0][0]
        assert exits + counted == total and exits < total


def test_uniform_at_draws_what_random_would_and_leaves_the_stream_as_it_would() -> None:
    rng = np.random.default_rng(3)
    for case in range(200):
        total = int(rng.integers(1, 30000))
        positions = np.sort(rng.choice(total, size=min(int(rng.integers(0, 40)), total), replace=False))
        a, b = np.random.Generator(np.random.PCG64(case)), np.random.Generator(np.random.PCG64(case))
        for generator in (a, b):
            generator.integers(0, 100)            # leaves half of a 64-bit output buffered
        assert np.array_equal(a.random(total)[positions], uniform_at(b, positions, total))
        assert a.integers(0, 2**31, size=4).tolist() == b.integers(0, 2**31, size=4).tolist()
        assert a.random() == b.random()


def test_an_old_store_gets_the_count_tables_on_open(tmp_path: Path) -> None:
    run = tmp_path / "old"
    run.mkdir()
    store = RunStore(run / "run.db", create=True)
    store.close()
    db = sqlite3.connect(str(run / "run.db"))
    with db:
        for table in ("crash_counts", "crash_hosts", "event_counts"):
            db.execute(f"DROP TABLE {table}")
    db.close()
    store = RunStore(run / "run.db")
    store.close()
    names = {r[0] for r in rows(run, "SELECT name FROM sqlite_master WHERE type='table'")}
    assert {"crash_counts", "crash_hosts", "event_counts"} <= names
