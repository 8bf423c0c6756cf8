"""Postfix policy delegation wire format (notes/protocols.md §3): parsing, bounded reading, replies."""

from __future__ import annotations

import collections

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mailcloak.errors import ProtocolError
from mailcloak.policy.codec import (
    MAX_ATTRIBUTES,
    MAX_LINE,
    MAX_REQUEST,
    MalformedRequest,
    PolicyRequest,
    encode_reply,
    parse_request,
    RequestFramer,
)

# Captured from real Postfix (notes/postfix-dovecot-here.md, "What goes over the wire").
CAPTURED = b"""request=smtpd_access_policy
protocol_state=RCPT
protocol_name=ESMTP
client_address=127.0.0.1
client_name=localhost
client_port=47264
reverse_client_name=localhost
server_address=127.0.0.1
server_port=47377
helo_name=client.test
sender=alice@d1.test
recipient=bob@elsewhere.example
recipient_count=0
queue_id=
instance=5b3e.6b061cc7.7e325.0
size=0
etrn_domain=
stress=
sasl_method=PLAIN
sasl_username=alice@d1.test
sasl_sender=
ccert_subject=
ccert_issuer=
ccert_fingerprint=
ccert_pubkey_fingerprint=
encryption_protocol=
encryption_cipher=
encryption_keysize=0
policy_context=

"""


def lines_of(raw: bytes) -> list[bytes]:
    assert raw.endswith(b"\n\n")
    return raw[:-2].split(b"\n")


class Wire:
    """`data` fed to a RequestFramer (in chunks of `chunk` bytes), then read a request at a time as
    the server answers them; None at the end, ProtocolError where the server closes."""

    def __init__(self, data: bytes, chunk: int | None = None):
        self.framer = RequestFramer()
        self.requests: collections.deque = collections.deque()
        self.error: ProtocolError | None = None
        step = chunk or max(len(data), 1)
        for i in range(0, len(data), step):
            try:
                self.requests.extend(self.framer.feed(data[i:i + step]))
            except ProtocolError as exc:
                self.error = exc
                break

    def read(self) -> list[bytes] | None:
        if self.requests:
            return self.requests.popleft()
        if self.error is not None:
            raise self.error
        if self.framer.pending:
            raise ProtocolError("connection closed in the middle of a request")
        return None


# parse_request ---------------------------------------------------------------------------------


def test_parse_captured_request():
    parsed = parse_request(lines_of(CAPTURED))
    assert isinstance(parsed, PolicyRequest)
    assert parsed.protocol_state == "RCPT"
    assert parsed.sender == "alice@d1.test"
    assert parsed.recipient == "bob@elsewhere.example"
    assert parsed.sasl_method == "PLAIN"
    assert parsed.sasl_username == "alice@d1.test"
    assert parsed.authenticated
    assert parsed.get("client_address") == "127.0.0.1"
    assert parsed.get("instance") == "5b3e.6b061cc7.7e325.0"
    assert parsed.get("queue_id") == ""
    assert parsed.get("not_sent") == ""
    assert len(parsed.attributes) == 29


def test_parse_unauthenticated():
    raw = CAPTURED.replace(b"sasl_method=PLAIN", b"sasl_method=").replace(
        b"sasl_username=alice@d1.test", b"sasl_username=")
    parsed = parse_request(lines_of(raw))
    assert isinstance(parsed, PolicyRequest)
    assert not parsed.authenticated


def test_parse_normalises_case():
    parsed = parse_request([b"request=smtpd_access_policy", b"protocol_state=rcpt",
                            b"sender=Alice@D1.Test", b"recipient=BOB@X.test", b"sasl_method=xoauth2",
                            b"sasl_username=Alice"])
    assert parsed.protocol_state == "RCPT"
    assert parsed.sender == "alice@d1.test"
    assert parsed.recipient == "bob@x.test"
    assert parsed.sasl_method == "XOAUTH2"
    assert parsed.sasl_username == "Alice"   # kept as sent


def test_unknown_attributes_ignored():
    parsed = parse_request([b"request=smtpd_access_policy", b"future_attribute=whatever",
                            b"x-y.z=1=2", b"protocol_state=RCPT"])
    assert isinstance(parsed, PolicyRequest)
    assert parsed.protocol_state == "RCPT"
    assert parsed.get("x-y.z") == "1=2"   # only the first '=' splits


def test_repeated_names_keep_one_value():
    parsed = parse_request([b"request=smtpd_access_policy", b"sender=first@d1.test",
                            b"sender=second@d1.test"])
    assert isinstance(parsed, PolicyRequest)
    assert parsed.sender in ("first@d1.test", "second@d1.test")


