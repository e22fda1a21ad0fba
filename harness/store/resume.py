"""Where a stopped run stands, so `harness resume RUN` can finish it.

A run stopped by SIGKILL, a reboot, a full disk or Ctrl-C keeps everything committed before the
stop (the store commits every second). Resuming continues each unfinished trial at the second after
its last committed sample, on the same seeded arrival stream (so the load after the gap is the load
that would have come), with new hosts; the gap is recorded as an event. Completed trials are kept.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

from harness.collect.retention import KeptCore
from harness.base.errors import HarnessError
from harness.store.runstore import RunStore, open_run

FINISHED = ("complete", "failed")      # trial states resume leaves alone


@dataclass(frozen=True)
class Invocation:
    """How the run was started, saved in the store so resume can rebuild the same scenario."""

    command: str                        # run | soak
    scenario_base: str                  # absolute folder of the scenario file (relative paths resolve there)
    scenario_file: str
    duration: float | None = None       # --duration override
    seed: int | None = None             # --seed override
    variant: str | None = None
    trials: int | None = None
    baseline: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return self.__dict__.copy()

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "Invocation":
        known = {k: data[k] for k in cls.__dataclass_fields__ if k in data}
        return cls(**known)


@dataclass(frozen=True)
class ResumePoint:
    run_id: str
    run_dir: Path
    invocation: Invocation
    scenario_text: str
    trials: dict[int, tuple[str, int]]  # trial number -> (status, second to resume at)
    stopped_wall: float                 # wall time of the last committed write
    bucket_counts: dict[str, int]       # crashes per bucket so far (core retention continues from here)
    kept_cores: list[KeptCore]          # cores kept so far, oldest first
    untriaged: list[dict[str, Any]]     # crashes with a core whose triage never finished

    def goes_on_from(self, total_trials: int) -> int:
        """The earliest second any unfinished trial of the run goes on from (0: one had not begun): what is on
        the timeline before it is past for every trial still to run."""
        starts = [self.trials[n][1] if n in self.trials else 0 for n in range(1, total_trials + 1)
                  if n not in self.trials or self.trials[n][0] not in FINISHED]
        return min(starts, default=0)


def resume_point(run_dir: Path) -> ResumePoint:
    """Read what a stopped run left; refuses a finished run or one whose harness is still alive."""
    try:
        store = open_run(run_dir)
    except FileNotFoundError:
        raise HarnessError(f"{run_dir} is not a run folder (no run.db)") from None
    try:
        return _read(store, run_dir)
    finally:
        store.close()


def _read(store: RunStore, run_dir: Path) -> ResumePoint:
    runs = store.query("SELECT * FROM runs")
    if not runs:
        raise HarnessError(f"{run_dir} stopped before its run began; start it again with harness run")
    run = runs[0]
    if run["status"] == "complete":
        raise HarnessError(f"{run_dir} is complete; nothing to resume")
    if run["status"] == "running" and _harness_alive(run["harness_pid"]):
        raise HarnessError(f"{run_dir} is still running (harness pid {run['harness_pid']})")
    invocation = store.meta("invocation")
    if invocation is None:
        raise HarnessError(f"{run_dir} was written by a harness that did not record how it was started; "
                           "it can be reported but not resumed")
    trials = {}
    for row in store.query("SELECT t.id, t.status, (SELECT MAX(s.t + s.span) FROM samples s WHERE s.trial = t.id) "
                           "AS next FROM trials t"):
        trials[row["id"]] = (row["status"], int(row["next"] or 0))
    last = store.query("SELECT MAX(w) AS w FROM (SELECT MAX(wall) AS w FROM events UNION ALL "
                       "SELECT MAX(wall) FROM crashes UNION ALL SELECT MAX(wall) FROM harness_samples)")
    stopped = last[0]["w"] or run["started"]
    buckets: dict[str, int] = {}
    kept: list[KeptCore] = []
    for row in store.query("SELECT x.uid, x.bucket, x.data FROM triage x LEFT JOIN crashes c ON c.uid = x.uid "
                           "ORDER BY c.wall"):
        key = row["bucket"] or "untriaged"
        buckets[key] = buckets.get(key, 0) + 1
        data = json.loads(row["data"])
        if data.get("core_kept") and data.get("core_file"):
            try:
                kept.append(KeptCore(row["uid"], Path(data["core_file"]), os.stat(data["core_file"]).st_size, key))
            except OSError:
                pass
    untriaged = [{"uid": r["uid"], "core_path": r["core_path"], "executable": r["executable"],
                  # over --cluster: the machine that wrote (and kept) the core
                  "machine": json.loads(r["detail"] or "{}").get("machine")} for r in store.query(
        "SELECT c.uid, c.core_path, c.executable, c.detail FROM crashes c LEFT JOIN triage x ON x.uid = c.uid "
        "WHERE x.uid IS NULL AND c.core_path IS NOT NULL AND c.uid IS NOT NULL")]
    return ResumePoint(run_id=run["id"], run_dir=run_dir, invocation=Invocation.from_json(invocation),
                       scenario_text=_read_no_follow(run_dir / "scenario.yaml"), trials=trials,
                       stopped_wall=stopped, bucket_counts=buckets, kept_cores=kept, untriaged=untriaged)


def _read_no_follow(path: Path) -> str:
    """What resume will run: never through a symlink planted in the run folder."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as exc:
        raise HarnessError(f"cannot read {path}: {exc.strerror or exc}") from None
    with os.fdopen(fd, "r", encoding="utf-8") as handle:
        return handle.read()


def _harness_alive(pid: int | None) -> bool:
    """Is the recorded harness process still the one running this run (not a reused pid)?"""
    if not pid or pid == os.getpid():
        return False
    try:
        process = psutil.Process(pid)
        return process.status() != psutil.STATUS_ZOMBIE and any("harness" in part for part in process.cmdline())
    except (psutil.Error, OSError):
        return False


def gap_detail(stopped_wall: float, resumed_at: int) -> dict[str, Any]:
    now = time.time()
    return {"resumed_at": resumed_at, "stopped_wall": stopped_wall, "resumed_wall": now,
            "down_seconds": round(max(0.0, now - stopped_wall), 3)}
