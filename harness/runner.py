"""The trio runner: the one place that schedules I/O.

run_scenario() builds the target, then runs each trial (variant x repeat, interleaved) as a fresh
fleet: supervisor, load driver, host-loss faults, per-second sampler, store writer and status line,
all in one nursery. Stopping is cancellation: at the end of the load, on SIGINT/SIGTERM, or on
error, every host is stopped and reaped, and what was gathered is written before returning.
"""

from __future__ import annotations

import gc
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import psutil
import trio

from harness.balancer import Balancer
from harness.driver import Counters, Driver
from harness.driverpool import DriverPool, resolve_workers
from harness.errors import HarnessError, ScenarioError
from harness.capacity import DRIVER_MAX_RATE
from harness.fleet import (FleetSupervisor, Host, State, assign_ports, check_command, plan_fleet, resolve_program,
                           stderr_tail)
from harness.hostprep import HostPrep
from harness.plan import PlanSpec, choose_hosts, loss_events
from harness.runoptions import RunOptions, RunResult, new_run_id
from harness.trialorder import trial_order
from harness.isolation import scenario_problem
from harness.netfault import NetFaults
from harness.netfault.topology import backends
from harness.isolation.limits import ResourceFaults, oom_triage, oom_verdict
from harness.procs import ExitInfo, Spawner
from harness.scenario import Cores, Scenario, ShimFault, Variant
from harness.resume import FINISHED, gap_detail
from harness.logsink import LogPump
from harness.safefs import RunLock, Untrusted, check_trusted_path, create_run_dir
from harness.status import CLEAR, eta_text, fit, run_eta, terminal_width
from harness.store import HostSample, RequestSample, RunStore, Sample
from harness.collect.coreinstall import claim_record, find_spooled_record, installed_spool
from harness.collect.cores import CoreRefused, core_pattern, core_pattern_status, find_core, secure_core
from harness.collect.retention import CoreRetention, KeptCore
from harness.collect.triage import triage_core
from harness.faults import ShimFaults, monotonic_clock
from harness.metrics import Metrics
from harness.shim.interpose import check_interposable, shim_loaded
from harness.shim.build import ShimBuildError, ensure_shim
from harness.variants import apply_variant, variant_for_group
from harness.proof.binding import contradiction, prove_files, prove_process
from harness.proof.check import allocator_problems
from harness.collect.objects import ObjectStore, object_list, save_deleted

FLUSH_INTERVAL = 1.0


class TrialFailed(Exception):
    """A trial that cannot stand as evidence (e.g. the requested allocator is not the one bound)."""


class Recorder:
    """Buffers what happens; the writer task commits it every second."""

    def __init__(self) -> None:
        self.t0 = trio.current_time()
        self.wall0 = time.time()
        self.events: list[dict[str, Any]] = []
        self.crashes: list[dict[str, Any]] = []
        self.samples: list[Sample] = []
        self.host_samples: list[HostSample] = []
        self.request_samples: list[RequestSample] = []
        self.reply_counts: list[tuple[int, str, str, int]] = []   # (second, family, name, count)
        self.crash_count = 0
        self.offered_rate = 0.0
        self.last_sample: Sample | None = None
        self.next_second = 0              # index of the sample being gathered
        self.previous_alive: int | None = None

    def now(self) -> float:
        return trio.current_time() - self.t0

    def event(self, kind: str, host: int | None = None, pid: int | None = None, *,
              happened_at: float | None = None, **detail: Any) -> None:
        """`happened_at`: when it happened, if earlier than now (trial seconds)."""
        now = self.now()
        t = now if happened_at is None else min(happened_at, now)
        self.events.append({"t": round(t, 6), "wall": time.time() - (now - t), "kind": kind, "host": host, "pid": pid,
                            "detail": detail})

    def crash(self, record: dict[str, Any]) -> None:
        record.setdefault("t", round(self.now(), 6))
        record.setdefault("wall", time.time())
        self.crash_count += 1
        self.crashes.append(record)

    def take(self) -> dict[str, list[Any]]:
        batch = {"events": self.events, "crashes": self.crashes, "samples": self.samples,
                 "host_samples": self.host_samples, "request_samples": self.request_samples,
                 "reply_counts": self.reply_counts}
        self.events, self.crashes, self.samples, self.host_samples = [], [], [], []
        self.request_samples, self.reply_counts = [], []
        return batch


