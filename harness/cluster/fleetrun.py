"""A real fleet spread over a Dask cluster's machines (`--cluster` with a real fleet; docs/cluster.md).

The machine that ran the command keeps what a run has once: the store, the trial's clock and timeline, the
load (its driver, or driver workers, sending to every host wherever it runs), the balancer's fleet-wide view,
the per-second samples and the report. The hosts run on the workers' machines, placed by `fleet.placement`
(harness.plan.placement): for each trial, one Dask task per machine starts an agent there
(harness.cluster.machine) that runs that machine's hosts as a local trial runs its own, and streams back
what it sees. So:
- a host that dies on one machine leaves the driver's rotation at once (its machine's supervisor says so),
  and its share goes to the survivors on every machine, as on one machine;
- samples are made here from the driver's own counters, so they are exact; each host's usage (RSS, fds,
  threads, cgroup, shim counters) comes from its machine every second;
- crashes are recorded, their cores kept and triaged on the machine that wrote them; the crash row (with the
  in-flight count and hosts alive filled in here) and later its triage come back into the one store;
- `kind: machine-loss` stops a machine's agent at once: its watchdog SIGKILLs every host it runs, nothing
  more comes from there, and the driver finds out by itself (connections reset), as it would; a machine
  that goes silent or drops its link unplanned is recorded as a `machine-lost` event, never a silent gap.
"""

from __future__ import annotations

import math
import os
import pickle
import secrets
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trio

from harness.base.errors import HarnessError
from harness.cluster.connect import connect
from harness.cluster.shards import ShardPool
from harness.cluster.wire import Callbacks, local_address_towards
from harness.plan.placement import place_hosts
from harness.plan.streams import choose_machines
from harness.run.driverpool import Channel, resolve_workers
from harness.run.faults.network import NetFaults, armed_spans, describe, merge_summaries
from harness.run.faults.network.topology import DRIVER, LinkSpec, fault_links, host_names
from harness.run.fleet import FleetSupervisor, Host, State
from harness.run.options import RunOptions, RunResult
from harness.run.procs import Spawner
from harness.run.runner import Run
from harness.run.trial import Recorder, Trial, TrialFailed, _Listener
from harness.scenario.model import Scenario, Variant

CONNECT_TIMEOUT = 120.0     # for every machine's agent to call back (a Dask task, then a Python start-up)
SILENT_AFTER = 15.0         # a machine that sends nothing this long (it reports every second) is lost
FINAL_TIMEOUT = 300.0       # for a machine to stop its hosts and finish triaging its cores


def machine_task(address: str, port: int, token: bytes, machine: int, label: str) -> dict[str, Any]:
    """On a worker: this machine's agent for one trial, in a process of its own (it dies with the worker:
    PR_SET_PDEATHSIG). The worker's thread only waits for it."""
    env = {k: v for k, v in os.environ.items() if k != "MALLOC_TRIM_THRESHOLD_"}   # the nanny's, for itself
    # `label` (run/trial/machine) is there for ps: which run an agent belongs to
    child = subprocess.run([sys.executable, "-m", "harness.cluster.machine", str(os.getpid()), label],
                           input=pickle.dumps((address, port, token, machine)), capture_output=True, env=env,
                           check=False)
    tail = child.stderr.decode(errors="replace").strip().splitlines()[-5:]
    return {"returncode": child.returncode, "stderr": " | ".join(tail), "host": socket.gethostname()}


@dataclass
class Machine:
    number: int                      # 0-based, in the order of the workers' addresses
    worker: str                      # the Dask worker's address
    addr: str                        # where its hosts listen (the worker's host)
    hosts: list[int] = field(default_factory=list)
    channel: Channel | None = None
    future: Any = None
    outbox: Any = None
    inbox: Any = None
    done: bool = False
    lost: str | None = None          # "planned" | why it was lost unplanned
    lost_at: float | None = None
    heard: float = 0.0               # trio time of its last message
    ports: dict[int, int] = field(default_factory=dict)
    via: dict[LinkSpec, int] = field(default_factory=dict)   # its fault proxy's port for each link into its hosts
    network: dict[str, Any] | None = None                    # what its fault proxy did (at the trial's end)
    disarmed: dict[int, tuple[float, dict[str, int]]] = field(default_factory=dict)  # network fault -> its last
    # disarm here: when, and its proxy's counts for the fault then (all that is known of a machine lost later)
    offset: float = 0.0              # its agent's trio clock minus the command's (harness.cluster.fleetrun._clock_offsets)
    rtt: float = 0.0                 # the round trip the offsets were read in (their uncertainty: half of it)
    perf_offset: float = 0.0         # its CLOCK_MONOTONIC minus this machine's
    usage: dict[int, dict[str, Any]] = field(default_factory=dict)

    @property
    def label(self) -> str:
        return f"machine {self.number + 1} ({self.worker})"

    def describe(self) -> dict[str, Any]:
        return {"machine": self.number + 1, "worker": self.worker, "addr": self.addr, "hosts": self.hosts,
                "lost": self.lost, "lost_at": self.lost_at, "monotonic_offset_ms": round(self.perf_offset * 1e3, 3),
                "clock_rtt_ms": round(self.rtt * 1e3, 3)}


