"""Protocol codecs, sans-IO (the h11 way): bytes out from a request template, complete replies in.

A codec has no I/O of its own. For each protocol a module provides:
- `parse_request(value) -> template` and `parse_expect(value) -> expectation`: validation of what the
  scenario wrote (raise `Invalid` with a one-line message; the loader adds file, line and field);
- `compile(spec) -> Encoder`: `encoder.encode(key, seq) -> bytes`, the request on the wire;
- `Decoder()`: one per connection; `feed(data) -> list of replies`, complete and in request order,
  fed whatever the socket returned; `eof() -> list` completes a reply the server ends by closing;
  `closing` is set once a reply said the server closes the connection after it. A reply that cannot
  be parsed raises `ProtocolError` with the offending bytes: the connection is then closed and its
  requests in flight are errors, never shifted onto later requests;
- `check(expect, reply) -> None | kind`: None when the reply is what the request expects, else the
  kind of bad reply (`http_5xx`, `resp_error`, `mismatch`...).
The driver, the readiness probe and the set-up requests all go through these.
"""

from __future__ import annotations

from types import ModuleType

from harness.protocols import http, line, memcached, resp
from harness.protocols.common import (Decoder, Encoder, FramedDecoder, Pattern, ProtocolError, RequestSpec,
                                      TextTemplate, parse_pattern, payload, placeholders_in, unknown_placeholders)

PROTOCOLS = ("line", "http", "resp", "memcached")
_CODECS: dict[str, ModuleType] = {"line": line, "http": http, "resp": resp, "memcached": memcached}

__all__ = ["PROTOCOLS", "codec", "Decoder", "Encoder", "FramedDecoder", "Pattern", "ProtocolError", "RequestSpec",
           "TextTemplate", "parse_pattern", "payload", "placeholders_in", "unknown_placeholders"]


def codec(protocol: str) -> ModuleType:
    """The codec module of a protocol (validated names only)."""
    return _CODECS[protocol]
