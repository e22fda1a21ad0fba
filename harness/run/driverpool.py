"""Driver workers (`client.workers: N | auto`): the load split across N driver processes.

One Python process sends what one core can; more comes from more processes. Each worker is a child
of the harness running harness.run.driverworker: its own engine (harness.run.driver), its own connections to
every host, its own HDR histograms. The split is by seeded assignment: every worker draws the whole
seeded arrival stream and keeps the arrivals whose mark (a stream of its own) is its number, so each
share is an independent Poisson process of rate r(t)/N, the shares together are exactly the
single-process stream, and a rerun or a variant sees the same arrivals on the same workers.

What the workers send back is merged exactly: per second (at the same clock boundaries, CLOCK_MONOTONIC
is shared), counts are added and histograms added counter by counter (harness.run.hdrbatch), so
percentiles are those of one histogram of every request.

The balancer's view across workers:
- a host whose process is gone leaves every worker's rotation at once: the supervisor's exit notice is
  sent to all of them, and each worker's own connections to it break anyway (RST or EOF on loopback);
- a host that stops answering is ejected by the first worker whose oldest request to it times out;
  that worker tells the pool, and the pool tells the others, which drop it too (their requests in
  flight end as timeouts, as on a single driver) and re-probe it themselves;
- in-flight counts stay per worker: each worker balances its own share by its own in-flight requests,
  a proportional sample of the whole (a slow host gathers in-flight requests in every worker alike).
Each worker records a `host-out` event when it stops sending to a host, so how fast a dead host's share
moved is in the store (bench/driver.py measures it).

Workers die with the harness: they are forked by the fleet's spawner thread with the parent-death
signal, carry the spawner's process tag (harness/run/reaper.py: the watchdog and the next start sweep them),
and exit when their control socket closes. A worker that dies during a trial is an error the run
reports, never a silent loss of load.
"""

from __future__ import annotations

import hashlib
import hmac
import math
import os
import pickle
import socket
import struct
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import trio

import harness
from harness.run.driver import Counters, RequestCounters
from harness.base.errors import HarnessError
from harness.run.hdrbatch import Sparse, add_sparse, to_sparse
from harness.base.hist import new_histogram
from harness.base.outcomes import COUNTS
from harness.plan.streams import PlanSpec
from harness.run.procs import Child, Spawner, stop, wait_exit
from harness.scenario.model import Client, Target

FRAME = struct.Struct("!I")
MAX_FRAME = 256 * 1024 * 1024
READY_TIMEOUT = 60.0        # a worker imports numpy and trio before it answers: seconds on a busy machine
REPORT_TIMEOUT = 30.0       # a worker that sends no second for this long has stopped working
FINAL_TIMEOUT = 10.0        # when stopping, how long the workers get to send what they gathered
SCALARS = COUNTS


def resolve_workers(value: int | str) -> int:
    """`auto`: the cores this process may run on."""
    if value == "auto":
        return max(1, len(os.sched_getaffinity(0)))
    return int(value)


# --- the wire: length-prefixed pickles between the harness and its own workers ------------------

LINK_ENV = "HARNESS_LINK_TOKEN"      # a driver shard's token, from the agent that started it (harness.cluster)
MAC = hashlib.sha256().digest_size


def link_keys(token: bytes, side: str) -> tuple[bytes, bytes]:
    """(key to seal what this side sends, key to check what it receives) on a link between the command
    (side "command") and a cluster machine (side "machine"), both derived from the link's token."""
    to_machine = hmac.new(token, b"harness link: command to machine", hashlib.sha256).digest()
    to_command = hmac.new(token, b"harness link: machine to command", hashlib.sha256).digest()
    return (to_machine, to_command) if side == "command" else (to_command, to_machine)


