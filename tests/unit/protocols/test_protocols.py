"""The protocol codecs (sans-IO): bytes out from templates, complete replies in, in order, fed in any chunks."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from harness.base.fields import Invalid
from harness.protocols import ProtocolError, RequestSpec, codec, payload


def feed_in_chunks(decoder, data: bytes, cuts: list[int]) -> list:
    """Feed `data` split at the given offsets, collecting every reply."""
    replies, start = [], 0
    for cut in sorted(set(c % (len(data) + 1) for c in cuts)) + [len(data)]:
        replies += decoder.feed(data[start:cut])
        start = cut
    return replies


def spec(protocol: str, template, expect=None, value_size: int = 0) -> RequestSpec:
    module = codec(protocol)
    return RequestSpec("r", module.parse_request(template), module.parse_expect(expect), value_size=value_size)


# --- line ---------------------------------------------------------------------------------------

def test_line_template_without_placeholder_is_sent_as_written():
    encoder = codec("line").compile(spec("line", "PING\r\n"), seed=1)
    assert encoder.encode("k123", 7) == b"PING\r\n"


def test_line_placeholders_and_literal_braces():
    encoder = codec("line").compile(spec("line", "SET {key} {seq} {\"x\": 1} {value}\n", value_size=5), seed=3)
    assert encoder.encode("k1", 42) == f"SET k1 42 {{\"x\": 1}} {payload(3, 5)}\n".encode()
    assert payload(3, 5) == payload(3, 5) and payload(3, 5) != payload(4, 5)


def test_line_validation():
    line = codec("line")
    with pytest.raises(Invalid, match="newline"):
        line.parse_request("GET {key}")
    with pytest.raises(Invalid, match="unknown placeholder '{kye}'"):
        line.parse_request("GET {kye}\n")


@given(st.lists(st.integers(min_value=0, max_value=200), max_size=8))
def test_line_decoder_any_chunks(cuts):
    data = b"OK 1\nOK 2\nERR x\n"
    assert feed_in_chunks(codec("line").Decoder(), data, cuts) == [b"OK 1", b"OK 2", b"ERR x"]


def test_line_keyed_expectation():
    line = codec("line")
    expect = line.parse_expect("^OK {key}$")
    assert line.check(expect, b"OK k1", "k1", 0) is None
    assert line.check(expect, b"OK k2", "k1", 0) == "mismatch"
    assert line.check(line.parse_expect("^OK"), b"ERR", "k", 0) == "mismatch"


# --- http ---------------------------------------------------------------------------------------

def test_http_encode_get_and_post():
    http = codec("http")
    get = http.compile(spec("http", "GET /item/{key}"), seed=1).encode("k9", 0)
    assert get == b"GET /item/k9 HTTP/1.1\r\nHost: localhost\r\n\r\n"
    post = http.compile(spec("http", {"method": "POST", "path": "/p", "headers": {"X-Seq": "{seq}"},
                                      "body": "{key}={value}"}, value_size=3), seed=1).encode("k1", 5)
    body = f"k1={payload(1, 3)}".encode()
    assert post == b"POST /p HTTP/1.1\r\nHost: localhost\r\nX-Seq: 5\r\nContent-Length: %d\r\n\r\n%s" % (
        len(body), body)


def test_http_validation():
    http = codec("http")
    with pytest.raises(Invalid, match="HEAD"):
        http.parse_request("HEAD /")
    with pytest.raises(Invalid, match="path"):
        http.parse_request({"method": "GET"})
    with pytest.raises(Invalid, match="method"):
        http.parse_request("FETCH /")
    with pytest.raises(Invalid, match="Content-Length"):
        http.parse_request({"path": "/", "headers": {"Content-Length": 3}})
    with pytest.raises(Invalid, match="status"):
        http.parse_expect("2xxx")


def test_http_status_classes():
    http = codec("http")
    default = http.parse_expect(None)
    assert http.check(default, 200, "", 0) is None and http.check(default, 304, "", 0) is None
    assert http.check(default, 503, "", 0) == "http_5xx" and http.check(default, 404, "", 0) == "http_4xx"
    listed = http.parse_expect([200, "404", "500-502"])
    assert [http.check(listed, s, "", 0) for s in (200, 404, 501, 503, 204)] == \
        [None, None, None, "http_5xx", "http_2xx"]


RESPONSES = (
    b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nabc"
    b"HTTP/1.1 404 Not Found\r\nTransfer-Encoding: chunked\r\n\r\n4\r\nWiki\r\n5\r\npedia\r\n0\r\n\r\n"
    b"HTTP/1.1 100 Continue\r\n\r\n"
    b"HTTP/1.1 503 Busy\r\nContent-Length: 0\r\n\r\n"
)


@given(st.lists(st.integers(min_value=0, max_value=400), max_size=10))
@settings(max_examples=200)
def test_http_decoder_any_chunks(cuts):
    decoder = codec("http").Decoder()
    assert feed_in_chunks(decoder, RESPONSES, cuts) == [200, 404, 503]
    assert not decoder.closing


def test_http_connection_close_and_body_to_eof():
    decoder = codec("http").Decoder()
    assert decoder.feed(b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 2\r\n\r\nok") == [200]
    assert decoder.closing
    until_close = codec("http").Decoder()
    assert until_close.feed(b"HTTP/1.1 200 OK\r\n\r\nsome body") == []
    assert until_close.closing
    assert until_close.eof() == [200]


def test_http_garbage_is_a_protocol_error():
    with pytest.raises(ProtocolError) as caught:
        codec("http").Decoder().feed(b"SSH-2.0-OpenSSH\r\n" * 20)
    assert caught.value.excerpt.startswith(b"SSH-2.0") and len(caught.value.excerpt) == 200


# --- resp ---------------------------------------------------------------------------------------

def test_resp_encode():
    resp = codec("resp")
    assert resp.compile(spec("resp", ["GET", "{key}"]), 1).encode("k12", 0) == b"*2\r\n$3\r\nGET\r\n$3\r\nk12\r\n"
    assert resp.compile(spec("resp", "PING"), 1).encode("k", 0) == b"*1\r\n$4\r\nPING\r\n"
    with pytest.raises(Invalid, match="list"):
        resp.parse_request({"GET": 1})


REDIS = (b"+OK\r\n-ERR wrong type\r\n:42\r\n$2\r\nv1\r\n$-1\r\n*2\r\n$1\r\na\r\n*1\r\n:7\r\n*-1\r\n$0\r\n\r\n")


@given(st.lists(st.integers(min_value=0, max_value=120), max_size=10))
@settings(max_examples=200)
def test_resp_decoder_every_type_any_chunks(cuts):
    replies = feed_in_chunks(codec("resp").Decoder(), REDIS, cuts)
    assert replies == [(b"+", b"OK"), (b"-", b"ERR wrong type"), (b":", 42), (b"$", b"v1"), (b"$", None),
                       (b"*", [(b"$", b"a"), (b"*", [(b":", 7)])]), (b"*", None), (b"$", b"")]


def test_resp_checks():
    resp = codec("resp")
    assert resp.check(None, (b"-", b"ERR x"), "k", 0) == "resp_error"
    assert resp.check(resp.parse_expect("^-ERR"), (b"-", b"ERR x"), "k", 0) is None
    assert resp.check(resp.parse_expect(r"^\+PONG$"), (b"+", b"PONG"), "k", 0) is None
    keyed = resp.parse_expect("^{key}-")
    assert resp.check(keyed, (b"$", b"k7-abc"), "k7", 0) is None
    assert resp.check(keyed, (b"$", b"k8-abc"), "k7", 0) == "mismatch"
    assert resp.check(keyed, (b"$", None), "k7", 0) == "mismatch"


def test_resp_short_bulk_is_a_protocol_error_not_a_shift():
    """`$5\\r\\nab\\r\\n` repeated: the 5 bytes swallow the next header, then no CRLF: an error."""
    decoder = codec("resp").Decoder()
    assert decoder.feed(b"$5\r\nab\r\n") == []
    with pytest.raises(ProtocolError):
        decoder.feed(b"$5\r\nab\r\n")


# --- memcached ----------------------------------------------------------------------------------

def test_memcached_encode_storage_adds_the_byte_count():
    mc = codec("memcached")
    encoder = mc.compile(spec("memcached", "set {key} 0 0\r\n{key}-{value}\r\n", value_size=4), 2)
    data = f"k5-{payload(2, 4)}".encode()
    assert encoder.encode("k5", 0) == b"set k5 0 0 %d\r\n%s\r\n" % (len(data), data)
    assert mc.compile(spec("memcached", "get {key}\r\n"), 1).encode("k1", 0) == b"get k1\r\n"
    with pytest.raises(Invalid, match="byte count"):
        mc.parse_request("set {key} 0 0 5\r\nhello\r\n")
    with pytest.raises(Invalid, match="data block"):
        mc.parse_request("set {key} 0 0\r\n")
    with pytest.raises(Invalid, match="unknown memcached command"):
        mc.parse_request("fetch {key}\r\n")


MEMCACHED = (b"VALUE k1 0 2\r\nv1\r\nEND\r\nEND\r\nSTORED\r\nVALUE a 0 3\r\nEND\r\nVALUE b 1 0\r\n\r\nEND\r\n"
             b"NOT_FOUND\r\n12\r\nSERVER_ERROR out of memory\r\n")


@given(st.lists(st.integers(min_value=0, max_value=150), max_size=10))
@settings(max_examples=200)
def test_memcached_decoder_any_chunks(cuts):
    replies = feed_in_chunks(codec("memcached").Decoder(), MEMCACHED, cuts)
    assert replies == [(b"VALUE k1 0 2", b"v1"), (b"END", None), (b"STORED", None), (b"VALUE a 0 3", b"END"),
                       (b"NOT_FOUND", None), (b"12", None), (b"SERVER_ERROR out of memory", None)]


def test_memcached_checks():
    mc = codec("memcached")
    assert mc.check(None, (b"END", None), "k", 0) is None
    assert mc.check(None, (b"SERVER_ERROR out of memory", None), "k", 0) == "memcached_error"
    assert mc.check(mc.parse_expect("^{key}-"), (b"VALUE k1 0 5", b"k1-xy"), "k1", 0) is None
    assert mc.check(mc.parse_expect("^{key}-"), (b"END", None), "k1", 0) == "mismatch"
