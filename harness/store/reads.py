"""Reads of a run store, each named by what it reads: the queries of the report, compare, regressions, trends,
calibration, the HTML page, the crash views and the command line. With harness/store/runstore.py (schema, upgrades and
writes), harness/store/crashcounts.py and harness/store/resume.py, the only place that holds SQL: the modules above get
rows and keep their logic (docs/architecture.md).

Rows come back as the callers used them: `sqlite3.Row` from `store.query`, or plain dicts where noted.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from harness.store.runstore import RunStore


def _dicts(store: RunStore, sql: str, args: tuple[Any, ...] = ()) -> list[dict[str, Any]]:
    return [dict(row) for row in store.query(sql, args)]


def _marks(values: Sequence[Any]) -> str:
    return ",".join("?" * len(values))


def tables(store: RunStore) -> set[str]:
    return {row["name"] for row in store.query("SELECT name FROM sqlite_master WHERE type='table'")}


def has_table(store: RunStore, name: str) -> bool:
    return bool(store.query("SELECT 1 FROM sqlite_master WHERE type='table' AND name=?", (name,)))


# --- the run and its trials ------------------------------------------------------------------------------------

def runs(store: RunStore) -> list[dict[str, Any]]:
    """The runs row (one, or none when the run stopped before it began), as dicts."""
    return _dicts(store, "SELECT * FROM runs")


def run_ids(store: RunStore) -> list[sqlite3.Row]:
    return store.query("SELECT id FROM runs")


def run_hosts(store: RunStore) -> int:
    return int(store.query("SELECT hosts FROM runs")[0]["hosts"])


def run_record(db_path: Path) -> dict[str, Any] | None:
    """The runs row of a store, read-only (other runs, possibly still being written, are never touched);
    None when it cannot be read."""
    try:
        db = sqlite3.connect(db_path.resolve().as_uri() + "?mode=ro", uri=True, timeout=5)
    except sqlite3.Error:
        return None
    try:
        db.row_factory = sqlite3.Row
        row = db.execute("SELECT id, scenario, status, exit_code, started FROM runs").fetchone()
        return dict(row) if row else None
    except sqlite3.Error:
        return None
    finally:
        db.close()


def phases(store: RunStore) -> list[dict[str, Any]]:
    return _dicts(store, "SELECT * FROM phases ORDER BY idx")


def trials(store: RunStore) -> list[dict[str, Any]]:
    return _dicts(store, "SELECT * FROM trials ORDER BY id")


def trial_rows(store: RunStore) -> list[sqlite3.Row]:
    return store.query("SELECT * FROM trials ORDER BY id")


def trial_variants(store: RunStore) -> list[sqlite3.Row]:
    return store.query("SELECT id, variant, status FROM trials ORDER BY id")


def first_trial(store: RunStore) -> int | None:
    row = store.query("SELECT id FROM trials ORDER BY id LIMIT 1")
    return int(row[0]["id"]) if row else None


def simulated_exposures(store: RunStore) -> list[sqlite3.Row]:
    """The simulator's own exposure sum of trials whose exits are counted rather than stored."""
    return store.query(
        "SELECT id, json_extract(detail, '$.exposure') AS exposure FROM trials WHERE id IN "
        "(SELECT DISTINCT trial FROM event_counts WHERE kind IN ('start', 'exit'))")


# --- per-second samples --------------------------------------------------------------------------------------

def samples(store: RunStore, trial: int) -> list[dict[str, Any]]:
    return _dicts(store, "SELECT * FROM samples WHERE trial=? ORDER BY t", (trial,))


def sample_counts(store: RunStore, trial: int) -> list[sqlite3.Row]:
    return store.query("SELECT t, span, sent, ok, hist FROM samples WHERE trial=? ORDER BY t", (trial,))


def plot_samples(store: RunStore, trial: int) -> list[dict[str, Any]]:
    return _dicts(store, "SELECT t, span, offered, ok, timeout, conn_error, no_host, bad_reply, p50, p99, p999, "
                         "max, hosts_alive, offered_rate FROM samples WHERE trial=? ORDER BY t", (trial,))