@dataclass
class RemoteHost(Host):
    """A host as seen from the command: its state, process and counters as its machine reports them."""

    machine: int = 0
    remote_pid: int | None = None

    @property
    def pid(self) -> int | None:      # the process on its machine (never looked up here)
        return self.remote_pid if self.state not in (State.DOWN, State.STOPPED) else None


class RemoteFleet(FleetSupervisor):
    """The fleet supervisor's surface (what the trial reads and does) over the machines' agents."""

    def __init__(self, trial: ClusterTrial, hosts: list[Host], machines: list[Machine], listener: _Listener):
        super().__init__(hosts, trial.scenario.target, None, trial.recorder, listener)  # type: ignore[arg-type]
        self.trial = trial
        self.machines = machines
        self.by_index = {h.index: h for h in hosts}
        self.loading = False          # the load has begun (a machine lost before that fails the trial's set-up)
        self.stopping = False         # the trial is over (or failed): machines are being stopped
        self._nursery: trio.Nursery | None = None
        # (host, pid) -> what the command saw when that incarnation's exit was reported: its requests in flight
        # and the hosts up then (a crash record comes up to a second later, in its machine's batch)
        self.gone_at: dict[tuple[int, int | None], dict[str, Any]] = {}

    # --- what the trial asks ----------------------------------------------------------------------

    def kill(self, host: Host, why: str, down_for: float) -> bool:
        machine = self.machines_by_number()[host.machine]   # type: ignore[attr-defined]
        if machine.lost or host.state not in (State.UP, State.PAUSED):
            return False
        machine.outbox.send_nowait(("kill", host.index, why, down_for))
        return True

    async def pause(self, host: Host, duration: float) -> bool:
        machine = self.machines_by_number()[host.machine]   # type: ignore[attr-defined]
        if machine.lost or host.state != State.UP:
            return False
        machine.outbox.send_nowait(("pause", host.index, duration))   # its machine records pause and resume
        return True

    def mark_alive_boundary(self) -> None:
        super().mark_alive_boundary()
        self.loading = True
        for machine in self.live():
            machine.outbox.send_nowait(("load", self.trial.recorder.t0))

    def machines_by_number(self) -> dict[int, Machine]:
        return {m.number: m for m in self.machines}

    def live(self) -> list[Machine]:
        return [m for m in self.machines if not m.lost and not m.done]

    def usage(self) -> tuple[dict[int, tuple[int, int, int]], dict[int, dict[str, Any]]]:
        """Each host's last reported usage, as the local sampler's (harness.run.trial._usage_and_objects)."""
        usage: dict[int, tuple[int, int, int]] = {}
        cgroups: dict[int, dict[str, Any]] = {}
        for machine in self.machines:
            if machine.lost:
                continue
            for index, report in machine.usage.items():
                if report.get("usage") is not None and self.by_index[index].pid is not None:
                    usage[index] = tuple(report["usage"])   # type: ignore[assignment]
                if report.get("cgroup") is not None:
                    cgroups[index] = report["cgroup"]
        return usage, cgroups

    def shim_snapshot(self, host: int) -> dict[str, Any] | None:
        machine = self.machines_by_number()[self.by_index[host].machine]   # type: ignore[attr-defined]
        return machine.usage.get(host, {}).get("shim")

    # --- running -------------------------------------------------------------------------------------

    async def run(self) -> None:
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                for machine in self.machines:
                    nursery.start_soon(self._send, machine)
                    nursery.start_soon(self._receive, machine)
                nursery.start_soon(self._watch_silence)
                nursery.start_soon(self._heartbeat)
        finally:
            self._nursery = None          # (what comes while the machines stop is handled in line)
            with trio.CancelScope(shield=True):
                await self._stop_all()

    async def _send(self, machine: Machine) -> None:
        assert machine.channel is not None
        async for message in machine.inbox:
            try:
                await machine.channel.send(message)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                return            # the receiver sees the link close

    async def _receive(self, machine: Machine) -> None:
        assert machine.channel is not None
        machine.heard = trio.current_time()
        while not machine.done:
            message = await machine.channel.receive()
            if message is None:
                if not machine.done and not machine.lost:
                    self.lose(machine, "its link to this machine closed")
                return
            machine.heard = trio.current_time()
            if machine.lost:
                continue                  # lost: what still arrives did not come from a live machine
            # handled whole even when the trial ends meanwhile: a batch's crash rows wait (boundedly) for the
            # shards' in-flight counts, and one cut off there was a crash seen but never recorded
            with trio.CancelScope(shield=True):
                await self._handle(machine, message)

    async def _handle(self, machine: Machine, message: Any) -> None:
        kind = message[0]
        recorder = self.recorder
        if kind == "ready":
            _, index, incarnation, pid = message
            host = self.by_index[index]
            host.incarnation, host.remote_pid = incarnation, pid   # type: ignore[attr-defined]
            host.state = State.UP
            self._alive_changed()
            self._ready_once[index].set()
            self.listener.host_ready(host)
        elif kind == "gone":
            _, index, incarnation, pid = message
            host = self.by_index[index]
            if host.state in (State.UP, State.PAUSED):
                host.state = State.DOWN
                self._host_went_down()
                self.listener.host_gone(host)
                if self._nursery is not None:     # (not while the fleet is being stopped at the end)
                    seen = self.gone_at[(index, pid)] = {"alive": self.up_count(), "settled": trio.Event()}
                    self._nursery.start_soon(self._settle, index, seen)
        elif kind == "alive":
            pass                          # a heartbeat: heard (above) is what counts
        elif kind == "started":
            _, failed, directory = message
            if failed and self.first_start_failed is None:
                hint = (f"; over --cluster a host must listen on its machine's address ({machine.addr}): write "
                        f"{{addr}} where the scenario says 127.0.0.1") if "accept connections" in failed else ""
                self.first_start_failed = f"{failed} (on {machine.label}){hint}"
                self.first_start_failed_dir = Path(directory) if directory else None
            for index in machine.hosts:
                self._ready_once[index].set()
        elif kind == "usage":
            machine.usage = message[1]
            before = self.alive_now()
            for index, report in message[1].items():
                host = self.by_index[index]
                host.state = State(report["state"])
                host.remote_pid = report["pid"]   # type: ignore[attr-defined]
                host.incarnation, host.restarts, host.crashes = report["incarnation"], report["restarts"], \
                    report["crashes"]
            if self.alive_now() != before:
                self._alive_changed()
        elif kind == "batch":
            _, events, crashes = message
            for event in events:
                if event["kind"] in ("fault-arm", "fault-disarm", "fault-window"):   # one window's, from several machines
                    event["detail"]["machine"] = machine.number + 1
                    if event["kind"] == "fault-disarm" and "counts" in event["detail"]:
                        machine.disarmed[event["detail"]["fault"]] = (event["t"], event["detail"]["counts"])
            recorder.events.extend(events)
            for record in crashes:
                await self.trial.remote_crash(machine, record)
        elif kind == "triage":
            await self.trial.run.store_call(self.trial.run.store.record_triage, message[1], message[2])
        elif kind == "core-dropped":
            await self.trial.run.store_call(self.trial.run.store.mark_core_dropped, message[1], message[2])
        elif kind == "say":
            line = message[1]
            print(line.replace("harness: ", f"harness: {machine.label}: ", 1) if line.startswith("harness: ")
                  else f"harness: {machine.label}: {line}", file=sys.stderr)
        elif kind == "failed":
            raise TrialFailed(f"{message[1]} (on {machine.label})")
        elif kind == "error":             # the agent cannot go on; it closes its link next
            if not self.loading:
                raise HarnessError(f"{machine.label}: {message[1]}")
            self.lose(machine, message[1])
        elif kind == "done":
            machine.network = message[2]
            for summary in message[1]:
                host = self.by_index[summary["host"]]
                host.restarts, host.crashes = summary["restarts"], summary["crashes"]
            machine.done = True

    async def _settle(self, index: int, seen: dict[str, Any]) -> None:
        """Every driver shard's requests in flight to the host when it went (harness.run.driverpool.settle)."""
        driver = self.trial.driver
        assert driver is not None
        try:
            await driver.settle(index)
        finally:
            # (also when the trial's end cancels the wait: what the shards had answered by then; the crash
            # row needs a number, a None there fails the store's write and the run with it)
            seen["inflight"] = max(driver.balancer.inflight[index], driver.lost_inflight[index])
            seen["settled"].set()

    async def _heartbeat(self) -> None:
        """Every second to every machine: an agent that hears nothing for a while stops its hosts itself."""
        while True:
            for machine in self.live():
                machine.outbox.send_nowait(("alive",))
            await trio.sleep(1.0)

    async def _watch_silence(self) -> None:
        """A machine that stops talking (powered off, partitioned: no FIN ever comes) is lost."""
        while True:
            await trio.sleep(1.0)
            now = trio.current_time()
            for machine in self.live():
                if now - machine.heard > SILENT_AFTER:
                    self.lose(machine, f"nothing heard from it for {SILENT_AFTER:g}s")

    def lose(self, machine: Machine, why: str, fault: int | None = None) -> None:
        """The machine is gone (planned: a machine-loss fault; else unplanned): its hosts are down, its driver
        shards' share goes to a standby here (harness.cluster.shards). Planned, the driver is not told: it finds
        out from its own connections, as it would. Unplanned, the hosts may still run (an agent stuck, a link
        cut): the driver is told they are gone, as they are recorded, and the link is closed (an agent that can
        still see it stops its hosts)."""
        if machine.lost:
            return
        planned = fault is not None
        if not planned and not self.loading and not self.stopping:
            raise HarnessError(f"{machine.label} was lost before the load began: {why}")
        machine.lost = "machine-loss" if planned else why
        machine.lost_at = round(self.recorder.now(), 6)
        hosts = []
        for index in machine.hosts:
            host = self.by_index[index]
            hosts.append(index)
            was_up = host.state in (State.UP, State.PAUSED)
            host.state = State.DOWN
            if was_up:
                self._host_went_down()
            host.kill_expected = machine.lost
            self._ready_once[index].set()
            if not planned:
                self.listener.host_gone(host)
        pool = self.trial.driver
        if isinstance(pool, ShardPool):
            pool.machine_lost(machine)
        if not planned and machine.channel is not None and self._nursery is not None:
            self._nursery.start_soon(machine.channel.aclose)
        if planned:
            machine.outbox.send_nowait(("lose",))
            self.recorder.event("machine-loss", None, None, happened_at=machine.lost_at, fault=fault,
                                machine=machine.number + 1, worker=machine.worker, hosts=hosts)
        else:
            self.recorder.event("machine-lost", None, None, happened_at=machine.lost_at,
                                machine=machine.number + 1, worker=machine.worker, hosts=hosts, why=why,
                                unplanned=True)
            print(f"harness: warning: {machine.label} was lost during the trial ({why}); its hosts "
                  f"({len(hosts)}) count as down from {machine.lost_at:.1f}s, the load goes on to the others",
                  file=sys.stderr)

    async def force_all(self) -> None:
        for machine in self.machines:
            if machine.channel is not None and not machine.lost and not machine.done:
                try:
                    await machine.channel.send(("force",))
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    pass

    async def _stop_all(self) -> None:
        """The trial ends: every live machine stops its hosts, sends its last batch and triage, then done."""
        self.stopping = True
        for machine in self.live():
            assert machine.channel is not None
            try:
                await machine.channel.send(("stop",))    # (the sender tasks are cancelled by now)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                pass
        with trio.move_on_after(FINAL_TIMEOUT) as scope:
            for machine in self.machines:
                while not machine.done and not machine.lost:
                    assert machine.channel is not None
                    message = await machine.channel.receive()
                    if message is None:
                        self.lose(machine, "its link closed while it stopped its hosts")
                        break
                    await self._handle(machine, message)
        if scope.cancelled_caught:
            for machine in self.live():
                self.lose(machine, f"it did not finish within {FINAL_TIMEOUT:g}s of the trial's end")


