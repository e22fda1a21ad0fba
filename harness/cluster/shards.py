"""The load sent from the machines that run the hosts (`client.load_from: machines`, the default over
--cluster): a driver shard on each machine.

A shard is one of harness.run.driverpool's driver workers (harness.run.driverworker, unchanged) that runs on a
machine: the machine's agent dials the command's listener with the shard's token and starts the worker
process with that connected socket as its control socket. The command's pool talks to it as to a local
worker: the same seeded split of the arrival stream (shard w of W keeps the arrivals assigned to w), the same
host changes broadcast to every shard (a dead host's share moves to the survivors, wherever they run), the
same per-second counters merged exactly. Only the clock differs: each shard's start is given on its own
machine's CLOCK_MONOTONIC (the agent measured the offset when it was given the trial).

A lost machine takes its shard with it. Its share of the arrivals is not lost with it: a standby shard on the
command's machine (started with the others, idle, connected to no host) takes the lost shard's number,
connects to the hosts up and sends that share from the moment of the loss on (the plan's `start_at`, as a
resumed run continues); a second loss starts another one here (a Python start-up: about a second, those
arrivals going out late, their lateness in the send lag). What the lost shard had counted since its last report is gone with it: those seconds'
samples count only what the other shards saw, and the `driver-takeover` event says which seconds.
"""

from __future__ import annotations

import time
from dataclasses import replace
from typing import TYPE_CHECKING, Any

import trio

from harness.base.errors import HarnessError
from harness.plan.streams import PlanSpec
from harness.run.driverpool import READY_TIMEOUT, DriverPool, Worker

if TYPE_CHECKING:
    from harness.cluster.fleetrun import ClusterTrial, Machine

IDLE = 1 << 62        # a standby's first second: it reports none until it takes over
LOSS_GRACE = 20.0     # a shard's link closed: how long its machine has to be found lost (else it is an error)


