"""The open-loop load driver and the client side of the balancer.

Requests go out at their scheduled arrival times whatever the fleet is doing (open loop), and
latency is measured from the *intended* send time, so a slow fleet cannot hide its own latency
(no coordinated omission). Requests are pipelined on a few connections per host and encoded and
decoded by the target's protocol codec (harness.protocols): replies come back complete and in order,
each judged by its own request's expectation. Nothing is dropped silently: every arrival ends as ok,
timeout, conn_error (connection lost with the request in flight), no_host (nobody in rotation) or
bad_reply (with its kind: mismatch, http_5xx, resp_error, protocol_error...).

Host membership: the supervisor tells us when a host is ready (we connect, then put it in
rotation) and when its process is gone (out at once). A host that stops answering (paused,
hung) is found out by its oldest request timing out: its connections are closed, their requests
counted as timeouts, and it is re-probed until it answers again.

Connections the server closes on purpose are not failures: an idle connection closed (keep-alive
timeout) is replaced quietly, and after a reply that announces the close (HTTP `Connection: close`)
the requests pipelined behind it, which the server never answered, are sent again on a new
connection (their latency still counts from their intended time).

The hot path is one loop (the engine) in one trio task: it waits on one epoll set of its own that
holds every connection and a timerfd armed for the next arrival, so a wake-up costs one trip through
trio however many sockets are ready. Each wake-up reads what arrived, then hands every arrival that is
due to its connection's buffer, then writes each touched connection once: requests due together share
a send() per connection. The send lag (intended -> actual send) is taken when the bytes are written, and
latencies and lags are kept as plain lists and added to the HDR histograms once a second
(harness.run.hdrbatch: the same counts record_value would give).
"""

from __future__ import annotations

import select
import socket
import sys
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import trio
from hdrh.histogram import HdrHistogram

from harness.run.balancer import Balancer
from harness.run.exchange import Conversation, connect, exchange
from harness.base.hist import LATENCY_MAX_US, new_histogram, release_histogram
from harness.run.hdrbatch import micros, record_many
from harness.scenario.loadshape import LoadShape
from harness.base.outcomes import COUNTS, ERROR_KINDS  # noqa: F401 (ERROR_KINDS: the driver's own words)
from harness.plan.streams import ArrivalChunk, PlanSpec, arrival_chunks, key_name
from harness.protocols import ProtocolError, codec, parse_pattern
from harness.scenario.model import Client, Target
from harness.run.timer import PreciseTimer

PROBE_KEY = "probe"
MAX_PROTOCOL_EVENTS = 50         # per trial: protocol errors are counted always, recorded as events this often
BURST = 512                      # arrivals handed out per wake-up before the engine lets others run
NAMED_KEYS = 1 << 16             # key spaces up to this size get their names (and payloads) made once
UNSENT_BUDGET = 1.0              # seconds spent counting unsent arrivals one by one before estimating
SWITCH_INTERVAL = 0.0002         # seconds another thread may hold the GIL while the driver waits for it

EPOLLIN, EPOLLOUT = select.EPOLLIN, select.EPOLLOUT
EPOLL_READ = select.EPOLLIN | select.EPOLLERR | select.EPOLLHUP | select.EPOLLRDHUP


class RequestCounters:
    """One request name's outcomes in one interval (a mix of several requests only)."""

    __slots__ = (*COUNTS, "latency")

    def __init__(self) -> None:
        for name in COUNTS:
            setattr(self, name, 0)
        self.latency = new_histogram()


