"""What every protocol codec shares: the request spec, templates, reply patterns, the seeded payload and
the error a reply that cannot be parsed raises (harness/protocols/__init__.py says what a codec provides)."""

from __future__ import annotations

import functools
import random
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

PLACEHOLDERS = ("key", "value", "seq")     # what a request template may contain
EXCERPT = 200                              # bytes of an unparseable reply kept as evidence


class ProtocolError(Exception):
    """Bytes that are not a reply of the protocol (or a reply nobody asked for)."""

    def __init__(self, reason: str, data: bytes):
        super().__init__(reason)
        self.reason = reason
        self.excerpt = bytes(data[:EXCERPT])


class Encoder(Protocol):
    def encode(self, key: str, seq: int) -> bytes: ...


class Decoder(Protocol):
    closing: bool

    def feed(self, data: bytes) -> list[Any]: ...

    def eof(self) -> list[Any]: ...


class FramedDecoder:
    """A Decoder for protocols whose replies parse one at a time from a position in the buffer:
    `parse_one(buffer, pos)` gives (reply, the position after it), or None when more bytes are needed,
    and raises ProtocolError for bytes that are not a reply."""

    __slots__ = ("buffer", "closing")
    parse_one: Callable[[bytes, int], tuple[Any, int] | None]

    def __init__(self) -> None:
        self.buffer = b""
        self.closing = False

    def feed(self, data: bytes) -> list[Any]:
        buffer = self.buffer + data if self.buffer else data
        replies: list[Any] = []
        parse = self.parse_one
        pos = 0
        while pos < len(buffer):
            parsed = parse(buffer, pos)
            if parsed is None:
                break
            reply, pos = parsed
            replies.append(reply)
        self.buffer = buffer[pos:]
        return replies

    def eof(self) -> list[Any]:
        return []


@dataclass(frozen=True)
class RequestSpec:
    """One request of the scenario's mix (or of set-up, or the readiness probe), as validated.

    `template` and `expect` are in the protocol's own form (see each codec's parse_request and
    parse_expect); `value_size` is the length of the seeded payload that `{value}` stands for."""

    name: str
    template: Any
    expect: Any = None
    weight: float = 1.0
    value_size: int = 0


def payload(seed: int, size: int) -> str:
    """The seeded payload `{value}` stands for: printable, the same for a seed and size."""
    rng = random.Random(f"{seed}:value:{size}")
    alphabet = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"
    return "".join(rng.choice(alphabet) for _ in range(size))


class TextTemplate:
    """A text with {key}, {value} and {seq} placeholders, rendered by str.format (C speed).

    Every other brace is literal (an nginx-style `{` in a body stays as written)."""

    __slots__ = ("text", "fields", "_format", "_value")

    def __init__(self, text: str, value: str = ""):
        self.text = text
        self.fields = placeholders_in(text)
        escaped = text.replace("{", "{{").replace("}", "}}")
        for name in PLACEHOLDERS:
            escaped = escaped.replace("{{" + name + "}}", "{" + name + "}")
        self._format: Callable[..., str] = escaped.format
        self._value = value

    def render(self, key: str, seq: int) -> str:
        if not self.fields:
            return self.text
        return self._format(key=key, value=self._value, seq=seq)


def placeholders_in(text: str) -> tuple[str, ...]:
    """The known placeholders a text uses, in order of first use."""
    found = [m.group(1) for m in re.finditer(r"\{([A-Za-z_]+)\}", text) if m.group(1) in PLACEHOLDERS]
    return tuple(dict.fromkeys(found))


def unknown_placeholders(text: str) -> list[str]:
    """`{name}` fields that are not request placeholders (a typo such as {kye})."""
    return [m.group(1) for m in re.finditer(r"\{([A-Za-z_][A-Za-z0-9_]*)\}", text) if m.group(1) not in PLACEHOLDERS]


class Pattern:
    """A reply expectation: a regular expression searched in the reply's text (as bytes).

    It may use {key}, {seq} and {value}: they stand for the request's own values (escaped), so
    `expect: "^{key}$"` checks that each reply belongs to its request, not to a neighbour."""

    __slots__ = ("text", "keyed", "_compiled", "_value")

    def __init__(self, text: str, value: str = ""):
        self.text = text
        self._value = value
        self.keyed = bool(placeholders_in(text))
        self._compiled = None if self.keyed else re.compile(text.encode())

    def matches(self, reply: bytes, key: str, seq: int) -> bool:
        if self._compiled is not None:
            return self._compiled.search(reply) is not None
        return _keyed(self.text, key, str(seq) if "{seq}" in self.text else "", self._value).search(reply) is not None

    def with_value(self, value: str) -> "Pattern":
        return Pattern(self.text, value)


@functools.lru_cache(maxsize=65536)
def _keyed(text: str, key: str, seq: str, value: str) -> re.Pattern[bytes]:
    """The pattern for one key (compiled once per key: re's own cache holds only 512)."""
    for name, field in (("key", key), ("seq", seq), ("value", value)):
        text = text.replace("{" + name + "}", re.escape(field))
    return re.compile(text.encode())


def parse_pattern(value: Any) -> Pattern | None:
    """`expect:` of the text protocols: a regular expression (searched, not anchored)."""
    from harness.base.fields import Invalid, describe
    if value is None:
        return None
    if not isinstance(value, str) or not value:
        raise Invalid(f"expected a regular expression, got {describe(value)}")
    probe = value
    for name in PLACEHOLDERS:
        probe = probe.replace("{" + name + "}", "x")
    try:
        re.compile(probe)
    except (re.error, OverflowError, RecursionError) as exc:
        raise Invalid(f"not a valid regular expression: {exc}") from None
    return Pattern(value)