def test_value_may_contain_utf8_and_be_empty():
    parsed = parse_request([b"request=smtpd_access_policy", "sender=jos\u00e9@d1.test".encode(), b"recipient="])
    assert parsed.sender == "jos\u00e9@d1.test"
    assert parsed.recipient == ""


@pytest.mark.parametrize("lines", [
    [],
    [b"protocol_state=RCPT"],
    [b"request=", b"protocol_state=RCPT"],
    [b"request=smtpd_access_policy_x"],
    [b"request=junk"],
    [b"REQUEST=smtpd_access_policy"],
], ids=["empty", "missing", "empty-value", "longer", "other", "case"])
def test_missing_or_wrong_request_attribute(lines):
    assert isinstance(parse_request(lines), MalformedRequest)


@pytest.mark.parametrize("bad", [
    b"no equals sign",
    b"=value without name",
    b"sender=a\x00b@d1.test",
    b"send\x00er=a@d1.test",
    b"sender=\xff\xfe@d1.test",
    b"sender=\xc3@d1.test",          # truncated UTF-8 sequence
    b"s\xc3\xa9nder=x",               # non-ASCII name
])
def test_malformed_lines(bad):
    result = parse_request([b"request=smtpd_access_policy", bad])
    assert isinstance(result, MalformedRequest)
    assert result.reason


# RequestFramer --------------------------------------------------------------------------------


def test_read_captured_request():
    reader = Wire(CAPTURED)
    lines = reader.read()
    assert lines == lines_of(CAPTURED)
    assert reader.read() is None


def test_several_requests_back_to_back():
    one = b"request=smtpd_access_policy\nprotocol_state=RCPT\nrecipient=a@d1.test\n\n"
    two = b"request=smtpd_access_policy\nprotocol_state=MAIL\n\n"
    reader = Wire(one + two + CAPTURED)
    first, second, third = reader.read(), reader.read(), reader.read()
    assert parse_request(first).recipient == "a@d1.test"
    assert parse_request(second).protocol_state == "MAIL"
    assert third == lines_of(CAPTURED)
    assert reader.read() is None


def test_crlf_tolerated():
    reader = Wire(CAPTURED.replace(b"\n", b"\r\n"))
    lines = reader.read()
    assert lines == lines_of(CAPTURED)
    assert reader.read() is None


@pytest.mark.parametrize("chunk", [1, 7, 100])
def test_request_arriving_in_pieces(chunk):
    reader = Wire(CAPTURED + CAPTURED.replace(b"\n", b"\r\n"), chunk)
    assert reader.read() == lines_of(CAPTURED)
    assert reader.read() == lines_of(CAPTURED)
    assert reader.read() is None


def test_clean_eof_returns_none():
    assert Wire(b"").read() is None


@pytest.mark.parametrize("data", [
    b"request=smtpd_access_policy",
    b"request=smtpd_access_policy\n",
    b"request=smtpd_access_policy\nprotocol_state=RCPT\n",
    b"request=smtpd_access_policy\nprotocol_state=RC",
])
def test_eof_mid_request(data):
    with pytest.raises(ProtocolError):
        Wire(data).read()


def test_eof_mid_second_request():
    reader = Wire(b"request=smtpd_access_policy\n\nrequest=smtpd")
    assert reader.read() == [b"request=smtpd_access_policy"]
    with pytest.raises(ProtocolError):
        reader.read()


@pytest.mark.parametrize("chunk", [None, 1000])
def test_line_over_max_line(chunk):
    long_line = b"request=smtpd_access_policy\nsender=" + b"a" * (MAX_LINE + 10) + b"\n\n"
    with pytest.raises(ProtocolError, match="line longer"):
        Wire(long_line, chunk).read()


def test_a_bound_broken_by_a_request_still_arriving_closes_at_once():
    for partial in (b"request=smtpd_access_policy\nsender=" + b"a" * MAX_LINE,
                    b"request=smtpd_access_policy\n" + b"a=1\n" * (MAX_ATTRIBUTES + 1),
                    b"request=smtpd_access_policy\n" + (b"x=" + b"y" * 8000 + b"\n") * 9):
        assert isinstance(Wire(partial, 500).error, ProtocolError)  # before any end of input


def test_line_at_postfix_bound_is_fine():
    # Postfix's own bound for one string is 4 x 2048 = 8192 bytes.
    line = b"ccert_subject=" + b"x" * (8192 - len(b"ccert_subject="))
    lines = Wire(b"request=smtpd_access_policy\n" + line + b"\n\n").read()
    assert lines[1] == line


