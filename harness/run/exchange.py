"""Short request/reply exchanges outside the load: readiness probes, set-up requests, re-probes.

They go through the same codecs as the load (harness.protocols), on one connection, with a window of
requests in flight, each reply judged by its request's expectation. The load itself is the driver's.
"""

from __future__ import annotations

import socket
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import trio

from harness.protocols import ProtocolError, RequestSpec, codec

Judge = Callable[[Any], "str | None"]   # reply -> None (good) or the kind of bad reply


@dataclass
class Outcome:
    sent: int = 0
    good: int = 0
    bad: int = 0
    first_bad: str | None = None     # "kind: reply" of the first bad reply
    error: str | None = None         # why the exchange stopped early (closed, timeout, protocol error)

    @property
    def ok(self) -> bool:
        return self.error is None and self.bad == 0

    def describe(self) -> str:
        if self.error is not None:
            return f"{self.error} after {self.good} good replies of {self.sent} sent"
        if self.bad:
            return f"{self.bad} of {self.sent} replies were bad (first: {self.first_bad})"
        return f"{self.good} good replies"


@dataclass
class Conversation:
    """A protocol as the exchanges need it: a decoder factory and a way to print a reply."""

    protocol: str
    terminator: str = "\n"
    module: Any = field(init=False)

    def __post_init__(self) -> None:
        self.module = codec(self.protocol)

    def decoder(self) -> Any:
        return self.module.Decoder(self.terminator) if self.protocol == "line" else self.module.Decoder()

    def judge(self, spec: RequestSpec, key: str, seq: int, any_reply: bool = False) -> Judge:
        """any_reply: a complete reply is enough (a re-probe asks whether the host answers at all)."""
        if any_reply:
            return lambda reply: None
        check, expect = self.module.check, spec.expect
        return lambda reply: check(expect, reply, key, seq)


async def connect(port: int, timeout: float, host: str = "127.0.0.1") -> socket.socket | None:
    """A non-blocking, TCP_NODELAY socket connected within the timeout, or None."""
    sock = trio.socket.socket(trio.socket.AF_INET, trio.socket.SOCK_STREAM)
    try:
        with trio.move_on_after(timeout):
            await sock.connect((host, port))
            raw = socket.socket(fileno=sock.detach())
            raw.setblocking(False)
            raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            return raw
    except OSError:
        pass
    sock.close()
    return None


async def exchange(port: int, conversation: Conversation, requests: Iterable[tuple[bytes, Judge]], *,
                   timeout: float, window: int = 64, addr: str = "127.0.0.1") -> Outcome:
    """Send the requests on one connection with at most `window` in flight; judge each reply. Gives up
    when no reply comes within `timeout` of the last progress, when the server closes with requests
    unanswered, or on bytes that are not the protocol. A server that announces it closes after a reply
    (HTTP `Connection: close`) gets the unanswered requests again on a new connection."""
    outcome = Outcome()
    pending = iter(requests)
    in_flight: deque[tuple[bytes, Judge]] = deque()
    exhausted = False
    while True:
        sock = await connect(port, timeout, addr)
        if sock is None:
            outcome.error = f"cannot connect to port {port}" + (f" of {addr}" if addr != "127.0.0.1" else "")
            return outcome
        try:
            resend = b"".join(payload for payload, _ in in_flight)
            again = await _on_connection(sock, conversation, pending, in_flight, outcome, timeout, window, resend)
        finally:
            sock.close()
        if not again:
            return outcome


async def _on_connection(sock: socket.socket, conversation: Conversation, pending: Any,
                         in_flight: deque[tuple[bytes, Judge]], outcome: Outcome, timeout: float, window: int,
                         resend: bytes) -> bool:
    """Exchange on one connection; True when the server closed it as announced and there is more to send."""
    decoder = conversation.decoder()
    out = bytearray(resend)
    try:
        while True:
            while len(in_flight) < window:
                item = next(pending, None)
                if item is None:
                    break
                out += item[0]
                in_flight.append(item)
                outcome.sent += 1
            if not in_flight:
                return False
            with trio.move_on_after(timeout) as scope:
                while out:
                    await trio.lowlevel.wait_writable(sock)
                    try:
                        written = sock.send(out)
                    except BlockingIOError:
                        continue
                    del out[:written]
                replies: list[Any] = []
                while not replies:
                    await trio.lowlevel.wait_readable(sock)
                    try:
                        data = sock.recv(262144)
                    except BlockingIOError:
                        continue
                    replies = decoder.feed(data) if data else decoder.eof()
                    if not data and not replies:
                        if decoder.closing:
                            return True
                        outcome.error = "the server closed the connection"
                        return False
            if scope.cancelled_caught:
                outcome.error = f"no reply within {timeout:g}s"
                return False
            if len(replies) > len(in_flight):
                outcome.error = f"{len(replies) - len(in_flight)} reply(ies) with no request in flight"
                return False
            for reply in replies:
                kind = in_flight.popleft()[1](reply)
                if kind is None:
                    outcome.good += 1
                else:
                    outcome.bad += 1
                    if outcome.first_bad is None:
                        outcome.first_bad = f"{kind}: {conversation.module.describe_reply(reply)[:120]}"
            if decoder.closing:
                return bool(in_flight) or _more(pending, in_flight, outcome)
    except ProtocolError as exc:
        outcome.error = f"not a {conversation.protocol} reply ({exc.reason}): {exc.excerpt[:80]!r}"
        return False
    except OSError as exc:
        outcome.error = f"connection failed: {exc.strerror or exc}"
        return False


def _more(pending: Any, in_flight: deque[tuple[bytes, Judge]], outcome: Outcome) -> bool:
    """Whether requests remain; a peeked one goes to in_flight's front to be sent on the next connection."""
    item = next(pending, None)
    if item is None:
        return False
    in_flight.appendleft(item)
    outcome.sent += 1
    return True
