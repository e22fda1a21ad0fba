"""One machine's share of a real fleet spread over a cluster: its hosts, their faults, cores and triage.

A Dask task on the worker (harness.cluster.fleetrun.machine_task) starts this module as a process of its
own, `python -m harness.cluster.machine PARENT_PID RUN/TRIAL/MACHINE`, with the command's address, port, the machine's number
and its token on stdin. It connects back (harness.cluster.wire) and runs, for one trial, what a local trial
runs for its hosts (harness.run.trial: the same supervisor, restart policy, readiness, proof of what runs,
fault shim, log caps, core collection), with the trial's clock taken from the command's, and everything it
records sent back: host changes at once (the command's balancer moves a dead host's share to the survivors
on every machine), events and crash records every second, each host's usage every second, the triage of
each core once this machine has done it (the core stays here, where it was written).

The conversation (command -> machine / machine -> command):
  config {scenario, variant, trial, hosts...}  -> ports {host: port}, {link: port}   (free ports here for its
                                                   hosts, and its fault proxy's for the links into them)
  table (every host's port and address, every   (each host's templates may name hosts on other machines)
         link's proxy port)
  start                                         -> ready / gone (host, incarnation, pid) as they happen,
                                                   started (when each host was ready once, or failed)
  load (trial time 0 on the command's clock)    -> usage (every second), batch (events, crashes),
  kill / pause (a host-loss on one of its hosts)   triage, core-dropped, say (warnings for the user)
  stop                                          -> the last batch and triage, then done
  lose (machine-loss)                           -> nothing: this process exits at once and its watchdog
                                                   SIGKILLs every host it runs (harness.run.reaper)
"""

from __future__ import annotations

import ctypes
import math
import os
import pickle
import signal
import stat
import sys
import time
from pathlib import Path
from typing import Any

import trio

from harness.base.errors import HarnessError
from harness.base.safefs import open_trusted_dir
from harness.cluster.wire import dial, dial_socket
from harness.present.prometheus import Metrics
from harness.run.driverpool import LINK_ENV, Channel, worker_env
from harness.run.fleet import FleetSupervisor, Host, assign_ports, plan_fleet
from harness.run.faults.network import NetFaults
from harness.run.faults.network.topology import LinkSpec, backends
from harness.run.hostprep import HostPrep
from harness.run.faults.resources import ResourceFaults
from harness.run.options import RunOptions
from harness.run.procs import Child, Spawner, stop, wait_exit
from harness.run.runner import Run
from harness.run.trial import Recorder, Trial, TrialFailed, _usage_and_objects, leaf
from harness.collect.objects import ObjectStore

PR_SET_PDEATHSIG = 1
USAGE_INTERVAL = 1.0
LINK_TIMEOUT = 30.0      # the command sends a heartbeat every second while the fleet runs
SETUP_TIMEOUT = 300.0    # before that it may wait for the slowest machine to call back


class ForwardingStore:
    """Stands in for the run store here: what the trial writes goes to the command, which owns the store."""

    def __init__(self, outbox: trio.MemorySendChannel[Any]):
        self.outbox = outbox

    def write_batch(self, trial: int, **batch: Any) -> None:
        self.outbox.send_nowait(("batch", batch["events"], batch["crashes"]))

    def record_triage(self, uid: str, result: dict[str, Any]) -> None:
        self.outbox.send_nowait(("triage", uid, result))

    def mark_core_dropped(self, uid: str, why: str) -> None:
        self.outbox.send_nowait(("core-dropped", uid, why))

    def rollup(self, *args: Any) -> None:
        """Samples are the command's: nothing is rolled up here."""