def test_too_many_attributes():
    body = b"request=smtpd_access_policy\n" + b"".join(b"a%d=1\n" % i for i in range(MAX_ATTRIBUTES + 5))
    with pytest.raises(ProtocolError):
        Wire(body + b"\n").read()


def test_max_attributes_exactly_is_fine():
    body = b"request=smtpd_access_policy\n" + b"".join(b"a%d=1\n" % i for i in range(MAX_ATTRIBUTES - 1))
    lines = Wire(body + b"\n").read()
    assert len(lines) == MAX_ATTRIBUTES


def test_request_over_max_request():
    line = b"x=" + b"y" * 8000 + b"\n"
    count = MAX_REQUEST // len(line) + 2
    assert count < MAX_ATTRIBUTES
    body = b"request=smtpd_access_policy\n" + line * count + b"\n"
    with pytest.raises(ProtocolError):
        Wire(body).read()


# encode_reply ----------------------------------------------------------------------------------


@pytest.mark.parametrize("action, wire", [
    ("DUNNO", b"action=DUNNO\n\n"),
    ("550 5.1.1 No such user", b"action=550 5.1.1 No such user\n\n"),
    ("451 4.3.0 a\r\nb", b"action=451 4.3.0 a  b\n\n"),
    ("x\x00y\nz", b"action=x y z\n\n"),
])
def test_encode_reply(action, wire):
    assert encode_reply(action) == wire


@given(st.text())
def test_encode_reply_never_breaks_framing(action):
    wire = encode_reply(action)
    assert wire.startswith(b"action=") and wire.endswith(b"\n\n")
    value = wire[len(b"action="):-2]
    assert b"\n" not in value and b"\r" not in value and b"\x00" not in value
    value.decode("utf-8")  # always valid UTF-8 (Postfix refuses malformed UTF-8 replies)


# Properties ------------------------------------------------------------------------------------


def _drain(data: bytes, chunk: int) -> list[list[bytes]]:
    reader = Wire(data, chunk)
    requests = []
    while True:
        try:
            lines = reader.read()
        except ProtocolError:
            return requests
        if lines is None:
            return requests
        for line in lines:
            assert b"\n" not in line
            assert len(line) <= MAX_LINE
        requests.append(lines)
        if len(requests) > len(data) + 1:
            raise AssertionError("reader does not make progress")


wire_bytes = st.one_of(
    st.binary(max_size=2000),
    st.lists(st.sampled_from([b"request=smtpd_access_policy\n", b"\n", b"\r\n", b"a=b\n", b"=\n",
                              b"x" * 300, b"\x00", b"\xff", b"sender=a@b\n", b"\r"]),
             max_size=60).map(b"".join),
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(wire_bytes, st.sampled_from([1, 64, 256, MAX_LINE + 1]))
def test_any_bytes_only_protocol_error_or_lines(data, chunk):
    _drain(data, chunk)


line_strategy = st.one_of(
    st.binary(max_size=200).map(lambda b: b.replace(b"\n", b"")),
    st.builds(lambda k, v: k + b"=" + v,
              st.sampled_from([b"request", b"sender", b"protocol_state", b"sasl_method", b"", b"x"]),
              st.one_of(st.just(b"smtpd_access_policy"), st.binary(max_size=50))),
)


@settings(max_examples=150, deadline=None)
@given(st.lists(line_strategy, max_size=20))
def test_parse_request_never_raises(lines):
    result = parse_request(lines)
    assert isinstance(result, (PolicyRequest, MalformedRequest))
    if isinstance(result, PolicyRequest):
        assert result.get("request") == "smtpd_access_policy"
        # the derived properties never raise either
        _ = (result.protocol_state, result.sender, result.recipient, result.sasl_method,
             result.sasl_username, result.authenticated)


def test_stray_empty_lines_between_requests_are_skipped():
    reader = Wire(b"\n\nrequest=smtpd_access_policy\n\n")
    assert reader.read() == [b"request=smtpd_access_policy"]
    assert reader.read() is None


def test_cr_only_line_inside_an_lf_framed_request_is_a_malformed_line_not_its_end():
    reader = Wire(b"request=smtpd_access_policy\n\r\nprotocol_state=RCPT\n\n")
    lines = reader.read()
    assert lines == [b"request=smtpd_access_policy", b"", b"protocol_state=RCPT"]
    assert isinstance(parse_request(lines), MalformedRequest)
    assert reader.read() is None  # nothing past the request was consumed or left behind
