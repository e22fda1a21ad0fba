"""memcached's text protocol: get/gets with VALUE blocks and END, storage, delete, incr/decr, touch...

A template is the command as text. For a storage command (set, add, replace, append, prepend, cas)
write the command line without the byte count, then the data block on the next line:
`"set {key} 0 0\\r\\n{value}\\r\\n"`: the harness fills in the count from the data it sends.
A reply is (first line, data of the first VALUE or None). For `expect` a reply reads as the data of its
first VALUE (a hit), `END` (a miss) or its line (`STORED`, `NOT_FOUND`, `5`...). `ERROR`,
`CLIENT_ERROR ...` and `SERVER_ERROR ...` are bad replies (`memcached_error`) unless `expect` matches.
"""

from __future__ import annotations

from typing import Any

from harness.base.fields import Invalid, describe
from harness.protocols.common import (FramedDecoder, Pattern, ProtocolError, RequestSpec, TextTemplate, parse_pattern,
                                      payload, unknown_placeholders)

STORAGE = {"set": 4, "add": 4, "replace": 4, "append": 4, "prepend": 4, "cas": 5}   # fields before <bytes>
COMMANDS = set(STORAGE) | {"get", "gets", "gat", "gats", "delete", "incr", "decr", "touch", "version", "stats",
                           "flush_all", "verbosity", "mg", "ms", "md", "ma", "mn"}
MAX_LINE = 64 * 1024
MAX_VALUE = 1024 * 1024 * 1024
_ERRORS = (b"ERROR", b"CLIENT_ERROR", b"SERVER_ERROR")


def parse_request(value: Any) -> dict[str, str]:
    if not isinstance(value, str) or not value.strip():
        raise Invalid(f"expected a memcached command like \"get {{key}}\\r\\n\", got {describe(value)}")
    unknown = unknown_placeholders(value)
    if unknown:
        raise Invalid(f"unknown placeholder '{{{unknown[0]}}}' (known: {{key}} {{value}} {{seq}})")
    line, newline, data = value.partition("\n")
    line = line.removesuffix("\r")
    if not newline:
        raise Invalid("a memcached command ends with \\r\\n (write it as \"get {key}\\r\\n\")")
    words = line.split()
    command = words[0] if words else ""
    if command not in COMMANDS:
        raise Invalid(f"unknown memcached command {command!r} (expected one of {', '.join(sorted(COMMANDS))})")
    if command in STORAGE:
        if len(words) != STORAGE[command]:
            fields = "key flags exptime" + (" cas-unique" if command == "cas" else "")
            raise Invalid(f"write a {command} as \"{command} {fields}\" then the data on the next line: the "
                          f"harness adds the byte count (got {len(words) - 1} fields)")
        if not data:
            raise Invalid(f"a {command} needs its data block on the next line, like "
                          f"\"{command} {{key}} 0 0\\r\\n{{value}}\\r\\n\"")
        data = data.removesuffix("\n").removesuffix("\r")
        return {"line": line, "data": data}
    if data:
        raise Invalid(f"only storage commands have a data block; {command} is one line")
    return {"line": line, "data": ""}


def parse_expect(value: Any) -> Pattern | None:
    return parse_pattern(value)


class Encoder:
    __slots__ = ("_line", "_data")

    def __init__(self, spec: RequestSpec, seed: int):
        value = payload(seed, spec.value_size)
        template = spec.template
        self._line = TextTemplate(template["line"], value)
        self._data = TextTemplate(template["data"], value) if template["data"] else None

    def encode(self, key: str, seq: int) -> bytes:
        line = self._line.render(key, seq).encode()
        if self._data is None:
            return line + b"\r\n"
        data = self._data.render(key, seq).encode()
        return b"%s %d\r\n%s\r\n" % (line, len(data), data)


def compile(spec: RequestSpec, seed: int) -> Encoder:
    return Encoder(spec, seed)


Reply = tuple[bytes, bytes | None]


def _parse(buf: bytes, pos: int) -> tuple[Reply, int] | None:
    end = buf.find(b"\r\n", pos)
    if end < 0:
        if len(buf) - pos > MAX_LINE:
            raise ProtocolError("a memcached reply line without an end", buf[pos:])
        return None
    line = buf[pos:end]
    if not (line.startswith(b"VALUE ") or line.startswith(b"STAT ")):
        return (line, None), end + 2
    # A multi-part reply: VALUE blocks (or STAT lines) up to END.
    first: bytes | None = None
    at = pos
    while True:
        end = buf.find(b"\r\n", at)
        if end < 0:
            return None
        current = buf[at:end]
        if current == b"END":
            return (line, first), end + 2
        if current.startswith(b"STAT "):
            at = end + 2
            continue
        fields = current.split()
        if len(fields) < 4 or fields[0] != b"VALUE" or not fields[3].isdigit() or int(fields[3]) > MAX_VALUE:
            raise ProtocolError("expected VALUE <key> <flags> <bytes> or END", buf[pos:])
        stop = end + 2 + int(fields[3])
        if len(buf) < stop + 2:
            return None
        if buf[stop:stop + 2] != b"\r\n":
            raise ProtocolError("a VALUE's data is not followed by CRLF", buf[pos:])
        if first is None:
            first = buf[end + 2:stop]
        at = stop + 2


def text_of(reply: Reply) -> bytes:
    line, data = reply
    return data if data is not None else line


def check(expect: Pattern | None, reply: Reply, key: str, seq: int) -> str | None:
    error = reply[0].startswith(_ERRORS)
    if expect is None:
        return "memcached_error" if error else None
    if expect.matches(text_of(reply), key, seq):
        return None
    return "memcached_error" if error else "mismatch"


def describe_reply(reply: Reply) -> str:
    return text_of(reply).decode("utf-8", "replace")


class Decoder(FramedDecoder):
    __slots__ = ()
    parse_one = staticmethod(_parse)
