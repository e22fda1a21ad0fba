"""The fault proxy: one listener per proxied link (harness/run/faults/network/topology.py), each connection forwarded to
its host and shaped by the network faults armed on the link (toxiproxy's model, in trio, with no kernel
module: this kernel has neither netem nor iptables).

- latency, bandwidth, slicer: each chunk read is released at the times `toxics.Shaper` gives; reading goes
  on meanwhile (up to MAX_QUEUED bytes per direction, then the reader waits: TCP's own back-pressure);
- stall: nothing is written in that direction while it lasts; the connection stays open;
- partition: established connections stall (both ways unless a direction is given); new ones are reset at
  once (`how: refuse`: the client's connect succeeds, its first read or write fails with ECONNRESET) or held
  without an upstream connection until the partition ends (`how: blackhole`: requests time out);
- reset: every connection on the link is closed with RST (SO_LINGER 0) on both sides when it is armed, and
  any connection made while it lasts is reset at once.
With nothing armed, a connection is two loops of recv and send on non-blocking sockets (no queue, no timer).
The host's own failures pass through as they are: an upstream RST is an RST to the client, a FIN a FIN.
"""

from __future__ import annotations

import random
import socket
import struct
from collections import deque
from collections.abc import Iterable
from typing import Any

import trio

from harness.run.faults.network.toxics import SHAPING, Counts, Shaper, applies
from harness.run.faults.network.topology import DRIVER, LinkSpec
from harness.scenario.model import NetFault

DIRECTIONS = ("upstream", "downstream")
MAX_QUEUED = 4 * 1024 * 1024     # bytes a direction holds before the proxy stops reading it
READ_SIZE = 65536
CONNECT_TIMEOUT = 5.0
MAX_PEERS = 32                   # client addresses a link counts one by one (the rest: "other")
_LINGER_RST = struct.pack("ii", 1, 0)


def _rst_close(sock: socket.socket | None) -> None:
    """Close with an RST (SO_LINGER 0) instead of a FIN."""
    if sock is None or sock.fileno() < 0:
        return
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RST)
    except OSError:
        pass
    trio.lowlevel.notify_closing(sock)
    sock.close()


def _close(sock: socket.socket | None) -> None:
    if sock is not None and sock.fileno() >= 0:
        trio.lowlevel.notify_closing(sock)
        sock.close()


def _tune(sock: socket.socket) -> None:
    sock.setblocking(False)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


async def _send_all(sock: socket.socket, data: bytes) -> None:
    view = memoryview(data)
    while view:
        try:
            sent = sock.send(view)
        except BlockingIOError:
            await trio.lowlevel.wait_writable(sock)
            continue
        view = view[sent:]


async def _connect(addr: tuple[str, int], timeout: float) -> socket.socket | None:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    _tune(sock)
    try:
        with trio.move_on_after(timeout):
            error = sock.connect_ex(addr)
            if error not in (0, 115):   # EINPROGRESS
                raise OSError(error, "connect")
            if error:
                await trio.lowlevel.wait_writable(sock)
                error = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                if error:
                    raise OSError(error, "connect")
            return sock
    except OSError:
        pass
    _close(sock)
    return None


