"""Postfix policy delegation wire format: `name=value` lines ending with an empty line.

Framing is bounded (line length, attribute count, request size); a peer that breaks a bound is
cut off with ProtocolError, as SMTPD_POLICY_README asks ("log a warning and disconnect"). A
request that arrives whole but is not a valid policy request is returned as MalformedRequest, so
the server can answer it with DEFER_IF_PERMIT and keep the connection.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from types import MappingProxyType
from typing import Mapping

from mailcloak.errors import ProtocolError

# Postfix's own bound is 4 x line_length_limit (2048) = 8192 bytes per string.
MAX_LINE = 8192 + 64
MAX_ATTRIBUTES = 256
MAX_REQUEST = 64 * 1024


@dataclass(frozen=True, slots=True)
class PolicyRequest:
    attributes: Mapping[str, str]

    def get(self, name: str) -> str:
        return self.attributes.get(name, "")

    @property
    def protocol_state(self) -> str:
        return self.attributes.get("protocol_state", "").upper()

    @property
    def sender(self) -> str:
        return self.attributes.get("sender", "").lower()

    @property
    def recipient(self) -> str:
        return self.attributes.get("recipient", "").lower()

    @property
    def sasl_method(self) -> str:
        return self.attributes.get("sasl_method", "").upper()

    @property
    def sasl_username(self) -> str:
        return self.attributes.get("sasl_username", "")

    @property
    def authenticated(self) -> bool:
        get = self.attributes.get
        return bool(get("sasl_method") or get("sasl_username"))


    def decision_key(self) -> tuple[str, ...]:
        """The attributes the policy decision may read, normalised: see DECIDING. For an app's
        login (PLAIN/LOGIN) also `client_address`, which rows 7/8 check against the app's
        networks; other requests leave it out, so their decisions are shared across clients."""
        get = self.attributes.get
        key = tuple(normalise(get(name, "")) for name, normalise in DECIDING.items())
        if key[_METHOD] in APP_METHODS:
            return (*key, get("client_address", ""))
        return key


# The attributes the policy decision reads, each with the normalisation its rules apply (the
# properties above). Facts and decision are given a request holding these alone (`deciding`), so
# that the decision is a function of `decision_key()`, the snapshot and the runtime by
# construction, and can be memoised under that key. A rule that needs another attribute (say
# client_address) adds it here, and the key then includes it.
DECIDING = {
    "protocol_state": str.upper,
    "sender": str.lower,
    "recipient": str.lower,
    "sasl_method": str.upper,
    "sasl_username": str,
}


_METHOD = list(DECIDING).index("sasl_method")
_KEY_NAMES = (*DECIDING, "client_address")

# SASL mechanisms of an app's login (an app password through Dovecot's Lua passdb).
APP_METHODS = frozenset({"PLAIN", "LOGIN"})


def deciding(key: tuple[str, ...]) -> PolicyRequest:
    """The request the decision sees for `key` (a `decision_key()`)."""
    return PolicyRequest(MappingProxyType(dict(zip(_KEY_NAMES, key))))


@dataclass(frozen=True, slots=True)
class MalformedRequest:
    reason: str


class RequestFramer:
    """Frames requests as their bytes arrive (`feed`), within the bounds above.

    A request ends at the first empty line. When its first line ends in CRLF, a line holding only
    CR ends it too (clients that send CRLF); when it ends in LF alone (Postfix), only an empty LF
    line does, and a CR-only line inside it is a (malformed) line. One CR ending a line is dropped.
    Empty lines between requests ask nothing and are skipped. A request still arriving is checked
    against the bounds as it grows, each byte once, so that a peer breaking one is cut off at once.
    """

    __slots__ = ("_buffer", "_checked", "_lines", "broken")

    def __init__(self):
        self._buffer = b""
        self._checked = 0  # bytes of the pending request already checked against the bounds
        self._lines = 0  # complete lines among them
        # A bound broken after requests that came whole in the same bytes: those are answered
        # first, then the connection is closed with this.
        self.broken: ProtocolError | None = None

    @property
    def pending(self) -> int:
        """Bytes received that do not yet form a whole request."""
        return len(self._buffer)

    def feed(self, data: bytes) -> list[list[bytes]]:
        """Add received bytes; every request now complete, as its lines (without newlines)."""
        if self.broken is not None:
            raise self.broken
        buffer = self._buffer + data if self._buffer else data
        requests = []
        start = 0
        try:
            while True:
                lines, start = _take_request(buffer, start)
                if lines is None:
                    break
                requests.append(lines)
            if requests or start:
                self._checked = self._lines = 0
            rest = buffer[start:] if start else buffer
            if rest:
                self._check_partial(rest)
        except ProtocolError as exc:
            if not requests:
                raise
            self.broken, self._buffer = exc, b""
            return requests
        self._buffer = rest
        return requests

    def _check_partial(self, rest: bytes) -> None:
        pos, count = self._checked, self._lines
        while (newline := rest.find(b"\n", pos)) >= 0:
            if newline - pos >= MAX_LINE:
                raise ProtocolError(f"line longer than {MAX_LINE} bytes")
            count += 1
            pos = newline + 1
        if len(rest) - pos >= MAX_LINE:
            raise ProtocolError(f"line longer than {MAX_LINE} bytes")
        if count > MAX_ATTRIBUTES:
            raise ProtocolError(f"more than {MAX_ATTRIBUTES} attributes")
        if len(rest) > MAX_REQUEST:
            raise ProtocolError(f"request larger than {MAX_REQUEST} bytes")
        self._checked, self._lines = pos, count


def _take_request(data: bytes, start: int) -> tuple[list[bytes] | None, int]:
    """The lines of the request starting at `start` and where the next begins; (None, start of
    the request still arriving) if it is not complete."""
    while True:  # a stray empty line between requests asks nothing
        if data.startswith(b"\n", start):
            start += 1
        elif data.startswith(b"\r\n", start):
            start += 2
        else:
            break
    first_end = data.find(b"\n", start)
    if first_end < 0:
        return None, start
    if data[first_end - 1] == 13:  # CR: CRLF-framed
        lf, crlf = data.find(b"\n\n", first_end), data.find(b"\n\r\n", first_end)
        if crlf >= 0 and (lf < 0 or crlf < lf):
            return _checked_lines(data[start:crlf]), crlf + 3
        if lf < 0:
            return None, start
    else:
        lf = data.find(b"\n\n", first_end)
        if lf < 0:
            return None, start
        if lf + 2 - start <= MAX_LINE:  # no line can be too long: the usual request
            body = data[start:lf]
            if b"\r" not in body:
                lines = body.split(b"\n")
                if len(lines) <= MAX_ATTRIBUTES:
                    return lines, lf + 2
    return _checked_lines(data[start:lf]), lf + 2


def _checked_lines(body: bytes) -> list[bytes]:
    """The lines of a whole request (without its empty line), checked against the bounds."""
    lines = []
    size = 0
    for raw in body.split(b"\n"):
        if len(raw) + 1 > MAX_LINE:
            raise ProtocolError(f"line longer than {MAX_LINE} bytes")
        line = raw.removesuffix(b"\r")
        size += len(line) + 1
        if size > MAX_REQUEST:
            raise ProtocolError(f"request larger than {MAX_REQUEST} bytes")
        lines.append(line)
        if len(lines) > MAX_ATTRIBUTES:
            raise ProtocolError(f"more than {MAX_ATTRIBUTES} attributes")
    return lines


def parse_request(lines: list[bytes]) -> PolicyRequest | MalformedRequest:
    """Attributes from the lines of one request; unknown attributes are kept and ignored."""
    attributes: dict[str, str] = {}
    # Fast path: an ASCII request (Postfix's, unless an address is UTF-8) decoded at once.
    # Anything else (a NUL, UTF-8, a line that is not name=value) takes the loop below, which
    # says what.
    joined = b"\n".join(lines)
    if joined.isascii() and b"\x00" not in joined:
        parts = joined.decode("ascii").split("\n")
        if len(parts) == len(lines):
            for line in parts:
                name, sep, value = line.partition("=")
                if not sep or not name:
                    break
                if name not in attributes:  # a repeated name keeps its first value
                    attributes[name] = value
            else:
                if attributes.get("request") != "smtpd_access_policy":
                    return MalformedRequest("not an smtpd_access_policy request")
                return PolicyRequest(MappingProxyType(attributes))
            attributes = {}
    for line in lines:
        name, sep, value = line.partition(b"=")
        if not sep or not name:
            return MalformedRequest("a line is not name=value")
        if b"\x00" in line:
            return MalformedRequest("NUL byte in request")
        try:
            key, text = name.decode("ascii"), value.decode("utf-8")
        except UnicodeDecodeError:
            return MalformedRequest("request is not valid UTF-8")
        attributes.setdefault(key, text)  # a repeated name keeps its first value
    if attributes.get("request") != "smtpd_access_policy":
        return MalformedRequest("not an smtpd_access_policy request")
    return PolicyRequest(MappingProxyType(attributes))


@functools.lru_cache(maxsize=64)  # the actions are a handful of constants
def encode_reply(action: str) -> bytes:
    """`action=...` and the empty line. CR, LF and NUL can never reach the wire."""
    safe = action.replace("\r", " ").replace("\n", " ").replace("\x00", " ")
    return f"action={safe}\n\n".encode("utf-8", "replace")
