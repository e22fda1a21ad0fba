"""Redis RESP2: commands go out as arrays of bulk strings, every reply type comes back parsed.

A template is a list of arguments (`[SET, "{key}", "{value}"]`) or a string of words (`PING`).
Replies: simple strings, errors, integers, bulk strings (and the null bulk), arrays (nested, and the
null array). Each reply is (type, value); for `expect` it reads as its first line on the wire
(`+OK`, `-ERR ...`, `:1`, `*2`) except a bulk string, which reads as its content, and the null bulk,
which reads as `(nil)`. An error reply is a bad reply (`resp_error`) unless `expect` matches it.
"""

from __future__ import annotations

from typing import Any

from harness.base.fields import Invalid, describe
from harness.protocols.common import (FramedDecoder, Pattern, ProtocolError, RequestSpec, TextTemplate, parse_pattern,
                                      payload, unknown_placeholders)

MAX_BULK = 512 * 1024 * 1024     # redis's own limit (proto-max-bulk-len)
MAX_LINE = 64 * 1024             # a header line longer than this is not RESP
MAX_DEPTH = 32


def parse_request(value: Any) -> tuple[str, ...]:
    if isinstance(value, str):
        value = value.split()
    if not isinstance(value, list) or not value:
        raise Invalid(f"expected a command as a list like [GET, \"{{key}}\"] (or a string of words like PING), "
                      f"got {describe(value)}")
    args = []
    for arg in value:
        if isinstance(arg, bool) or not isinstance(arg, (str, int, float)):
            raise Invalid(f"every argument of a redis command is a string or number, got {describe(arg)}")
        text = str(arg)
        unknown = unknown_placeholders(text)
        if unknown:
            raise Invalid(f"unknown placeholder '{{{unknown[0]}}}' (known: {{key}} {{value}} {{seq}})")
        args.append(text)
    return tuple(args)


def parse_expect(value: Any) -> Pattern | None:
    return parse_pattern(value)


class Encoder:
    """`*N` then `$len arg` per argument; constant arguments are encoded once."""

    __slots__ = ("_parts",)

    def __init__(self, spec: RequestSpec, seed: int):
        value = payload(seed, spec.value_size)
        parts: list[bytes | TextTemplate] = []
        for arg in spec.template:
            template = TextTemplate(arg, value)
            if template.fields:
                parts.append(template)
            else:
                data = arg.encode()
                parts.append(b"$%d\r\n%s\r\n" % (len(data), data))
        self._parts = (b"*%d\r\n" % len(parts), parts)

    def encode(self, key: str, seq: int) -> bytes:
        head, parts = self._parts
        out = [head]
        for part in parts:
            if isinstance(part, bytes):
                out.append(part)
            else:
                data = part.render(key, seq).encode()
                out.append(b"$%d\r\n%s\r\n" % (len(data), data))
        return b"".join(out)


def compile(spec: RequestSpec, seed: int) -> Encoder:
    return Encoder(spec, seed)


Reply = tuple[bytes, Any]


def _parse(buf: bytes, pos: int, depth: int = 0) -> tuple[Reply, int] | None:
    """One reply starting at pos: (reply, position after it), or None when more bytes are needed."""
    end = buf.find(b"\r\n", pos)
    if end < 0:
        if len(buf) - pos > MAX_LINE:
            raise ProtocolError("a RESP header line without an end", buf[pos:])
        return None
    kind = buf[pos:pos + 1]
    if kind == b"$":
        length = _number(buf, pos, end)
        if length == -1:
            return (b"$", None), end + 2
        if not 0 <= length <= MAX_BULK:
            raise ProtocolError(f"bulk string of length {length}", buf[pos:])
        stop = end + 2 + length
        if len(buf) < stop + 2:
            return None
        if buf[stop:stop + 2] != b"\r\n":
            raise ProtocolError(f"bulk string of length {length} not followed by CRLF", buf[pos:])
        return (b"$", buf[end + 2:stop]), stop + 2
    if kind == b"+" or kind == b"-":
        return (kind, buf[pos + 1:end]), end + 2
    if kind == b":":
        return (b":", _number(buf, pos, end)), end + 2
    if kind == b"*":
        count = _number(buf, pos, end)
        if count == -1:
            return (b"*", None), end + 2
        if count < 0 or depth >= MAX_DEPTH:
            raise ProtocolError(f"array of {count} elements at depth {depth}", buf[pos:])
        items = []
        at = end + 2
        for _ in range(count):
            parsed = _parse(buf, at, depth + 1)
            if parsed is None:
                return None
            item, at = parsed
            items.append(item)
        return (b"*", items), at
    raise ProtocolError(f"unknown RESP reply type {kind!r}", buf[pos:])


def _number(buf: bytes, pos: int, end: int) -> int:
    try:
        return int(buf[pos + 1:end])
    except ValueError:
        raise ProtocolError("a RESP length or integer that is not a number", buf[pos:]) from None


def text_of(reply: Reply) -> bytes:
    """What `expect` is matched against."""
    kind, value = reply
    if kind == b"$":
        return b"(nil)" if value is None else value
    if kind == b"*":
        return b"*-1" if value is None else b"*%d" % len(value)
    if kind == b":":
        return b":%d" % value
    return kind + value


def check(expect: Pattern | None, reply: Reply, key: str, seq: int) -> str | None:
    if expect is None:
        return "resp_error" if reply[0] == b"-" else None
    if expect.matches(text_of(reply), key, seq):
        return None
    return "resp_error" if reply[0] == b"-" else "mismatch"


def describe_reply(reply: Reply) -> str:
    return text_of(reply).decode("utf-8", "replace")


class Decoder(FramedDecoder):
    __slots__ = ()
    parse_one = staticmethod(_parse)