class Channel:
    """Messages over a Unix stream socket (a socketpair the harness made for a child it started), or over a
    TCP link to or from a cluster's machine (harness.cluster.wire). On such a link every frame is sealed
    (`keys`): an HMAC-SHA256 over its sequence number and its bytes, checked before it is unpickled, so a frame
    injected, replayed or reordered on the way is refused, never run."""

    def __init__(self, sock: socket.socket | trio.SocketStream, buffered: bytes = b"",
                 keys: tuple[bytes, bytes] | None = None):
        self.stream = sock if isinstance(sock, trio.SocketStream) else \
            trio.SocketStream(trio.socket.from_stdlib_socket(sock))
        self._buffer = bytearray(buffered)
        self._send_lock = trio.Lock()
        self._keys = keys
        self._sent = 0
        self._received = 0

    def _seal(self, data: bytes) -> bytes:
        if self._keys is None:
            return data
        mac = hmac.new(self._keys[0], self._sent.to_bytes(8, "big") + data, hashlib.sha256).digest()
        self._sent += 1
        return mac + data

    def _open(self, frame: bytes) -> bytes:
        if self._keys is None:
            return frame
        mac, data = frame[:MAC], frame[MAC:]
        expected = hmac.new(self._keys[1], self._received.to_bytes(8, "big") + data, hashlib.sha256).digest()
        if not hmac.compare_digest(mac, expected):
            raise HarnessError("a message on a cluster link failed its check (injected or corrupted on the way): "
                               "the link is dropped")
        self._received += 1
        return data

    async def send(self, message: Any) -> None:
        data = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
        async with self._send_lock:
            payload = self._seal(data)       # in the lock: frames go out in the order they are numbered
            await self.stream.send_all(FRAME.pack(len(payload)) + payload)

    async def receive(self) -> Any:
        """The next message, or None when the other end closed."""
        while True:
            if len(self._buffer) >= FRAME.size:
                (size,) = FRAME.unpack_from(self._buffer)
                if size > MAX_FRAME:
                    raise HarnessError(f"driver worker channel: a message of {size} bytes")
                if len(self._buffer) >= FRAME.size + size:
                    data = self._open(bytes(self._buffer[FRAME.size:FRAME.size + size]))
                    del self._buffer[:FRAME.size + size]
                    return pickle.loads(data)
            try:
                chunk = await self.stream.receive_some(1 << 20)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                return None
            if not chunk:
                return None
            self._buffer += chunk

    async def aclose(self) -> None:
        await self.stream.aclose()


# --- counters on the wire -----------------------------------------------------------------------

def pack_counters(counters: Counters) -> dict[str, Any]:
    """A finished Counters (histograms filled) as plain values."""
    return {"scalars": tuple(getattr(counters, name) for name in SCALARS),
            "latency": to_sparse(counters.latency), "host_sent": counters.host_sent, "host_ok": counters.host_ok,
            "host_errors": counters.host_errors, "bad_kinds": counters.bad_kinds, "status": counters.status,
            "per_request": [(tuple(getattr(r, name) for name in SCALARS), to_sparse(r.latency))
                            for r in counters.per_request]}


def merge_counters(into: Counters, packed: dict[str, Any]) -> None:
    """Add a worker's counters: the same numbers and histograms as if one driver had seen it all."""
    for name, value in zip(SCALARS, packed["scalars"]):
        setattr(into, name, getattr(into, name) + value)
    add_sparse(into.latency, packed["latency"])
    for field in ("host_sent", "host_ok", "host_errors"):
        mine = getattr(into, field)
        for host, value in enumerate(packed[field]):
            mine[host] += value
    for field in ("bad_kinds", "status"):
        mine = getattr(into, field)
        for kind, value in packed[field].items():
            mine[kind] = mine.get(kind, 0) + value
    for request, (scalars, latency) in zip(into.per_request, packed["per_request"]):
        assert isinstance(request, RequestCounters)
        for name, value in zip(SCALARS, scalars):
            setattr(request, name, getattr(request, name) + value)
        add_sparse(request.latency, latency)


