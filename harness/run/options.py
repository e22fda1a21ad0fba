"""What a run is asked to do and what it returns, for the real runner and the simulator alike."""

from __future__ import annotations

import datetime as dt
import secrets
from dataclasses import dataclass, field
from pathlib import Path

from harness.plan.trialorder import trial_order
from harness.scenario.model import Scenario
from harness.store.resume import Invocation, ResumePoint
from harness.base.safefs import RunLock


def new_run_id(name: str) -> str:
    return f"{dt.datetime.now().strftime('%Y%m%d-%H%M%S')}-{name}-{secrets.token_hex(2)}"


@dataclass
class RunOptions:
    out_dir: Path = Path("results")
    variant: str | None = None
    trials: int | None = None
    status: bool = True
    argv: list[str] = field(default_factory=list)
    metrics: tuple[str, int] | None = None      # serve /metrics here during the run
    invocation: Invocation | None = None         # how the run was started (saved for harness resume)
    resume: ResumePoint | None = None            # continue this stopped run instead of starting one
    rollup_after: float = 3600.0                 # per-second samples older than this become ...
    rollup_every: int = 60                       # ... one row per this many seconds
    self_sample_every: float = 10.0              # the harness's own RSS/fds/threads, for soaks
    lock: RunLock | None = None                  # resume: the run folder's lock, taken before reading it

    def resumed_from(self, scenario: Scenario) -> int:
        """The earliest second a resumed run's unfinished trials go on from (0: not resuming, or a trial that
        had not begun): what is on the timeline before it is past."""
        if self.resume is None:
            return 0
        return self.resume.goes_on_from(len(trial_order(scenario, self.variant, self.trials or scenario.trials)))


@dataclass
class RunResult:
    run_id: str
    run_dir: Path
    status: str                # complete | interrupted
    signal: int | None = None
    failed_trials: list[str] = field(default_factory=list)
    lock: RunLock | None = None    # held until the caller has recorded the verdict
    forced: bool = False           # a second SIGINT/SIGTERM: hosts killed, exit at once
