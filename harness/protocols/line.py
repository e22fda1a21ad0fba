"""The line protocol: one request written as a text template, one reply line back per request.

The template is sent exactly as written, its placeholders filled ({key}, {value}, {seq}); a template
without placeholders goes out byte for byte. A reply is the bytes up to the terminator. A line that
arrives with no request in flight (a banner, or a reply of several lines: use resp or memcached for
those) is a protocol error, never paired with a later request.
"""

from __future__ import annotations

from typing import Any

from harness.base.fields import Invalid, describe
from harness.protocols.common import Pattern, RequestSpec, TextTemplate, parse_pattern, payload, unknown_placeholders

DEFAULT_TERMINATOR = "\n"


def parse_request(value: Any) -> str:
    if not isinstance(value, str) or not value:
        raise Invalid(f"expected a request line like \"GET {{key}}\\n\", got {describe(value)}")
    if "\n" not in value:
        raise Invalid("a line request must end with a newline (write it as \"GET {key}\\n\")")
    unknown = unknown_placeholders(value)
    if unknown:
        raise Invalid(f"unknown placeholder '{{{unknown[0]}}}' (known: {{key}} {{value}} {{seq}})")
    return value


def parse_expect(value: Any) -> Pattern | None:
    """A regular expression a good reply line matches (searched, not anchored)."""
    return parse_pattern(value)


class Encoder:
    __slots__ = ("_render",)

    def __init__(self, spec: RequestSpec, seed: int):
        self._render = TextTemplate(spec.template, payload(seed, spec.value_size)).render

    def encode(self, key: str, seq: int) -> bytes:
        return self._render(key, seq).encode()


def compile(spec: RequestSpec, seed: int) -> Encoder:
    return Encoder(spec, seed)


class Decoder:
    """Splits on the terminator. (More replies than requests in flight is caught by the caller.)"""

    __slots__ = ("terminator", "buffer", "closing")

    def __init__(self, terminator: str = DEFAULT_TERMINATOR):
        self.terminator = terminator.encode()
        self.buffer = b""
        self.closing = False

    def feed(self, data: bytes) -> list[bytes]:
        buffer = self.buffer + data if self.buffer else data
        if self.terminator not in data and self.terminator not in buffer:
            self.buffer = buffer
            return []
        *replies, self.buffer = buffer.split(self.terminator)
        return replies

    def eof(self) -> list[bytes]:
        return []


def check(expect: Pattern | None, reply: bytes, key: str, seq: int) -> str | None:
    if expect is None or expect.matches(reply, key, seq):
        return None
    return "mismatch"


def describe_reply(reply: bytes) -> str:
    return reply.decode("utf-8", "replace")
