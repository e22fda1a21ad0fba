"""The run store: results/<run-id>/run.db (SQLite in WAL mode), written as the run goes.

Each write batch is one transaction, committed at once (at least every second), so a harness
killed with SIGKILL leaves everything up to its last second readable. The runner calls the
writing methods from a worker thread (trio.to_thread), one at a time; readers open their own
connection.
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from harness.base import hist
from harness.base.outcomes import COUNTS, HostSample, RequestSample, Sample, counted  # noqa: F401 (the records the store writes)

SCHEMA_VERSION = 2
StoreError = sqlite3.Error      # what a failed write raises (a full disk, most likely)

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS runs (
    id TEXT PRIMARY KEY, scenario TEXT NOT NULL, scenario_file TEXT NOT NULL, seed INTEGER NOT NULL,
    duration REAL NOT NULL, hosts INTEGER NOT NULL, argv TEXT NOT NULL, started REAL NOT NULL,
    ended REAL, status TEXT NOT NULL, exit_code INTEGER, harness_pid INTEGER);
CREATE TABLE IF NOT EXISTS phases (
    idx INTEGER PRIMARY KEY, name TEXT NOT NULL, kind TEXT NOT NULL, start REAL NOT NULL, end REAL NOT NULL,
    rate_from REAL NOT NULL, rate_to REAL NOT NULL);
CREATE TABLE IF NOT EXISTS trials (
    id INTEGER PRIMARY KEY, variant TEXT NOT NULL, repeat INTEGER NOT NULL, seed INTEGER NOT NULL,
    started REAL, load_started REAL, ended REAL, status TEXT NOT NULL, detail TEXT NOT NULL DEFAULT '{}');
CREATE TABLE IF NOT EXISTS events (
    id INTEGER PRIMARY KEY, trial INTEGER NOT NULL, t REAL NOT NULL, wall REAL NOT NULL, kind TEXT NOT NULL,
    host INTEGER, pid INTEGER, detail TEXT NOT NULL DEFAULT '{}');
CREATE TABLE IF NOT EXISTS samples (
    trial INTEGER NOT NULL, t INTEGER NOT NULL, offered INTEGER NOT NULL, sent INTEGER NOT NULL,
    ok INTEGER NOT NULL, timeout INTEGER NOT NULL, conn_error INTEGER NOT NULL, no_host INTEGER NOT NULL,
    bad_reply INTEGER NOT NULL, p50 REAL, p90 REAL, p99 REAL, p999 REAL, max REAL, hosts_alive INTEGER NOT NULL,
    offered_rate REAL NOT NULL, hist BLOB, span INTEGER NOT NULL DEFAULT 1, PRIMARY KEY (trial, t));
CREATE TABLE IF NOT EXISTS host_samples (
    trial INTEGER NOT NULL, t INTEGER NOT NULL, host INTEGER NOT NULL, state TEXT NOT NULL, pid INTEGER,
    sent INTEGER NOT NULL, ok INTEGER NOT NULL, errors INTEGER NOT NULL, inflight INTEGER NOT NULL,
    rss INTEGER, fds INTEGER, shim TEXT, threads INTEGER, span INTEGER NOT NULL DEFAULT 1, cgroup TEXT,
    PRIMARY KEY (trial, t, host));
CREATE TABLE IF NOT EXISTS harness_samples (
    wall REAL PRIMARY KEY, trial INTEGER, rss INTEGER NOT NULL, fds INTEGER NOT NULL, threads INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS crashes (
    id INTEGER PRIMARY KEY, trial INTEGER NOT NULL, t REAL NOT NULL, wall REAL NOT NULL, host INTEGER NOT NULL,
    pid INTEGER NOT NULL, signal INTEGER NOT NULL, signal_name TEXT NOT NULL, core_dumped INTEGER NOT NULL,
    uptime REAL NOT NULL, offered_rate REAL NOT NULL, host_inflight INTEGER NOT NULL, hosts_alive INTEGER NOT NULL,
    core_path TEXT, executable TEXT, stderr_tail TEXT NOT NULL DEFAULT '', detail TEXT NOT NULL DEFAULT '{}',
    uid TEXT);
CREATE TABLE IF NOT EXISTS request_samples (
    trial INTEGER NOT NULL, t INTEGER NOT NULL, name TEXT NOT NULL, offered INTEGER NOT NULL, sent INTEGER NOT NULL,
    ok INTEGER NOT NULL, timeout INTEGER NOT NULL, conn_error INTEGER NOT NULL, no_host INTEGER NOT NULL,
    bad_reply INTEGER NOT NULL, hist BLOB, span INTEGER NOT NULL DEFAULT 1, PRIMARY KEY (trial, t, name));
CREATE TABLE IF NOT EXISTS reply_counts (
    trial INTEGER NOT NULL, t INTEGER NOT NULL, family TEXT NOT NULL, name TEXT NOT NULL, count INTEGER NOT NULL,
    span INTEGER NOT NULL DEFAULT 1, PRIMARY KEY (trial, t, family, name));
CREATE TABLE IF NOT EXISTS triage (
    uid TEXT PRIMARY KEY, crash_class TEXT, signature TEXT, bucket TEXT, in_allocator INTEGER, fault_address TEXT,
    data TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS crash_counts (
    trial INTEGER NOT NULL, t REAL NOT NULL, span REAL NOT NULL, bucket TEXT NOT NULL, grp TEXT NOT NULL DEFAULT '',
    signal_name TEXT NOT NULL, count INTEGER NOT NULL, cores_kept INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (trial, t, bucket, grp, signal_name));
CREATE TABLE IF NOT EXISTS crash_hosts (
    trial INTEGER NOT NULL, host INTEGER NOT NULL, bucket TEXT NOT NULL, count INTEGER NOT NULL,
    first_t REAL NOT NULL, last_t REAL NOT NULL, PRIMARY KEY (trial, host, bucket));
CREATE TABLE IF NOT EXISTS event_counts (
    trial INTEGER NOT NULL, t INTEGER NOT NULL, kind TEXT NOT NULL, count INTEGER NOT NULL,
    PRIMARY KEY (trial, t, kind));
"""