class MachineRun(Run):
    """What a trial here uses of its run: the command's run id, this machine's folder, the forwarding store,
    the triage of cores (here, one at a time, as a local run does)."""

    def __init__(self, scenario: Any, run_id: str, run_dir: Path, store: ForwardingStore):
        super().__init__(scenario, RunOptions(out_dir=run_dir.parent, status=False))
        self.run_id = run_id
        self.run_dir = run_dir
        self.objects = ObjectStore(run_dir / "objects")
        self.store = store  # type: ignore[assignment]
        self.metrics = Metrics(run_dir / "metrics.prom")     # counted by the command; never served here

    async def store_call(self, fn: Any, *args: Any, **kwargs: Any) -> None:
        fn(*args, **kwargs)      # a message queued to the command: no disk, no thread


class _NoDriver:
    """The load is the command's: a crash record's in-flight count is filled in there."""

    class _Balancer:
        def __init__(self, hosts: int):
            self.inflight = [0] * hosts

    def __init__(self, hosts: int):
        self.balancer = self._Balancer(hosts)
        self.lost_inflight = [0] * hosts

    async def settle(self, host: int) -> None:
        pass


class _Relay:
    """The supervisor's host changes, sent to the command at once."""

    def __init__(self, outbox: trio.MemorySendChannel[Any]):
        self.outbox = outbox

    def host_ready(self, host: Host) -> None:
        self.outbox.send_nowait(("ready", host.index, host.incarnation, host.pid))

    def host_gone(self, host: Host) -> None:
        # the pid of the process that went (reaped by now: host.pid is None), which its crash record names
        pid = host.child.pid if host.child is not None else None
        self.outbox.send_nowait(("gone", host.index, host.incarnation, pid))