def p50s(store: RunStore, trial: int) -> list[float]:
    return [r["p50"] for r in store.query("SELECT p50 FROM samples WHERE trial=? AND p50 IS NOT NULL", (trial,))]


def fleet_seconds(store: RunStore) -> list[sqlite3.Row]:
    """Per trial: host-seconds alive by the fleet-wide samples, and the end of its last sample."""
    return store.query(
        "SELECT trial, SUM(hosts_alive * span) AS alive_seconds, MAX(t + span) AS last FROM samples GROUP BY trial")


def request_samples(store: RunStore, trial: int) -> list[dict[str, Any]]:
    return _dicts(store, "SELECT * FROM request_samples WHERE trial=? ORDER BY t", (trial,))


def reply_counts(store: RunStore, trial: int) -> list[dict[str, Any]]:
    return _dicts(store, "SELECT family, name, sum(count) AS n FROM reply_counts WHERE trial=? "
                         "GROUP BY family, name ORDER BY family, name", (trial,))


# --- per-host samples --------------------------------------------------------------------------------------------

def host_samples(store: RunStore, trial: int) -> list[dict[str, Any]]:
    return _dicts(store, "SELECT * FROM host_samples WHERE trial=? ORDER BY t, host", (trial,))


def cgroup_samples(store: RunStore, trial: int) -> list[dict[str, Any]]:
    """Per-host cgroup accounting rows (host, cgroup JSON) in time order; none from a store from before
    per-host cgroups."""
    try:
        return _dicts(store, "SELECT host, cgroup FROM host_samples WHERE trial=? AND cgroup IS NOT NULL ORDER BY t",
                      (trial,))
    except sqlite3.Error:
        return []


def up_host_samples(store: RunStore, trial: int) -> list[sqlite3.Row]:
    return store.query("SELECT host, inflight, ok, shim, state FROM host_samples WHERE trial=? AND state='up'",
                       (trial,))


def host_seconds(store: RunStore, not_running: Sequence[str]) -> list[sqlite3.Row]:
    """Per trial: seconds each host was sampled in a running state, summed."""
    return store.query(
        f"SELECT trial, SUM(CASE WHEN state IN ({_marks(not_running)}) THEN 0 ELSE span END) "
        "AS host_seconds FROM host_samples GROUP BY trial", tuple(not_running))


def peak_rss(store: RunStore) -> dict[int, Any]:
    return {row["trial"]: row["peak_rss"] for row in store.query(
        "SELECT trial, MAX(rss) AS peak_rss FROM host_samples GROUP BY trial")}


def host_traffic(store: RunStore, trial: int) -> list[dict[str, Any]]:
    return _dicts(store, "SELECT host, sum(sent) AS sent, sum(ok) AS ok, sum(errors) AS errors "
                         "FROM host_samples WHERE trial=? GROUP BY host", (trial,))


def last_shim_counters(store: RunStore, trial: int, host: int, since: float) -> list[sqlite3.Row]:
    """The shim counters of a host's last sample at or after `since` (at most one row)."""
    return store.query("SELECT shim FROM host_samples WHERE trial=? AND host=? AND t>=? AND shim IS NOT NULL "
                       "ORDER BY t DESC LIMIT 1", (trial, host, since))


def memory_buckets(store: RunStore, trial: int, width: int) -> list[dict[str, Any]]:
    """Per process and bucket of `width` seconds: its highest rss, fds, threads and shim live bytes."""
    return _dicts(store, "SELECT host, pid, min(t) AS t, max(t + span) - min(t) AS span, max(rss) AS rss, "
                         "max(fds) AS fds, max(threads) AS threads, "
                         "max(CASE WHEN json_extract(shim, '$.loaded') THEN json_extract(shim, '$.live_bytes') END) "
                         "AS live FROM host_samples WHERE trial=? AND pid IS NOT NULL "
                         "GROUP BY host, pid, t / ? ORDER BY host, t", (trial, width))


