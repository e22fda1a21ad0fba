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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SCHEMA_VERSION = 1

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
    offered_rate REAL NOT NULL, hist BLOB, PRIMARY KEY (trial, t));
CREATE TABLE IF NOT EXISTS host_samples (
    trial INTEGER NOT NULL, t INTEGER NOT NULL, host INTEGER NOT NULL, state TEXT NOT NULL, pid INTEGER,
    sent INTEGER NOT NULL, ok INTEGER NOT NULL, errors INTEGER NOT NULL, inflight INTEGER NOT NULL,
    rss INTEGER, fds INTEGER, shim TEXT, PRIMARY KEY (trial, t, host));
CREATE TABLE IF NOT EXISTS crashes (
    id INTEGER PRIMARY KEY, trial INTEGER NOT NULL, t REAL NOT NULL, wall REAL NOT NULL, host INTEGER NOT NULL,
    pid INTEGER NOT NULL, signal INTEGER NOT NULL, signal_name TEXT NOT NULL, core_dumped INTEGER NOT NULL,
    uptime REAL NOT NULL, offered_rate REAL NOT NULL, host_inflight INTEGER NOT NULL, hosts_alive INTEGER NOT NULL,
    core_path TEXT, executable TEXT, stderr_tail TEXT NOT NULL DEFAULT '', detail TEXT NOT NULL DEFAULT '{}',
    uid TEXT);
CREATE TABLE IF NOT EXISTS triage (
    uid TEXT PRIMARY KEY, crash_class TEXT, signature TEXT, bucket TEXT, in_allocator INTEGER, fault_address TEXT,
    data TEXT NOT NULL);
"""


@dataclass(frozen=True)
class Sample:
    t: int
    offered: int
    sent: int
    ok: int
    timeout: int
    conn_error: int
    no_host: int
    bad_reply: int
    p50: float | None
    p90: float | None
    p99: float | None
    p999: float | None
    max: float | None
    hosts_alive: int
    offered_rate: float
    hist: bytes | None


@dataclass(frozen=True)
class HostSample:
    t: int
    host: int
    state: str
    pid: int | None
    sent: int
    ok: int
    errors: int
    inflight: int
    rss: int | None
    fds: int | None
    shim: dict[str, Any] | None = None


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

    def end_run(self, status: str, exit_code: int) -> None:
        with self._tx():
            self.db.execute("UPDATE runs SET ended=?, status=?, exit_code=?", (time.time(), status, exit_code))

    def write_batch(self, trial: int, *, events: list[dict[str, Any]] = (), samples: list[Sample] = (),  # type: ignore[assignment]
                    host_samples: list[HostSample] = (), crashes: list[dict[str, Any]] = ()) -> None:  # type: ignore[assignment]
        """Everything the runner gathered since the last batch, in one transaction."""
        with self._tx():
            self.db.executemany(
                "INSERT INTO events (trial, t, wall, kind, host, pid, detail) VALUES (?,?,?,?,?,?,?)",
                [(trial, e["t"], e["wall"], e["kind"], e.get("host"), e.get("pid"), json.dumps(e.get("detail", {})))
                 for e in events])
            self.db.executemany(
                "INSERT OR REPLACE INTO samples VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
                [(trial, s.t, s.offered, s.sent, s.ok, s.timeout, s.conn_error, s.no_host, s.bad_reply, s.p50, s.p90,
                  s.p99, s.p999, s.max, s.hosts_alive, s.offered_rate, s.hist) for s in samples])
            self.db.executemany(
                "INSERT OR REPLACE INTO host_samples VALUES (?,?,?,?,?,?,?,?,?,?,?,?)",
                [(trial, h.t, h.host, h.state, h.pid, h.sent, h.ok, h.errors, h.inflight, h.rss, h.fds,
                  json.dumps(h.shim) if h.shim is not None else None) for h in host_samples])
            self.db.executemany(
                "INSERT INTO crashes (trial, t, wall, host, pid, signal, signal_name, core_dumped, uptime, "
                "offered_rate, host_inflight, hosts_alive, core_path, executable, stderr_tail, detail, uid) "
                "VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
                [(trial, c["t"], c["wall"], c["host"], c["pid"], c["signal"], c["signal_name"], int(c["core_dumped"]),
                  c["uptime"], c["offered_rate"], c["host_inflight"], c["hosts_alive"], c.get("core_path"),
                  c.get("executable"), c.get("stderr_tail", ""), json.dumps(c.get("detail", {})), c.get("uid"))
                 for c in crashes])

    def record_triage(self, uid: str, triage: dict[str, Any]) -> None:
        """A core's triage, keyed by its crash's uid (either may be written first)."""
        with self._tx():
            self.db.execute(
                "INSERT OR REPLACE INTO triage (uid, crash_class, signature, bucket, in_allocator, fault_address, data) "
                "VALUES (?,?,?,?,?,?,?)",
                (uid, triage.get("crash_class"), triage.get("signature"), triage.get("bucket"),
                 int(bool(triage.get("in_allocator"))), triage.get("fault_address"), json.dumps(triage)))

    def _tx(self) -> "_Transaction":
        return _Transaction(self.db)

    # --- reading --------------------------------------------------------------------------

    def query(self, sql: str, args: tuple[Any, ...] = ()) -> list[sqlite3.Row]:
        return self.db.execute(sql, args).fetchall()


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