class MachineTrial(Trial):
    def __init__(self, run: MachineRun, config: dict[str, Any], spawner: Spawner,
                 outbox: trio.MemorySendChannel[Any]):
        super().__init__(run, config["trial"], config["variant"], config["repeat"], spawner, config["total"],
                         start_at=config["start_at"])
        self.mine: list[int] = config["hosts"]
        self.outbox = outbox
        self.offset = 0.0      # this machine's trio clock minus the command's CLOCK_MONOTONIC
        self._fleet_done = trio.Event()
        self.watch_scope = trio.CancelScope()     # the wait for a force once the fleet is stopping
        self.listen: tuple[str, int] = config["listen"]
        self.addr: str = config["addr"]            # this machine's address, where its hosts and proxy listen
        self.nets: dict[int, Any] = {}             # isolation: netns: a namespace per host of such a group
        self.shards: list[Child] = []      # driver shards started here
        self.trial_dir: str = config.get("trial_dir", f"t{self.number}")   # a resumed attempt's is its own
        taken = 1      # (resumed from the same second twice: the second attempt's is its own too)
        while self.resuming and (run.run_dir / "hosts" / self.trial_dir).exists():
            taken += 1
            self.trial_dir = f"{config.get('trial_dir')}-{taken}"

    async def prepare(self) -> tuple[dict[int, int], dict[LinkSpec, int]]:
        """Before the fleet is planned: a port for each of its hosts (a namespaced host's fixed one), and the
        fault proxy for every link into them, listening on this machine's address (a link's proxy runs beside
        the host it leads to, wherever its clients are): the ports the other machines' hosts and the driver
        are given."""
        scenario = self.scenario
        ports = [0] * scenario.fleet.hosts
        for index, port in zip(self.mine, assign_ports(len(self.mine))):
            ports[index] = port
        self.nets = await self._networks(ports, self.spawner, only=set(self.mine))
        if scenario.net_faults or self.nets:
            upstream = [self.nets[h].inner_ip if h in self.nets else self.addr for h in range(len(ports))]
            self.net = NetFaults(scenario, ports, upstream, hosts=set(self.mine), listen=self.addr,
                                 says_unlinked=False)    # (the command says those)
        return {h: ports[h] for h in self.mine}, self.net.proxy.via() if self.net is not None else {}

    async def plan(self, ports: list[int], addrs: list[str], via: dict[LinkSpec, int]) -> None:
        """This machine's hosts, as Trial._set_up plans a local fleet, with the resource faults' cgroup limits
        on them. `addrs`: each host's machine, where it (or its links' proxy: `via`) listens."""
        scenario, variant, number, spawner = self.scenario, self.variant, self.number, self.spawner
        self.ports = ports
        own = [self.nets[h].inner_ip if h in self.nets else addr for h, addr in enumerate(addrs)]
        hosts = self.hosts = plan_fleet(scenario.host_groups, variant, self.run.run_dir / "hosts" / self.trial_dir,
                                        ports=ports, addrs=own, only=set(self.mine),
                                        backends=backends(scenario, ports, via, addrs=addrs, proxy_addrs=addrs))
        self._isolate(hosts, number, spawner, self.nets)
        self.recorder = recorder = Recorder()
        if scenario.resource_faults and variant.faults:   # cgroup limits on this machine's hosts
            mine = {h.index: h for h in hosts}
            limits = self.limits = ResourceFaults(scenario, mine)  # type: ignore[arg-type]
            limits.targets = {f: [h for h in hs if h in mine] for f, hs in limits.targets.items()}
            for detail in await trio.to_thread.run_sync(limits.initial, self.start_at):
                recorder.event("fault-disarm" if detail.pop("disarm", False) else "fault-arm", None, None, **detail)
        self.shim = await self._prepare_shim(hosts)
        if self.shim is not None:   # a fault's hosts on other machines are armed there
            self.shim.targets = {f: [h for h in hs if h in self.shim.files] for f, hs in self.shim.targets.items()}
        from harness.run.logsink import LogPump
        pump = self.pump = LogPump()
        for host in hosts:
            host.logs = pump.attach(host.dir, (host.target or scenario.target).log_max)
        self.driver = _NoDriver(len(ports))  # type: ignore[assignment]
        self.supervisor = FleetSupervisor(hosts, scenario.target, spawner, self.recorder, _Relay(self.outbox),
                                          on_crash=self._on_crash, prep=HostPrep(scenario), prove=self._prove)

    def by_index(self, index: int) -> Host | None:
        return next((h for h in self.hosts if h.index == index), None)

    async def serve(self, channel: Channel, outer: trio.Nursery) -> None:
        """Until the command says stop (or is gone): the fleet, its faults, usage and batches; then the fleet
        stopped as at the end of a local trial, while a second Ctrl-C there can still make it quick (force)."""
        supervisor = self.supervisor
        assert supervisor is not None
        recorder = self.recorder
        async with trio.open_nursery() as nursery:
            if self.net is not None:
                await nursery.start(self.net.proxy.serve)    # before any host: frontends connect through it
            fleet_scope = trio.CancelScope()
            nursery.start_soon(self._fleet, supervisor, fleet_scope)
            nursery.start_soon(self._say_started, supervisor)
            nursery.start_soon(_beat, self.outbox)
            while True:
                message = await heard(channel, LINK_TIMEOUT)
                if message is None:            # the command is gone (or silent): stop everything here, and
                    self._leave_triage()       # leave the cores untriaged (a resume triages them: not twice)
                    break
                kind = message[0]
                if kind == "load":
                    self._clock(message[1])
                    supervisor.mark_alive_boundary()
                    # what happened in the set-up (starts, proofs) goes now: a machine lost in the first
                    # second would take it with it
                    await self._flush(self.number, recorder)
                    nursery.start_soon(self._writer, self.number, recorder)
                    nursery.start_soon(self._usage, supervisor)
                    if self.shim is not None and self.variant.faults:
                        nursery.start_soon(self.shim.run, recorder.t0, recorder, float(self.start_at))
                    if self.limits is not None:
                        nursery.start_soon(self.limits.run, recorder.t0, recorder, self.start_at)
                    if self.net is not None and self.variant.faults:
                        nursery.start_soon(self.net.run, recorder.t0, recorder, self.start_at)
                elif kind == "kill":
                    _, index, why, down_for = message
                    host = self.by_index(index)
                    if host is not None:
                        supervisor.kill(host, why, math.inf if down_for is None else down_for)
                elif kind == "pause":
                    host = self.by_index(message[1])
                    if host is not None:
                        nursery.start_soon(supervisor.pause, host, message[2])
                elif kind == "driver":
                    await self._start_shard(message[1], message[2])
                elif kind == "triage":     # a core a stopped attempt kept here, never triaged (resume)
                    self._triage_left(*message[1:])
                elif kind == "stop":
                    outer.start_soon(self._until_forced, channel)
                    break
                elif kind == "alive":
                    pass
                elif kind == "force":      # a second Ctrl-C there before the stop reached here
                    self.force()
                elif kind == "lose":
                    # machine-loss: gone at once, without a word; the spawner's watchdog sees this process
                    # die and SIGKILLs every host it started, as a machine losing power takes them all
                    os._exit(0)
            if self.shim is not None:
                self.shim.finish(recorder)
            fleet_scope.cancel()              # hosts stopped as at the end of a local trial
            await self._fleet_done.wait()
            nursery.cancel_scope.cancel()

    def _triage_left(self, uid: str, core: str, executable: str) -> None:
        """A core a stopped attempt kept here: triaged if it is still a regular file in this run's folder on
        this machine (its retention may remove or compress it afterwards: nothing else is touched)."""
        path = Path(core)
        try:
            inside = path.resolve().is_relative_to(self.run.run_dir.resolve()) and \
                stat.S_ISREG(os.lstat(path).st_mode)
        except OSError:
            inside = False
        if inside:
            self.run.triage_later(uid, path, Path(executable))
        else:
            print(f"harness: note: the core of crash {uid} is not at {core} in this run's folder on this machine "
                  f"any more: left untriaged", file=sys.stderr)

    def _leave_triage(self) -> None:
        """The command is gone: the cores not triaged yet stay where they were kept, for a resume to triage."""
        if self.run._triage_nursery is not None:
            self.run._triage_nursery.cancel_scope.cancel()

    async def _until_forced(self, channel: Channel) -> None:
        """While the hosts stop and the cores are triaged: the command's second Ctrl-C (force)."""
        with self.watch_scope:
            while True:
                message = await channel.receive()
                if message is None:            # the command is gone: nobody to tell the triage to
                    self._leave_triage()
                    return
                if message[0] == "force":
                    self.force()
                    return

    def force(self) -> None:
        """No more grace: every host SIGKILLed now, triage left (its cores stay where they were kept)."""
        supervisor = self.supervisor
        assert supervisor is not None
        supervisor.forced = True
        for host in self.hosts:
            if host.child is not None and not host.child.reaped:
                host.child.signal_group(signal.SIGKILL)
        if self.run._triage_nursery is not None:
            self.run._triage_nursery.cancel_scope.cancel()

    async def _start_shard(self, token: bytes, number: int) -> None:
        """A driver shard here (harness.cluster.shards): it calls the command back itself; its control socket is
        the connection this process opened for it."""
        address, port = self.listen
        log = self.run.run_dir / f"driver-shard-{number}.log"
        try:
            sock = await trio.to_thread.run_sync(dial_socket, address, port, token, number)
        except OSError as exc:
            print(f"harness: warning: driver shard {number} cannot reach {address}:{port}: {exc}", file=sys.stderr)
            return
        try:
            env = worker_env()
            env.pop("MALLOC_TRIM_THRESHOLD_", None)
            env[LINK_ENV] = token.hex()    # its link is sealed too (root-only: /proc/PID/environ is 0400)
            self.shards.append(await self.spawner.spawn(
                [sys.executable, "-m", "harness.run.driverworker", str(sock.fileno())], cwd=self.run.run_dir,
                env=env, stdout=log, stderr=log, pass_fds=(sock.fileno(),)))
        finally:
            sock.close()

    async def _fleet(self, supervisor: FleetSupervisor, scope: trio.CancelScope) -> None:
        try:
            with scope:
                await supervisor.run()
        finally:
            self._fleet_done.set()

    async def _say_started(self, supervisor: FleetSupervisor) -> None:
        await supervisor.wait_all_started()
        self.outbox.send_nowait(("started", supervisor.first_start_failed,
                                 str(supervisor.first_start_failed_dir) if supervisor.first_start_failed_dir else None))

    def _clock(self, t0_command: float) -> None:
        """Trial time 0, given on the command's CLOCK_MONOTONIC, on this process's trio clock."""
        recorder = self.recorder
        shift = t0_command + self.offset - recorder.t0
        for item in recorder.events + recorder.crashes:   # what happened before the load: earlier times
            item["t"] = round(item["t"] - shift, 6)
        recorder.t0 = t0_command + self.offset
        recorder.wall0 = time.time() - (trio.current_time() - recorder.t0)
        recorder.next_second = self.start_at

    async def _usage(self, supervisor: FleetSupervisor) -> None:
        """Every second: each host's state, process and cgroup usage, what the shim injected; OOM kills of a
        host's other processes as events (as the local sampler notes them)."""
        while True:
            await trio.sleep(USAGE_INTERVAL)
            usage, cgroups = await trio.to_thread.run_sync(_usage_and_objects, supervisor.hosts, self.run.objects)
            self._note_oom_kills(self.recorder, supervisor.hosts, cgroups)
            self.outbox.send_nowait(("usage", {h.index: {
                "state": h.state.value, "pid": h.pid, "incarnation": h.incarnation, "restarts": h.restarts,
                "crashes": h.crashes, "usage": usage.get(h.index), "cgroup": cgroups.get(h.index),
                "shim": self._shim_snapshot(h.index)} for h in supervisor.hosts}))

    async def finish(self) -> None:
        """After the fleet stopped: the hosts' last output, what they wrote over their caps, the last batch;
        namespaces and cgroups released."""
        for shard in self.shards:    # each exits once the command closes its link
            with trio.move_on_after(10.0):
                await wait_exit(shard)
            await stop(shard, grace=2.0)
        if self.pump is not None:
            await trio.to_thread.run_sync(self.pump.close)
        self._log_overflow(self.recorder, self.hosts)
        await self._flush(self.number, self.recorder)
        await self._release_hosts()


