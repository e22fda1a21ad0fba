"""One trial of a run: a fresh fleet under the planned load, its faults, sampling and status line.

Trial.execute() is the trial's life in three steps: set up (ports, namespaces, the fleet's plan, the fault
shim, log pipes, the driver and the supervisor), the load (every task of the trial in one nursery: fault
proxy, supervisor, driver, store writer, per-second sampler, faults, status line; stopping is
cancellation), and the wrap-up (the last partial second, the hosts' last output, the trial's row and
everything gathered written, faults and namespaces released). What outlives a trial (the store, the
triage of cores, warnings said once) is the Run's (harness.run.runner).
"""

from __future__ import annotations

import gc
import shutil
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Collection, Protocol

import psutil
import trio

from harness.run.balancer import Balancer
from harness.run.capacity import DRIVER_MAX_RATE
from harness.collect.coreinstall import claim_record, find_spooled_record, installed_spool
from harness.collect.cores import CoreRefused, core_pattern, find_core, secure_core
from harness.collect.objects import ObjectStore, object_list, save_deleted
from harness.run.driver import Counters, Driver
from harness.run.driverpool import DriverPool, resolve_workers
from harness.base.errors import HarnessError
from harness.run.faults.shimfaults import ShimFaults, monotonic_clock
from harness.run.fleet import FleetSupervisor, Host, State, assign_ports, plan_fleet, resolve_program, stderr_tail
from harness.run.hostprep import HostPrep
from harness.run.faults.resources import ResourceFaults, oom_triage, oom_verdict
from harness.run.logsink import LogPump
from harness.present.prometheus import Metrics
from harness.run.faults.network import NetFaults
from harness.run.faults.network.topology import backends
from harness.base.outcomes import COUNTS, ERROR_KINDS, OUTCOMES, HostSample, RequestSample, Sample
from harness.plan.streams import PlanSpec, choose_hosts, loss_events
from harness.run.procs import ExitInfo, Spawner
from harness.collect.proof.binding import contradiction, prove_files, prove_process
from harness.store.resume import ResumePoint, gap_detail
from harness.run.options import RunOptions
from harness.scenario.model import Cores, Scenario, Variant
from harness.shim.build import ShimBuildError, ensure_shim
from harness.shim.interpose import shim_loaded
from harness.present.status import CLEAR, eta_text, fit, run_eta, terminal_width
from harness.store.runstore import RunStore


class RunContext(Protocol):
    """What a trial uses of the run it belongs to (harness.run.runner.Run): the store, the folder, the run-wide
    counters and warnings said once, and the triage of cores, which outlives the trial."""

    scenario: Scenario
    options: RunOptions
    run_id: str
    run_dir: Path
    resume: ResumePoint | None
    store: RunStore | None
    metrics: Metrics
    objects: ObjectStore
    interrupted: int | None
    low_disk: bool
    missing_records: int
    warned_shim: bool
    warned_proof: set[str]
    trial_walls: list[float]

    async def store_call(self, fn: Any, *args: Any, **kwargs: Any) -> None: ...

    def triage_later(self, uid: str, core: Path, executable: Path) -> None: ...

FLUSH_INTERVAL = 1.0


class TrialFailed(Exception):
    """A trial that cannot stand as evidence (e.g. the requested allocator is not the one bound)."""


def leaf(exc: BaseException) -> BaseException:
    """The first real exception inside (nested) exception groups: what a message should say."""
    while isinstance(exc, BaseExceptionGroup) and exc.exceptions:
        exc = exc.exceptions[0]
    return exc


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