def ejected_lanes(store: RunStore, trial: int, max_lanes: int, width: int) -> list[dict[str, Any]]:
    return _dicts(store, "SELECT host, min(t) AS t, max(t + span) - min(t) AS span, 'ejected' AS state "
                         "FROM host_samples WHERE trial=? AND state = 'ejected' AND host < ? "
                         "GROUP BY host, t / ? ORDER BY host, t", (trial, max_lanes, width))


# A bucket where a host was down for a moment shows it down: the worst state wins.
_WORST_STATE = ("CASE WHEN sum(state='down') THEN 'down' WHEN sum(state='paused') THEN 'paused' "
                "WHEN sum(state='ejected') THEN 'ejected' WHEN sum(state='starting') THEN 'starting' "
                "ELSE 'stopped' END")


def state_lanes(store: RunStore, trial: int, width: int) -> list[dict[str, Any]]:
    """Per host and bucket of `width` seconds in which it was not up: the worst state it was sampled in."""
    return _dicts(store, f"SELECT host, min(t) AS t, max(t + span) - min(t) AS span, {_WORST_STATE} AS state "
                         "FROM host_samples WHERE trial=? AND state != 'up' GROUP BY host, t / ? ORDER BY host, t",
                  (trial, width))


_HEAP_JSON = ("CASE WHEN json_extract(h.shim, '$.loaded') = 0 THEN NULL "
              "ELSE json_extract(h.shim, '$.live_bytes') END")


def _host_sql(heap: str, not_running: Sequence[str]) -> str:
    return (f"SELECT h.trial, h.host, h.pid, h.t, h.span, h.rss, {heap}, h.fds, h.threads FROM host_samples h "
            f"WHERE h.pid IS NOT NULL AND h.state NOT IN ({_marks(not_running)}) "
            "ORDER BY h.trial, h.host, h.t")


def process_series(store: RunStore, not_running: Sequence[str]) -> list[tuple[Any, ...]]:
    """Rows of (trial, host, pid, t, span, rss, heap, fds, threads) of running processes; heap is the shim's
    live_bytes, read by SQLite's JSON functions (fast) when it has them."""
    try:
        return store.db.execute(_host_sql(_HEAP_JSON, not_running), tuple(not_running)).fetchall()
    except sqlite3.OperationalError:
        rows = []
        for row in store.db.execute(_host_sql("h.shim", not_running), tuple(not_running)):
            shim = json.loads(row[6]) if row[6] else None
            heap = shim.get("live_bytes") if shim and shim.get("loaded", True) else None
            rows.append((*row[:6], heap, *row[7:]))
        return rows


def harness_footprint(store: RunStore) -> list[tuple[Any, ...]]:
    """The harness's own samples: (wall, rss, fds, threads), in time order."""
    return store.db.execute("SELECT wall, rss, fds, threads FROM harness_samples ORDER BY wall").fetchall()


def harness_footprint_rows(store: RunStore) -> list[dict[str, Any]]:
    """The same as dicts (wall, rss, threads, fds); none from a store older than the table."""
    if not has_table(store, "harness_samples"):
        return []
    return _dicts(store, "SELECT wall, rss, threads, fds FROM harness_samples ORDER BY wall")


# --- events ------------------------------------------------------------------------------------------------------

def events(store: RunStore, trial: int) -> list[dict[str, Any]]:
    return _dicts(store, "SELECT * FROM events WHERE trial=? ORDER BY id", (trial,))


def counted_events(store: RunStore, trial: int, kind: str) -> int:
    """Events of a kind stored as counts, not rows (a simulated crash loop's restarts)."""
    try:
        return int(store.query("SELECT coalesce(sum(count), 0) AS n FROM event_counts WHERE trial=? AND kind=?",
                               (trial, kind))[0]["n"])
    except sqlite3.OperationalError:
        return 0                            # an old store on read-only media