def _leaf(exc: BaseException) -> BaseException:
    """The first real exception inside (nested) exception groups: what a message should say."""
    while isinstance(exc, BaseExceptionGroup) and exc.exceptions:
        exc = exc.exceptions[0]
    return exc


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
        self._missing_records = 0          # crashes whose record the core handler never wrote
        self.store: RunStore | None = None
        self.store_lock = trio.CapacityLimiter(1)
        self.interrupted: int | None = None
        self.main_scope: trio.CancelScope | None = None
        self._shim: ShimFaults | None = None
        self._triage_nursery: trio.Nursery | None = None
        self._triage_limiter = trio.CapacityLimiter(1)
        self._retention = CoreRetention(scenario.cores, dict(self.resume.bucket_counts) if self.resume else {},
                                        list(self.resume.kept_cores) if self.resume else [])
        self.failed_trials: list[str] = []
        self._warned_shim = False
        self._warned_proof: set[str] = set()
        self._objects = ObjectStore(self.run_dir / "objects")
        self._low_disk = False
        self._trial_number: int | None = None
        self._trial_walls: list[float] = []       # wall seconds of each finished trial, for the ETA
        self._start_at = 0

    async def _store_call(self, fn: Any, *args: Any, **kwargs: Any) -> None:
        try:
            await trio.to_thread.run_sync(lambda: fn(*args, **kwargs), limiter=self.store_lock)
        except (sqlite3.Error, OSError) as exc:
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
        if self.resume:
            if self.lock is None:
                self.lock = RunLock.take(self.run_dir)
        else:
            try:
                self.run_dir, self.lock = create_run_dir(self.options.out_dir, self.run_id, scenario.text)
                self._objects = ObjectStore(self.run_dir / "objects")   # where the run folder really is
            except Untrusted as exc:
                raise HarnessError(f"{exc}: refusing to write there (another user could redirect what root "
                                   f"writes); use --out with a folder only you or root can write") from None
            except OSError as exc:
                raise HarnessError(f"cannot create the results folder {self.run_dir}: {exc.strerror or exc}") \
                    from None
        self.metrics = Metrics(self.run_dir / "metrics.prom", self.options.metrics)
        if self.resume:
            self.store = RunStore(self.run_dir / "run.db")
            await self._store_call(self.store.resume_run, os.getpid())
        else:
            self.store = RunStore(self.run_dir / "run.db", create=True)
            await self._store_call(
                self.store.begin_run, run_id=self.run_id, scenario=scenario.name, scenario_file=scenario.file,
                seed=scenario.seed, duration=scenario.duration, hosts=scenario.fleet.hosts, argv=self.options.argv,
                phases=[(p.name, p.kind, p.start, p.end, p.rate_from, p.rate_to) for p in scenario.load.phases],
                pid=os.getpid())
            if self.options.invocation is not None:
                await self._store_call(self.store.set_meta, "invocation", self.options.invocation.to_json())
        self.metrics.hosts.set(scenario.fleet.hosts)
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
                        # Killed before these were triaged: the cores are still where they were put.
                        if Path(crash["core_path"]).exists():
                            self._triage_nursery.start_soon(self._triage, crash["uid"], Path(crash["core_path"]),
                                                            Path(crash["executable"] or ""))
                    with trio.CancelScope() as self.main_scope:
                        for number, (variant, repeat) in enumerate(trials, start=1):
                            before = self.resume.trials.get(number) if self.resume else None
                            if before is not None and before[0] in FINISHED:
                                continue
                            try:
                                await self._trial(number, variant, repeat, spawner, len(trials),
                                                  start_at=before[1] if before else None)
                            except* TrialFailed as group:
                                reason = str(_leaf(group))
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
                    await self._store_call(self.store.end_run, status,
                                           128 + self.interrupted if self.interrupted else (2 if aborted else 0))
                except HarnessError:
                    pass  # the store cannot be written: the run stays resumable as "incomplete"
            await trio.to_thread.run_sync(spawner.close)
            await trio.to_thread.run_sync(self.metrics.close)
            self.store.close()
        return RunResult(self.run_id, self.run_dir, status, self.interrupted, self.failed_trials, lock=self.lock,
                         forced=self.forced)

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
        supervisor = getattr(self, "_supervisor", None)
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
            await self._store_call(self.store.harness_sample, self._trial_number, rss, fds, threads)

    async def _trial(self, number: int, variant: Variant, repeat: int, spawner: Spawner, total: int,
                     start_at: int | None = None) -> None:
        """One trial; `start_at` continues a stopped one at that second (harness resume)."""
        scenario = self.scenario
        assert self.store is not None
        self._trial_number = number
        self._start_at = start_at or 0
        if start_at is None:
            await self._store_call(self.store.begin_trial, number, variant.name, repeat, scenario.seed)
        else:
            await self._store_call(self.store.resume_trial, number)
        planned = PlanSpec(scenario.load, scenario.client.keys, scenario.seed,
                           tuple(spec.weight for spec in scenario.target.requests), start_at=self._start_at)
        ports = assign_ports(scenario.fleet.hosts)
        nets = await self._networks(ports, spawner)   # isolation: netns: an address (and a port) of its own
        addrs = [nets[h].inner_ip if h in nets else "127.0.0.1" for h in range(len(ports))]
        # The fault proxy's listeners exist before the hosts are planned: a frontend's config names them.
        net = NetFaults(scenario, ports, addrs) if scenario.net_faults or nets else None
        hosts = plan_fleet(scenario.host_groups, variant, self.run_dir / "hosts" / f"t{number}", ports=ports,
                           backends=backends(scenario, ports, net.proxy.via() if net else {}), addrs=addrs)
        self._isolate(hosts, number, spawner, nets)
        recorder = Recorder()
        limits = ResourceFaults(scenario, hosts) if scenario.resource_faults and variant.faults else None
        if limits is not None:   # limits whose window starts at 0 hold from the hosts' first byte
            for detail in await trio.to_thread.run_sync(limits.initial, self._start_at):
                recorder.event("fault-disarm" if detail.pop("disarm", False) else "fault-arm", None, None, **detail)
        self._shim = await self._prepare_shim(hosts)
        # Output goes through pipes into capped files from the first start to the last stop.
        pump = LogPump()
        try:
            for host in hosts:
                host.logs = pump.attach(host.dir, (host.target or scenario.target).log_max)
        except OSError as exc:
            await trio.to_thread.run_sync(pump.close)
            if self._shim is not None:
                self._shim.close()
            raise HarnessError(f"cannot create the host logs under {self.run_dir / 'hosts'}: {exc}") from None
        if self._shim is not None:
            self._shim.clock = monotonic_clock(recorder.now)   # injection times on the trial's clock
        workers = resolve_workers(scenario.client.workers)
        expect_replies = [(h.target or scenario.target).expect_reply for h in hosts]
        driver_ports = net.driver_ports(ports) if net else ports   # the fault proxy's, where it is on the path
        driver: Driver | DriverPool
        if workers > 1:
            driver = DriverPool(scenario.target, scenario.client, driver_ports, scenario.fleet.balancer,
                                expect_replies, seed=scenario.seed, workers=workers, spawner=spawner,
                                log_dir=self.run_dir / "hosts" / f"t{number}", on_event=recorder.event)
        else:
            driver = Driver(scenario.target, scenario.client, driver_ports,
                            Balancer(len(hosts), scenario.fleet.balancer), expect_replies=expect_replies,
                            seed=scenario.seed, on_event=recorder.event)
        rotation = {h for g in scenario.host_groups if g.rotation for h in scenario.hosts_in((g.name,))}
        self._rotation = rotation
        listener = _Listener(driver, recorder, rotation)
        supervisor = FleetSupervisor(hosts, scenario.target, spawner, recorder, listener, on_crash=self._on_crash,
                                     prep=HostPrep(scenario), prove=self._prove)
        self._recorder = recorder
        self._variant_name = variant.name
        self._variant_allocator = variant.allocator
        self._driver = driver
        self._supervisor = supervisor
        status = "complete"
        failure = ""
        began = time.monotonic()
        try:
            async with trio.open_nursery() as nursery:
                if net is not None:
                    await nursery.start(net.proxy.serve)   # before any host: frontends connect through it
                nursery.start_soon(supervisor.run)
                await nursery.start(driver.serve)
                with trio.move_on_after(max(g.target.ready.timeout for g in scenario.host_groups) + 5):
                    await supervisor.wait_all_started()
                if supervisor.first_start_failed:
                    raise HarnessError(f"target failed to start: {supervisor.first_start_failed} "
                                       f"(see {supervisor.first_start_failed_dir or hosts[0].dir}/)")
                # Start-up garbage is long-lived: freeze it so collections during the load stay short.
                gc.collect()
                gc.freeze()
                load_start = trio.current_time() + 0.05
                shift = load_start - self._start_at - recorder.t0
                for event in recorder.events:  # start-up events happened before the load: earlier times
                    event["t"] = round(event["t"] - shift, 6)
                recorder.t0 = load_start - self._start_at
                recorder.wall0 = time.time() + 0.05 - self._start_at
                recorder.next_second = self._start_at
                supervisor.mark_alive_boundary()
                if start_at is None:
                    await self._store_call(self.store.trial_load_started, number, recorder.wall0)
                else:
                    assert self.resume is not None
                    recorder.event("gap", None, None, **gap_detail(self.resume.stopped_wall, self._start_at))
                nursery.start_soon(self._writer, number, recorder)
                sampling = trio.CancelScope()
                nursery.start_soon(self._sampler, recorder, driver, supervisor, sampling)
                if variant.faults:
                    nursery.start_soon(self._host_losses, recorder, supervisor, nursery)
                if self._shim is not None and variant.faults:
                    nursery.start_soon(self._shim.run, recorder.t0, recorder, float(self._start_at))
                if limits is not None:
                    nursery.start_soon(limits.run, recorder.t0, recorder, self._start_at)
                if net is not None and variant.faults:
                    nursery.start_soon(net.run, recorder.t0, recorder, self._start_at)
                if self.options.status:
                    nursery.start_soon(self._status_line, recorder, driver, supervisor, (number, total, variant.name))
                # Bounded work: a driver that cannot keep up stops at the planned end plus the timeout.
                until = recorder.t0 + scenario.duration + scenario.client.timeout
                await driver.run_load(planned, recorder.t0, until)
                if driver.unsent:
                    self._report_unsent(recorder, driver)
                sampling.cancel()     # what the sampler did not take goes into the final sample
                await self._final_sample(recorder, driver, supervisor)
                if self._shim is not None:
                    self._shim.finish(recorder)
                nursery.cancel_scope.cancel()
        except BaseException as exc:
            status = "interrupted" if self.interrupted else "failed"
            failure = str(_leaf(exc))
            raise
        finally:
            with trio.CancelScope(shield=True):
                if status != "complete":
                    await self._final_sample(recorder, driver, supervisor, stopped=True)
                await trio.to_thread.run_sync(pump.close)  # the hosts are stopped: take their last output
                self._log_overflow(recorder, hosts)
                recorder.event("trial-end", status=status)
                await self._flush(number, recorder)
                await self._store_call(self.store.end_trial, number, status,
                                       {"failure": failure if status == "failed" else None,"send_lag_us": {q: driver.lag.get_value_at_percentile(float(q))
                                                      for q in ("50", "99", "99.9", "100")},
                                        **({"unsent": driver.unsent, "unsent_exact": driver.unsent_exact}
                                           if driver.unsent else {}),
                                        "hosts": [{"name": h.name, "port": h.port, "restarts": h.restarts,
                                                   "crashes": h.crashes} for h in hosts],
                                        "resent": driver.resent, "protocol_errors": driver.protocol_errors,
                                        "driver_workers": workers,
                                        **({"network": net.summary()} if net is not None else {})})
                if self.options.status and sys.stderr.isatty():
                    print(CLEAR, end="", file=sys.stderr, flush=True)   # the status line goes, the report follows
                self._trial_walls.append(time.monotonic() - began)
                if self._shim is not None:
                    self._shim.close()
                if net is not None:
                    net.proxy.close()
                stuck = await trio.to_thread.run_sync(spawner.isolation.release, [h.jail for h in hosts if h.jail])
                if stuck:
                    print(f"harness: warning: cgroups could not be removed: {' '.join(stuck)}", file=sys.stderr)

    async def _networks(self, ports: list[int], spawner: Spawner) -> dict[int, Any]:
        """A network namespace per host of a group with isolation: netns; such a host whose readiness port is a
        number (a target that insists on its port) gets that port."""
        nets: dict[int, Any] = {}
        for group in self.scenario.host_groups:
            if not group.target.isolation.netns:
                continue
            for index in self.scenario.hosts_in((group.name,)):
                try:
                    nets[index] = await trio.to_thread.run_sync(spawner.isolation.network)
                except OSError as exc:
                    raise HarnessError(f"cannot make a network namespace for {group.name or 'the hosts'}: "
                                       f"{exc}") from None
                if group.target.ready.port.isdigit():
                    ports[index] = int(group.target.ready.port)
        return nets

    def _isolate(self, hosts: list[Host], trial: int, spawner: Spawner, nets: dict[int, Any] | None = None) -> None:
        """Each host's cgroup and PID namespaces (harness/isolation), as its target's `isolation` says:
        by default wherever the machine allows; a host with a resource fault always has a cgroup."""
        limited = {h for f in self.scenario.resource_faults for h in self.scenario.hosts_in(f.groups)}
        for host in hosts:
            spec = (host.target or self.scenario.target).isolation
            host.jail = spawner.isolation.jail(f"t{trial}-{host.name}", pid=spec.pid is not False,
                                               cgroup=spec.cgroup is not False or host.index in limited,
                                               net=(nets or {}).get(host.index))
            if host.jail.cgroup is None and (spec.cgroup or host.index in limited):
                raise HarnessError(f"cannot create a cgroup for {host.name}: "
                                   f"{'; '.join(spawner.isolation.notes) or 'cgroups are not available'}")

    def _report_unsent(self, recorder: Recorder, driver: Driver) -> None:
        """Arrivals the driver could not send by the planned end plus the timeout: never dropped silently."""
        count = driver.unsent if driver.unsent_exact else f"about {driver.unsent:.3g}"
        recorder.event("unsent", None, None, unsent=driver.unsent, exact=driver.unsent_exact,
                       at=round(recorder.now(), 3))
        print(f"\nharness: warning: the driver could not keep up: {count} planned arrivals were not sent by the "
              f"planned end plus the client timeout (counted as unsent; one driver process sends about "
              f"{DRIVER_MAX_RATE:,}/s here; client.workers adds processes)", file=sys.stderr)

    def _log_overflow(self, recorder: Recorder, hosts: list[Host]) -> None:
        """What targets wrote beyond log_max (dropped, never written) is an event per host, and said once."""
        total = 0
        for host in hosts:
            if host.logs is None:
                continue
            out, err = host.logs.stdout, host.logs.stderr
            if out.dropped_total or err.dropped_total or out.errors or err.errors:
                recorder.event("log-dropped", host.index, None, stdout=out.dropped_total, stderr=err.dropped_total,
                               log_max=out.cap, written=out.received + err.received - out.dropped_total
                               - err.dropped_total, errors=out.errors + err.errors)
                total += out.dropped_total + err.dropped_total
        if total:
            print(f"harness: warning: targets wrote more than log_max a second: {total / 2**20:.1f} MiB of their "
                  f"output was dropped (counted in 'log-dropped' events; each log keeps its newest part)",
                  file=sys.stderr)

    async def _prepare_shim(self, hosts: list[Host]) -> ShimFaults | None:
        if not self.scenario.shim_faults:
            return None
        try:
            library = await trio.to_thread.run_sync(ensure_shim)
        except ShimBuildError as exc:
            raise HarnessError(f"cannot build the fault shim: {exc}") from None
        return ShimFaults(self.scenario, hosts, library)

    async def _on_crash(self, host: Host, info: ExitInfo, record: dict[str, Any]) -> None:
        """Add the load at the moment of death, the stderr tail, the core and the faults armed
        with what the shim had injected to a crash record."""
        recorder = self._recorder
        if self._shim is not None:
            # Armed at the moment of death (by the controller's log: a crash seen while the fleet is being
            # stopped comes after the faults were disarmed), with what the shim had injected by then.
            record.setdefault("detail", {})["shim"] = {"armed": self._shim.armed_at(host.index, record["t"]),
                                                       **self._shim.snapshot(host.index)}
        # the plan's rate at the moment of death (before the first sample too; 0 before or after the load)
        record["offered_rate"] = self.scenario.load.rate(record["t"]) if record["t"] >= 0 else 0.0
        # The connections may have reported the death first and failed their requests already.
        await self._driver.settle(host.index)
        record["host_inflight"] = max(self._driver.balancer.inflight[host.index],
                                      self._driver.lost_inflight[host.index])
        record["hosts_alive"] = self._supervisor.up_count()
        since = time.time() - (time.monotonic() - host.started_at) - 1
        incarnation = host.child.incarnation if host.child is not None else None
        record["stderr_tail"], record["core_path"], notes, free, missing = await trio.to_thread.run_sync(
            _collect_crash_files, host, record["pid"], info.core_dumped, since, self.scenario.cores,
            _record_timeout(self._missing_records), incarnation.ns_pid if incarnation is not None else None)
        if missing:
            self._missing_records += 1
            if self._missing_records == 1:
                print(f"harness: warning: the core handler wrote no record for {host.name} (pid {record['pid']}): "
                      f"its spool may be full or the handler broken (`harness cores status`); later crashes "
                      f"wait less for theirs", file=sys.stderr)
        if free is not None and not self._low_disk:
            # Reported once; crashes are still counted and triage goes on for cores already kept.
            self._low_disk = True
            recorder.event("low-disk", host.index, record["pid"], free=free, min_free=self.scenario.cores.min_free,
                           path=str(host.dir))
            print(f"harness: warning: low disk ({free // 2**20} MiB free under {host.dir}): cores are not collected "
                  f"while free space is under cores.min_free; the run goes on", file=sys.stderr)
        record["uid"] = f"{self.run_id}:{record['pid']}:{host.index}:{host.incarnation}"
        if notes:
            record.setdefault("detail", {})["core_notes"] = notes
        oom = await trio.to_thread.run_sync(oom_verdict, host, info.signal)
        if oom is not None:
            # The kernel's OOM killer, with the cgroup's count as the evidence; a harness SIGKILL never gets
            # here (an expected exit is no crash), and another SIGKILL leaves the count where it was.
            record.setdefault("detail", {})["cgroup"] = oom
            assert self.store is not None
            await self._store_call(self.store.record_triage, record["uid"], oom_triage(record["executable"], oom))
        elif host.jail is not None and host.jail.cgroup is not None:
            record.setdefault("detail", {})["cgroup"] = await trio.to_thread.run_sync(host.jail.cgroup.stats)
        self.metrics.crash(host.name, record["executable"], record["signal_name"], bool(record["core_path"]),
                           self._variant_name)
        if record["core_path"] and self._triage_nursery is not None:
            self._triage_nursery.start_soon(self._triage, record["uid"], Path(record["core_path"]),
                                            Path(record["executable"]))

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
        await self._store_call(self.store.record_triage, uid, result)
        for old in dropped:
            await self._store_call(self.store.mark_core_dropped, old.uid,
                                   f"deleted to make room under the core disk cap ({old.bucket} keeps newer cores)")

    async def _flush(self, trial: int, recorder: Recorder) -> None:
        batch = recorder.take()
        if any(batch.values()):
            assert self.store is not None
            await self._store_call(self.store.write_batch, trial, **batch)

    async def _writer(self, trial: int, recorder: Recorder) -> None:
        assert self.store is not None
        every = self.options.rollup_every
        rolled_to = 0
        while True:
            await trio.sleep(FLUSH_INTERVAL)
            await self._flush(trial, recorder)
            # A long run keeps per-second rows for the last `rollup_after` only: the store stays small.
            before = int(recorder.next_second - self.options.rollup_after)
            if before - rolled_to >= every:
                await self._store_call(self.store.rollup, trial, before, every)
                rolled_to = before - before % every

    async def _sampler(self, recorder: Recorder, driver: Driver | DriverPool, supervisor: FleetSupervisor,
                       scope: trio.CancelScope) -> None:
        with scope:
            await self._sample_each_second(recorder, driver, supervisor)

    async def _sample_each_second(self, recorder: Recorder, driver: Driver | DriverPool,
                                  supervisor: FleetSupervisor) -> None:
        while True:
            await trio.sleep_until(recorder.t0 + recorder.next_second + 1)
            # All waiting first: once the counters are swapped, nothing may await (a cancellation
            # there would lose a second of outcomes).
            usage, cgroups = await trio.to_thread.run_sync(_usage_and_objects, supervisor.hosts, self._objects)
            # A thread finishes even when cancelled: if the load ended meanwhile, the final sample has
            # taken these counters and the hosts are stopping, so this second must not be recorded.
            await trio.lowlevel.checkpoint_if_cancelled()
            # Driver workers' seconds may still be on their way: wait for them (a cancellation while
            # waiting takes nothing; the final sample gathers it).
            counters = await driver.take_counters(recorder.next_second)
            self._add_sample(recorder, recorder.next_second, counters, driver, supervisor, usage, cgroups)
            self._note_oom_kills(recorder, supervisor.hosts, cgroups)
            recorder.next_second += 1
            if recorder.next_second % 5 == 0:
                await trio.to_thread.run_sync(self.metrics.write_textfile)

    async def _prove(self, host: Host, child: Any, stage: str) -> None:
        """Proof of what this incarnation runs (harness.proof): from the files at exec, from the live process
        (scope, GOT read back, mapped objects) once it is ready; it goes with the host's crash rows. A variant
        the proof contradicts fails its trial; a shim that is not active is a warning."""
        pid = child.pid
        shim = host.extra.get("shim")

        def work() -> tuple[dict[str, Any], list[dict[str, Any]], bool]:
            if stage == "exec":
                # From the files alone: the same for every incarnation of the host, so worked out once.
                if "files_proof" not in host.extra:
                    host.extra["files_proof"] = prove_files(resolve_program(host.argv[0]), host.env)[0].to_dict()
                return host.extra["files_proof"], [], False
            proof = prove_process(pid).to_dict()
            if proof["stage"] == "error":
                return proof, [], False
            objects = object_list(pid)
            save_deleted(pid, self._objects)
            return proof, objects, bool(shim) and shim_loaded(pid, Path(shim))

        proof, objects, shim_mapped = await trio.to_thread.run_sync(work)
        if stage == "ready" and proof["stage"] == "error" and host.extra.get("proof"):
            host.extra["proof"]["errors"] = proof["errors"]   # died meanwhile: the exec proof stands
            return
        if stage == "exec":
            if child is host.child and "proof" not in host.extra:   # never over the live proof of readiness
                host.extra["proof"] = compact_proof(proof)
            return
        host.extra["proof"] = compact_proof(proof)
        recorder = self._recorder
        named = {"group": host.group, "name": host.name} if host.group else {}
        recorder.event("proof", host.index, pid, **{k: v for k, v in proof.items() if k != "pid"}, objects=objects,
                       shim_mapped=shim_mapped, variant=self._variant_name, **named)
        wanted = host.extra.get("allocator", self._variant_allocator)   # a variant may skip some groups
        why = contradiction(proof, wanted) if wanted else None
        if why:
            raise TrialFailed(f"variant {self._variant_name} asked for {wanted}, but in {host.name} (pid {pid}) "
                              f"{why}")
        for warning in proof["warnings"]:
            if warning not in self._warned_proof:
                self._warned_proof.add(warning)
                print(f"harness: warning: {host.name} (variant {self._variant_name}): {warning}", file=sys.stderr)
        if self._shim is not None:
            # Mapped is not enough: the shim must also have attached its control file.
            attached = any(p.pid == pid for p in self._shim.files[host.index].counters().processes)
            loaded = shim_mapped and attached
            recorder.event("shim-check", host.index, pid, loaded=loaded, mapped=shim_mapped, attached=attached)
            if not loaded and not self._warned_shim:
                self._warned_shim = True
                why = ("its control file was not attached (see the host's stderr)" if shim_mapped else
                       "static executable, setuid, or LD_PRELOAD dropped by a wrapper?")
                print(f"harness: warning: the fault shim is not active in {host.name} (pid {pid}): faults "
                      f"will not reach it ({why})", file=sys.stderr)

    async def _final_sample(self, recorder: Recorder, driver: Driver | DriverPool, supervisor: FleetSupervisor,
                            stopped: bool = False) -> None:
        """The last, partial second (after the load ends, or when interrupted)."""
        counters = await driver.take_final(stopped)
        if counters.offered or counters.ok or counters.timeout or counters.conn_error or counters.no_host \
                or counters.bad_reply:
            self._add_sample(recorder, recorder.next_second, counters, driver, supervisor, {})
            if stopped and recorder.last_sample and recorder.previous_alive is not None:
                # Hosts were already stopped by the interruption: they were alive during the second.
                recorder.samples[-1] = recorder.last_sample = replace(recorder.last_sample,
                                                                      hosts_alive=recorder.previous_alive)
            recorder.next_second += 1

    def _note_oom_kills(self, recorder: Recorder, hosts: list[Host], cgroups: dict[int, dict[str, Any]]) -> None:
        """OOM kills that took a process of a host that lives on (a worker its master replaces): events, not
        crashes. (The host's own death by OOM is a crash, classified where its exit is handled.)"""
        for host in hosts:
            count = cgroups.get(host.index, {}).get("oom_kills")
            seen = host.extra.get("oom_seen", 0)
            if count is not None and count > seen:
                host.extra["oom_seen"] = count
                if host.state == State.UP and host.pid is not None and _running(host.pid) \
                        and host.child is not None and host.child.incarnation is not None \
                        and (host.child.incarnation.oom_before or 0) < count:
                    recorder.event("oom-kill", host.index, host.pid, count=count - seen, total=count,
                                   host_alive=True)

    def _add_sample(self, recorder: Recorder, second: int, c: Counters, driver: Driver | DriverPool,
                    supervisor: FleetSupervisor, usage: dict[int, tuple[int, int, int]],
                    cgroups: dict[int, dict[str, Any]] | None = None) -> None:
        offered_rate = self.scenario.load.rate(second + 0.5)
        recorder.offered_rate = self.scenario.load.rate(second + 1)
        has = c.latency.get_total_count() > 0
        pct = (lambda q: c.latency.get_value_at_percentile(q) / 1e6) if has else (lambda q: None)
        alive = supervisor.take_fewest_alive(until=recorder.t0 + second + 1)
        recorder.previous_alive = recorder.last_sample.hosts_alive if recorder.last_sample else None
        recorder.last_sample = Sample(
            t=second, offered=c.offered, sent=c.sent, ok=c.ok, timeout=c.timeout, conn_error=c.conn_error,
            no_host=c.no_host, bad_reply=c.bad_reply, p50=pct(50), p90=pct(90), p99=pct(99), p999=pct(99.9),
            max=c.latency.get_max_value() / 1e6 if has else None, hosts_alive=alive, offered_rate=offered_rate,
            hist=c.latency.encode() if has else None)
        recorder.samples.append(recorder.last_sample)
        names = [spec.name for spec in self.scenario.target.requests]
        for name, r in zip(names, c.per_request):
            if r.offered or r.ok or r.timeout or r.conn_error or r.bad_reply:
                has_r = r.latency.get_total_count() > 0
                recorder.request_samples.append(RequestSample(
                    t=second, name=name, offered=r.offered, sent=r.sent, ok=r.ok, timeout=r.timeout,
                    conn_error=r.conn_error, no_host=r.no_host, bad_reply=r.bad_reply,
                    hist=r.latency.encode() if has_r else None))
        recorder.reply_counts.extend((second, "bad", kind, count) for kind, count in c.bad_kinds.items())
        recorder.reply_counts.extend((second, "status", str(code), count) for code, count in c.status.items())
        self.metrics.offered.set(c.offered)
        self.metrics.achieved.set(c.ok)
        for kind in ("timeout", "conn_error", "no_host", "bad_reply"):
            self.metrics.errors.labels(kind=kind).set(getattr(c, kind))
        self.metrics.alive.set(alive)
        if has:
            self.metrics.p99.set(pct(99))
        for host in supervisor.hosts:
            state = host.state.value
            if host.state == State.UP and not driver.balancer.in_rotation[host.index] \
                    and host.index in self._rotation:
                state = "ejected"
            rss, fds, threads = usage.get(host.pid or -1, (None, None, None))
            recorder.host_samples.append(HostSample(
                t=second, host=host.index, state=state, pid=host.pid, sent=c.host_sent[host.index],
                ok=c.host_ok[host.index], errors=c.host_errors[host.index],
                inflight=driver.balancer.inflight[host.index], rss=rss, fds=fds, threads=threads,
                shim=self._shim.snapshot(host.index) if self._shim is not None else None,
                cgroup=(cgroups or {}).get(host.index)))
        c.release()  # encoded above: free the histograms now, not at the next GC (see release_histogram)

    async def _host_losses(self, recorder: Recorder, supervisor: FleetSupervisor, nursery: trio.Nursery) -> None:
        scenario = self.scenario
        for event in loss_events(scenario.host_losses, scenario.duration):
            if event.t < self._start_at:
                continue  # happened before the run was stopped and resumed
            await trio.sleep_until(recorder.t0 + event.t)
            fault = event.fault
            candidates = [h.index for h in supervisor.hosts if h.state == State.UP]
            count = fault.hosts.resolve(len(supervisor.hosts))
            chosen = choose_hosts(scenario.seed, event, candidates, count)
            recorder.event("host-loss", None, None, how=fault.how, fault=fault.index, hosts=chosen,
                           asked=count, available=len(candidates))
            for index in chosen:
                host = supervisor.hosts[index]
                if fault.how == "kill":
                    supervisor.kill(host, f"host-loss (faults[{fault.index}])", fault.down_for)
                else:
                    nursery.start_soon(supervisor.pause, host, fault.pause_for)

    async def _status_line(self, recorder: Recorder, driver: Driver, supervisor: FleetSupervisor,
                           trial: tuple[int, int, str]) -> None:
        """One line on stderr: every second on a terminal (rewritten in place, cut to its width, erased at
        the trial's end), every 10 s otherwise (one line each)."""
        tty = sys.stderr.isatty()
        interval = 1.0 if tty else 10.0
        number, total, variant = trial
        while True:
            await trio.sleep(interval)
            elapsed = recorder.now()
            last = recorder.last_sample
            errors = (last.timeout + last.conn_error + last.no_host + last.bad_reply) if last else 0
            eta = run_eta(elapsed_in_trial=elapsed, duration=self.scenario.duration, trial=number, trials=total,
                          finished_trial_walls=self._trial_walls)
            parts = [f"trial {number}/{total} {variant}", f"{elapsed:.0f}/{self.scenario.duration:.0f}s",
                     eta_text(eta), f"up {supervisor.up_count()}/{len(supervisor.hosts)}",
                     f"crashes {recorder.crash_count}",
                     f"p99 {last.p99 * 1e3:.1f}ms" if last and last.p99 is not None else "p99 -",
                     f"ok {last.ok}/s" if last else "ok -", f"offered {self.scenario.load.rate(elapsed):.0f}/s",
                     f"errors {errors}/s"]
            if tty:
                print(CLEAR + fit(parts, terminal_width()), end="", file=sys.stderr, flush=True)
            else:
                print("  ".join(parts), file=sys.stderr, flush=True)