SAMPLE_COLUMNS = f"trial, t, {', '.join(COUNTS)}, p50, p90, p99, p999, max, hosts_alive, offered_rate, hist"
HOST_SAMPLE_COLUMNS = "trial, t, host, state, pid, sent, ok, errors, inflight, rss, fds, shim, threads, cgroup"
REQUEST_SAMPLE_COLUMNS = f"trial, t, name, {', '.join(COUNTS)}, hist"
# Tables added after schema 2: created on open when missing (older stores simply have no rows in them).
# crash_counts, crash_hosts, event_counts: a crash storm stored compactly (a simulated cascade has hundreds
# of thousands of crashes): exact counts per slot x bucket x host group and per host x bucket, while
# `crashes` holds a sample of rows. A slot is a second [t, t + span), cut at phase boundaries so that every
# phase's count is exact. A trial with crash_counts rows has all its crashes counted there; one without has
# every crash as a row. event_counts: events counted instead of stored (a crash loop's exits and restarts).
ADDED_TABLES = ("request_samples", "reply_counts", "crash_counts", "crash_hosts", "event_counts")
# Columns added the same way: (table, column, type).
ADDED_COLUMNS = (("host_samples", "cgroup", "TEXT"),)


class RunStore:
    """One run's database. Not thread-safe: the runner serializes calls."""

    def __init__(self, path: Path, *, create: bool = False):
        if not create and not path.exists():
            raise FileNotFoundError(path)
        self.path = path
        # isolation_level=None: explicit BEGIN/COMMIT per batch; check_same_thread=False because
        # trio.to_thread may use a different worker thread for each (serialized) call.
        self.db = sqlite3.connect(str(path), isolation_level=None, check_same_thread=False, timeout=30)
        self.db.row_factory = sqlite3.Row
        if create:
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.execute("PRAGMA synchronous=NORMAL")
            self.db.executescript(SCHEMA)
            self.db.execute("INSERT OR REPLACE INTO meta VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),))
        else:
            self._upgrade()

    def _upgrade(self) -> None:
        """Stores written by schema 1 get the columns and tables added since (all optional)."""
        try:
            columns = {r["name"] for r in self.db.execute("PRAGMA table_info(host_samples)")}
            if columns and "span" not in columns:
                with self._tx():
                    self.db.execute("ALTER TABLE samples ADD COLUMN span INTEGER NOT NULL DEFAULT 1")
                    self.db.execute("ALTER TABLE host_samples ADD COLUMN threads INTEGER")
                    self.db.execute("ALTER TABLE host_samples ADD COLUMN span INTEGER NOT NULL DEFAULT 1")
                    self.db.execute("CREATE TABLE IF NOT EXISTS harness_samples (wall REAL PRIMARY KEY, trial INTEGER, "
                                    "rss INTEGER NOT NULL, fds INTEGER NOT NULL, threads INTEGER NOT NULL)")
            tables = {r["name"] for r in self.db.execute("SELECT name FROM sqlite_master WHERE type='table'")}
            if tables and not set(ADDED_TABLES) <= tables:
                with self._tx():
                    for statement in SCHEMA.split(";"):
                        if any(f"EXISTS {name} (" in statement for name in ADDED_TABLES):
                            self.db.execute(statement)
            for table, column, kind in ADDED_COLUMNS:
                have = {r["name"] for r in self.db.execute(f"PRAGMA table_info({table})")}
                if have and column not in have:
                    with self._tx():
                        self.db.execute(f"ALTER TABLE {table} ADD COLUMN {column} {kind}")
        except sqlite3.OperationalError:
            pass  # read-only media: readers cope with the old shape

    def close(self) -> None:
        self.db.close()

    # --- writing --------------------------------------------------------------------------

    def begin_run(self, *, run_id: str, scenario: str, scenario_file: str, seed: int, duration: float, hosts: int,
                  argv: list[str], phases: Iterable[tuple[str, str, float, float, float, float]], pid: int) -> None:
        with self._tx():
            self.db.execute("INSERT INTO runs (id, scenario, scenario_file, seed, duration, hosts, argv, started, "
                            "status, harness_pid) VALUES (?,?,?,?,?,?,?,?,?,?)",
                            (run_id, scenario, scenario_file, seed, duration, hosts, json.dumps(argv), time.time(),
                             "running", pid))
            self.db.executemany("INSERT INTO phases (idx, name, kind, start, end, rate_from, rate_to) "
                                "VALUES (?,?,?,?,?,?,?)", [(i, *p) for i, p in enumerate(phases)])

    def begin_trial(self, trial: int, variant: str, repeat: int, seed: int) -> None:
        with self._tx():
            self.db.execute("INSERT INTO trials (id, variant, repeat, seed, started, status) VALUES (?,?,?,?,?,?)",
                            (trial, variant, repeat, seed, time.time(), "running"))

    def trial_load_started(self, trial: int, wall: float) -> None:
        with self._tx():
            self.db.execute("UPDATE trials SET load_started=? WHERE id=?", (wall, trial))

    def end_trial(self, trial: int, status: str, detail: dict[str, Any] | None = None) -> None:
        with self._tx():
            self.db.execute("UPDATE trials SET ended=?, status=?, detail=? WHERE id=?",
                            (time.time(), status, json.dumps(detail or {}), trial))

    def set_meta(self, key: str, value: Any) -> None:
        with self._tx():
            self.db.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", (key, json.dumps(value)))

    def meta(self, key: str, default: Any = None) -> Any:
        row = self.db.execute("SELECT value FROM meta WHERE key=?", (key,)).fetchone()
        return json.loads(row["value"]) if row else default

    def resume_run(self, pid: int) -> None:
        """A stopped run is running again (harness resume)."""
        with self._tx():
            self.db.execute("UPDATE runs SET status='running', ended=NULL, exit_code=NULL, harness_pid=?", (pid,))

    def resume_trial(self, trial: int) -> None:
        with self._tx():
            self.db.execute("UPDATE trials SET status='running', ended=NULL WHERE id=?", (trial,))

    def set_exit_code(self, exit_code: int) -> None:
        """The command's final verdict (expectations and regressions judged), which `latest-good` reads."""
        with self._tx():
            self.db.execute("UPDATE runs SET exit_code=?", (exit_code,))

    def mark_core_dropped(self, uid: str, reason: str) -> None:
        """A kept core was deleted later (to make room for a new bucket's): its triage says so."""
        with self._tx():
            row = self.db.execute("SELECT data FROM triage WHERE uid=?", (uid,)).fetchone()
            if row is not None:
                data = json.loads(row["data"])
                data.update(core_kept=False, core_dropped=reason)
                self.db.execute("UPDATE triage SET data=? WHERE uid=?", (json.dumps(data), uid))

    def end_run(self, status: str, exit_code: int) -> None:
        with self._tx():
            self.db.execute("UPDATE runs SET ended=?, status=?, exit_code=?", (time.time(), status, exit_code))

    def write_batch(self, trial: int, *, events: list[dict[str, Any]] = (), samples: list[Sample] = (),  # type: ignore[assignment]
                    host_samples: list[HostSample] = (), crashes: list[dict[str, Any]] = (),  # type: ignore[assignment]
                    request_samples: list[RequestSample] = (),  # type: ignore[assignment]
                    reply_counts: list[tuple[int, str, str, int]] = (),  # type: ignore[assignment]
                    crash_counts: Iterable[tuple[float, float, str, str, str, int, int]] = (),
                    crash_hosts: Iterable[tuple[int, str, int, float, float]] = (),
                    event_counts: Iterable[tuple[int, str, int]] = ()) -> None:
        """Everything the runner gathered since the last batch, in one transaction. Crash and event counts
        add to what earlier batches stored: crash_counts (t, span, bucket, group, signal name, count,
        cores kept), crash_hosts (host, bucket, count, first t, last t), event_counts (second, kind, count)."""
        with self._tx():
            self.db.executemany(
                "INSERT INTO crash_counts (trial, t, span, bucket, grp, signal_name, count, cores_kept) "
                "VALUES (?,?,?,?,?,?,?,?) ON CONFLICT (trial, t, bucket, grp, signal_name) DO UPDATE SET "
                "count = count + excluded.count, cores_kept = cores_kept + excluded.cores_kept",
                [(trial, *row) for row in crash_counts])
            self.db.executemany(
                "INSERT INTO crash_hosts (trial, host, bucket, count, first_t, last_t) VALUES (?,?,?,?,?,?) "
                "ON CONFLICT (trial, host, bucket) DO UPDATE SET count = count + excluded.count, "
                "first_t = min(first_t, excluded.first_t), last_t = max(last_t, excluded.last_t)",
                [(trial, *row) for row in crash_hosts])
            self.db.executemany(
                "INSERT INTO event_counts (trial, t, kind, count) VALUES (?,?,?,?) "
                "ON CONFLICT (trial, t, kind) DO UPDATE SET count = count + excluded.count",
                [(trial, *row) for row in event_counts])
            self.db.executemany(
                "INSERT INTO events (trial, t, wall, kind, host, pid, detail) VALUES (?,?,?,?,?,?,?)",
                [(trial, e["t"], e["wall"], e["kind"], e.get("host"), e.get("pid"), json.dumps(e.get("detail", {})))
                 for e in events])
            self.db.executemany(
                f"INSERT OR REPLACE INTO samples ({SAMPLE_COLUMNS}) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
                [(trial, s.t, *counted(s), s.p50, s.p90, s.p99, s.p999, s.max, s.hosts_alive, s.offered_rate, s.hist)
                 for s in samples])
            self.db.executemany(
                f"INSERT OR REPLACE INTO host_samples ({HOST_SAMPLE_COLUMNS}) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
                [(trial, h.t, h.host, h.state, h.pid, h.sent, h.ok, h.errors, h.inflight, h.rss, h.fds,
                  json.dumps(h.shim) if h.shim is not None else None, h.threads,
                  json.dumps(h.cgroup) if h.cgroup is not None else None) for h in host_samples])
            self.db.executemany(
                "INSERT INTO crashes (trial, t, wall, host, pid, signal, signal_name, core_dumped, uptime, "
                "offered_rate, host_inflight, hosts_alive, core_path, executable, stderr_tail, detail, uid) "
                "VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
                [(trial, c["t"], c["wall"], c["host"], c["pid"], c["signal"], c["signal_name"], int(c["core_dumped"]),
                  c["uptime"], c["offered_rate"], c["host_inflight"], c["hosts_alive"], c.get("core_path"),
                  c.get("executable"), c.get("stderr_tail", ""), json.dumps(c.get("detail", {})), c.get("uid"))
                 for c in crashes])
            self.db.executemany(
                f"INSERT OR REPLACE INTO request_samples ({REQUEST_SAMPLE_COLUMNS}) VALUES (?,?,?,?,?,?,?,?,?,?,?)",
                [(trial, r.t, r.name, *counted(r), r.hist) for r in request_samples])
            self.db.executemany(
                "INSERT OR REPLACE INTO reply_counts (trial, t, family, name, count) VALUES (?,?,?,?,?)",
                [(trial, t, family, name, count) for t, family, name, count in reply_counts])

    def record_triage(self, uid: str, triage: dict[str, Any]) -> None:
        """A core's triage, keyed by its crash's uid (either may be written first)."""
        with self._tx():
            self.db.execute(
                "INSERT OR REPLACE INTO triage (uid, crash_class, signature, bucket, in_allocator, fault_address, data) "
                "VALUES (?,?,?,?,?,?,?)",
                (uid, triage.get("crash_class"), triage.get("signature"), triage.get("bucket"),
                 int(bool(triage.get("in_allocator"))), triage.get("fault_address"), json.dumps(triage)))

    def record_triage_rows(self, rows: Iterable[tuple[Any, ...]]) -> None:
        """Triage rows already in the table's form (uid, crash_class, signature, bucket, in_allocator,
        fault_address, data JSON), in one transaction: the simulator's, one per simulated crash kind."""
        with self._tx():
            self.db.executemany(
                "INSERT OR REPLACE INTO triage (uid, crash_class, signature, bucket, in_allocator, "
                "fault_address, data) VALUES (?,?,?,?,?,?,?)", rows)

    def harness_sample(self, trial: int | None, rss: int, fds: int, threads: int) -> None:
        """The harness's own footprint, so a soak shows that the harness itself does not leak."""
        with self._tx():
            self.db.execute("INSERT OR REPLACE INTO harness_samples VALUES (?,?,?,?,?)",
                            (time.time(), trial, rss, fds, threads))

    def rollup(self, trial: int, before: int, every: int) -> int:
        """Per-second rows of `trial` older than second `before` become one row per `every` seconds (per
        host and process for host rows), so a night-long store stays small. Counts are summed, latency
        histograms merged (percentiles stay exact), hosts alive is the fewest in the window, memory and
        fds are the window's last values; `span` says how many seconds a row covers. Returns the rows
        removed."""
        end = before - before % every
        rows = self.db.execute("SELECT * FROM samples WHERE trial=? AND t<? AND span=1 ORDER BY t",
                               (trial, end)).fetchall()
        host_rows = self.db.execute("SELECT * FROM host_samples WHERE trial=? AND t<? AND span=1 ORDER BY t, host",
                                    (trial, end)).fetchall()
        request_rows = self.db.execute("SELECT * FROM request_samples WHERE trial=? AND t<? AND span=1 ORDER BY t",
                                       (trial, end)).fetchall()
        count_rows = self.db.execute("SELECT * FROM reply_counts WHERE trial=? AND t<? AND span=1 ORDER BY t",
                                     (trial, end)).fetchall()
        if not rows and not host_rows:
            return 0
        merged = [_merge_samples(group) for group in _windows(rows, every, lambda r: ())]
        merged_hosts = [_merge_host_samples(group) for group in _windows(host_rows, every,
                                                                         lambda r: (r["host"], r["pid"]))]
        merged_requests = [_merge_request_samples(group) for group in _windows(request_rows, every,
                                                                               lambda r: (r["name"],))]
        merged_counts = [(g[0]["t"], g[0]["family"], g[0]["name"], sum(r["count"] for r in g), len(g))
                         for g in _windows(count_rows, every, lambda r: (r["family"], r["name"]))]
        with self._tx():
            self.db.execute("DELETE FROM samples WHERE trial=? AND t<? AND span=1", (trial, end))
            self.db.execute("DELETE FROM host_samples WHERE trial=? AND t<? AND span=1", (trial, end))
            self.db.execute("DELETE FROM request_samples WHERE trial=? AND t<? AND span=1", (trial, end))
            self.db.execute("DELETE FROM reply_counts WHERE trial=? AND t<? AND span=1", (trial, end))
            self.db.executemany(f"INSERT OR REPLACE INTO request_samples ({REQUEST_SAMPLE_COLUMNS}, span) "
                                "VALUES (?,?,?,?,?,?,?,?,?,?,?,?)", [(trial, *m) for m in merged_requests])
            self.db.executemany("INSERT OR REPLACE INTO reply_counts (trial, t, family, name, count, span) "
                                "VALUES (?,?,?,?,?,?)", [(trial, *m) for m in merged_counts])
            self.db.executemany(f"INSERT OR REPLACE INTO samples ({SAMPLE_COLUMNS}, span) "
                                "VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)", [(trial, *m) for m in merged])
            self.db.executemany(f"INSERT OR REPLACE INTO host_samples ({HOST_SAMPLE_COLUMNS}, span) "
                                "VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)", [(trial, *m) for m in merged_hosts])
        return len(rows) + len(host_rows) - len(merged) - len(merged_hosts)

    def _tx(self) -> "_Transaction":
        return _Transaction(self.db)

    # --- reading --------------------------------------------------------------------------

    def query(self, sql: str, args: tuple[Any, ...] = ()) -> list[sqlite3.Row]:
        return self.db.execute(sql, args).fetchall()


def _windows(rows: list[sqlite3.Row], every: int, key: Any) -> list[list[sqlite3.Row]]:
    groups: dict[tuple[Any, ...], list[sqlite3.Row]] = {}
    for row in rows:
        groups.setdefault((row["t"] // every, *key(row)), []).append(row)
    return list(groups.values())


def _merge_samples(group: list[sqlite3.Row]) -> tuple[Any, ...]:
    histogram = _merged_histogram(group)
    has = histogram.get_total_count() > 0
    pct = (lambda q: histogram.get_value_at_percentile(q) / 1e6) if has else (lambda q: None)
    totals = [sum(r[k] for r in group) for k in COUNTS]
    merged = (group[0]["t"], *totals, pct(50), pct(90), pct(99), pct(99.9),
              histogram.get_max_value() / 1e6 if has else None, min(r["hosts_alive"] for r in group),
              sum(r["offered_rate"] for r in group) / len(group), histogram.encode() if has else None, len(group))
    hist.release_histogram(histogram)
    return merged


def _merged_histogram(rows: list[sqlite3.Row]) -> Any:
    from hdrh.histogram import HdrHistogram   # imported late to keep the store light
    histogram = hist.new_histogram()
    for row in rows:
        if row["hist"]:
            # Not decode_and_add: the decoded histogram must be freed before the next row's is made.
            other = HdrHistogram.decode(row["hist"])
            histogram.add(other)
            hist.release_histogram(other)
    return histogram


def _merge_request_samples(group: list[sqlite3.Row]) -> tuple[Any, ...]:
    histogram = _merged_histogram(group)
    totals = [sum(r[k] for r in group) for k in COUNTS]
    merged = (group[0]["t"], group[0]["name"], *totals, histogram.encode() if histogram.get_total_count() else None,
              len(group))
    hist.release_histogram(histogram)
    return merged


def _merge_host_samples(group: list[sqlite3.Row]) -> tuple[Any, ...]:
    last = group[-1]
    return (group[0]["t"], last["host"], last["state"], last["pid"], sum(r["sent"] for r in group),
            sum(r["ok"] for r in group), sum(r["errors"] for r in group), max(r["inflight"] for r in group),
            last["rss"], last["fds"], last["shim"], last["threads"], _last_cgroup(group), len(group))


def _last_cgroup(group: list[sqlite3.Row]) -> str | None:
    """The window's last cgroup counters, with the highest memory seen in it (a spike stays visible)."""
    rows = [r for r in group if "cgroup" in r.keys() and r["cgroup"]]
    if not rows:
        return None
    last = json.loads(rows[-1]["cgroup"])
    peaks = [json.loads(r["cgroup"]).get("memory") for r in rows]
    last["memory_max_in_window"] = max((p for p in peaks if p is not None), default=None)
    return json.dumps(last)


class _Transaction:
    def __init__(self, db: sqlite3.Connection):
        self.db = db

    def __enter__(self) -> None:
        self.db.execute("BEGIN")

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        self.db.execute("COMMIT" if exc_type is None else "ROLLBACK")


def open_run(path: Path) -> RunStore:
    """A run directory (or its run.db) for reading; a WAL left by a killed writer is recovered on open."""
    return RunStore(path / "run.db" if path.is_dir() else path)