class ClusterTrial(Trial):
    run: ClusterRun    # type: ignore[assignment]

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.machines: list[Machine] = []

    async def _set_up(self) -> None:
        scenario, variant, number, run = self.scenario, self.variant, self.number, self.run
        placement = place_hosts(scenario, len(run.machines))
        self.machines = machines = [Machine(m.number, m.worker, m.addr) for m in run.machines]
        for index, where in enumerate(placement):
            machines[where].hosts.append(index)
        self.machines = machines = [m for m in machines if m.hosts]
        self.recorder = recorder = Recorder()
        try:
            await self._call_machines()
        except BaseException:
            with trio.CancelScope(shield=True):
                await self._release_machines()
            raise
        ports = [0] * scenario.fleet.hosts
        addrs = ["127.0.0.1"] * scenario.fleet.hosts
        via: dict[LinkSpec, int] = {}
        for machine in machines:
            for index, port in machine.ports.items():
                ports[index], addrs[index] = port, machine.addr
            via.update(machine.via)
        for machine in machines:
            # queued now, before anything else is (a driver shard's start, from the pool's serve)
            machine.outbox.send_nowait(("table", ports, addrs, machine.offset, via))
            machine.outbox.send_nowait(("start",))
            for crash in run.take_left_on(machine.addr):   # a stopped attempt's cores, triaged where they are
                machine.outbox.send_nowait(("triage", crash["uid"], crash["core_path"], crash["executable"] or ""))
        self.ports = ports
        names = host_names(scenario)
        groups = {index: group for group in scenario.host_groups for index in scenario.hosts_in((group.name,))}
        self.hosts = hosts = []
        for machine in machines:
            for index in machine.hosts:
                group = groups[index]
                hosts.append(RemoteHost(index=index, name=names[index], port=ports[index],
                                        dir=run.run_dir / "machines" / f"m{machine.number + 1}",
                                        argv=list(group.target.command), env={}, cwd=Path("/"), group=group.name,
                                        target=group.target, addr=machine.addr, machine=machine.number))
        hosts.sort(key=lambda h: h.index)
        # the driver's links that go through a fault proxy: to that proxy, on the host's machine
        driver_ports = [via.get(LinkSpec(DRIVER, h), port) for h, port in enumerate(ports)]
        if scenario.client.load_from == "machines":
            # client.workers shards on each machine (auto: one: this machine cannot count another's cores)
            per_machine = 1 if scenario.client.workers == "auto" else resolve_workers(scenario.client.workers)
            shards = {n: machine for n, machine in enumerate(m for m in machines for _ in range(per_machine))}
            self.workers = len(shards)
            self.driver = ShardPool(self, shards, target=scenario.target, client=scenario.client, ports=driver_ports,
                                    policy=scenario.fleet.balancer,
                                    expect_replies=[(h.target or scenario.target).expect_reply for h in hosts],
                                    seed=scenario.seed, spawner=self.spawner,
                                    log_dir=run.run_dir / "hosts" / f"t{number}", on_event=recorder.event,
                                    addrs=addrs)
        else:
            self.driver = self._local_driver(hosts, driver_ports, addrs)
        self.rotation = {h for g in scenario.host_groups if g.rotation for h in scenario.hosts_in((g.name,))}
        self.supervisor = RemoteFleet(self, hosts, machines, _Listener(self.driver, recorder, self.rotation))
        recorder.event("placement", None, None, placement=scenario.fleet.placement,
                       machines=[m.describe() for m in machines], **{"from": self.start_at})

    async def _call_machines(self) -> None:
        """One task per machine; each agent calls back, is given the trial and answers with its ports."""
        run, machines = self.run, self.machines
        assert run.callbacks is not None
        expected = {m.number: run.callbacks.expect() for m in machines}
        address, port = run.listen_address

        # A resumed trial's tasks have keys of their own: the interrupted attempt's task may still be running
        # there (its agent stopping its hosts), and Dask would take a key it knows for that task.
        attempt = f"-from{self.start_at}s-{secrets.token_hex(4)}" if self.resuming else ""

        def submit() -> None:
            for m in machines:
                m.future = run.client.submit(machine_task, address, port, expected[m.number][0], m.number,
                                             f"{run.run_id}/t{self.number}/m{m.number + 1}",
                                             workers=[m.worker], allow_other_workers=False, pure=False,
                                             key=f"harness-{run.run_id}-t{self.number}-m{m.number + 1}{attempt}")
        await trio.to_thread.run_sync(submit)
        deadline = trio.current_time() + CONNECT_TIMEOUT
        for m in machines:
            while m.channel is None:
                with trio.move_on_after(1.0):
                    _, m.channel = await expected[m.number][1].receive()
                    m.outbox, m.inbox = trio.open_memory_channel[Any](math.inf)
                if m.channel is None and m.future is not None and m.future.done():
                    why = await trio.to_thread.run_sync(_task_failure, m.future)
                    raise HarnessError(f"{m.label} could not start its hosts: {why}")
                if m.channel is None and trio.current_time() > deadline:
                    raise HarnessError(f"{m.label} did not call back within {CONNECT_TIMEOUT:g}s (can it reach "
                                       f"{address}:{port}?)")
        for m in machines:
            assert m.channel is not None
            await m.channel.send(("config", {
                "scenario": self.scenario, "variant": self.variant, "trial": self.number, "repeat": self.repeat,
                "total": self.total, "start_at": self.start_at if self.resuming else None, "hosts": m.hosts,
                "trial_dir": self.trial_dir(),
                "run_id": run.run_id, "run_dir": str(run.run_dir / "machines" / f"m{m.number + 1}"),
                "umask": self.spawner.child_umask, "addr": m.addr,
                "listen": run.listen_address}))
        for m in machines:
            assert m.channel is not None
            message = await m.channel.receive()
            if message is not None and message[0] == "error":
                raise HarnessError(f"{m.label}: {message[1]}")
            if message is None or message[0] != "ports":
                raise HarnessError(f"{m.label} closed its link before it chose its ports")
            m.ports, m.via = message[1], message[2]
            m.offset, m.perf_offset, m.rtt = await _clock_offsets(m.channel)

    def trial_dir(self) -> str:
        """The trial's folder under each machine's hosts/: a resumed attempt's is its own (t1-from12s), so what
        the interrupted one left on that machine (logs, cores, triage) stays as it was, whichever machine
        ran which host then."""
        return f"t{self.number}-from{self.start_at}s" if self.resuming else f"t{self.number}"

    async def remote_crash(self, machine: Machine, record: dict[str, Any]) -> None:
        """A crash record from a machine, completed here as harness.run.trial._on_crash does locally: the
        load at that moment is this driver's, the hosts alive are the fleet's, both as they were when the
        host's exit was reported (the record itself comes up to a second later)."""
        driver, supervisor = self.driver, self.supervisor
        assert driver is not None and isinstance(supervisor, RemoteFleet)
        index = record["host"]
        seen = supervisor.gone_at.pop((index, record.get("pid")), None)
        if seen is not None:
            with trio.move_on_after(5.0):
                await seen["settled"].wait()
            record["host_inflight"] = seen.get("inflight")    # None: not known (the shards did not answer)
            record["hosts_alive"] = seen["alive"]
        else:     # it was not up when it died (starting, or being stopped): nothing was in flight to it
            await driver.settle(index)
            record["host_inflight"] = max(driver.balancer.inflight[index], driver.lost_inflight[index])
            record["hosts_alive"] = supervisor.up_count()
        record.setdefault("detail", {})["machine"] = {"machine": machine.number + 1, "worker": machine.worker,
                                                      "addr": machine.addr}
        self.run.metrics.crash(self.hosts[index].name, record["executable"], record["signal_name"],
                               bool(record["core_path"]), self.variant.name)
        self.recorder.crash(record)

    def _more_faults(self, nursery: trio.Nursery, recorder: Recorder) -> None:
        if self.variant.faults and self.scenario.machine_losses:
            nursery.start_soon(self._machine_losses, recorder)
        if self.variant.faults and any(not fault_links(self.scenario, f) for f in self.scenario.net_faults):
            # a network fault with no link anywhere: its windows, said here as a local run says them
            # (no proxy: hosts=() opens no listener); the others are each machine's
            nursery.start_soon(NetFaults(self.scenario, self.ports, hosts=()).run, recorder.t0, recorder,
                               self.start_at)

    async def _machine_losses(self, recorder: Recorder) -> None:
        fleet = self.supervisor
        assert isinstance(fleet, RemoteFleet)
        for fault in sorted(self.scenario.machine_losses, key=lambda f: f.at):
            if fault.at < self.start_at:
                continue
            await trio.sleep_until(recorder.t0 + fault.at)
            candidates = [m.number for m in fleet.live()]
            chosen = choose_machines(self.scenario.seed, fault, candidates)
            if not chosen:
                named = f"machine {fault.machine + 1}" if fault.machine is not None else "no machine"
                recorder.event("machine-loss", None, None, fault=fault.index, machine=None, hosts=[],
                               note=f"{named} runs hosts of this trial any more (placement, or lost already)")
                print(f"harness: warning: faults[{fault.index}] (machine-loss at {fault.at:g}s): {named} runs "
                      f"hosts of this trial (placement, or lost already): nothing lost", file=sys.stderr)
            by_number = fleet.machines_by_number()
            for number in chosen:
                fleet.lose(by_number[number], "machine-loss", fault=fault.index)

    async def _host_usage(self, supervisor: FleetSupervisor) -> tuple[dict[int, tuple[int, int, int]],
                                                                      dict[int, dict[str, Any]]]:
        """Each host's usage as its machine last reported it (every second)."""
        assert isinstance(supervisor, RemoteFleet)
        return supervisor.usage()

    def _note_oom_kills(self, recorder: Recorder, hosts: list[Host], cgroups: dict[int, dict[str, Any]]) -> None:
        """Each machine notes its own hosts' (harness.cluster.machine)."""

    def _shim_snapshot(self, host: int) -> dict[str, Any] | None:
        fleet = self.supervisor
        return fleet.shim_snapshot(host) if isinstance(fleet, RemoteFleet) else None

    def _detail(self) -> dict[str, Any]:
        detail = super()._detail()
        detail["machines"] = [m.describe() for m in self.machines]
        detail["machines_from"] = self.start_at     # a resumed trial's machines: from the resumed second on
        network = self._network_detail()
        if network is not None:
            detail["network"] = network
        return detail

    def _network_detail(self) -> dict[str, Any] | None:
        """What every machine's fault proxy did. A machine lost takes its proxy's counts with it: of such a
        machine, what its last disarm of each fault said, and for each fault with links there, from when its
        counts there are unknown."""
        if not self.scenario.net_faults and not any(m.via for m in self.machines):
            return None
        summaries = []
        unknown: dict[int, list[dict[str, Any]]] = {}
        for machine in self.machines:
            if machine.network is not None:
                for link in machine.network["links"].values():
                    link["machine"] = machine.number + 1       # where that link's proxy ran
                summaries.append(machine.network)
                continue
            summaries.append({"faults": {str(i): counts for i, (_, counts) in machine.disarmed.items()},
                              "links": {}})
            for fault in self.scenario.net_faults:
                known = machine.disarmed.get(fault.index)
                if set(fault_links(self.scenario, fault)) & set(machine.via) and \
                        _unreported(fault, self.scenario.duration, machine.lost_at, known[0] if known else None):
                    unknown.setdefault(fault.index, []).append({
                        "machine": machine.number + 1, "lost_at": machine.lost_at,
                        "known_until": known[0] if known is not None else None})
        network = merge_summaries(summaries)
        for fault in self.scenario.net_faults:
            counts = network["faults"].get(str(fault.index), {})
            network["faults"][str(fault.index)] = {"kind": fault.kind, "label": describe(fault), **counts,
                                                   **({"unknown": unknown[fault.index]} if fault.index in unknown
                                                      else {})}
        return network

    async def _wrap_up(self, began: float) -> None:
        try:
            await super()._wrap_up(began)
        finally:
            await self._release_machines()

    async def _release_machines(self) -> None:
        """Every machine's task ended (its agent exits once its link closes; a lost one's was killed)."""
        for machine in self.machines:
            if machine.channel is not None:
                await machine.channel.aclose()
        futures = [m.future for m in self.machines if m.future is not None]
        if not futures:
            return

        def settle() -> list[str]:
            deadline = time.monotonic() + 30
            while not all(f.done() for f in futures) and time.monotonic() < deadline:
                time.sleep(0.1)
            late = [f for f in futures if not f.done()]
            if late:      # its agent, if it still runs, stops once its link is closed or silent
                self.run.client.cancel(late)
            # what the agents of machines lost unplanned said last, when their task ended
            return [f"{m.label}: {_task_failure(m.future)}" for m in self.machines
                    if m.lost and m.lost != "machine-loss" and m.future is not None and m.future.done()]
        try:
            last_words = await trio.to_thread.run_sync(settle)
        except Exception as exc:     # noqa: BLE001 - the cluster itself may be what failed
            last_words = [f"the cluster could not say how the machines' tasks ended: {exc!r}"]
        for words in last_words:
            print(f"harness: note: {words}", file=sys.stderr)


