"""Netstrings (`<len>:<bytes>,`) as the socketmap uses them (notes/protocols.md §4.1)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mailcloak.errors import ProtocolError
from mailcloak.socketmap.netstring import NetstringDecoder, encode

MAX = 10_000


@pytest.mark.parametrize("payload, wire", [
    (b"", b"0:,"),
    (b"alias alias1@d1.test", b"20:alias alias1@d1.test,"),
    (b"OK alice@d1.test", b"16:OK alice@d1.test,"),
    (b"NOTFOUND ", b"9:NOTFOUND ,"),
    (b"a,b:c", b"5:a,b:c,"),
])
def test_encode(payload, wire):
    assert encode(payload) == wire
    assert NetstringDecoder(MAX).feed(wire) == [payload]


def test_decode_several_in_one_feed():
    decoder = NetstringDecoder(MAX)
    assert decoder.feed(b"3:abc,0:,5:hello,") == [b"abc", b"", b"hello"]
    assert decoder.pending == 0


def test_byte_by_byte():
    wire = encode(b"alias Alias1@D1.Test") + encode(b"") + encode(b"x" * 123)
    decoder = NetstringDecoder(MAX)
    out = []
    for i in range(len(wire)):
        got = decoder.feed(wire[i:i + 1])
        out.extend(got)
        if i < len(wire) - 1:
            assert decoder.pending > 0 or got
    assert out == [b"alias Alias1@D1.Test", b"", b"x" * 123]
    assert decoder.pending == 0


@pytest.mark.parametrize("partial", [b"1", b"12", b"12:", b"12:hello", b"12:hello world", b"5:hello"])
def test_partial_input_returns_nothing_and_keeps_pending(partial):
    decoder = NetstringDecoder(MAX)
    assert decoder.feed(partial) == []
    assert decoder.pending == len(partial)


def test_partial_then_rest():
    decoder = NetstringDecoder(MAX)
    assert decoder.feed(b"5:hel") == []
    assert decoder.pending == 5
    assert decoder.feed(b"lo,3:ab") == [b"hello"]
    assert decoder.pending == 4
    assert decoder.feed(b"c,") == [b"abc"]
    assert decoder.pending == 0


def test_payload_at_max_length_is_fine():
    assert NetstringDecoder(10).feed(encode(b"x" * 10)) == [b"x" * 10]


@pytest.mark.parametrize("wire", [
    b"a:abc,",               # non-digit length
    b"1a:abc,",
    b"-1:,",
    b"+3:abc,",
    b" 3:abc,",
    b"3 :abc,",
    b":abc,",                # empty length
    b"x",                    # non-digit, detected before any ':'
    b"1000000000000:",       # 10**12
    b"1000000000000",        # 10**12 still arriving: too many digits already
    b"03:abc,",              # leading zero
    b"00:,",
    b"3abc,",                # missing ':'
    b"3:abcd,",              # missing ',' (payload longer than announced)
    b"3:abc;",
    b"3:abc\n",
    b"10001:",               # payload over max_length
    b"99999:" + b"x" * 10,
    b"0:,3:abcX",            # a good one then a bad one
])
def test_malformed(wire):
    with pytest.raises(ProtocolError):
        NetstringDecoder(MAX).feed(wire)


def test_malformed_fed_byte_by_byte():
    decoder = NetstringDecoder(MAX)
    with pytest.raises(ProtocolError):
        for byte in b"3:abcX":
            decoder.feed(bytes([byte]))


def test_over_max_length_detected_early():
    decoder = NetstringDecoder(100)
    with pytest.raises(ProtocolError):
        decoder.feed(b"101:")
    with pytest.raises(ProtocolError):
        NetstringDecoder(100).feed(b"1000")  # four digits can only announce > 100


@settings(max_examples=200, deadline=None)
@given(payloads=st.lists(st.binary(max_size=300), max_size=10), data=st.data())
def test_round_trip_with_arbitrary_chunking(payloads, data):
    wire = b"".join(encode(p) for p in payloads)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(wire)), max_size=20)))
    decoder = NetstringDecoder(300)
    out = []
    start = 0
    for cut in cuts + [len(wire)]:
        out.extend(decoder.feed(wire[start:cut]))
        start = cut
    assert out == payloads
    assert decoder.pending == 0


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=200), st.integers(1, 50))
def test_random_bytes_give_payloads_or_protocol_error(wire, max_length):
    decoder = NetstringDecoder(max_length)
    try:
        for payload in decoder.feed(wire):
            assert len(payload) <= max_length
    except ProtocolError:
        pass
    else:
        assert decoder.pending <= len(wire)