class Link:
    """One proxied path (a client kind to one host): its listener, its connections, its armed faults."""

    def __init__(self, spec: LinkSpec, name: str, upstream: tuple[str, int], seed: int, listen: str = "127.0.0.1"):
        self.spec = spec
        self.name = name
        self.upstream = upstream
        self.seed = seed
        self.listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.listener.bind((listen, 0))   # held for the whole trial: no port to lose to anyone
        self.listener.listen(1024)
        self.listener.setblocking(False)
        self.port: int = self.listener.getsockname()[1]
        self.armed: list[NetFault] = []
        self.connections: set[Connection] = set()
        self.counts: dict[int, Counts] = {}
        self.gates = {d: trio.Event() for d in DIRECTIONS}
        self.open_for_connect = trio.Event()
        for event in (*self.gates.values(), self.open_for_connect):
            event.set()
        self.accepted = 0
        self.upstream_failures = 0
        self.bytes = {d: 0 for d in DIRECTIONS}
        self.peers: dict[str, int] = {}      # connections by client address (over a cluster it listens on
        self._serial = 0                     # the machine's address: whoever could reach it is seen here)

    def count(self, fault: NetFault) -> Counts:
        return self.counts.setdefault(fault.index, Counts())

    # --- what is armed -------------------------------------------------------------------------

    def shaping(self, direction: str) -> list[NetFault]:
        return [f for f in self.armed if f.kind in SHAPING and applies(f, direction)]

    def holding(self, direction: str) -> list[NetFault]:
        return [f for f in self.armed if f.kind in ("stall", "partition") and applies(f, direction)]

    def refusing(self) -> NetFault | None:
        return next((f for f in reversed(self.armed) if (f.kind == "partition" and f.how == "refuse")
                     or (f.kind == "reset" and not f.instant)), None)

    def blackholing(self) -> NetFault | None:
        return next((f for f in reversed(self.armed) if f.kind == "partition" and f.how == "blackhole"), None)

    def arm(self, fault: NetFault) -> None:
        if fault.kind == "reset":
            for connection in list(self.connections):
                if connection.reset():
                    self.count(fault).connections_reset += 1
            if fault.instant:
                return
        self.armed.append(fault)
        self._regate()

    def disarm(self, fault: NetFault) -> None:
        if fault in self.armed:
            self.armed.remove(fault)
        self._regate()

    def _regate(self) -> None:
        for direction, gate in self.gates.items():
            if self.holding(direction):
                if gate.is_set():
                    self.gates[direction] = trio.Event()
            else:
                gate.set()
        if self.blackholing():
            if self.open_for_connect.is_set():
                self.open_for_connect = trio.Event()
        else:
            self.open_for_connect.set()

    # --- serving -------------------------------------------------------------------------------

    async def serve(self) -> None:
        try:
            async with trio.open_nursery() as nursery:
                while True:
                    try:
                        await trio.lowlevel.wait_readable(self.listener)
                    except trio.ClosedResourceError:
                        return   # closed (the trial is over)
                    starved = False
                    while True:
                        try:
                            sock, peer = self.listener.accept()
                        except BlockingIOError:
                            break
                        except OSError:
                            starved = True   # out of fds, say: the client sees its connection wait or fail
                            break
                        self._count_peer(peer[0])
                        self._admit(sock, nursery)
                    if starved:            # (still readable: without a pause this would spin)
                        await trio.sleep(0.05)
        finally:
            _close(self.listener)
            for connection in list(self.connections):
                connection.reset()

    def _admit(self, sock: socket.socket, nursery: trio.Nursery) -> None:
        _tune(sock)
        self.accepted += 1
        refusing = self.refusing()
        if refusing is not None:
            counts = self.count(refusing)
            if refusing.kind == "reset":
                counts.connections_reset += 1
            else:
                counts.connections_refused += 1
            _rst_close(sock)
            return
        self._serial += 1
        connection = Connection(self, sock, random.Random(f"{self.seed}:{self.name}:{self._serial}"))
        self.connections.add(connection)
        nursery.start_soon(connection.run)

    def _count_peer(self, addr: str) -> None:
        if addr in self.peers or len(self.peers) < MAX_PEERS:
            self.peers[addr] = self.peers.get(addr, 0) + 1
        else:
            self.peers["other"] = self.peers.get("other", 0) + 1

    def close(self) -> None:
        _close(self.listener)


class Connection:
    """A client's connection and its upstream twin."""

    def __init__(self, link: Link, client: socket.socket, rng: random.Random):
        self.link = link
        self.client: socket.socket | None = client
        self.upstream: socket.socket | None = None
        self.scope = trio.CancelScope()
        self.rng = rng
        self.stalled_by: set[int] = set()
        self.closed = False

    def reset(self) -> bool:
        """RST both sides now; False when it was already closed."""
        if self.closed:
            return False
        self.closed = True
        _rst_close(self.client)
        _rst_close(self.upstream)
        self.scope.cancel()
        return True

    async def run(self) -> None:
        link = self.link
        try:
            with self.scope:
                holding = link.blackholing()
                if holding is not None:
                    link.count(holding).connections_blackholed += 1
                    while link.blackholing() is not None:   # no upstream connection until it ends
                        await link.open_for_connect.wait()
                self.upstream = await _connect(link.upstream, CONNECT_TIMEOUT)
                if self.upstream is None:
                    link.upstream_failures += 1   # the host is down: the client sees a reset, as it would
                    self.reset()
                    return
                async with trio.open_nursery() as nursery:
                    for direction, src, dst in (("upstream", self.client, self.upstream),
                                                ("downstream", self.upstream, self.client)):
                        pipe = Pipe(self, src, dst, direction, Shaper(self.rng))
                        nursery.start_soon(pipe.read_loop)
                        nursery.start_soon(pipe.write_loop)
        except (OSError, trio.ClosedResourceError):
            self.reset()
        finally:
            if not self.closed:
                self.closed = True
                _close(self.client)
                _close(self.upstream)
            link.connections.discard(self)