def worker_env() -> dict[str, str]:
    """A driver worker's environment: this one, with this very package importable (wherever it was imported
    from here)."""
    source = str(Path(harness.__file__).resolve().parent.parent)
    return {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [source, os.environ.get("PYTHONPATH")]))}


class PoolView:
    """The fleet-wide balancer state the runner reads (host states and in-flight counts per second)."""

    def __init__(self, hosts: int, workers: int):
        self.per_worker_rotation = [[False] * hosts for _ in range(workers)]
        self.per_worker_inflight = [[0] * hosts for _ in range(workers)]

    def update(self, worker: int, in_rotation: list[bool], inflight: list[int]) -> None:
        self.per_worker_rotation[worker] = in_rotation
        self.per_worker_inflight[worker] = inflight

    @property
    def in_rotation(self) -> list[bool]:
        """In rotation everywhere (a host any worker ejected shows as ejected)."""
        return [all(column) for column in zip(*self.per_worker_rotation)]

    @property
    def inflight(self) -> list[int]:
        return [sum(column) for column in zip(*self.per_worker_inflight)]


class Worker:
    def __init__(self, number: int):
        self.number = number
        self.child: Child | None = None
        self.channel: Channel | None = None
        self.outbox_send, self.outbox_receive = trio.open_memory_channel[Any](math.inf)
        self.ready = trio.Event()
        self.done = trio.Event()
        self.final: dict[str, Any] | None = None
        self.seconds: dict[int, dict[str, Any]] = {}
        self.acks: dict[int, tuple[int, int]] = {}      # host -> (host_gone sequence, requests lost)
        self.log: Path | None = None
        self.exited = False
        self.first_second = 0        # the first second it reports (a shard taking over another's share: later)