class ShardPool(DriverPool):
    def __init__(self, trial: ClusterTrial, shards: dict[int, Machine], **pool: Any):
        super().__init__(workers=len(shards), **pool)
        self.trial = trial
        self.machine_of = shards                 # shard number -> the machine it runs on
        self.local: set[int] = set()             # ids of the Worker objects running here (takeovers)
        self._plan: PlanSpec | None = None
        self.standby: Worker | None = Worker(len(shards))     # here, idle until a shard is lost
        self.standby.first_second = IDLE
        self.local.add(id(self.standby))
        self.workers.append(self.standby)
        # its own row in the fleet-wide view, neutral (in rotation everywhere, nothing in flight) while idle
        self.balancer.per_worker_rotation.append([True] * self.hosts)
        self.balancer.per_worker_inflight.append([0] * self.hosts)
        self.last_reported: dict[int, int] = {}                # shard number -> last second it reported
        self._start = 0.0                        # the load's start and end on the trio clock
        self._until: float | None = None
        # host -> [its generation, whether a shard ejected it since]: what a shard taking over is told
        self.hosts_seen: dict[int, list[Any]] = {}

    async def _spawn(self, worker: Worker) -> None:
        if id(worker) in self.local:
            await super()._spawn(worker)
            return
        machine = self.machine_of[worker.number]
        callbacks = self.trial.run.callbacks
        assert callbacks is not None
        token, calls = callbacks.expect()
        machine.outbox.send_nowait(("driver", token, worker.number))
        with trio.move_on_after(READY_TIMEOUT):
            _, worker.channel = await calls.receive()
        if worker.channel is None:
            raise HarnessError(f"the driver shard on {machine.label} did not call back within {READY_TIMEOUT:g}s")
        await worker.channel.send(("config", self._config(worker)))

    def _config(self, worker: Worker) -> dict[str, Any]:
        """Each host gets client.connections in all, as from one driver in a local run (the default there):
        each shard opens its share of them (at least one); a standby is told the lost shard's when it takes
        over (until then it connects to nothing)."""
        share = self._share(worker.number if worker.number < len(self.machine_of) else 0)
        return {**super()._config(worker), "client": replace(self.config["client"], connections=share)}

    def _share(self, number: int) -> int:
        """Shard `number`'s connections per host: client.connections split among the shards, at least one."""
        shards, connections = len(self.machine_of), self.config["client"].connections
        return max(1, connections // shards + (number < connections % shards))

    def host_ready(self, index: int, generation: int) -> None:
        self.hosts_seen[index] = [generation, False]
        super().host_ready(index, generation)

    def host_gone(self, index: int) -> None:
        self.hosts_seen.pop(index, None)
        super().host_gone(index)

    async def _watch(self, worker: Worker) -> None:
        if id(worker) in self.local:
            await super()._watch(worker)
        # a shard on a machine: its link is its life (harness.cluster.shards._receive)

    async def _receive(self, worker: Worker) -> None:
        await super()._receive(worker)
        if id(worker) in self.local or self._closing:
            return
        worker.exited = True
        self._notify()
        machine = self.machine_of[worker.number]
        with trio.move_on_after(LOSS_GRACE):
            while not machine.lost and not self._closing:
                await trio.sleep(0.1)
        if self._closing:
            return
        if not machine.lost:
            raise HarnessError(f"the driver shard on {machine.label} closed its link during the load "
                               f"(its log: {self.trial.run.run_dir}/machines/m{machine.number + 1}/"
                               f"driver-shard-{worker.number}.log)")
        worker.done.set()          # nothing more comes from it: what it reported stays
        await self._take_over(worker)

    async def _take_over(self, lost: Worker) -> None:
        """The lost shard's share, from now on, from a shard on this machine."""
        recorder = self.trial.recorder
        at = max(recorder.now(), float(self.trial.start_at))
        shard, self.standby = self.standby, None
        if shard is None:        # the standby took over an earlier loss: a new one here, told what is up
            shard = Worker(lost.number)
            shard.first_second = IDLE        # nothing to wait for from it until it runs
            self.local.add(id(shard))
            self.workers.append(shard)
            self.standby = shard             # (told no host change while it starts: all of it comes below)
            await self._launch(shard)
            with trio.move_on_after(READY_TIMEOUT):
                await shard.ready.wait()
            self.standby = None
            if not shard.ready.is_set():
                raise HarnessError(f"the driver shard taking over shard {lost.number} did not start within "
                                   f"{READY_TIMEOUT:g}s (log: {shard.log})")
        # told what is up only now: idle, it held no connection to any host (they would use the hosts'
        # memory and file descriptors, which a local run's hosts do not spend); it connects before it sends,
        # with the lost shard's connections, and probes first a host another shard ejected (it may hang)
        shard.outbox_send.send_nowait(("connections", self._share(lost.number)))
        for index, (generation, ejected) in self.hosts_seen.items():
            shard.outbox_send.send_nowait(("host_ready", index, generation, ejected))
        shard.number = lost.number
        shard.first_second = int(at)
        last = self.last_reported.get(lost.number)
        recorder.event("driver-takeover", None, None, shard=lost.number,
                       machine=self.machine_of[lost.number].number + 1, at=round(at, 6),
                       counts_lost=[(last + 1 if last is not None else 0), int(at) + 1])
        if self._plan is not None:
            offset = time.perf_counter() - trio.current_time()
            shard.outbox_send.send_nowait(("start", replace(self._plan, start_at=at), self._start + offset,
                                           None if self._until is None else self._until + offset, lost.number,
                                           True))

    def _relayed(self) -> list[Worker]:
        """Host changes go to every running shard but the idle standby (it is told what is up when it takes
        over)."""
        return [w for w in super()._relayed() if w is not self.standby]

    def machine_lost(self, machine: Machine) -> None:
        """Its machine is lost: its shards' links are closed here too (a partition never closes them), which
        hands their share to the standby (_receive)."""
        nursery = self._nursery
        for worker in self.workers:
            if id(worker) not in self.local and self.machine_of.get(worker.number) is machine \
                    and worker.channel is not None and not worker.exited and nursery is not None:
                nursery.start_soon(worker.channel.aclose)

    async def run_load(self, plan: PlanSpec, start: float, until: float | None = None) -> None:
        """As DriverPool's, with each shard's start on its own machine's clock."""
        self._plan, self._start, self._until = plan, start, until
        offset = time.perf_counter() - trio.current_time()       # trio clock -> CLOCK_MONOTONIC here
        for worker in self.workers:
            if worker is self.standby:
                continue
            if id(worker) in self.local:     # took over before the load began: the whole share
                worker.first_second = int(plan.start_at)
            shift = 0.0 if id(worker) in self.local else self.machine_of[worker.number].perf_offset
            worker.outbox_send.send_nowait(("start", plan, start + offset + shift,
                                            None if until is None else until + offset + shift, worker.number))
        while True:          # every shard that sends (a takeover meanwhile too), not an unused standby
            pending = [w for w in self.workers if w.first_second != IDLE and not w.done.is_set()]
            if not pending:
                break
            await pending[0].done.wait()
        self._merge_stats()

    def _handle(self, worker: Worker, message: Any) -> None:
        if message[0] == "eject":
            seen = self.hosts_seen.get(message[1])
            if seen is not None and seen[0] == message[2]:
                seen[1] = True
        if worker is self.standby and message[0] == "done":    # stopped unused: it has nothing to give
            worker.done.set()
            self._notify()
            return
        if message[0] == "second":
            self.last_reported[worker.number] = max(message[1], self.last_reported.get(worker.number, -1))
        super()._handle(worker, message)
