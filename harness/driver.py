"""The open-loop load driver and the client side of the balancer.

Requests go out at their scheduled arrival times whatever the fleet is doing (open loop), and
latency is measured from the *intended* send time, so a slow fleet cannot hide its own latency
(no coordinated omission). Requests are pipelined on a few connections per host; replies come
back in order. Nothing is dropped silently: every arrival ends as ok, timeout, conn_error
(connection lost with the request in flight), no_host (nobody in rotation) or bad_reply.

Host membership: the supervisor tells us when a host is ready (we connect, then put it in
rotation) and when its process is gone (out at once). A host that stops answering (paused,
hung) is found out by its oldest request timing out: its connections are closed, their requests
counted as timeouts, and it is re-probed until it answers again.
"""

from __future__ import annotations

import re
import socket
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import trio
from hdrh.histogram import HdrHistogram

from harness.balancer import Balancer
from harness.plan import Arrival
from harness.scenario import Client, Target
from harness.timer import PreciseTimer

LATENCY_MAX_US = 3_600_000_000  # an hour, in microseconds
ERROR_KINDS = ("timeout", "conn_error", "no_host", "bad_reply")


def new_histogram() -> HdrHistogram:
    return HdrHistogram(1, LATENCY_MAX_US, 3)


def release_histogram(histogram: HdrHistogram) -> None:
    """Free a histogram's ~190 KB counts array now. An hdrh histogram is a reference cycle (histogram <->
    its encoder), so dropping the last reference frees nothing until the cyclic GC runs: a rollup merging a
    minute of rows held all 60 decoded histograms (~11 MiB) at once, in a worker thread's malloc arena,
    and glibc keeps an arena's high-water mark, so the harness's RSS stepped up by ~10 MiB per arena. Only
    for histograms that are done with (decoded for a merge, or a second's counters once encoded)."""
    histogram.encoder = None


@dataclass
class Counters:
    """What happened in one sampling interval (one second)."""

    hosts: int
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

    def __post_init__(self) -> None:
        self.host_sent = [0] * self.hosts
        self.host_ok = [0] * self.hosts
        self.host_errors = [0] * self.hosts


