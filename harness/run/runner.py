"""The trio runner: the one place that schedules I/O.

run_scenario() checks what can be checked before the night (builds, allocators, commands, the fault
shim's reach, the results folder), opens the run folder and its store, then runs each trial (variant x
repeat, interleaved) as a fresh fleet (harness.run.trial), with the triage of cores beside the trials.
Stopping is cancellation: at the end of the load, on SIGINT/SIGTERM, or on error, every host is stopped
and reaped, and what was gathered is written before returning.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import psutil
import trio

from harness.collect.coreinstall import installed_spool
from harness.collect.cores import core_pattern_status
from harness.collect.objects import ObjectStore
from harness.collect.retention import CoreRetention, KeptCore
from harness.collect.triage import triage_core
from harness.base.errors import HarnessError, ScenarioError
from harness.run.fleet import check_command, resolve_program
from harness.run.isolation import scenario_problem
from harness.present.prometheus import Metrics
from harness.run.procs import Spawner
from harness.run.proofcheck import allocator_problems
from harness.store.resume import FINISHED
from harness.run.options import RunOptions, RunResult, new_run_id
from harness.base.safefs import RunLock, Untrusted, check_trusted_path, create_run_dir
from harness.scenario.model import Scenario, ShimFault, Variant
from harness.shim.interpose import check_interposable
from harness.store.runstore import RunStore, StoreError
from harness.run.trial import Trial, TrialFailed, leaf
from harness.plan.trialorder import trial_order
from harness.scenario.variants import apply_variant, variant_for_group


async def build_target(argv: tuple[str, ...], root: Path) -> None:
    def run() -> subprocess.CompletedProcess[bytes]:
        return subprocess.run(list(argv), cwd=root, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=900)
    try:
        result = await trio.to_thread.run_sync(run)
    except FileNotFoundError:
        raise HarnessError(f"build command not found: {argv[0]} (in {root})") from None
    except subprocess.TimeoutExpired:
        raise HarnessError(f"build timed out after 900s: {' '.join(argv)}") from None
    if result.returncode != 0:
        lines = [line for line in result.stdout.decode(errors="replace").splitlines() if line.strip()]
        errors = [line for line in lines if "error" in line.lower()] or lines
        raise HarnessError(f"build failed ({' '.join(argv)} exited {result.returncode}): "
                           f"{errors[0].strip() if errors else 'no output'}")


class Run:
    """A whole run: pre-flight, the run folder and its store, every trial in turn (harness.run.trial), the
    triage of cores beside them, signals, and the harness's own footprint."""

    def __init__(self, scenario: Scenario, options: RunOptions):
        self.scenario = scenario
        self.options = options
        self.resume = options.resume
        self.run_id = self.resume.run_id if self.resume else new_run_id(scenario.name)
        # Absolute: hosts run in their own folders, and paths handed to them (the shim's control
        # file) must mean the same thing there.
        self.run_dir = (self.resume.run_dir if self.resume else options.out_dir / self.run_id).resolve()
        self.lock: RunLock | None = options.lock
        self.forced = False
        self.missing_records = 0          # crashes whose record the core handler never wrote
        self.store: RunStore | None = None
        self.store_lock = trio.CapacityLimiter(1)
        self.interrupted: int | None = None
        self.main_scope: trio.CancelScope | None = None
        self.trial: Trial | None = None              # the trial running (or the last one)
        self._triage_nursery: trio.Nursery | None = None
        self._triage_limiter = trio.CapacityLimiter(1)
        self._retention = CoreRetention(scenario.cores, dict(self.resume.bucket_counts) if self.resume else {},
                                        list(self.resume.kept_cores) if self.resume else [])
        self.failed_trials: list[str] = []
        self.warned_shim = False                 # warnings said once a run
        self.warned_proof: set[str] = set()
        self.objects = ObjectStore(self.run_dir / "objects")
        self.low_disk = False
        self._trial_number: int | None = None
        self.trial_walls: list[float] = []       # wall seconds of each finished trial, for the ETA

    async def store_call(self, fn: Any, *args: Any, **kwargs: Any) -> None:
        try:
            await trio.to_thread.run_sync(lambda: fn(*args, **kwargs), limiter=self.store_lock)
        except (StoreError, OSError) as exc:
            # A full disk, most likely: what was committed stays, and the run can be finished later.
            raise HarnessError(f"cannot write the results store {self.run_dir / 'run.db'}: {exc}; what was "
                               f"recorded so far is kept: `harness resume {self.run_dir}` continues the run") from None

    async def execute(self) -> RunResult:
        scenario = self.scenario
        trials = trial_order(scenario, self.options.variant, self.options.trials or scenario.trials)
        missing = scenario_problem(scenario)
        if missing:
            raise HarnessError(f"{scenario.file}: {missing}")
        builds = {scenario.target.build} | {g.target.build for g in scenario.host_groups} \
            | {v.build for v, _ in trials if v.build}
        for build in sorted((b for b in builds if b), key=str):
            await build_target(build, scenario.target.root)
        # Built now: a variant whose allocator cannot take effect is refused before the night, not found out at 3am.
        refused = await trio.to_thread.run_sync(allocator_problems, scenario, {v.name for v, _ in trials})
        if refused:
            raise ScenarioError(refused)
        for variant, _ in trials:
            for group in scenario.host_groups:
                argv = apply_variant(group.target, variant_for_group(variant, group.name), group.target.command)[0]
                check_command(argv, group.target.root)
                faults = scenario.shim_faults_for(group.name)
                if faults and variant.faults:
                    _check_interposable(scenario, argv[0], faults)

        if not self.resume:
            try:  # refused before any work, with one line; checked again as the run folder is made
                check_trusted_path(self.options.out_dir, what="results folder")
            except Untrusted as exc:
                raise HarnessError(f"{exc}: refusing to write there (another user could redirect what root "
                                   f"writes); use --out with a folder only you or root can write") from None
        cores = core_pattern_status()
        if not cores.findable and installed_spool() is None:
            print(f"harness: warning: cores will not be collected: {cores.advice}", file=sys.stderr)
        # Everything the run writes is the harness user's alone (0600 files, 0700 folders); targets
        # get the umask the harness was started with.
        umask = os.umask(0o077)
        try:
            return await self._execute(scenario, trials, umask)
        finally:
            os.umask(umask)

    async def _execute(self, scenario: Scenario, trials: list[tuple[Variant, int]], umask: int) -> RunResult:
        self._open_run_folder()
        await self._open_store()
        spawner = Spawner()
        spawner.child_umask = umask
        if spawner.orphans_killed:
            print(f"harness: warning: killed {len(spawner.orphans_killed)} leftover processes of a harness that was "
                  f"killed (pids {' '.join(map(str, spawner.orphans_killed))})", file=sys.stderr)
        aborted = False
        try:
            async with trio.open_nursery() as outer:
                outer.start_soon(self._watch_signals, outer.cancel_scope)
                outer.start_soon(self._self_sampler)
                # Triage of cores runs beside the trials and is waited for at the end.
                async with trio.open_nursery() as self._triage_nursery:
                    for crash in self.resume.untriaged if self.resume else ():
                        self._triage_left(crash)
                    with trio.CancelScope() as self.main_scope:
                        for number, (variant, repeat) in enumerate(trials, start=1):
                            before = self.resume.trials.get(number) if self.resume else None
                            if before is not None and before[0] in FINISHED:
                                continue
                            self._trial_number = number
                            self.trial = self._new_trial(number, variant, repeat, spawner, len(trials),
                                                         before[1] if before else None)
                            try:
                                await self.trial.execute()
                            except* TrialFailed as group:
                                reason = str(leaf(group))
                                self.failed_trials.append(f"trial {number} ({variant.name}): {reason}")
                                print(f"harness: trial {number} ({variant.name}) FAILED: {reason}", file=sys.stderr)
                            if self.interrupted:
                                break
                outer.cancel_scope.cancel()
        except BaseException:
            aborted = True
            raise
        finally:
            status = "interrupted" if self.interrupted else ("failed" if aborted else "complete")
            with trio.CancelScope(shield=True):
                try:
                    await self.store_call(self.store.end_run, status,
                                          128 + self.interrupted if self.interrupted else (2 if aborted else 0))
                except HarnessError:
                    pass  # the store cannot be written: the run stays resumable as "incomplete"
            await trio.to_thread.run_sync(spawner.close)
            await trio.to_thread.run_sync(self.metrics.close)
            self.store.close()
        return RunResult(self.run_id, self.run_dir, status, self.interrupted, self.failed_trials, lock=self.lock,
                         forced=self.forced)

    def _triage_left(self, crash: dict[str, Any]) -> None:
        """A core whose triage the stopped run never finished: triaged now, where it was put, if that is here."""
        assert self._triage_nursery is not None
        if Path(crash["core_path"]).exists():
            self._triage_nursery.start_soon(self._triage, crash["uid"], Path(crash["core_path"]),
                                            Path(crash["executable"] or ""))
        elif crash.get("machine"):
            machine = crash["machine"]
            print(f"harness: note: the core of crash {crash['uid']} was kept on machine m{machine.get('machine')} "
                  f"({machine.get('addr')}) at {crash['core_path']}, not found here: left untriaged (resume with "
                  f"--cluster triages it on its machine)", file=sys.stderr)

    def _new_trial(self, number: int, variant: Variant, repeat: int, spawner: Spawner, total: int,
                   start_at: int | None) -> Trial:
        """A trial of this run (a run over a cluster makes its own kind: harness.cluster.fleetrun)."""
        return Trial(self, number, variant, repeat, spawner, total, start_at=start_at)

    def _open_run_folder(self) -> None:
        """The run's folder, made (or, resuming, taken) under its lock."""
        scenario = self.scenario
        if self.resume:
            if self.lock is None:
                self.lock = RunLock.take(self.run_dir)
        else:
            try:
                self.run_dir, self.lock = create_run_dir(self.options.out_dir, self.run_id, scenario.text)
                self.objects = ObjectStore(self.run_dir / "objects")   # where the run folder really is
            except Untrusted as exc:
                raise HarnessError(f"{exc}: refusing to write there (another user could redirect what root "
                                   f"writes); use --out with a folder only you or root can write") from None
            except OSError as exc:
                raise HarnessError(f"cannot create the results folder {self.run_dir}: {exc.strerror or exc}") \
                    from None

    async def _open_store(self) -> None:
        """The metrics files and the store: the run's row begun (or, resuming, taken up again)."""
        scenario = self.scenario
        self.metrics = Metrics(self.run_dir / "metrics.prom", self.options.metrics)
        if self.resume:
            self.store = RunStore(self.run_dir / "run.db")
            await self.store_call(self.store.resume_run, os.getpid())
        else:
            self.store = RunStore(self.run_dir / "run.db", create=True)
            await self.store_call(
                self.store.begin_run, run_id=self.run_id, scenario=scenario.name, scenario_file=scenario.file,
                seed=scenario.seed, duration=scenario.duration, hosts=scenario.fleet.hosts, argv=self.options.argv,
                phases=[(p.name, p.kind, p.start, p.end, p.rate_from, p.rate_to) for p in scenario.load.phases],
                pid=os.getpid())
            if self.options.invocation is not None:
                await self.store_call(self.store.set_meta, "invocation", self.options.invocation.to_json())
        self.metrics.hosts.set(scenario.fleet.hosts)

    async def _watch_signals(self, scope: trio.CancelScope) -> None:
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            async for signum in signals:
                if self.interrupted is None:
                    self.interrupted = signum
                    print(f"\nharness: {signal.Signals(signum).name} received, stopping the fleet "
                          f"(again to kill it at once)...", file=sys.stderr)
                    if self.main_scope is not None:
                        self.main_scope.cancel()
                elif not self.forced:
                    # A second signal: no more grace for anyone. SIGKILL every host (what escaped its group
                    # is swept after each exit as usual), stop waiting for triage (resume triages what is
                    # left), and let the shielded flushes write what was gathered.
                    self.forced = True
                    print(f"harness: {signal.Signals(signum).name} again: killing the hosts now", file=sys.stderr)
                    self._kill_hosts()
                    if self._triage_nursery is not None:
                        self._triage_nursery.cancel_scope.cancel()

    def _kill_hosts(self) -> None:
        supervisor = self.trial.supervisor if self.trial is not None else None
        if supervisor is None:
            return
        supervisor.forced = True          # and any host that was about to start again does not
        for host in supervisor.hosts:
            if host.child is not None and not host.child.reaped:
                host.child.signal_group(signal.SIGKILL)

    async def _self_sampler(self) -> None:
        """The harness's own footprint, so a night-long soak can show that the harness does not leak."""
        assert self.store is not None
        me = psutil.Process()
        while True:
            await trio.sleep(self.options.self_sample_every)
            rss, fds, threads = await trio.to_thread.run_sync(
                lambda: (me.memory_info().rss, me.num_fds(), me.num_threads()))
            await self.store_call(self.store.harness_sample, self._trial_number, rss, fds, threads)

    def triage_later(self, uid: str, core: Path, executable: Path) -> None:
        """A crash's core, triaged beside the trials (not after a forced stop: resume triages it)."""
        if self._triage_nursery is not None:
            self._triage_nursery.start_soon(self._triage, uid, core, executable)

    async def _triage(self, uid: str, core: Path, executable: Path) -> None:
        """Backtrace, class, signature and bucket of one core, off the supervisor's path so the host
        restarts at once; one at a time, as gdb and eu-stack are heavy on a small machine."""
        def work() -> tuple[dict[str, Any], list[KeptCore]]:
            try:
                result = triage_core(core, executable, timeout=60).to_dict()
            except Exception as exc:  # triage must never take the run down
                result = {"crash_class": None, "errors": [f"triage failed: {exc!r}"]}
            dropped: list[KeptCore] = []
            try:
                kept, dropped = self._retention.decide(uid, core, result.get("bucket") or "untriaged")
                result.update(kept)
            except OSError as exc:
                result.setdefault("errors", []).append(f"core retention failed: {exc}")
            return result, dropped
        # Abandoned on a forced stop (a second Ctrl-C): the thread finishes on its own, resume triages the core.
        result, dropped = await trio.to_thread.run_sync(work, limiter=self._triage_limiter, abandon_on_cancel=True)
        assert self.store is not None
        await self.store_call(self.store.record_triage, uid, result)
        for old in dropped:
            await self.store_call(self.store.mark_core_dropped, old.uid,
                                  f"deleted to make room under the core disk cap ({old.bucket} keeps newer cores)")


def _check_interposable(scenario: Scenario, program: str, faults: tuple[ShimFault, ...] | None = None) -> None:
    """Before the run: can LD_PRELOAD reach the target's allocation and lock calls at all? (`faults`: the ones
    aimed at this program's hosts, default all)"""
    faults = scenario.shim_faults if faults is None else faults
    path = resolve_program(program)
    report = check_interposable(Path(path))
    kinds = {fault.kind for fault in faults}
    why = "; ".join(report.reasons)
    if not report.preloadable:
        raise HarnessError(f"cannot inject faults into {path}: {why}")
    if "alloc-fail" in kinds and not report.alloc_faults:
        raise HarnessError(f"allocation faults cannot reach {path}: {why}")
    exe_locks = any(f.kind == "lock-error" and f.callers in ((), ("exe",)) for f in faults)
    if exe_locks and not report.lock_faults:
        print(f"harness: warning: {path} does not call pthread lock functions itself; lock errors with the default "
              f"caller filter (the executable) will inject nothing ({why or 'no pthread_mutex_lock import'})",
              file=sys.stderr)


async def run_scenario(scenario: Scenario, options: RunOptions) -> RunResult:
    return await Run(scenario, options).execute()
