"""The store's readers (harness/store/reads.py) against a real store written through RunStore: every reader
runs on the current schema and returns what was written, and the readers that must survive an older store
without a table or column do."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

from harness.store import reads
from harness.store.runstore import HostSample, RunStore, Sample


def _store(tmp_path: Path) -> RunStore:
    store = RunStore(tmp_path / "run.db", create=True)
    store.begin_run(run_id="r1", scenario="s", scenario_file="s.yaml", seed=7, duration=3.0, hosts=2, argv=["run"],
                    phases=[("hold", "hold", 0.0, 3.0, 10.0, 10.0)], pid=1)
    store.begin_trial(1, "default", 0, 7)
    samples = [Sample(t, 10, 10, 9, 1, 0, 0, 0, 0.001 * (t + 1), None, 0.002, None, None, 2, 10.0, None)
               for t in range(3)]
    hosts = [HostSample(t, h, "up" if (t, h) != (2, 1) else "down", 100 + h, 5, 5 - h, h, 1, 1000 * (t + 1), 7,
                        cgroup={"memory": t} if h == 0 else None) for t in range(3) for h in range(2)]
    events = [{"t": 0.0, "wall": 1.0, "kind": "start", "host": h, "pid": 100 + h, "detail": {"name": f"web-{h}"}}
              for h in range(2)]
    events.append({"t": 2.5, "wall": 3.5, "kind": "exit", "host": 1, "pid": 101, "detail": {"uptime": 2.5}})
    store.write_batch(1, events=events, samples=samples, host_samples=hosts)
    return store


def test_every_reader_runs_on_the_current_schema_and_reads_what_was_written(tmp_path: Path) -> None:
    store = _store(tmp_path)
    try:
        assert reads.runs(store)[0]["id"] == "r1" and reads.run_hosts(store) == 2
        assert [r["id"] for r in reads.run_ids(store)] == ["r1"]
        assert [p["name"] for p in reads.phases(store)] == ["hold"]
        assert [t["id"] for t in reads.trials(store)] == [1] == [t["id"] for t in reads.trial_rows(store)]
        assert reads.first_trial(store) == 1 and reads.trial_variants(store)[0]["variant"] == "default"
        assert [s["t"] for s in reads.samples(store, 1)] == [0, 1, 2]
        assert sum(s["sent"] for s in reads.sample_counts(store, 1)) == 30
        assert reads.plot_samples(store, 1)[0]["hosts_alive"] == 2
        assert reads.p50s(store, 1) == [0.001, 0.002, 0.003]
        assert [dict(r) for r in reads.fleet_seconds(store)] == [{"trial": 1, "alive_seconds": 6, "last": 3}]
        assert len(reads.host_samples(store, 1)) == 6 and len(reads.up_host_samples(store, 1)) == 5
        # host 1 was down in second 2: five running host-seconds
        assert {r["trial"]: r["host_seconds"] for r in reads.host_seconds(store, ("down", "stopped"))} == {1: 5}
        assert reads.peak_rss(store) == {1: 3000}
        assert {r["host"]: r["sent"] for r in reads.host_traffic(store, 1)} == {0: 15, 1: 15}
        assert [json.loads(r["cgroup"]) for r in reads.cgroup_samples(store, 1)] == [{"memory": t} for t in range(3)]
        assert [r["rss"] for r in reads.memory_buckets(store, 1, 60)] == [3000, 3000]
        assert reads.ejected_lanes(store, 1, 64, 1) == []
        assert [(r["host"], r["state"]) for r in reads.state_lanes(store, 1, 1)] == [(1, "down")]
        assert len(reads.process_series(store, ("down", "stopped"))) == 5
        assert reads.harness_footprint(store) == [] and reads.harness_footprint_rows(store) == []
        assert [e["kind"] for e in reads.events(store, 1)] == ["start", "start", "exit"]
        assert reads.counted_events(store, 1, "start") == 0
        assert [(r["kind"], r["uptime"]) for r in reads.lifecycle_events(store)][-1] == ("exit", 2.5)
        assert reads.proof_events(store) == [] and len(reads.start_events(store)) == 2
        assert reads.host_names(store, 1) == {0: "web-0", 1: "web-1"}
        assert [e["kind"] for e in reads.lane_events(store, 1, 64)] == ["start", "start", "exit"]
        assert reads.fault_timeline_events(store, 1) == [] and len(reads.start_resume_events(store, 1)) == 2
        assert reads.request_samples(store, 1) == [] and reads.reply_counts(store, 1) == []
        assert reads.bucket_crashes(store, "ab") == [] == reads.bucket_crashes_by_variant(store, "ab")
        assert reads.triaged_crashes(store) == [] and reads.simulated_exposures(store) == []
        assert {"runs", "samples", "host_samples"} <= reads.tables(store) and reads.has_table(store, "events")
    finally:
        store.close()
    assert reads.run_record(tmp_path / "run.db")["status"] == "running"


def test_readers_of_an_older_store_without_the_newer_columns_and_tables(tmp_path: Path) -> None:
    store = _store(tmp_path)
    store.db.execute("ALTER TABLE host_samples DROP COLUMN cgroup")     # a store from before per-host cgroups
    store.db.execute("DROP TABLE harness_samples")
    store.db.execute("DROP TABLE event_counts")
    try:
        assert reads.cgroup_samples(store, 1) == []
        assert reads.harness_footprint_rows(store) == []
        assert reads.counted_events(store, 1, "start") == 0
    finally:
        store.close()
    assert reads.run_record(tmp_path / "missing.db") is None
    broken = tmp_path / "broken.db"
    sqlite3.connect(broken).close()                                    # a database without a runs table
    assert reads.run_record(broken) is None