def _unreported(fault: Any, duration: float, lost_at: float | None, known_until: float | None) -> bool:
    """Whether a machine lost at `lost_at` may have done more for a network fault than its last disarm there
    (at `known_until`) said: a window of the fault began before the loss and was not disarmed there by then."""
    if lost_at is None:
        return True
    return any(start < lost_at and (known_until is None or end - known_until > 0.1 or end >= duration)
               for start, end in armed_spans(fault, duration))


PINGS = 8


async def _clock_offsets(channel: Channel) -> tuple[float, float, float]:
    """(its trio clock - ours, its CLOCK_MONOTONIC - ours), from the quickest of a few round trips (as NTP
    does: the answer was read half-way through the round trip); good to a fraction of a millisecond on a LAN.
    Everything a machine records is on the trial's clock through this."""
    best: tuple[float, float, float] | None = None
    for _ in range(PINGS):
        sent, sent_perf = trio.current_time(), time.perf_counter()
        await channel.send(("ping",))
        reply = await channel.receive()
        if reply is None or reply[0] != "pong":
            raise HarnessError("a machine's agent closed its link while its clock was read")
        back, back_perf = trio.current_time(), time.perf_counter()
        candidate = (back - sent, reply[1] - (sent + back) / 2, reply[2] - (sent_perf + back_perf) / 2)
        if best is None or candidate[0] < best[0]:
            best = candidate
    assert best is not None
    return best[1], best[2], best[0]