class Trial:
    """Trial `number` of `total`: `variant`, repeat `repeat`; `start_at` continues a stopped one at that second
    (harness resume)."""

    def __init__(self, run: RunContext, number: int, variant: Variant, repeat: int, spawner: Spawner, total: int,
                 start_at: int | None = None):
        self.run = run
        self.scenario = run.scenario
        self.number = number
        self.variant = variant
        self.repeat = repeat
        self.spawner = spawner
        self.total = total
        self.resuming = start_at is not None
        self.start_at = start_at or 0
        self.recorder = Recorder()                  # a fresh one (its clock) once the hosts are planned
        # set up by _set_up(), in this order
        self.ports: list[int] = []
        self.net: NetFaults | None = None          # the fault proxy, with network faults or network namespaces
        self.hosts: list[Host] = []
        self.limits: ResourceFaults | None = None  # cgroup limits on the timeline
        self.shim: ShimFaults | None = None         # the fault shim's controller, with shim faults
        self.pump: LogPump | None = None            # the hosts' output into capped files
        self.workers = 1                            # driver processes
        self.driver: Driver | DriverPool | None = None
        self.rotation: set[int] = set()             # hosts the driver loads
        self.supervisor: FleetSupervisor | None = None
        self.status = "complete"                    # complete | interrupted | failed
        self.failure = ""

    async def execute(self) -> None:
        run = self.run
        assert run.store is not None
        if not self.resuming:
            await run.store_call(run.store.begin_trial, self.number, self.variant.name, self.repeat,
                                 self.scenario.seed)
        else:
            await run.store_call(run.store.resume_trial, self.number)
        await self._set_up()
        began = time.monotonic()
        try:
            await self._load()
        except BaseException as exc:
            self.status = "interrupted" if run.interrupted else "failed"
            self.failure = str(leaf(exc))
            raise
        finally:
            with trio.CancelScope(shield=True):
                await self._wrap_up(began)

    async def _set_up(self) -> None:
        """Ports and namespaces, the fleet's plan, the fault shim, log pipes, the driver and the supervisor."""
        scenario, variant, number, spawner = self.scenario, self.variant, self.number, self.spawner
        self.ports = ports = assign_ports(scenario.fleet.hosts)
        nets = await self._networks(ports, spawner)   # isolation: netns: an address (and a port) of its own
        addrs = [nets[h].inner_ip if h in nets else "127.0.0.1" for h in range(len(ports))]
        # The fault proxy's listeners exist before the hosts are planned: a frontend's config names them.
        net = self.net = NetFaults(scenario, ports, addrs) if scenario.net_faults or nets else None
        hosts = self.hosts = plan_fleet(scenario.host_groups, variant, self.run.run_dir / "hosts" / f"t{number}",
                                        ports=ports, backends=backends(scenario, ports, net.proxy.via() if net else {}),
                                        addrs=addrs)
        self._isolate(hosts, number, spawner, nets)
        self.recorder = recorder = Recorder()
        limits = self.limits = ResourceFaults(scenario, hosts) if scenario.resource_faults and variant.faults \
            else None
        if limits is not None:   # limits whose window starts at 0 hold from the hosts' first byte
            for detail in await trio.to_thread.run_sync(limits.initial, self.start_at):
                recorder.event("fault-disarm" if detail.pop("disarm", False) else "fault-arm", None, None, **detail)
        self.shim = await self._prepare_shim(hosts)
        # Output goes through pipes into capped files from the first start to the last stop.
        pump = self.pump = LogPump()
        try:
            for host in hosts:
                host.logs = pump.attach(host.dir, (host.target or scenario.target).log_max)
        except OSError as exc:
            await trio.to_thread.run_sync(pump.close)
            if self.shim is not None:
                self.shim.close()
            raise HarnessError(f"cannot create the host logs under {self.run.run_dir / 'hosts'}: {exc}") from None
        if self.shim is not None:
            self.shim.clock = monotonic_clock(recorder.now)   # injection times on the trial's clock
        driver_ports = net.driver_ports(ports) if net else ports   # the fault proxy's, where it is on the path
        self.driver = self._local_driver(hosts, driver_ports)
        self.rotation = {h for g in scenario.host_groups if g.rotation for h in scenario.hosts_in((g.name,))}
        listener = _Listener(self.driver, recorder, self.rotation)
        self.supervisor = FleetSupervisor(hosts, scenario.target, spawner, recorder, listener,
                                          on_crash=self._on_crash, prep=HostPrep(scenario), prove=self._prove)

    def _local_driver(self, hosts: list[Host], ports: list[int],
                      addrs: list[str] | None = None) -> Driver | DriverPool:
        """The load sent from this machine: one driver in this process, or `client.workers` driver processes."""
        scenario = self.scenario
        self.workers = workers = resolve_workers(scenario.client.workers)
        expect_replies = [(h.target or scenario.target).expect_reply for h in hosts]
        if workers > 1:
            return DriverPool(scenario.target, scenario.client, ports, scenario.fleet.balancer, expect_replies,
                              seed=scenario.seed, workers=workers, spawner=self.spawner,
                              log_dir=self.run.run_dir / "hosts" / f"t{self.number}", on_event=self.recorder.event,
                              addrs=addrs)
        return Driver(scenario.target, scenario.client, ports, Balancer(len(hosts), scenario.fleet.balancer),
                      expect_replies=expect_replies, seed=scenario.seed, on_event=self.recorder.event, addrs=addrs)

    async def _load(self) -> None:
        """The fleet started, then the planned load with every task of the trial beside it."""
        scenario, variant, recorder, net = self.scenario, self.variant, self.recorder, self.net
        driver, supervisor = self.driver, self.supervisor
        assert driver is not None and supervisor is not None and self.run.store is not None
        planned = PlanSpec(scenario.load, scenario.client.keys, scenario.seed,
                           tuple(spec.weight for spec in scenario.target.requests), start_at=self.start_at)
        async with trio.open_nursery() as nursery:
            if net is not None:
                await nursery.start(net.proxy.serve)   # before any host: frontends connect through it
            nursery.start_soon(supervisor.run)
            await nursery.start(driver.serve)
            with trio.move_on_after(max(g.target.ready.timeout for g in scenario.host_groups) + 5):
                await supervisor.wait_all_started()
            if supervisor.first_start_failed:
                raise HarnessError(f"target failed to start: {supervisor.first_start_failed} "
                                   f"(see {supervisor.first_start_failed_dir or self.hosts[0].dir}/)")
            # Start-up garbage is long-lived: freeze it so collections during the load stay short.
            gc.collect()
            gc.freeze()
            await self._clock_to_the_load()
            nursery.start_soon(self._writer, self.number, recorder)
            sampling = trio.CancelScope()
            nursery.start_soon(self._sampler, recorder, driver, supervisor, sampling)
            if variant.faults:
                nursery.start_soon(self._host_losses, recorder, supervisor, nursery)
            if self.shim is not None and variant.faults:
                nursery.start_soon(self.shim.run, recorder.t0, recorder, float(self.start_at))
            if self.limits is not None:
                nursery.start_soon(self.limits.run, recorder.t0, recorder, self.start_at)
            if net is not None and variant.faults:
                nursery.start_soon(net.run, recorder.t0, recorder, self.start_at)
            self._more_faults(nursery, recorder)
            if self.run.options.status:
                nursery.start_soon(self._status_line, recorder, driver, supervisor,
                                   (self.number, self.total, variant.name))
            # Bounded work: a driver that cannot keep up stops at the planned end plus the timeout.
            until = recorder.t0 + scenario.duration + scenario.client.timeout
            await driver.run_load(planned, recorder.t0, until)
            if driver.unsent:
                self._report_unsent(recorder, driver)
            sampling.cancel()     # what the sampler did not take goes into the final sample
            await self._final_sample(recorder, driver, supervisor)
            if self.shim is not None:
                self.shim.finish(recorder)
            nursery.cancel_scope.cancel()

    def _more_faults(self, nursery: trio.Nursery, recorder: Recorder) -> None:
        """Fault tasks a kind of trial adds beside the load (a cluster's machine losses: harness.cluster)."""

    async def _clock_to_the_load(self) -> None:
        """The trial's clock starts with the load (at the resumed second when resuming); start-up events move
        to earlier times."""
        recorder, supervisor, run = self.recorder, self.supervisor, self.run
        assert supervisor is not None and run.store is not None
        load_start = trio.current_time() + 0.05
        shift = load_start - self.start_at - recorder.t0
        for event in recorder.events:  # start-up events happened before the load: earlier times
            event["t"] = round(event["t"] - shift, 6)
        recorder.t0 = load_start - self.start_at
        recorder.wall0 = time.time() + 0.05 - self.start_at
        recorder.next_second = self.start_at
        supervisor.mark_alive_boundary()
        if not self.resuming:
            await run.store_call(run.store.trial_load_started, self.number, recorder.wall0)
        else:
            assert run.resume is not None
            recorder.event("gap", None, None, **gap_detail(run.resume.stopped_wall, self.start_at))

    async def _wrap_up(self, began: float) -> None:
        """The last partial second, the hosts' last output, the trial's row; faults and namespaces released."""
        run, recorder, driver, supervisor, hosts = self.run, self.recorder, self.driver, self.supervisor, self.hosts
        assert driver is not None and supervisor is not None and run.store is not None
        if self.status != "complete":
            await self._final_sample(recorder, driver, supervisor, stopped=True)
        if self.pump is not None:   # (none here when every host runs on other machines: harness.cluster)
            await trio.to_thread.run_sync(self.pump.close)  # the hosts are stopped: take their last output
        self._log_overflow(recorder, hosts)
        recorder.event("trial-end", status=self.status)
        await self._flush(self.number, recorder)
        await run.store_call(run.store.end_trial, self.number, self.status, self._detail())
        if run.options.status and sys.stderr.isatty():
            print(CLEAR, end="", file=sys.stderr, flush=True)   # the status line goes, the report follows
        run.trial_walls.append(time.monotonic() - began)
        await self._release_hosts()

    async def _release_hosts(self) -> None:
        """What the trial's hosts held here: the shim's control files, the fault proxy, cgroups and namespaces."""
        if self.shim is not None:
            self.shim.close()
        if self.net is not None:
            self.net.proxy.close()
        stuck = await trio.to_thread.run_sync(self.spawner.isolation.release,
                                              [h.jail for h in self.hosts if h.jail])
        if stuck:
            print(f"harness: warning: cgroups could not be removed: {' '.join(stuck)}", file=sys.stderr)

    def _detail(self) -> dict[str, Any]:
        """The trial row's detail: why it failed, the driver's send lag and what it could not send, the hosts."""
        driver, net = self.driver, self.net
        assert driver is not None
        return {"failure": self.failure if self.status == "failed" else None,
                "send_lag_us": {q: driver.lag.get_value_at_percentile(float(q)) for q in ("50", "99", "99.9", "100")},
                **({"unsent": driver.unsent, "unsent_exact": driver.unsent_exact} if driver.unsent else {}),
                "hosts": [{"name": h.name, "port": h.port, "restarts": h.restarts, "crashes": h.crashes}
                          for h in self.hosts],
                "resent": driver.resent, "protocol_errors": driver.protocol_errors, "driver_workers": self.workers,
                **({"network": net.summary()} if net is not None else {})}

    async def _networks(self, ports: list[int], spawner: Spawner,
                        only: Collection[int] | None = None) -> dict[int, Any]:
        """A network namespace per host of a group with isolation: netns (of `only`, the hosts run here, when
        given); such a host whose readiness port is a number (a target that insists on its port) gets it."""
        nets: dict[int, Any] = {}
        for group in self.scenario.host_groups:
            if not group.target.isolation.netns:
                continue
            for index in self.scenario.hosts_in((group.name,)):
                if only is not None and index not in only:
                    continue
                try:
                    nets[index] = await trio.to_thread.run_sync(spawner.isolation.network)
                except OSError as exc:
                    raise HarnessError(f"cannot make a network namespace for {group.name or 'the hosts'}: "
                                       f"{exc}") from None
                if group.target.ready.port.isdigit():
                    ports[index] = int(group.target.ready.port)
        return nets

    def _isolate(self, hosts: list[Host], trial: int, spawner: Spawner, nets: dict[int, Any] | None = None) -> None:
        """Each host's cgroup and PID namespaces (harness/run/isolation), as its target's `isolation` says:
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
        recorder = self.recorder
        if self.shim is not None:
            # Armed at the moment of death (by the controller's log: a crash seen while the fleet is being
            # stopped comes after the faults were disarmed), with what the shim had injected by then.
            record.setdefault("detail", {})["shim"] = {"armed": self.shim.armed_at(host.index, record["t"]),
                                                       **self.shim.snapshot(host.index)}
        # the plan's rate at the moment of death (before the first sample too; 0 before or after the load)
        record["offered_rate"] = self.scenario.load.rate(record["t"]) if record["t"] >= 0 else 0.0
        # The connections may have reported the death first and failed their requests already.
        await self.driver.settle(host.index)
        record["host_inflight"] = max(self.driver.balancer.inflight[host.index],
                                      self.driver.lost_inflight[host.index])
        record["hosts_alive"] = self.supervisor.up_count()
        since = time.time() - (time.monotonic() - host.started_at) - 1
        incarnation = host.child.incarnation if host.child is not None else None
        record["stderr_tail"], record["core_path"], notes, free, missing = await trio.to_thread.run_sync(
            _collect_crash_files, host, record["pid"], info.core_dumped, since, self.scenario.cores,
            _record_timeout(self.run.missing_records), incarnation.ns_pid if incarnation is not None else None)
        if missing:
            self.run.missing_records += 1
            if self.run.missing_records == 1:
                print(f"harness: warning: the core handler wrote no record for {host.name} (pid {record['pid']}): "
                      f"its spool may be full or the handler broken (`harness cores status`); later crashes "
                      f"wait less for theirs", file=sys.stderr)
        if free is not None and not self.run.low_disk:
            # Reported once; crashes are still counted and triage goes on for cores already kept.
            self.run.low_disk = True
            recorder.event("low-disk", host.index, record["pid"], free=free, min_free=self.scenario.cores.min_free,
                           path=str(host.dir))
            print(f"harness: warning: low disk ({free // 2**20} MiB free under {host.dir}): cores are not collected "
                  f"while free space is under cores.min_free; the run goes on", file=sys.stderr)
        record["uid"] = f"{self.run.run_id}:{record['pid']}:{host.index}:{host.incarnation}"
        if notes:
            record.setdefault("detail", {})["core_notes"] = notes
        oom = await trio.to_thread.run_sync(oom_verdict, host, info.signal)
        if oom is not None:
            # The kernel's OOM killer, with the cgroup's count as the evidence; a harness SIGKILL never gets
            # here (an expected exit is no crash), and another SIGKILL leaves the count where it was.
            record.setdefault("detail", {})["cgroup"] = oom
            assert self.run.store is not None
            await self.run.store_call(self.run.store.record_triage, record["uid"],
                                      oom_triage(record["executable"], oom))
        elif host.jail is not None and host.jail.cgroup is not None:
            record.setdefault("detail", {})["cgroup"] = await trio.to_thread.run_sync(host.jail.cgroup.stats)
        self.run.metrics.crash(host.name, record["executable"], record["signal_name"], bool(record["core_path"]),
                           self.variant.name)
        if record["core_path"]:
            self.run.triage_later(record["uid"], Path(record["core_path"]), Path(record["executable"]))

    async def _flush(self, trial: int, recorder: Recorder) -> None:
        batch = recorder.take()
        if any(batch.values()):
            assert self.run.store is not None
            await self.run.store_call(self.run.store.write_batch, trial, **batch)

    async def _writer(self, trial: int, recorder: Recorder) -> None:
        assert self.run.store is not None
        every = self.run.options.rollup_every
        rolled_to = 0
        while True:
            await trio.sleep(FLUSH_INTERVAL)
            await self._flush(trial, recorder)
            # A long run keeps per-second rows for the last `rollup_after` only: the store stays small.
            before = int(recorder.next_second - self.run.options.rollup_after)
            if before - rolled_to >= every:
                await self.run.store_call(self.run.store.rollup, trial, before, every)
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
            usage, cgroups = await self._host_usage(supervisor)
            # Driver workers' seconds may still be on their way: wait for them (a cancellation while
            # waiting takes nothing; the final sample gathers it).
            counters = await driver.take_counters(recorder.next_second)
            self._add_sample(recorder, recorder.next_second, counters, driver, supervisor, usage, cgroups)
            self._note_oom_kills(recorder, supervisor.hosts, cgroups)
            recorder.next_second += 1
            if recorder.next_second % 5 == 0:
                await trio.to_thread.run_sync(self.run.metrics.write_textfile)

    async def _host_usage(self, supervisor: FleetSupervisor) -> tuple[dict[int, tuple[int, int, int]],
                                                                      dict[int, dict[str, Any]]]:
        """Each host's process usage and cgroup counters now (over a cluster: as its machine last said)."""
        usage, cgroups = await trio.to_thread.run_sync(_usage_and_objects, supervisor.hosts, self.run.objects)
        # A thread finishes even when cancelled: if the load ended meanwhile, the final sample has
        # taken these counters and the hosts are stopping, so this second must not be recorded.
        await trio.lowlevel.checkpoint_if_cancelled()
        return usage, cgroups

    async def _prove(self, host: Host, child: Any, stage: str) -> None:
        """Proof of what this incarnation runs (harness.collect.proof): from the files at exec, from the live process
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
            save_deleted(pid, self.run.objects)
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
        recorder = self.recorder
        named = {"group": host.group, "name": host.name} if host.group else {}
        recorder.event("proof", host.index, pid, **{k: v for k, v in proof.items() if k != "pid"}, objects=objects,
                       shim_mapped=shim_mapped, variant=self.variant.name, **named)
        wanted = host.extra.get("allocator", self.variant.allocator)   # a variant may skip some groups
        why = contradiction(proof, wanted) if wanted else None
        if why:
            raise TrialFailed(f"variant {self.variant.name} asked for {wanted}, but in {host.name} (pid {pid}) "
                              f"{why}")
        for warning in proof["warnings"]:
            if warning not in self.run.warned_proof:
                self.run.warned_proof.add(warning)
                print(f"harness: warning: {host.name} (variant {self.variant.name}): {warning}", file=sys.stderr)
        if self.shim is not None:
            # Mapped is not enough: the shim must also have attached its control file.
            attached = any(p.pid == pid for p in self.shim.files[host.index].counters().processes)
            loaded = shim_mapped and attached
            recorder.event("shim-check", host.index, pid, loaded=loaded, mapped=shim_mapped, attached=attached)
            if not loaded and not self.run.warned_shim:
                self.run.warned_shim = True
                why = ("its control file was not attached (see the host's stderr)" if shim_mapped else
                       "static executable, setuid, or LD_PRELOAD dropped by a wrapper?")
                print(f"harness: warning: the fault shim is not active in {host.name} (pid {pid}): faults "
                      f"will not reach it ({why})", file=sys.stderr)

    async def _final_sample(self, recorder: Recorder, driver: Driver | DriverPool, supervisor: FleetSupervisor,
                            stopped: bool = False) -> None:
        """The last, partial second (after the load ends, or when interrupted)."""
        counters = await driver.take_final(stopped)
        if counters.offered or any(getattr(counters, outcome) for outcome in OUTCOMES):
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
            t=second, **{count: getattr(c, count) for count in COUNTS}, p50=pct(50), p90=pct(90), p99=pct(99),
            p999=pct(99.9), max=c.latency.get_max_value() / 1e6 if has else None, hosts_alive=alive,
            offered_rate=offered_rate, hist=c.latency.encode() if has else None)
        recorder.samples.append(recorder.last_sample)
        names = [spec.name for spec in self.scenario.target.requests]
        for name, r in zip(names, c.per_request):
            # (no_host is never without offered: a request finds nobody in rotation as it is offered)
            if r.offered or any(getattr(r, outcome) for outcome in OUTCOMES):
                has_r = r.latency.get_total_count() > 0
                recorder.request_samples.append(RequestSample(
                    t=second, name=name, **{count: getattr(r, count) for count in COUNTS},
                    hist=r.latency.encode() if has_r else None))
        recorder.reply_counts.extend((second, "bad", kind, count) for kind, count in c.bad_kinds.items())
        recorder.reply_counts.extend((second, "status", str(code), count) for code, count in c.status.items())
        self.run.metrics.offered.set(c.offered)
        self.run.metrics.achieved.set(c.ok)
        for kind in ERROR_KINDS:
            self.run.metrics.errors.labels(kind=kind).set(getattr(c, kind))
        self.run.metrics.alive.set(alive)
        if has:
            self.run.metrics.p99.set(pct(99))
        for host in supervisor.hosts:
            state = host.state.value
            if host.state == State.UP and not driver.balancer.in_rotation[host.index] \
                    and host.index in self.rotation:
                state = "ejected"
            rss, fds, threads = usage.get(host.index, (None, None, None))
            recorder.host_samples.append(HostSample(
                t=second, host=host.index, state=state, pid=host.pid, sent=c.host_sent[host.index],
                ok=c.host_ok[host.index], errors=c.host_errors[host.index],
                inflight=driver.balancer.inflight[host.index], rss=rss, fds=fds, threads=threads,
                shim=self._shim_snapshot(host.index),
                cgroup=(cgroups or {}).get(host.index)))
        c.release()  # encoded above: free the histograms now, not at the next GC (see release_histogram)

    def _shim_snapshot(self, host: int) -> dict[str, Any] | None:
        """What the shim injected into the host so far (None: no shim faults)."""
        return self.shim.snapshot(host) if self.shim is not None else None

    async def _host_losses(self, recorder: Recorder, supervisor: FleetSupervisor, nursery: trio.Nursery) -> None:
        scenario = self.scenario
        for event in loss_events(scenario.host_losses, scenario.duration):
            if event.t < self.start_at:
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
            errors = sum(getattr(last, kind) for kind in ERROR_KINDS) if last else 0
            eta = run_eta(elapsed_in_trial=elapsed, duration=self.scenario.duration, trial=number, trials=total,
                          finished_trial_walls=self.run.trial_walls)
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


def _process_usage(hosts: list[Host]) -> dict[int, tuple[int, int, int]]:
    """(RSS, open fds, threads) of each host's process, by host index."""
    usage = {}
    for host in hosts:
        pid = host.pid
        if pid is None:
            continue
        try:
            process = psutil.Process(pid)
            with process.oneshot():
                usage[host.index] = (process.memory_info().rss, process.num_fds(), process.num_threads())
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
    usage = _process_usage(hosts)
    for host in hosts:
        if host.pid is not None and host.state == State.UP:
            save_deleted(host.pid, store)
    return usage, _cgroup_usage(hosts)


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