class _Say:
    """This process's warnings (stderr) go to the command, which prints them for the user."""

    def __init__(self, outbox: trio.MemorySendChannel[Any]):
        self.outbox = outbox

    def write(self, text: str) -> int:
        for line in text.splitlines():
            if line.strip():
                try:
                    self.outbox.send_nowait(("say", line))
                except (trio.ClosedResourceError, trio.WouldBlock, RuntimeError):
                    sys.__stderr__.write(line + "\n")
        return len(text)

    def flush(self) -> None:
        pass

    def isatty(self) -> bool:
        return False


async def _hold_triage(run: MachineRun, trial_over: trio.Event, triage_over: trio.Event, *,
                       task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
    try:
        async with trio.open_nursery() as triage:
            run._triage_nursery = triage
            task_status.started()
            await trial_over.wait()
    finally:
        triage_over.set()


async def _sender(channel: Channel, outbox: trio.MemoryReceiveChannel[Any]) -> None:
    async for message in outbox:
        try:
            await channel.send(message)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            return


async def heard(channel: Channel, timeout: float) -> Any:
    """The command's next message; None when it closed the link or said nothing for `timeout` (it sends a
    heartbeat every second once the fleet runs: a partition, or a command that is gone)."""
    with trio.move_on_after(timeout):
        return await channel.receive()
    return None


async def _beat(outbox: trio.MemorySendChannel[Any]) -> None:
    """Every second: this machine is alive (the command takes a machine silent for a while as lost)."""
    while True:
        outbox.send_nowait(("alive",))
        await trio.sleep(1.0)


async def agent(address: str, port: int, token: bytes, machine: int) -> None:
    channel = await dial(address, port, token, machine)
    message = await heard(channel, SETUP_TIMEOUT)
    if message is None or message[0] != "config":
        return
    config = message[1]
    try:
        await _run(channel, config)
    except Exception as group:    # said to the command in one line, which says it to the user
        exc = leaf(group)
        if isinstance(exc, HarnessError):
            why = str(exc)
        elif isinstance(exc, OSError):
            why = f"{exc.strerror or exc} ({exc.filename or 'no file'})"
        else:                     # a bug: the traceback goes to the task's stderr, the gist to the user
            why = f"the agent failed: {exc!r}"
        try:
            await channel.send(("error", why))
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        raise
    finally:
        await channel.aclose()


async def _run(channel: Channel, config: dict[str, Any]) -> None:
    outbox_send, outbox_receive = trio.open_memory_channel[Any](math.inf)
    run_dir = Path(config["run_dir"])
    # made as the run folder is on the command's machine: every folder on the way trusted, 0700
    os.close(open_trusted_dir(run_dir, create=True, what="this machine's folder for the run"))
    run = MachineRun(config["scenario"], config["run_id"], run_dir, ForwardingStore(outbox_send))
    spawner = Spawner()
    spawner.child_umask = config.get("umask", 0o022)
    sys.stderr = _Say(outbox_send)  # type: ignore[assignment]
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_sender, channel, outbox_receive)
            trial_over, triage_over = trio.Event(), trio.Event()
            # The triage of cores in a nursery of its own, held open until the trial is over and then until
            # every core is triaged: a second Ctrl-C (force) cancels it alone, not the trial around it.
            await nursery.start(_hold_triage, run, trial_over, triage_over)
            try:
                trial = MachineTrial(run, config, spawner, outbox_send)
                outbox_send.send_nowait(("ports", *await trial.prepare()))
                table = await heard(channel, SETUP_TIMEOUT)
                while table is not None and table[0] == "ping":      # the command reads this machine's clocks
                    outbox_send.send_nowait(("pong", trio.current_time(), time.perf_counter()))
                    table = await heard(channel, SETUP_TIMEOUT)
                if table is None or table[0] != "table":
                    raise HarnessError("the command closed the link before the fleet was planned")
                trial.offset = table[3]
                await trial.plan(table[1], table[2], table[4])
                start = await heard(channel, SETUP_TIMEOUT)
                if start is None or start[0] != "start":
                    raise HarnessError("the command closed the link before the fleet started")
                try:
                    await trial.serve(channel, nursery)
                except* TrialFailed as group:    # the proof contradicts the variant: the trial cannot stand
                    outbox_send.send_nowait(("failed", str(leaf(group))))
                await trial.finish()
            finally:
                trial_over.set()
            await triage_over.wait()
            # every core triaged (or left, forced): its triage went out as each was done
            outbox_send.send_nowait(("done", [{"host": h.index, "restarts": h.restarts,
                                               "crashes": h.crashes} for h in trial.hosts],
                                     trial.net.summary() if trial.net is not None else None))
            outbox_send.close()
            trial.watch_scope.cancel()
    finally:
        sys.stderr = sys.__stderr__
        await trio.to_thread.run_sync(spawner.close)


def main() -> int:
    parent = int(sys.argv[1]) if len(sys.argv) == 3 and sys.argv[1].isdigit() else -1
    # dies with the worker's task that started it (a lost worker leaves no agent behind)
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent:
        return 70
    address, port, token, machine = pickle.loads(sys.stdin.buffer.read())
    os.umask(0o077)
    try:
        trio.run(agent, address, port, token, machine)
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