@dataclass
class Counters:
    """What happened in one sampling interval (one second): harness.base.outcomes.COUNTS, and more."""

    hosts: int
    requests: int = 1
    offered: int = 0
    sent: int = 0
    ok: int = 0
    timeout: int = 0
    conn_error: int = 0
    no_host: int = 0
    bad_reply: int = 0
    latency: HdrHistogram = field(default_factory=new_histogram)
    host_sent: list[int] = field(default_factory=list)
    host_ok: list[int] = field(default_factory=list)
    host_errors: list[int] = field(default_factory=list)
    bad_kinds: dict[str, int] = field(default_factory=dict)      # bad_reply by kind
    status: dict[int, int] = field(default_factory=dict)         # HTTP replies by status code
    per_request: list[RequestCounters] = field(default_factory=list)   # empty for a single request
    # Good replies not yet in the histograms: lat_counts[i] replies read at lat_nows[i], with these
    # intended send times (and requests, for a mix); folded in by finish().
    lat_nows: list[float] = field(default_factory=list)
    lat_counts: list[int] = field(default_factory=list)
    lat_dues: list[float] = field(default_factory=list)
    lat_requests: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.host_sent = [0] * self.hosts
        self.host_ok = [0] * self.hosts
        self.host_errors = [0] * self.hosts
        if self.requests > 1:
            self.per_request = [RequestCounters() for _ in range(self.requests)]

    def finish(self) -> None:
        """Add the collected latencies to the histograms (exactly as record_value would)."""
        if not self.lat_dues:
            return
        values = micros(self.lat_nows, self.lat_counts, self.lat_dues, LATENCY_MAX_US)
        record_many(self.latency, values)
        if self.per_request:
            requests = np.asarray(self.lat_requests, dtype=np.int64)
            for index, counters in enumerate(self.per_request):
                record_many(counters.latency, values[requests == index])
        self.lat_nows, self.lat_counts, self.lat_dues, self.lat_requests = [], [], [], []

    def release(self) -> None:
        release_histogram(self.latency)
        for request in self.per_request:
            release_histogram(request.latency)


# A request in flight: (intended time, time handed to the connection, request index, key, seq, bytes)
Pending = tuple[float, float, int, str, int, bytes]


class Conn:
    __slots__ = ("host", "generation", "sock", "fd", "pending", "out", "queued", "dirty", "want_write", "closed",
                 "decoder", "answered", "replacement")

    def __init__(self, host: int, generation: int, sock: socket.socket | None, decoder: Any):
        self.host = host
        self.generation = generation
        self.sock = sock                 # None while a replacement connection is being opened
        self.fd = -1                     # registered in the engine's epoll set while >= 0
        self.pending: deque[Pending] = deque()
        self.out = bytearray()           # bytes not yet written
        self.queued: list[float] = []    # intended times of the requests in `out` not yet fully written
        self.dirty = False               # on the engine's list of connections to write
        self.want_write = False          # the socket was full: the engine waits for it to be writable
        self.closed = False
        self.decoder = decoder
        self.answered = 0
        self.replacement = False


@dataclass
class HostLink:
    index: int
    port: int
    addr: str = "127.0.0.1"      # where the host listens (another machine's address, over a cluster)
    generation: int = 0          # incarnation we are connected to; -1 while the process is gone
    conns: list[Conn] = field(default_factory=list)
    next_conn: int = 0
    burst: int = -1              # the last burst that gave this host a request (its connection stays)
    probing: int | None = None   # generation a bring-up loop is running for