def _task_failure(future: Any) -> str:
    if future.status == "cancelled":
        return ("its task was cancelled: its agent had not ended 30s after the trial (it stops its hosts itself "
                "once it hears nothing from this machine for 30s)")
    try:
        if future.status == "error":
            return repr(future.exception(timeout=5))
        result = future.result(timeout=5)
        return f"its agent exited {result['returncode']} on {result['host']}: {result['stderr'] or 'no output'}"
    except Exception as exc:       # noqa: BLE001 - whatever Dask says, said in one line
        return repr(exc)


@dataclass(frozen=True)
class MachineSpec:
    number: int
    worker: str
    addr: str


class ClusterRun(Run):
    def __init__(self, scenario: Scenario, options: RunOptions, client: Any, address: str):
        super().__init__(scenario, options)
        self.client = client
        self.address = address
        workers = client.scheduler_info()["workers"]
        self.machines = [MachineSpec(n, worker, info.get("host") or worker.split("://")[-1].rsplit(":", 1)[0])
                         for n, (worker, info) in enumerate(sorted(workers.items()))]
        past = options.resumed_from(scenario)
        for fault in scenario.machine_losses:
            if fault.machine is not None and fault.machine >= len(self.machines) and fault.at >= past:
                raise HarnessError(f"{scenario.file}: faults[{fault.index}].machine: machine {fault.machine + 1}, but "
                                   f"the cluster at {address} has {len(self.machines)} worker(s)")
        self.callbacks: Callbacks | None = None
        self.listen_address = ("", 0)
        self.left_on_machines: list[dict[str, Any]] = []   # cores a stopped attempt left untriaged on machines

    def _triage_left(self, crash: dict[str, Any]) -> None:
        """A core kept on a machine is triaged there, by the agent a resumed trial starts at that address."""
        if crash.get("machine"):
            self.left_on_machines.append(crash)
        else:
            super()._triage_left(crash)

    def take_left_on(self, addr: str) -> list[dict[str, Any]]:
        taken = [c for c in self.left_on_machines if c["machine"].get("addr") == addr]
        self.left_on_machines = [c for c in self.left_on_machines if c not in taken]
        return taken

    async def execute(self) -> RunResult:
        host = await trio.to_thread.run_sync(local_address_towards, self.address)
        listeners = await trio.open_tcp_listeners(0, host=host)
        self.callbacks = Callbacks(listeners[0])
        self.listen_address = (host, listeners[0].socket.getsockname()[1])
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self.callbacks.serve)
                result = await super().execute()
                nursery.cancel_scope.cancel()
            for crash in self.left_on_machines:   # no trial ran hosts at its machine's address
                machine = crash["machine"]
                print(f"harness: note: the core of crash {crash['uid']} is kept on machine m{machine.get('machine')} "
                      f"({machine.get('addr')}) at {crash['core_path']}; no worker of this cluster at that address "
                      f"ran hosts, so it is left untriaged", file=sys.stderr)
            return result
        finally:
            for listener in listeners:
                await listener.aclose()

    def _new_trial(self, number: int, variant: Variant, repeat: int, spawner: Spawner, total: int,
                   start_at: int | None) -> Trial:
        return ClusterTrial(self, number, variant, repeat, spawner, total, start_at=start_at)

    def _kill_hosts(self) -> None:
        """A second Ctrl-C: the machines SIGKILL their hosts too, and stop triaging."""
        super()._kill_hosts()
        fleet = self.trial.supervisor if self.trial is not None else None
        if isinstance(fleet, RemoteFleet):
            trio.lowlevel.spawn_system_task(fleet.force_all)


def run_fleet_on_cluster(scenario: Scenario, options: RunOptions, address: str) -> RunResult:
    client = connect(address)
    try:
        run = ClusterRun(scenario, options, client, address)
        return trio.run(run.execute)
    finally:
        client.close()
