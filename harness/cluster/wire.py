"""The link between the machine that ran the command and each machine running a share of a real fleet.

A machine's agent (harness.cluster.machine) connects back over TCP to a listener the command opened for
the trial, and first sends its secret: a random token per machine and trial, handed over through Dask (a
trusted channel: docs/cluster.md, Trust) and the agent's stdin, never on a command line. The listener
compares it before it unpickles anything: another user on either machine who connects to the port gets
the connection closed, not code run as root. Then both sides speak harness.run.driverpool's Channel
(length-prefixed pickles, as the driver workers do over their socketpairs), each frame sealed with an HMAC
keyed from the token, one key per direction, over its sequence number: a frame injected, replayed or
reordered on the way is refused before it is unpickled, on either side. (Not encrypted: the frames can be
read on the way.)
"""

from __future__ import annotations

import errno
import hmac
import secrets
import socket
import struct
from collections.abc import Iterable

import trio

from harness.base.errors import HarnessError
from harness.run.driverpool import Channel, link_keys

TOKEN_BYTES = 32
HELLO = struct.Struct(f"!{TOKEN_BYTES}sI")     # token, machine number
HELLO_TIMEOUT = 10.0
MAX_PENDING = 64              # connections saying hello at once; more are closed at once
USER_TIMEOUT_MS = 30_000      # data unacknowledged this long (a partition, a machine gone): the link fails


def keep_alive(sock: socket.socket | trio.socket.SocketType) -> None:
    """A link to another machine fails by itself when that machine goes away without a FIN (powered off,
    partitioned): keepalive probes when idle, and a bound on unacknowledged data."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, 10)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, 5)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, 4)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, USER_TIMEOUT_MS)


def new_token() -> bytes:
    return secrets.token_bytes(TOKEN_BYTES)


def local_address_towards(address: str) -> str:
    """This machine's address on the route to `address` (a Dask scheduler's `tcp://host:port`): where
    the workers' machines can reach it. A UDP connect sends nothing; it only picks the route."""
    host_port = address.split("://", 1)[-1]
    host = host_port.rsplit(":", 1)[0].strip("[]") or "127.0.0.1"
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect((socket.gethostbyname(host), 9))
        except OSError as exc:
            raise HarnessError(f"no route from this machine to the cluster at {address}: {exc}") from None
        return probe.getsockname()[0]


async def read_hello(stream: trio.SocketStream, tokens: Iterable[bytes]) -> tuple[bytes, int, Channel] | None:
    """(the token, the number the peer gave, its channel) if the peer knows one of the tokens; None (closed)
    otherwise."""
    buffer = bytearray()
    with trio.move_on_after(HELLO_TIMEOUT):
        while len(buffer) < HELLO.size:
            try:
                chunk = await stream.receive_some(HELLO.size - len(buffer))
            except trio.BrokenResourceError:
                break
            if not chunk:
                break
            buffer += chunk
    if len(buffer) == HELLO.size:
        given, number = HELLO.unpack(bytes(buffer))
        for token in list(tokens):
            if hmac.compare_digest(given, token):
                return token, number, Channel(stream, keys=link_keys(token, "command"))
    await stream.aclose()
    return None


class Callbacks:
    """Connections to the command's listener, each handed to whoever expects its token (a machine's agent,
    a driver shard); a token is good for one connection. Anything else is closed unread."""

    def __init__(self, listener: trio.SocketListener):
        self.listener = listener
        self.waiting: dict[bytes, trio.MemorySendChannel[tuple[int, Channel]]] = {}

    def expect(self) -> tuple[bytes, trio.MemoryReceiveChannel[tuple[int, Channel]]]:
        token = new_token()
        send, receive = trio.open_memory_channel[tuple[int, Channel]](1)
        self.waiting[token] = send
        return token, receive

    async def serve(self) -> None:
        pending = trio.Semaphore(MAX_PENDING)
        async with trio.open_nursery() as nursery:
            while True:
                try:
                    stream = await self.listener.accept()
                except OSError as exc:        # out of descriptors (a flood of connections): wait, go on
                    if exc.errno not in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                        raise
                    await trio.sleep(0.1)
                    continue
                if pending.value == 0:
                    await stream.aclose()     # more strangers than agents could ever be: not waited for
                    continue
                nursery.start_soon(self._hello, stream, pending)

    async def _hello(self, stream: trio.SocketStream, pending: trio.Semaphore) -> None:
        async with pending:
            hello = await read_hello(stream, self.waiting)
        if hello is None:
            return
        token, number, channel = hello
        waiter = self.waiting.pop(token, None)
        if waiter is None:
            await channel.aclose()
            return
        keep_alive(stream.socket)
        waiter.send_nowait((number, channel))

    def forget(self, token: bytes) -> None:
        """A token no longer expected (its trial is over)."""
        self.waiting.pop(token, None)


async def dial(address: str, port: int, token: bytes, number: int) -> Channel:
    """The agent's side: connect to the command's listener and say who it is."""
    stream = await trio.open_tcp_stream(address, port)
    keep_alive(stream.socket)
    await stream.send_all(HELLO.pack(token, number))
    return Channel(stream, keys=link_keys(token, "machine"))


def dial_socket(address: str, port: int, token: bytes, number: int, timeout: float = 30.0) -> socket.socket:
    """The same, as a plain connected socket (handed to a driver shard process as its FD)."""
    sock = socket.create_connection((address, port), timeout=timeout)
    sock.settimeout(None)
    keep_alive(sock)
    sock.sendall(HELLO.pack(token, number))
    return sock