class Driver:
    def __init__(self, target: Target, client: Client, ports: list[int], balancer: Balancer,
                 expect_replies: Sequence[str | None] | None = None, *, seed: int = 1,
                 on_event: Callable[..., None] | None = None, worker: int | None = None,
                 on_eject: Callable[[int, int], None] | None = None, addrs: Sequence[str] | None = None):
        """`expect_replies`: each host's default reply pattern (a fleet of different kinds), for requests
        that give no `expect` of their own (default: the target's). `on_event(kind, host, pid, **detail)`
        records what the driver saw (protocol errors, hosts leaving rotation). `worker`: this driver's
        number when it is one of several driver processes; `on_eject(host, generation)` is told when a
        host is ejected here for not answering (the others eject it too, harness.run.driverpool). `addrs`: each
        host's address (default loopback; hosts on other machines over a cluster, harness.cluster)."""
        self.target = target
        self.client = client
        self.balancer = balancer
        self.links = [HostLink(i, port, addr) for i, (port, addr) in
                      enumerate(zip(ports, addrs if addrs is not None else ["127.0.0.1"] * len(ports)))]
        self.module = codec(target.protocol)
        self.conversation = Conversation(target.protocol, target.terminator)
        self.check = self.module.check
        self.requests = target.requests
        self.encoders = [self.module.compile(spec, seed).encode for spec in target.requests]
        self.counters = Counters(len(ports), len(target.requests))
        self._lag = new_histogram()                # intended -> actual send, whole run (µs)
        self._lag_nows: list[float] = []
        self._lag_counts: list[int] = []
        self._lag_dues: list[float] = []
        patterns = list(expect_replies) if expect_replies is not None else [target.expect_reply] * len(ports)
        compiled = {p: parse_pattern(p) for p in set(patterns) if p}
        # Each host's expectation of each request: the request's own, else the host's default pattern.
        self.expects = [[spec.expect if spec.expect is not None else (compiled[p] if p else None)
                         for spec in target.requests] for p in patterns]
        self.count_status = target.protocol == "http"
        self.on_event = on_event
        self.on_eject = on_eject
        self.worker = worker
        self._nursery: trio.Nursery | None = None
        self.finished_sending = False
        self.inflight = 0
        self.lost_inflight = [0] * len(ports)
        self.resent = 0                 # requests sent again after the server closed as it announced
        self.protocol_errors = 0
        self.unsent = 0                 # arrivals of the plan never sent: still due when the load had to end
        self.unsent_exact = True        # False: the tail of an enormous plan was estimated, not counted
        # The engine (serve): one epoll set for every connection and the arrival timer.
        self._epoll: select.epoll | None = None
        self._timer: PreciseTimer | None = None
        self._by_fd: dict[int, Conn] = {}
        self._dirty: list[Conn] = []
        self._burst = 0
        self._armed = -1.0
        # clock() is trio.current_time() without the trip through trio's run context
        self._offset = 0.0
        # The plan being sent (send_all)
        self._chunks: Iterator[ArrivalChunk] | None = None
        self._chunk: ArrivalChunk | None = None
        self._pos = 0
        self._start = 0.0
        self._until: float | None = None
        self._sent_all: trio.Event | None = None
        self._stopped_at_until = False
        self.key_space = client.keys.space
        self._names = [key_name(n) for n in range(self.key_space)] if self.key_space <= NAMED_KEYS else None
        # Payloads made once per key, for requests whose bytes depend on the key only ({seq} unused).
        self._payloads: list[list[bytes | None] | None] = [
            [None] * self.key_space if self._names is not None and encode("k0", 0) == encode("k0", 1) else None
            for encode in self.encoders]

    # --- the supervisor's callbacks ---------------------------------------------------------

    def host_ready(self, index: int, generation: int, probe: bool = False) -> None:
        """The host is up: connect and put it in rotation (`probe`: once it answers a probe, as a host that
        another worker ejected and this one has not seen answer yet)."""
        link = self.links[index]
        link.generation = generation
        self.lost_inflight[index] = 0
        if self._nursery is not None:
            self._nursery.start_soon(self._bring_up, link, generation, probe)

    def host_gone(self, index: int) -> None:
        link = self.links[index]
        link.generation = -1
        self._drop_host(link, "conn_error", why="gone")

    def eject(self, index: int, generation: int) -> None:
        """Another driver worker found this host not answering: out of rotation here too, and re-probed."""
        link = self.links[index]
        if link.generation != generation or not self.balancer.in_rotation[index]:
            return
        self._drop_host(link, "timeout", why="ejected elsewhere")
        if self._nursery is not None:
            self._nursery.start_soon(self._bring_up, link, generation, True)

    # --- counters -----------------------------------------------------------------------------

    def swap_counters(self) -> Counters:
        counters, self.counters = self.counters, Counters(len(self.links), len(self.requests))
        counters.finish()
        self._fold_lag()
        return counters

    @property
    def lag(self) -> HdrHistogram:
        self._fold_lag()
        return self._lag

    def _fold_lag(self) -> None:
        if self._lag_dues:
            record_many(self._lag, micros(self._lag_nows, self._lag_counts, self._lag_dues, LATENCY_MAX_US))
            self._lag_nows, self._lag_counts, self._lag_dues = [], [], []

    def clock(self) -> float:
        return time.perf_counter() + self._offset

    # --- running ------------------------------------------------------------------------------

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Background tasks (the engine, timeouts); runs until cancelled."""
        self._offset = trio.current_time() - time.perf_counter()
        self._epoll = select.epoll()
        self._timer = PreciseTimer()
        self._epoll.register(self._timer.fd, EPOLLIN)
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                nursery.start_soon(self._timeouts)
                nursery.start_soon(self._engine)
                task_status.started()
                await trio.sleep_forever()
        finally:
            self._nursery = None
            for link in self.links:
                for conn in list(link.conns):
                    self._forget(conn)
            self._timer.close()
            trio.lowlevel.notify_closing(self._epoll.fileno())
            self._epoll.close()

    async def send_all(self, plan: PlanSpec, start: float, until: float | None = None, *,
                       worker: int = 0, workers: int = 1) -> None:
        """Send the plan's arrivals (this worker's share of them) at start + t (trio clock). A driver that
        falls behind stops once the clock passes `until` (the planned end plus the client timeout): what
        it did not send is counted in `unsent`."""
        assert self._nursery is not None, "serve() first"
        self._chunks = arrival_chunks(plan.shape, plan.keys, plan.seed, plan.weights, worker=worker,
                                      workers=workers, start_at=plan.start_at)
        self._start, self._until = start, until
        self._chunk, self._pos = next(self._chunks, None), 0
        self._sent_all = done = trio.Event()
        self._armed = -1.0
        try:
            if self._chunk is None:
                done.set()          # nothing to send (a share of a tiny plan, or a resume at its end)
            self._arm()
            await done.wait()
        finally:
            self.finished_sending = True
            rest, self._chunks, self._chunk = self._chunks, None, None
            self._sent_all = None
        if self._stopped_at_until and rest is not None:
            self.unsent, self.unsent_exact = await trio.to_thread.run_sync(
                count_unsent, self.unsent, rest, plan.shape, workers)

    async def run_load(self, plan: PlanSpec, start: float, until: float | None = None) -> None:
        """The whole load: send the plan, wait for the replies, count what never came as timeouts."""
        # The harness's worker threads (store writes, /proc reads, log caps) run Python too, and by default
        # a thread keeps the GIL up to 5 ms before this loop gets it back: a send 5 ms late.
        interval = sys.getswitchinterval()
        sys.setswitchinterval(min(interval, SWITCH_INTERVAL))
        try:
            await self.send_all(plan, start, until)
            await self.drain()
            self.abandon_pending()
        finally:
            sys.setswitchinterval(interval)

    # The runner's view of any driver (this one, or harness.run.driverpool's workers).
    async def take_counters(self, second: int) -> Counters:
        return self.swap_counters()

    async def take_final(self, stopped: bool = False) -> Counters:
        return self.swap_counters()

    async def settle(self, host: int) -> None:
        """Nothing to wait for: host_gone counted what was in flight to the host already."""

    async def drain(self) -> None:
        """After the last arrival: wait for replies, at most one request timeout."""
        with trio.move_on_after(self.client.timeout + 0.1):
            while self.inflight > 0:
                await trio.sleep(0.01)

    def abandon_pending(self) -> None:
        """At the very end: requests still unanswered after the drain are timeouts, counted now."""
        for link in self.links:
            if any(conn.pending for conn in link.conns):
                link.generation = -1  # no re-probe
                self._drop_host(link, "timeout", why="end")

    # --- the engine -----------------------------------------------------------------------------

    async def _engine(self) -> None:
        assert self._epoll is not None
        fd = self._epoll.fileno()
        while True:
            if self._pump():
                await trio.lowlevel.checkpoint()     # more is due: let the others run, then carry on
            else:
                await trio.lowlevel.wait_readable(fd)

    def _pump(self) -> bool:
        """One round: read what arrived, send what is due, write what was queued. True when arrivals
        are still due (a burst was cut short)."""
        assert self._epoll is not None and self._timer is not None
        by_fd = self._by_fd
        timer_fd = self._timer.fd
        for fd, events in self._epoll.poll(0):
            if fd == timer_fd:
                self._timer.consume()
                self._armed = -1.0
                continue
            conn = by_fd.get(fd)
            if conn is None:
                continue
            if events & EPOLLOUT and conn.want_write:
                self._write(conn)
            if events & EPOLL_READ and not conn.closed:
                self._read(conn)
        behind = self._send_due() if self._chunk is not None else False
        if self._dirty:
            self._flush()
        if self._chunk is not None and not behind:
            self._arm()
        return behind

    def _arm(self) -> None:
        chunk = self._chunk
        if chunk is None:
            return
        due = self._start + chunk.t[self._pos]
        if due != self._armed:
            assert self._timer is not None
            self._timer.arm(due)
            self._armed = due

    def _send_due(self) -> bool:
        """Hand every due arrival to a connection (written by _flush). True if more are due than a burst.

        Longer than the other steps on purpose: it is the driver's hot loop (one pass per arrival), kept in
        one function with its attributes bound to locals; a call per arrival would cost the rate
        (bench/driver.py measures it)."""
        chunk = self._chunk
        assert chunk is not None
        now = self.clock()
        if self._until is not None and now > self._until:
            self._stop_at_until()
            return False
        self._burst += 1
        burst = self._burst
        start = self._start
        pos = self._pos
        times, indexes, keys, requests = chunk.t, chunk.index, chunk.key, chunk.request
        end = len(times)
        counters = self.counters
        per_request = counters.per_request
        host_sent = counters.host_sent
        pick = self.balancer.pick
        inflight = self.balancer.inflight
        links = self.links
        names = self._names
        payloads = self._payloads
        encoders = self.encoders
        dirty = self._dirty
        handed = offered = 0
        while offered < BURST:
            if pos == end:
                chunk = next(self._chunks, None) if self._chunks is not None else None
                self._chunk, pos = chunk, 0
                if chunk is None:
                    break
                times, indexes, keys, requests = chunk.t, chunk.index, chunk.key, chunk.request
                end = len(times)
            due = start + times[pos]
            if due > now:
                break
            request = requests[pos]
            offered += 1
            if per_request:
                per_request[request].offered += 1
            host = pick()
            if host is None:
                counters.no_host += 1
                if per_request:
                    per_request[request].no_host += 1
                pos += 1
                continue
            link = links[host]
            if link.burst != burst:          # one connection per host per burst: fewer, fuller writes
                link.burst = burst
                link.next_conn += 1
            conns = link.conns
            conn = conns[link.next_conn % len(conns)]
            number = keys[pos]
            key = names[number] if names is not None else key_name(number)
            cache = payloads[request]
            if cache is not None:
                payload = cache[number]
                if payload is None:
                    payload = cache[number] = encoders[request](key, indexes[pos])
            else:
                payload = encoders[request](key, indexes[pos])
            conn.pending.append((due, now, request, key, indexes[pos], payload))
            conn.out += payload
            conn.queued.append(due)
            if not conn.dirty:
                conn.dirty = True
                dirty.append(conn)
            inflight[host] += 1
            host_sent[host] += 1
            if per_request:
                per_request[request].sent += 1
            handed += 1
            pos += 1
        self._pos = pos
        counters.offered += offered
        counters.sent += handed
        self.inflight += handed
        if self._chunk is None:
            self._finish_sending()
            return False
        return offered == BURST     # perhaps more is due: the engine comes straight back after a checkpoint

    def _stop_at_until(self) -> None:
        """Past the planned end plus the timeout: the rest of the plan is unsent (counted by send_all)."""
        chunk = self._chunk
        assert chunk is not None
        self.unsent = len(chunk.t) - self._pos
        self._stopped_at_until = True
        self._chunk = None
        self._finish_sending()

    def _finish_sending(self) -> None:
        if self._sent_all is not None:
            self._sent_all.set()
        self._armed = -1.0

    def _flush(self) -> None:
        dirty, self._dirty = self._dirty, []
        for conn in dirty:
            conn.dirty = False
            if conn.sock is not None and not conn.closed and not conn.want_write:
                self._write(conn)

    def _write(self, conn: Conn) -> None:
        assert conn.sock is not None
        out = conn.out
        try:
            written = conn.sock.send(out)
        except BlockingIOError:
            written = 0
        except OSError:
            self._conn_failed(conn, "conn_error")
            return
        if written == len(out):
            out.clear()
            queued = conn.queued
            if queued:
                # The send lag is taken here, at the real write (a request split by a full socket
                # counts when its last byte went).
                self._lag_nows.append(self.clock())
                self._lag_counts.append(len(queued))
                self._lag_dues += queued
                conn.queued = []
            if conn.want_write:
                conn.want_write = False
                self._watch(conn, EPOLL_READ)
        else:
            del out[:written]
            if not conn.want_write:
                conn.want_write = True
                self._watch(conn, EPOLL_READ | EPOLLOUT)

    def _read(self, conn: Conn) -> None:
        sock = conn.sock
        assert sock is not None
        try:
            data = sock.recv(262144)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        decoder = conn.decoder
        try:
            replies = decoder.feed(data) if data else decoder.eof()
        except ProtocolError as exc:
            self._protocol_error(conn, exc)
            return
        if replies:
            if len(replies) > len(conn.pending):
                extra = len(replies) - len(conn.pending)
                self._protocol_error(conn, ProtocolError(
                    f"{extra} reply(ies) with no request in flight (a banner, or a reply of several "
                    f"lines in the line protocol?)", data))
                return
            self._replies(conn, replies)
        if decoder.closing or not data:
            self._closed_by_server(conn, announced=decoder.closing)

    def _replies(self, conn: Conn, replies: list[Any]) -> None:
        now = self.clock()
        counters = self.counters
        per_request = counters.per_request
        host = conn.host
        expects = self.expects[host]
        check = self.check
        pending = conn.pending
        count_status = self.count_status
        status = counters.status
        dues = counters.lat_dues
        requests = counters.lat_requests
        conn.answered += len(replies)
        good = 0
        for reply in replies:
            due, _sent, request, key, seq, _payload = pending.popleft()
            if count_status:
                status[reply] = status.get(reply, 0) + 1
            bad = check(expects[request], reply, key, seq)
            if bad is not None:
                counters.bad_reply += 1
                counters.host_errors[host] += 1
                counters.bad_kinds[bad] = counters.bad_kinds.get(bad, 0) + 1
                if per_request:
                    per_request[request].bad_reply += 1
                continue
            good += 1
            dues.append(due)
            if per_request:
                per_request[request].ok += 1
                requests.append(request)
        if good:
            counters.ok += good
            counters.host_ok[host] += good
            counters.lat_nows.append(now)
            counters.lat_counts.append(good)
        self.inflight -= len(replies)
        self.balancer.finished(host, len(replies))

    # --- connections ----------------------------------------------------------------------------

    def _watch(self, conn: Conn, events: int) -> None:
        """Register the connection's socket in the engine's epoll set (or change what it waits for)."""
        assert self._epoll is not None and conn.sock is not None
        if conn.fd < 0:
            conn.fd = conn.sock.fileno()
            self._by_fd[conn.fd] = conn
            self._epoll.register(conn.fd, events)
        else:
            self._epoll.modify(conn.fd, events)

    def _forget(self, conn: Conn) -> None:
        """Out of the epoll set before the socket closes (its number may be reused at once)."""
        if conn.fd >= 0:
            if self._by_fd.get(conn.fd) is conn:
                del self._by_fd[conn.fd]
            if self._epoll is not None:
                try:
                    self._epoll.unregister(conn.fd)
                except (OSError, ValueError):
                    pass
            conn.fd = -1
        if conn.sock is not None:
            conn.sock.close()

    async def _probe(self, link: HostLink) -> bool:
        """One request must get a complete reply within the timeout: the host really serves. (Any reply:
        a host that answers, even with errors, is up; its replies are judged under load.)"""
        spec = self.requests[0]
        payload = self.module.compile(spec, 1).encode(PROBE_KEY, 0)
        outcome = await exchange(link.port, self.conversation,
                                 [(payload, self.conversation.judge(spec, PROBE_KEY, 0, any_reply=True))],
                                 timeout=self.client.timeout, window=1, addr=link.addr)
        return outcome.ok

    async def _bring_up(self, link: HostLink, generation: int, probe: bool) -> None:
        """Open the host's connections and put it in rotation (probing first if it was ejected)."""
        if link.probing == generation:
            return
        link.probing = generation
        try:
            while link.generation == generation:
                answered = await self._probe(link) if probe else True
                first = await connect(link.port, self.client.timeout, link.addr) if answered else None
                if first is not None:
                    socks = [first]
                    for _ in range(self.client.connections - 1):
                        extra = await connect(link.port, self.client.timeout, link.addr)
                        if extra is not None:
                            socks.append(extra)
                    if link.generation != generation or self._epoll is None:
                        for sock in socks:
                            sock.close()
                        return
                    self._drop_host(link, "conn_error")
                    for sock in socks:
                        conn = Conn(link.index, generation, sock, self.conversation.decoder())
                        link.conns.append(conn)
                        self._watch(conn, EPOLL_READ)
                    self.balancer.set_in_rotation(link.index, True)
                    return
                probe = True
                await trio.sleep(self.client.probe_interval)
        finally:
            if link.probing == generation:
                link.probing = None

    def _drop_host(self, link: HostLink, kind: str, bad_kind: str | None = None, why: str | None = None) -> None:
        was_in = self.balancer.in_rotation[link.index]
        self.balancer.set_in_rotation(link.index, False)
        lost = sum(len(conn.pending) for conn in link.conns)
        if lost:
            self.lost_inflight[link.index] = lost  # what the host held when it went (for crash records)
        for conn in list(link.conns):
            self._close(conn, kind, bad_kind)
        link.conns.clear()
        if was_in and self.on_event is not None and self._sent_all is not None:
            # When the driver stopped giving the host requests, and why: how fast a dead host's share moves.
            self.on_event("host-out", link.index, None, why=why or kind, in_flight=lost,
                          **({"worker": self.worker} if self.worker is not None else {}))

    def _close(self, conn: Conn, kind: str, bad_kind: str | None = None) -> None:
        """Close a connection; its requests in flight end as `kind` (bad_reply: of `bad_kind`)."""
        if conn.closed:
            return
        conn.closed = True
        failed = len(conn.pending)
        if failed:
            counters = self.counters
            setattr(counters, kind, getattr(counters, kind) + failed)
            counters.host_errors[conn.host] += failed
            if bad_kind is not None:
                counters.bad_kinds[bad_kind] = counters.bad_kinds.get(bad_kind, 0) + failed
            if counters.per_request:
                for entry in conn.pending:
                    request = counters.per_request[entry[2]]
                    setattr(request, kind, getattr(request, kind) + 1)
            self.balancer.finished(conn.host, failed)
            self.inflight -= failed
            conn.pending.clear()
        link = self.links[conn.host]
        if conn in link.conns:
            link.conns.remove(conn)
        self._forget(conn)

    def _conn_failed(self, conn: Conn, kind: str, bad_kind: str | None = None) -> None:
        """A connection broke (or its oldest request timed out): the host leaves rotation, and is
        probed back in if its process is still there."""
        if conn.closed:
            return
        link = self.links[conn.host]
        self.lost_inflight[conn.host] = sum(len(c.pending) for c in link.conns)
        was_in = self.balancer.in_rotation[conn.host]
        self._close(conn, kind, bad_kind)
        self._drop_host(link, kind, bad_kind)
        if kind == "timeout" and was_in and self.on_eject is not None and link.generation == conn.generation:
            self.on_eject(link.index, conn.generation)
        if link.generation == conn.generation and self._nursery is not None:
            self._nursery.start_soon(self._bring_up, link, conn.generation, True)

    def _replace(self, conn: Conn) -> None:
        """The server closed this connection on purpose (idle, or after a reply that said so): a new
        connection takes its place, and the requests the server never answered go out on it again."""
        link = self.links[conn.host]
        fresh = Conn(conn.host, conn.generation, None, self.conversation.decoder())
        fresh.replacement = True
        fresh.pending = conn.pending
        for entry in fresh.pending:
            fresh.out += entry[5]
        # Requests never written on the old connection take their send lag when written on the new one.
        fresh.queued = conn.queued
        self.resent += len(fresh.pending) - len(fresh.queued)
        conn.pending, conn.queued = deque(), []
        self._close(conn, "conn_error")             # nothing left in flight on it: counts nothing
        link.conns.append(fresh)
        assert self._nursery is not None
        self._nursery.start_soon(self._open_replacement, link, fresh)

    async def _open_replacement(self, link: HostLink, conn: Conn) -> None:
        sock = await connect(link.port, self.client.timeout, link.addr)
        if conn.closed or self._epoll is None:            # the host went meanwhile
            if sock is not None:
                sock.close()
            return
        if sock is None:
            self._conn_failed(conn, "conn_error")
            return
        conn.sock = sock
        # Writable at once: the engine wakes up and writes what waited for this connection.
        conn.want_write = bool(conn.out)
        self._watch(conn, EPOLL_READ | (EPOLLOUT if conn.out else 0))

    def _protocol_error(self, conn: Conn, error: ProtocolError) -> None:
        """Bytes that are not the protocol: the connection's requests in flight are bad replies (never
        paired with later replies), the connection is closed and the host re-probed."""
        self.protocol_errors += 1
        if self.on_event is not None and self.protocol_errors <= MAX_PROTOCOL_EVENTS:
            self.on_event("protocol-error", conn.host, None, protocol=self.target.protocol, reason=error.reason,
                          excerpt=error.excerpt.decode("latin-1"), in_flight=len(conn.pending),
                          occurrence=self.protocol_errors)
        self._conn_failed(conn, "bad_reply", "protocol_error")

    def _closed_by_server(self, conn: Conn, announced: bool) -> None:
        if conn.closed:
            return
        if announced or not conn.pending:
            # On purpose (a reply said so, or an idle keep-alive closed). A fresh replacement that is
            # closed again before answering anything means the host is not serving: that is a failure.
            if conn.replacement and conn.answered == 0 and not announced:
                self._conn_failed(conn, "conn_error")
            else:
                self._replace(conn)
            return
        self._conn_failed(conn, "conn_error")

    async def _timeouts(self) -> None:
        """The oldest request on a connection past the timeout means the host stopped answering."""
        timeout = self.client.timeout
        while True:
            await trio.sleep(min(0.02, timeout / 4))
            now = trio.current_time()
            for link in self.links:
                for conn in list(link.conns):
                    if conn.pending and now - conn.pending[0][1] > timeout:
                        self._conn_failed(conn, "timeout")
                        break


def count_unsent(first: int, rest: Iterator[ArrivalChunk], shape: LoadShape, workers: int = 1,
                 budget: float = UNSENT_BUDGET) -> tuple[int, bool]:
    """`first` plus the arrivals left in `rest`: counted chunk by chunk for up to `budget` seconds (exact);
    the tail of a plan too large for that (rate: 1e9) is its expected number of arrivals, (Λ(end) - Λ(t))
    / workers, and the count is flagged as an estimate."""
    count = first
    deadline = time.monotonic() + budget
    for chunk in rest:
        count += len(chunk.t)
        if time.monotonic() > deadline:
            return count + round((shape.total_expected - shape.expected(chunk.t[-1])) / workers), False
    return count, True