class Conn:
    __slots__ = ("host", "generation", "sock", "pending", "out", "wake", "closed")

    def __init__(self, host: int, generation: int, sock: socket.socket):
        self.host = host
        self.generation = generation
        self.sock = sock
        self.pending: deque[tuple[float, float]] = deque()   # (intended time, actual send time)
        self.out = bytearray()
        self.wake = trio.Event()
        self.closed = False


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
                 expect_replies: Sequence[str | None] | None = None):
        """`expect_replies`: each host's reply pattern, for a fleet of different kinds (default: the target's)."""
        self.target = target
        self.client = client
        self.balancer = balancer
        self.links = [HostLink(i, port) for i, port in enumerate(ports)]
        self.counters = Counters(len(ports))
        self.lag = new_histogram()                 # intended -> actual send, whole run (µs)
        self.terminator = target.terminator.encode()
        patterns = list(expect_replies) if expect_replies is not None else [target.expect_reply] * len(ports)
        compiled = {p: re.compile(p.encode()) for p in set(patterns) if p}
        self.reply_patterns = [compiled[p] if p else None for p in patterns]
        self.request_head, _, self.request_tail = target.request.partition("{key}")
        self._nursery: trio.Nursery | None = None
        self.finished_sending = False
        self.inflight = 0
        self.lost_inflight = [0] * len(ports)

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
        counters, self.counters = self.counters, Counters(len(self.links))
        return counters

    # --- running ------------------------------------------------------------------------------

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Background tasks (connections, timeouts); runs until cancelled."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            nursery.start_soon(self._timeouts)
            task_status.started()
            await trio.sleep_forever()

    async def send_all(self, arrivals: Iterator[Arrival], start: float) -> None:
        """Send every arrival at start + arrival.t (trio clock)."""
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
                self._send(arrival, due)
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
        host = self.balancer.pick()
        if host is None:
            counters.no_host += 1
            return
        link = self.links[host]
        conn = link.conns[link.next_conn % len(link.conns)]
        link.next_conn += 1
        payload = (self.request_head + arrival.key + self.request_tail).encode()
        now = trio.current_time()
        conn.pending.append((due, now))
        self.inflight += 1
        self.balancer.started(host)
        counters.sent += 1
        counters.host_sent[host] += 1
        lag_us = int((now - due) * 1e6)
        self.lag.record_value(min(max(lag_us, 1), LATENCY_MAX_US))
        if conn.out:
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

    async def _connect(self, port: int) -> socket.socket | None:
        sock = trio.socket.socket(trio.socket.AF_INET, trio.socket.SOCK_STREAM)
        try:
            with trio.move_on_after(self.client.timeout):
                await sock.connect(("127.0.0.1", port))
                raw = socket.socket(fileno=sock.detach())
                raw.setblocking(False)
                raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                return raw
        except OSError:
            pass
        sock.close()
        return None

    async def _probe(self, port: int) -> socket.socket | None:
        """Connect and get one reply within the timeout: the host really serves."""
        sock = await self._connect(port)
        if sock is None:
            return None
        payload = (self.request_head + "probe" + self.request_tail).encode()
        try:
            with trio.move_on_after(self.client.timeout):
                sock.send(payload)
                received = b""
                while self.terminator not in received:
                    await trio.lowlevel.wait_readable(sock)
                    chunk = sock.recv(65536)
                    if not chunk:
                        raise OSError("closed")
                    received += chunk
                return sock
        except OSError:
            pass
        sock.close()
        return None

    async def _bring_up(self, link: HostLink, generation: int, probe: bool) -> None:
        """Open the host's connections and put it in rotation (probing first if it was ejected)."""
        if link.probing == generation:
            return
        link.probing = generation
        try:
            while link.generation == generation:
                first = await (self._probe(link.port) if probe else self._connect(link.port))
                if first is not None:
                    socks = [first]
                    for _ in range(self.client.connections - 1):
                        extra = await self._connect(link.port)
                        if extra is not None:
                            socks.append(extra)
                    if link.generation != generation:
                        for sock in socks:
                            sock.close()
                        return
                    self._drop_host(link, "conn_error")
                    for sock in socks:
                        self._add_conn(link, Conn(link.index, generation, sock))
                    self.balancer.set_in_rotation(link.index, True)
                    return
                probe = True
                await trio.sleep(self.client.probe_interval)
        finally:
            if link.probing == generation:
                link.probing = None

    def _add_conn(self, link: HostLink, conn: Conn) -> None:
        link.conns.append(conn)
        assert self._nursery is not None
        self._nursery.start_soon(self._reader, conn)
        self._nursery.start_soon(self._writer, conn)

    def _drop_host(self, link: HostLink, kind: str) -> None:
        self.balancer.set_in_rotation(link.index, False)
        lost = sum(len(conn.pending) for conn in link.conns)
        if lost:
            self.lost_inflight[link.index] = lost  # what the host held when it went (for crash records)
        for conn in list(link.conns):
            self._close(conn, kind)
        link.conns.clear()

    def _close(self, conn: Conn, kind: str) -> None:
        if conn.closed:
            return
        conn.closed = True
        failed = len(conn.pending)
        if failed:
            setattr(self.counters, kind, getattr(self.counters, kind) + failed)
            self.counters.host_errors[conn.host] += failed
            self.balancer.finished(conn.host, failed)
            self.inflight -= failed
            conn.pending.clear()
        link = self.links[conn.host]
        if conn in link.conns:
            link.conns.remove(conn)
        trio.lowlevel.notify_closing(conn.sock)
        conn.sock.close()
        conn.wake.set()

    def _conn_failed(self, conn: Conn, kind: str) -> None:
        """A connection broke (or its oldest request timed out): the host leaves rotation, and is
        probed back in if its process is still there."""
        if conn.closed:
            return
        link = self.links[conn.host]
        self.lost_inflight[conn.host] = sum(len(c.pending) for c in link.conns)
        self._close(conn, kind)
        self._drop_host(link, kind)
        if link.generation == conn.generation and self._nursery is not None:
            self._nursery.start_soon(self._bring_up, link, conn.generation, True)

    async def _reader(self, conn: Conn) -> None:
        buffer = b""
        terminator = self.terminator
        counters_of = self
        try:
            while not conn.closed:
                await trio.lowlevel.wait_readable(conn.sock)
                try:
                    data = conn.sock.recv(262144)
                except BlockingIOError:
                    continue
                except OSError:
                    data = b""
                if not data:
                    self._conn_failed(conn, "conn_error")
                    return
                now = trio.current_time()
                buffer += data
                if terminator not in data and terminator not in buffer:
                    continue
                *replies, buffer = buffer.split(terminator)
                counters = counters_of.counters
                pattern = self.reply_patterns[conn.host]
                for reply in replies:
                    if not conn.pending:
                        break  # a line nobody asked for (a banner): ignore
                    due, _sent = conn.pending.popleft()
                    self.inflight -= 1
                    self.balancer.finished(conn.host)
                    if pattern is not None and not pattern.search(reply):
                        counters.bad_reply += 1
                        counters.host_errors[conn.host] += 1
                        continue
                    counters.ok += 1
                    counters.host_ok[conn.host] += 1
                    latency_us = int((now - due) * 1e6)
                    counters.latency.record_value(min(max(latency_us, 1), LATENCY_MAX_US))
        except (trio.ClosedResourceError, OSError):
            pass

    async def _writer(self, conn: Conn) -> None:
        try:
            while not conn.closed:
                await conn.wake.wait()
                conn.wake = trio.Event()
                while conn.out and not conn.closed:
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