def lifecycle_events(store: RunStore) -> list[sqlite3.Row]:
    """Every start, exit and stop of every trial, with the uptime an exit carries."""
    return store.query("SELECT trial, t, kind, host, pid, json_extract(detail, '$.uptime') AS uptime "
                       "FROM events WHERE kind IN ('start', 'exit', 'stop') ORDER BY trial, t")


def proof_events(store: RunStore) -> list[sqlite3.Row]:
    return store.query("SELECT trial, detail FROM events WHERE kind='proof'")


def start_events(store: RunStore) -> list[sqlite3.Row]:
    return store.query("SELECT trial, host, detail FROM events WHERE kind='start'")


def host_names(store: RunStore, trial: int) -> dict[int, str]:
    """Host index -> name, for hosts whose start event names them (a mixed fleet's)."""
    return {r["host"]: r["name"] for r in store.query(
        "SELECT host, json_extract(detail, '$.name') AS name FROM events WHERE trial=? AND kind='start' "
        "AND json_extract(detail, '$.name') IS NOT NULL GROUP BY host", (trial,))}


def lane_events(store: RunStore, trial: int, max_lanes: int) -> list[dict[str, Any]]:
    return _dicts(store, "SELECT t, kind, host FROM events WHERE trial=? AND host IS NOT NULL AND host < ? "
                         "AND kind IN ('start', 'ready', 'pause', 'resume', 'exit', 'stop', 'no-restart')",
                  (trial, max_lanes))


def fault_timeline_events(store: RunStore, trial: int) -> list[dict[str, Any]]:
    return _dicts(store, "SELECT t, kind, host, detail FROM events WHERE trial=? AND kind IN ('fault-arm', "
                         "'fault-disarm', 'fault-armed', 'fault-disarmed', 'host-loss', 'gap', 'machine-loss', "
                         "'machine-lost') ORDER BY id", (trial,))


def start_resume_events(store: RunStore, trial: int) -> list[dict[str, Any]]:
    """Starts and resumes of a trial, without their detail (a crash-looping fleet has many)."""
    return _dicts(store, "SELECT t, kind, host, '{}' AS detail FROM events WHERE trial=? AND kind IN "
                         "('start', 'resume') ORDER BY id", (trial,))


# --- crashes -------------------------------------------------------------------------------------------------------

def bucket_crashes(store: RunStore, bucket: str) -> list[dict[str, Any]]:
    """Crashes of the buckets whose id starts with `bucket`, with their triage, in time order."""
    return [dict(r) for r in store.query(
        "SELECT c.*, x.bucket, x.data FROM crashes c LEFT JOIN triage x ON x.uid = c.uid "
        "WHERE x.bucket LIKE ? ORDER BY c.t", (bucket + "%",))]


def bucket_crashes_by_variant(store: RunStore, bucket: str) -> list[dict[str, Any]]:
    """The same, each with its trial's variant."""
    return [dict(r) for r in store.query(
        "SELECT c.*, t.variant, x.bucket, x.data FROM crashes c JOIN trials t ON t.id = c.trial "
        "LEFT JOIN triage x ON x.uid = c.uid WHERE x.bucket LIKE ? ORDER BY c.t", (bucket + "%",))]


def triaged_crashes(store: RunStore) -> list[sqlite3.Row]:
    """Every triaged crash with a bucket (bucket, uid, host, pid, t, trial, whether its core was kept), by
    trial and time; not its triage JSON (a simulated night has ~100k crashes)."""
    return store.query("SELECT x.bucket, x.uid, c.host, c.pid, c.t, c.trial, "
                       "coalesce(json_extract(x.data, '$.core_kept'), 1) AS kept FROM crashes c "
                       "JOIN triage x ON x.uid = c.uid WHERE x.bucket IS NOT NULL ORDER BY c.trial, c.t")


def triage_data(store: RunStore, uid: str) -> str | None:
    return store.query("SELECT data FROM triage WHERE uid=?", (uid,))[0]["data"]
