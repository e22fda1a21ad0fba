"""The link between the machine that ran the command and each machine running a share of a real fleet.

A machine's agent (harness.cluster.machine) connects back over TCP to a listener the command opened for
the trial, and first sends its secret: a random token per machine and trial, handed over through Dask (a
trusted channel: docs/cluster.md, Trust) and the agent's stdin, never on a command line. The listener
compares it before it unpickles anything: another user on either machine who connects to the port gets
the connection closed, not code run as root. Then both sides speak harness.run.driverpool's Channel
(length-prefixed pickles), as the driver workers do over their socketpairs.
"""

from __future__ import annotations

import hmac
import secrets
import socket
import struct

import trio

from harness.base.errors import HarnessError
from harness.run.driverpool import Channel

TOKEN_BYTES = 32
HELLO = struct.Struct(f"!{TOKEN_BYTES}sI")     # token, machine number
HELLO_TIMEOUT = 10.0


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


async def read_hello(stream: trio.SocketStream, tokens: dict[int, bytes]) -> tuple[int, Channel] | None:
    """(machine number, its channel) if the peer knows a machine's token; None otherwise (closed)."""
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
        token, machine = HELLO.unpack(bytes(buffer))
        expected = tokens.get(machine)
        if expected is not None and hmac.compare_digest(token, expected):
            return machine, Channel(stream)
    await stream.aclose()
    return None


async def dial(address: str, port: int, token: bytes, machine: int) -> Channel:
    """The agent's side: connect to the command's listener and say who it is."""
    stream = await trio.open_tcp_stream(address, port)
    await stream.send_all(HELLO.pack(token, machine))
    return Channel(stream)