class _Listener:
    def __init__(self, driver: Driver, recorder: Recorder, rotation: set[int] | None = None):
        self.driver = driver
        self.recorder = recorder
        self.rotation = rotation   # hosts the driver loads (a pure backend group gets its load from its frontends)

    def host_ready(self, host: Host) -> None:
        if self.rotation is None or host.index in self.rotation:
            try:
                self.driver.host_ready(host.index, host.incarnation)
            except RuntimeError:
                pass   # ready just as the trial ends: the driver's nursery is closed, there is no load to give

    def host_gone(self, host: Host) -> None:
        self.driver.host_gone(host.index)


def _running(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", "rb") as handle:
            return handle.read().rsplit(b")", 1)[1].split()[0] not in (b"Z", b"X")
    except (OSError, IndexError):
        return False


def _cgroup_usage(hosts: list[Host]) -> dict[int, dict[str, Any]]:
    """Each host's cgroup counters: memory and CPU of all its processes, throttling, pids, OOM kills."""
    return {h.index: h.jail.cgroup.stats() for h in hosts if h.jail is not None and h.jail.cgroup is not None}


def _process_usage(pids: list[int | None]) -> dict[int, tuple[int, int, int]]:
    """(RSS, open fds, threads) of each process."""
    usage = {}
    for pid in pids:
        if pid is None:
            continue
        try:
            process = psutil.Process(pid)
            with process.oneshot():
                usage[pid] = (process.memory_info().rss, process.num_fds(), process.num_threads())
        except (psutil.Error, OSError):
            continue
    return usage


def compact_proof(proof: dict[str, Any]) -> dict[str, Any]:
    """What a crash row keeps of its incarnation's proof (the full one is the `proof` event)."""
    keep = ("stage", "pid", "executable", "preload", "allocator", "source", "object", "shim", "warnings",
            "got_check", "errors")
    compact = {k: proof.get(k) for k in keep}
    compact["mapped_unbound"] = sorted({m["allocator"] for m in proof.get("mapped_unbound", [])})
    compact["bound"] = {name: sym.get("object") for name, sym in proof.get("symbols", {}).items()}
    return compact


def _usage_and_objects(hosts: list[Host], store: ObjectStore) -> tuple[dict[int, tuple[int, int, int]],
                                                                        dict[int, dict[str, Any]]]:
    """Each host's usage (its leader's, and its cgroup's counters); and objects deleted while mapped (a compiled
    VCL .so) are copied while their process lives (for crash bundles). One worker-thread hop for all: the
    sampler's second stays short."""
    usage = _process_usage([h.pid for h in hosts])
    for host in hosts:
        if host.pid is not None and host.state == State.UP:
            save_deleted(host.pid, store)
    return usage, _cgroup_usage(hosts)


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


def _record_timeout(missed: int) -> float:
    """How long to wait for the core handler's record of a crash. With core_pipe_limit > 0 the kernel
    waits for the handler before the process is reaped, so the record is there when we see the death;
    the wait is only slack. With 0 the handler may still be writing. Once records went missing in this
    run, wait less: a full or broken spool must not cost every restart seconds."""
    try:
        waits = int(Path("/proc/sys/kernel/core_pipe_limit").read_text().strip()) > 0
    except (OSError, ValueError):
        waits = False
    full = 1.0 if waits else 5.0
    return full if not missed else 0.2


def _collect_crash_files(host: Host, pid: int, core_dumped: bool, since: float, policy: Cores,
                         record_timeout: float = 5.0, ns_pid: int | None = None
                         ) -> tuple[str, str | None, list[str], int | None, bool]:
    """(stderr tail, core path in the results, notes, free bytes if the disk is low, whether the core
    handler's record is missing). Runs in a worker thread. `ns_pid`: the pid inside the host's PID namespace,
    which a core file name's %p (or core_uses_pid) shows."""
    max_core = policy.max_size
    tail = stderr_tail(host, 2048).decode(errors="replace")
    if not core_dumped:
        return tail, None, [], None, False
    free = _free_bytes(host.dir)
    low = free is not None and free < policy.min_free
    spool = installed_spool()
    if spool is not None:  # `harness cores install` put our pipe handler in core_pattern
        try:
            record = find_spooled_record(spool, pid, since, timeout=record_timeout)
        except OSError as exc:
            return tail, None, [f"cannot read the core spool {spool}: {exc}"], None, False
        if record is None:
            return tail, None, [f"no record of the crash from the core handler in {spool} within "
                                f"{record_timeout:g}s (spool full or handler broken?)"], None, True
        if record.core is None:
            claim_record(record)
            return tail, None, list(record.notes), None, False
        if low:  # the spooled copy is the pipe handler's to age out
            return tail, None, [f"core not collected: low disk ({free} bytes free)"], free, False
        try:
            stored = secure_core(record.core, host.dir / "cores", max_bytes=max_core)
        except (CoreRefused, OSError) as exc:
            return tail, None, [f"core not kept: {exc}"], None, False
        claim_record(record)
        return tail, str(stored.path), list(record.notes) + list(stored.notes), None, False
    found = find_core(host.cwd, ns_pid or pid, since)
    if found is None:
        return tail, None, [f"the kernel reported a core for pid {pid}, but none was found in {host.cwd} "
                            f"(core_pattern: {core_pattern()})"], None, False
    if low:  # the core is on the same disk: delete it rather than let the next ones fill it
        found.unlink(missing_ok=True)
        return tail, None, [f"core not collected: low disk ({free} bytes free)"], free, False
    try:
        stored = secure_core(found, host.dir / "cores", max_bytes=max_core)
    except (CoreRefused, OSError) as exc:
        return tail, None, [f"core not kept: {exc}"], None, False
    return tail, str(stored.path), list(stored.notes), None, False


def _free_bytes(path: Path) -> int | None:
    try:
        return shutil.disk_usage(path).free
    except OSError:
        return None


async def run_scenario(scenario: Scenario, options: RunOptions) -> RunResult:
    return await Run(scenario, options).execute()