class DriverPool:
    """The parent's side of N driver workers, with the surface of harness.run.driver.Driver the runner uses."""

    def __init__(self, target: Target, client: Client, ports: list[int], policy: str,
                 expect_replies: Sequence[str | None] | None, *, seed: int, workers: int, spawner: Spawner,
                 log_dir: Path, on_event: Any = None, addrs: Sequence[str] | None = None):
        self.target = target
        self.client = client
        self.hosts = len(ports)
        self.requests = len(target.requests)
        self.workers = [Worker(n) for n in range(workers)]
        self.spawner = spawner
        self.log_dir = log_dir
        self.on_event = on_event
        self.config = {"target": target, "client": client, "ports": list(ports), "policy": policy,
                       "addrs": list(addrs) if addrs is not None else None,
                       "expect_replies": list(expect_replies) if expect_replies is not None else None,
                       "seed": seed, "workers": workers}
        self.balancer = PoolView(self.hosts, workers)
        self.lost_inflight = [0] * self.hosts
        self.lag = new_histogram()
        self.resent = 0
        self.protocol_errors = 0
        self.unsent = 0
        self.unsent_exact = True
        self._gone_sequence = [0] * self.hosts
        self._changed = trio.Event()          # set (and replaced) whenever a worker reports anything
        self._closing = False
        self._finals_merged = False
        self._nursery: trio.Nursery | None = None

    # --- the supervisor's callbacks (sync: queued to every worker) ------------------------------

    def host_ready(self, index: int, generation: int) -> None:
        self._broadcast(("host_ready", index, generation))

    def host_gone(self, index: int) -> None:
        self._gone_sequence[index] += 1
        self._broadcast(("host_gone", index, self._gone_sequence[index]))

    def _broadcast(self, message: Any, skip: int | None = None) -> None:
        for worker in self._relayed():
            if worker.number != skip:
                worker.outbox_send.send_nowait(message)

    def _relayed(self) -> list[Worker]:
        """The workers host changes go to: every one still running."""
        return [w for w in self.workers if not w.exited]

    async def settle(self, host: int, timeout: float = 1.0) -> None:
        """Wait (briefly) until every worker has handled the host's exit, so lost_inflight counts what
        every worker had in flight to it."""
        sequence = self._gone_sequence[host]
        with trio.move_on_after(timeout):
            while not all(w.acks.get(host, (0, 0))[0] >= sequence for w in self._relayed()):
                await self._wait_change()
        acked = [w for w in self.workers if w.acks.get(host, (0, 0))[0] >= sequence]
        self.lost_inflight[host] = sum(w.acks[host][1] for w in acked)
        for worker in acked:       # nothing is in flight to it there any more (the last second's view is older)
            self.balancer.per_worker_inflight[worker.number][host] = 0

    # --- running --------------------------------------------------------------------------------

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Start the workers, wait until they are ready, then relay messages until cancelled; on the way
        out, collect what every worker gathered, then stop them."""
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                for worker in self.workers:
                    await self._launch(worker)
                with trio.move_on_after(READY_TIMEOUT) as scope:
                    for worker in self.workers:
                        await worker.ready.wait()
                if scope.cancelled_caught:
                    raise HarnessError(f"driver workers did not start within {READY_TIMEOUT:g}s (logs: {self.log_dir})")
                task_status.started()
                await trio.sleep_forever()
        finally:
            with trio.CancelScope(shield=True):
                await self._collect_and_stop()

    async def _spawn(self, worker: Worker) -> None:
        parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        worker.log = self.log_dir / f"driver-worker-{worker.number}.log"
        env = worker_env()
        try:
            worker.child = await self.spawner.spawn(
                [sys.executable, "-m", "harness.run.driverworker", str(child.fileno())], cwd=self.log_dir, env=env,
                stdout=worker.log, stderr=worker.log, pass_fds=(child.fileno(),))
        except OSError as exc:
            parent.close()
            raise HarnessError(f"cannot start a driver worker: {exc.strerror or exc}") from None
        finally:
            child.close()
        worker.channel = Channel(parent)
        await worker.channel.send(("config", self._config(worker)))

    async def _launch(self, worker: Worker) -> None:
        """A worker started, and its tasks here (watching it, hearing it, telling it) in the pool's nursery."""
        nursery = self._nursery
        assert nursery is not None
        await self._spawn(worker)
        nursery.start_soon(self._watch, worker)
        nursery.start_soon(self._receive, worker)
        nursery.start_soon(self._send, worker)

    def _config(self, worker: Worker) -> dict[str, Any]:
        """What a worker is configured with: the pool's, and its number (each opens client.connections per host)."""
        return {**self.config, "worker": worker.number}

    async def _send(self, worker: Worker) -> None:
        assert worker.channel is not None
        async for message in worker.outbox_receive:
            try:
                await worker.channel.send(message)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                return      # the worker is gone: _watch reports it

    async def _watch(self, worker: Worker) -> None:
        assert worker.child is not None
        status = await wait_exit(worker.child)
        worker.exited = True
        self._notify()
        if not self._closing:
            from harness.run.procs import ExitInfo
            raise HarnessError(f"driver worker {worker.number} (pid {worker.child.pid}) "
                               f"{ExitInfo.from_status(status).describe()} during the load{self._log_tail(worker)}")

    def _log_tail(self, worker: Worker) -> str:
        try:
            lines = [line for line in (worker.log.read_text(errors="replace") if worker.log else "").splitlines()
                     if line.strip()]
        except OSError:
            return ""
        return f": {lines[-1].strip()[:300]} (see {worker.log})" if lines else f" (log: {worker.log})"

    async def _receive(self, worker: Worker) -> None:
        assert worker.channel is not None
        while True:
            message = await worker.channel.receive()
            if message is None:
                return
            self._handle(worker, message)

    def _handle(self, worker: Worker, message: Any) -> None:
        kind = message[0]
        if kind == "second":
            _, second, packed, view = message
            worker.seconds[second] = packed
            self.balancer.update(worker.number, *view)
        elif kind == "done":
            _, packed, stats, view = message
            worker.final = {"counters": packed, **stats}
            self.balancer.update(worker.number, *view)
            worker.done.set()
        elif kind == "event":
            _, event, host, pid, detail = message
            if self.on_event is not None:
                self.on_event(event, host, pid, **detail)
        elif kind == "eject":
            _, host, generation = message
            self._broadcast(("eject", host, generation), skip=worker.number)
        elif kind == "gone-ack":
            _, host, sequence, lost = message
            worker.acks[host] = (sequence, lost)
        elif kind == "ready":
            worker.ready.set()
        self._notify()

    def _notify(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    async def _wait_change(self) -> None:
        await self._changed.wait()

    async def run_load(self, plan: PlanSpec, start: float, until: float | None = None) -> None:
        """Every worker sends its share of the plan, waits for its replies and counts what is left."""
        offset = time.perf_counter() - trio.current_time()       # trio clock -> CLOCK_MONOTONIC
        self._broadcast(("start", plan, start + offset, None if until is None else until + offset))
        for worker in self.workers:
            await worker.done.wait()
        self._merge_stats()

    async def take_counters(self, second: int) -> Counters:
        """The merged counters of one second, once every worker sent it (or finished its load)."""
        deadline = trio.current_time() + REPORT_TIMEOUT
        while not all(second in w.seconds or w.done.is_set() or w.exited or second < w.first_second
                      for w in self.workers):
            with trio.move_on_at(deadline) as scope:
                await self._wait_change()
            if scope.cancelled_caught:
                late = [w.number for w in self.workers if second not in w.seconds and not w.done.is_set()
                        and second >= w.first_second]
                raise HarnessError(f"driver worker(s) {', '.join(map(str, late))} sent nothing for "
                                   f"{REPORT_TIMEOUT:g}s (stuck, or starved of CPU)")
        merged = Counters(self.hosts, self.requests)
        for worker in self.workers:
            for earlier in sorted(s for s in worker.seconds if s <= second):
                merge_counters(merged, worker.seconds.pop(earlier))
        return merged

    async def take_final(self, stopped: bool = False) -> Counters:
        """Everything not yet taken: the seconds reported and the workers' last, partial ones."""
        merged = Counters(self.hosts, self.requests)
        for worker in self.workers:
            for second in sorted(worker.seconds):
                merge_counters(merged, worker.seconds.pop(second))
            if worker.final is not None and "counters" in worker.final:
                merge_counters(merged, worker.final.pop("counters"))
        self._merge_stats()
        return merged

    def _merge_stats(self) -> None:
        """The whole trial's send lag, re-sends, protocol errors and unsent arrivals, once."""
        if self._finals_merged:
            return
        self._finals_merged = True
        for worker in self.workers:
            if worker.final is not None:
                add_sparse(self.lag, worker.final["lag"])
                self.resent += worker.final["resent"]
                self.protocol_errors += worker.final["protocol_errors"]
                self.unsent += worker.final["unsent"]
                self.unsent_exact = self.unsent_exact and worker.final["unsent_exact"]

    async def _collect_and_stop(self) -> None:
        """Stopping (the trial ended or was interrupted): every live worker stops sending and sends what
        it gathered; then the control sockets close, and each worker exits (or is killed)."""
        self._closing = True
        live = [w for w in self.workers if w.channel is not None and not w.exited and not w.done.is_set()]
        with trio.move_on_after(FINAL_TIMEOUT):
            for worker in live:
                assert worker.channel is not None
                try:
                    await worker.channel.send(("stop",))
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    continue
                while not worker.done.is_set():
                    message = await worker.channel.receive()
                    if message is None:
                        break
                    self._handle(worker, message)
        for worker in self.workers:
            if worker.channel is not None:
                await worker.channel.aclose()
        for worker in self.workers:
            if worker.child is not None and not worker.child.reaped:
                with trio.move_on_after(2.0):
                    await wait_exit(worker.child)       # it exits on its own once its socket closes
                await stop(worker.child, grace=2.0)