class Pipe:
    """One direction of a connection: a reader and a writer with a queue of timed segments between them."""

    def __init__(self, connection: Connection, src: socket.socket | None, dst: socket.socket | None,
                 direction: str, shaper: Shaper):
        assert src is not None and dst is not None
        self.connection = connection
        self.link = connection.link
        self.src = src
        self.dst = dst
        self.direction = direction
        self.shaper = shaper
        self.queue: deque[tuple[float, bytes]] = deque()
        self.queued = 0
        self.eof = False
        self.wake = trio.Event()
        self.space = trio.Event()

    async def read_loop(self) -> None:
        try:
            await self._read()
        except (OSError, trio.ClosedResourceError):
            self.connection.reset()   # one side broke: the other learns it the same way (RST)

    async def write_loop(self) -> None:
        try:
            await self._write()
        except (OSError, trio.ClosedResourceError):
            self.connection.reset()

    async def _read(self) -> None:
        link, direction, src = self.link, self.direction, self.src
        ready = 0
        while True:
            try:
                data = src.recv(READ_SIZE)
            except BlockingIOError:
                ready = 0
                await trio.lowlevel.wait_readable(src)
                continue
            ready += 1
            if ready % 32 == 0:
                await trio.lowlevel.checkpoint()   # a busy stream must not starve the others
            if not data:
                self.eof = True
                self.wake.set()
                return
            link.bytes[direction] += len(data)
            shaping = link.shaping(direction)
            holding = link.holding(direction)
            if not shaping and not self.queue and not holding:
                await _send_all(self.dst, data)   # nothing armed: straight through
                continue
            for fault in holding:
                link.count(fault).bytes_held += len(data)   # read while held: it waits for the hold to end
            now = trio.current_time()
            self.queue.extend(self.shaper.plan(now, data, shaping, link.counts) if shaping else [(now, data)])
            self.queued += len(data)
            self.wake.set()
            while self.queued > MAX_QUEUED:
                self.space = trio.Event()
                await self.space.wait()

    async def _write(self) -> None:
        link, direction = self.link, self.direction
        while True:
            if not self.queue:
                if self.eof:
                    try:
                        self.dst.shutdown(socket.SHUT_WR)   # the FIN, after everything before it
                    except OSError:
                        pass
                    return
                self.wake = trio.Event()
                await self.wake.wait()
                continue
            holding = link.holding(direction)
            if holding:
                for fault in holding:
                    counts = link.count(fault)
                    if fault.index not in self.connection.stalled_by:
                        self.connection.stalled_by.add(fault.index)
                        counts.connections_stalled += 1
                await link.gates[direction].wait()
                continue
            release, segment = self.queue[0]
            if release > trio.current_time():
                await trio.sleep_until(release)
                continue   # a stall may have come meanwhile
            await _send_all(self.dst, segment)
            self.queue.popleft()
            self.queued -= len(segment)
            if self.queued <= MAX_QUEUED:
                self.space.set()


class FaultProxy:
    """Every proxied link of a trial, and the network faults' timeline."""

    def __init__(self, links: Iterable[tuple[LinkSpec, str, tuple[str, int]]], fault_links: dict[int, list[LinkSpec]],
                 faults: Iterable[NetFault], seed: int, listen: str = "127.0.0.1"):
        """`listen`: the address the links listen on (over a cluster, the machine's: other machines connect)."""
        self.links = {spec: Link(spec, name, upstream, seed, listen) for spec, name, upstream in links}
        self.faults = {f.index: f for f in faults}
        self.fault_links = {index: [s for s in specs if s in self.links] for index, specs in fault_links.items()}

    def via(self) -> dict[LinkSpec, int]:
        return {spec: link.port for spec, link in self.links.items()}

    def driver_ports(self, ports: list[int]) -> list[int]:
        """The port the driver uses for each host: its link's proxy, or the host's own."""
        return [self.links[LinkSpec(DRIVER, h)].port if LinkSpec(DRIVER, h) in self.links else port
                for h, port in enumerate(ports)]

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            for link in self.links.values():
                nursery.start_soon(link.serve)
            task_status.started()

    def close(self) -> None:
        for link in self.links.values():
            link.close()

    def act(self, action: str, fault: NetFault) -> None:
        for spec in self.fault_links.get(fault.index, []):
            link = self.links[spec]
            if action == "arm":
                link.arm(fault)
            else:
                link.disarm(fault)

    def counts(self, index: int) -> dict[str, int]:
        total = Counts()
        for spec in self.fault_links.get(index, []):
            total.add(self.links[spec].counts.get(index, Counts()))
        return total.as_dict()

    def summary(self) -> dict[str, Any]:
        """Per fault what it did, and per link what went through (for the trial's detail)."""
        return {"faults": {str(i): self.counts(i) for i in self.faults},
                "links": {link.name: {"port": link.port, "connections": link.accepted, "peers": dict(link.peers),
                                      "upstream_failures": link.upstream_failures, "bytes": dict(link.bytes)}
                          for link in self.links.values()}}
