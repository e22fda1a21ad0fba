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
"""

from __future__ import annotations

import socket
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import trio
from hdrh.histogram import HdrHistogram

from harness.balancer import Balancer
from harness.exchange import Conversation, connect, exchange
from harness.plan import Arrival
from harness.protocols import ProtocolError, codec, parse_pattern
from harness.scenario import Client, Target
from harness.timer import PreciseTimer

LATENCY_MAX_US = 3_600_000_000  # an hour, in microseconds
ERROR_KINDS = ("timeout", "conn_error", "no_host", "bad_reply")
PROBE_KEY = "probe"
MAX_PROTOCOL_EVENTS = 50         # per trial: protocol errors are counted always, recorded as events this often


def new_histogram() -> HdrHistogram:
    return HdrHistogram(1, LATENCY_MAX_US, 3)


def release_histogram(histogram: HdrHistogram) -> None:
    """Free a histogram's ~190 KB counts array now. An hdrh histogram is a reference cycle (histogram <->
    its encoder), so dropping the last reference frees nothing until the cyclic GC runs: a rollup merging a
    minute of rows held all 60 decoded histograms (~11 MiB) at once, in a worker thread's malloc arena,
    and glibc keeps an arena's high-water mark, so the harness's RSS stepped up by ~10 MiB per arena. Only
    for histograms that are done with (decoded for a merge, or a second's counters once encoded)."""
    histogram.encoder = None


class RequestCounters:
    """One request name's outcomes in one interval (a mix of several requests only)."""

    __slots__ = ("offered", "sent", "ok", "timeout", "conn_error", "no_host", "bad_reply", "latency")

    def __init__(self) -> None:
        self.offered = self.sent = self.ok = self.timeout = self.conn_error = self.no_host = self.bad_reply = 0
        self.latency = new_histogram()


@dataclass
class Counters:
    """What happened in one sampling interval (one second)."""

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

    def __post_init__(self) -> None:
        self.host_sent = [0] * self.hosts
        self.host_ok = [0] * self.hosts
        self.host_errors = [0] * self.hosts
        if self.requests > 1:
            self.per_request = [RequestCounters() for _ in range(self.requests)]

    def release(self) -> None:
        release_histogram(self.latency)
        for request in self.per_request:
            release_histogram(request.latency)


# A request in flight: (intended time, actual send time, request index, key, seq, bytes sent)
Pending = tuple[float, float, int, str, int, bytes]


class Conn:
    __slots__ = ("host", "generation", "sock", "pending", "out", "wake", "closed", "decoder", "answered",
                 "replacement")

    def __init__(self, host: int, generation: int, sock: socket.socket | None, decoder: Any):
        self.host = host
        self.generation = generation
        self.sock = sock                 # None while a replacement connection is being opened
        self.pending: deque[Pending] = deque()
        self.out = bytearray()
        self.wake = trio.Event()
        self.closed = False
        self.decoder = decoder
        self.answered = 0
        self.replacement = False


@dataclass
class HostLink:
    index: int
    port: int
    generation: int = 0          # incarnation we are connected to; -1 while the process is gone
    conns: list[Conn] = field(default_factory=list)
    next_conn: int = 0
    probing: int | None = None   # generation a bring-up loop is running for


class Driver:
    def __init__(self, target: Target, client: Client, ports: list[int], balancer: Balancer,
                 expect_replies: Sequence[str | None] | None = None, *, seed: int = 1,
                 on_event: Callable[..., None] | None = None):
        """`expect_replies`: each host's default reply pattern (a fleet of different kinds), for requests
        that give no `expect` of their own (default: the target's). `on_event(kind, host, pid, **detail)`
        records what the driver saw (protocol errors)."""
        self.target = target
        self.client = client
        self.balancer = balancer
        self.links = [HostLink(i, port) for i, port in enumerate(ports)]
        self.module = codec(target.protocol)
        self.conversation = Conversation(target.protocol, target.terminator)
        self.check = self.module.check
        self.requests = target.requests
        self.encoders = [self.module.compile(spec, seed).encode for spec in target.requests]
        self.counters = Counters(len(ports), len(target.requests))
        self.lag = new_histogram()                 # intended -> actual send, whole run (µs)
        patterns = list(expect_replies) if expect_replies is not None else [target.expect_reply] * len(ports)
        compiled = {p: parse_pattern(p) for p in set(patterns) if p}
        # Each host's expectation of each request: the request's own, else the host's default pattern.
        self.expects = [[spec.expect if spec.expect is not None else (compiled[p] if p else None)
                         for spec in target.requests] for p in patterns]
        self.count_status = target.protocol == "http"
        self.on_event = on_event
        self._nursery: trio.Nursery | None = None
        self.finished_sending = False
        self.inflight = 0
        self.lost_inflight = [0] * len(ports)
        self.resent = 0                 # requests sent again after the server closed as it announced
        self.protocol_errors = 0
        self.unsent = 0                 # arrivals of the plan never sent: still due when the load had to end
        self.unsent_exact = True        # False: the tail of an enormous plan was estimated, not counted

    # --- the supervisor's callbacks ---------------------------------------------------------

    def host_ready(self, index: int, generation: int) -> None:
        link = self.links[index]
        link.generation = generation
        self.lost_inflight[index] = 0
        if self._nursery is not None:
            self._nursery.start_soon(self._bring_up, link, generation, False)

    def host_gone(self, index: int) -> None:
        link = self.links[index]
        link.generation = -1
        self._drop_host(link, "conn_error")

    # --- counters -----------------------------------------------------------------------------

    def swap_counters(self) -> Counters:
        counters, self.counters = self.counters, Counters(len(self.links), len(self.requests))
        return counters

    # --- running ------------------------------------------------------------------------------

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Background tasks (connections, timeouts); runs until cancelled."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            nursery.start_soon(self._timeouts)
            task_status.started()
            await trio.sleep_forever()

    async def send_all(self, arrivals: Iterator[Arrival], start: float, until: float | None = None) -> Arrival | None:
        """Send every arrival at start + arrival.t (trio clock). A driver that falls behind stops once the
        clock passes `until` (the planned end plus the client timeout): the first arrival it did not send
        is returned, and it and the rest of the plan are the caller's to count as unsent."""
        timer = PreciseTimer()
        behind = 0
        try:
            for arrival in arrivals:
                due = start + arrival.t
                if due > trio.current_time():
                    await timer.sleep_until(due)
                    behind = 0
                else:
                    # Late (a burst, or the machine was busy): catch up without a trip through the
                    # scheduler per request, yet let the readers run every few dozen sends.
                    behind += 1
                    if behind % 32 == 0:
                        await trio.lowlevel.checkpoint()
                        if until is not None and trio.current_time() > until:
                            return arrival
                self._send(arrival, due)
            return None
        finally:
            timer.close()
            self.finished_sending = True

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
                self._drop_host(link, "timeout")

    def _send(self, arrival: Arrival, due: float) -> None:
        counters = self.counters
        counters.offered += 1
        request = arrival.request
        per_request = counters.per_request[request] if counters.per_request else None
        if per_request is not None:
            per_request.offered += 1
        host = self.balancer.pick()
        if host is None:
            counters.no_host += 1
            if per_request is not None:
                per_request.no_host += 1
            return
        link = self.links[host]
        conn = link.conns[link.next_conn % len(link.conns)]
        link.next_conn += 1
        payload = self.encoders[request](arrival.key, arrival.index)
        now = trio.current_time()
        conn.pending.append((due, now, request, arrival.key, arrival.index, payload))
        self.inflight += 1
        self.balancer.started(host)
        counters.sent += 1
        counters.host_sent[host] += 1
        if per_request is not None:
            per_request.sent += 1
        lag_us = int((now - due) * 1e6)
        self.lag.record_value(min(max(lag_us, 1), LATENCY_MAX_US))
        if conn.out or conn.sock is None:
            conn.out += payload
            return
        try:
            written = conn.sock.send(payload)
        except BlockingIOError:
            written = 0
        except OSError:
            self._conn_failed(conn, "conn_error")
            return
        if written < len(payload):
            conn.out += payload[written:]
            conn.wake.set()

    # --- connections ----------------------------------------------------------------------------

    def _decoder(self) -> Any:
        return self.conversation.decoder()

    async def _probe(self, port: int) -> bool:
        """One request must get a complete reply within the timeout: the host really serves. (Any reply:
        a host that answers, even with errors, is up; its replies are judged under load.)"""
        spec = self.requests[0]
        payload = self.module.compile(spec, 1).encode(PROBE_KEY, 0)
        outcome = await exchange(port, self.conversation,
                                 [(payload, self.conversation.judge(spec, PROBE_KEY, 0, any_reply=True))],
                                 timeout=self.client.timeout, window=1)
        return outcome.ok

    async def _bring_up(self, link: HostLink, generation: int, probe: bool) -> None:
        """Open the host's connections and put it in rotation (probing first if it was ejected)."""
        if link.probing == generation:
            return
        link.probing = generation
        try:
            while link.generation == generation:
                answered = await self._probe(link.port) if probe else True
                first = await connect(link.port, self.client.timeout) if answered else None
                if first is not None:
                    socks = [first]
                    for _ in range(self.client.connections - 1):
                        extra = await connect(link.port, self.client.timeout)
                        if extra is not None:
                            socks.append(extra)
                    if link.generation != generation:
                        for sock in socks:
                            sock.close()
                        return
                    self._drop_host(link, "conn_error")
                    for sock in socks:
                        self._add_conn(link, Conn(link.index, generation, sock, self._decoder()))
                    self.balancer.set_in_rotation(link.index, True)
                    return
                probe = True
                await trio.sleep(self.client.probe_interval)
        finally:
            if link.probing == generation:
                link.probing = None

    def _add_conn(self, link: HostLink, conn: Conn) -> None:
        link.conns.append(conn)
        self._start_conn(conn)

    def _start_conn(self, conn: Conn) -> None:
        assert self._nursery is not None
        self._nursery.start_soon(self._reader, conn)
        self._nursery.start_soon(self._writer, conn)

    def _drop_host(self, link: HostLink, kind: str, bad_kind: str | None = None) -> None:
        self.balancer.set_in_rotation(link.index, False)
        lost = sum(len(conn.pending) for conn in link.conns)
        if lost:
            self.lost_inflight[link.index] = lost  # what the host held when it went (for crash records)
        for conn in list(link.conns):
            self._close(conn, kind, bad_kind)
        link.conns.clear()

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
        if conn.sock is not None:
            trio.lowlevel.notify_closing(conn.sock)
            conn.sock.close()
        conn.wake.set()

    def _conn_failed(self, conn: Conn, kind: str, bad_kind: str | None = None) -> None:
        """A connection broke (or its oldest request timed out): the host leaves rotation, and is
        probed back in if its process is still there."""
        if conn.closed:
            return
        link = self.links[conn.host]
        self.lost_inflight[conn.host] = sum(len(c.pending) for c in link.conns)
        self._close(conn, kind, bad_kind)
        self._drop_host(link, kind, bad_kind)
        if link.generation == conn.generation and self._nursery is not None:
            self._nursery.start_soon(self._bring_up, link, conn.generation, True)

    def _replace(self, conn: Conn) -> None:
        """The server closed this connection on purpose (idle, or after a reply that said so): a new
        connection takes its place, and the requests the server never answered go out on it again."""
        link = self.links[conn.host]
        fresh = Conn(conn.host, conn.generation, None, self._decoder())
        fresh.replacement = True
        fresh.pending = conn.pending
        for entry in fresh.pending:
            fresh.out += entry[5]
        self.resent += len(fresh.pending)
        conn.pending = deque()
        self._close(conn, "conn_error")             # nothing left in flight on it: counts nothing
        link.conns.append(fresh)
        assert self._nursery is not None
        self._nursery.start_soon(self._open_replacement, link, fresh)

    async def _open_replacement(self, link: HostLink, conn: Conn) -> None:
        sock = await connect(link.port, self.client.timeout)
        if conn.closed:            # the host went meanwhile
            if sock is not None:
                sock.close()
            return
        if sock is None:
            self._conn_failed(conn, "conn_error")
            return
        conn.sock = sock
        self._start_conn(conn)
        if conn.out:
            conn.wake.set()

    def _protocol_error(self, conn: Conn, error: ProtocolError) -> None:
        """Bytes that are not the protocol: the connection's requests in flight are bad replies (never
        paired with later replies), the connection is closed and the host re-probed."""
        self.protocol_errors += 1
        if self.on_event is not None and self.protocol_errors <= MAX_PROTOCOL_EVENTS:
            self.on_event("protocol-error", conn.host, None, protocol=self.target.protocol, reason=error.reason,
                          excerpt=error.excerpt.decode("latin-1"), in_flight=len(conn.pending),
                          occurrence=self.protocol_errors)
        self._conn_failed(conn, "bad_reply", "protocol_error")

    async def _reader(self, conn: Conn) -> None:
        sock = conn.sock
        assert sock is not None
        decoder = conn.decoder
        try:
            while not conn.closed:
                await trio.lowlevel.wait_readable(sock)
                try:
                    data = sock.recv(262144)
                except BlockingIOError:
                    continue
                except OSError:
                    data = b""
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
                    return
        except (trio.ClosedResourceError, OSError):
            pass

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

    def _replies(self, conn: Conn, replies: list[Any]) -> None:
        now = trio.current_time()
        counters = self.counters
        per_request = counters.per_request
        host = conn.host
        expects = self.expects[host]
        check = self.check
        pending = conn.pending
        count_status = self.count_status
        latency = counters.latency
        conn.answered += len(replies)
        for reply in replies:
            due, _sent, request, key, seq, _payload = pending.popleft()
            if count_status:
                counters.status[reply] = counters.status.get(reply, 0) + 1
            bad = check(expects[request], reply, key, seq)
            if bad is not None:
                counters.bad_reply += 1
                counters.host_errors[host] += 1
                counters.bad_kinds[bad] = counters.bad_kinds.get(bad, 0) + 1
                if per_request:
                    per_request[request].bad_reply += 1
                continue
            counters.ok += 1
            counters.host_ok[host] += 1
            latency_us = min(max(int((now - due) * 1e6), 1), LATENCY_MAX_US)
            latency.record_value(latency_us)
            if per_request:
                per_request[request].ok += 1
                per_request[request].latency.record_value(latency_us)
        self.inflight -= len(replies)
        self.balancer.finished(host, len(replies))

    async def _writer(self, conn: Conn) -> None:
        try:
            while not conn.closed:
                await conn.wake.wait()
                conn.wake = trio.Event()
                while conn.out and not conn.closed:
                    assert conn.sock is not None
                    await trio.lowlevel.wait_writable(conn.sock)
                    try:
                        written = conn.sock.send(conn.out)
                    except BlockingIOError:
                        continue
                    except OSError:
                        self._conn_failed(conn, "conn_error")
                        return
                    del conn.out[:written]
        except (trio.ClosedResourceError, OSError):
            pass

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
