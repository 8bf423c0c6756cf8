"""Postfix policy delegation wire format: `name=value` lines ending with an empty line.

Reading is bounded (line length, attribute count, request size); a peer that breaks a bound is
cut off with ProtocolError, as SMTPD_POLICY_README asks ("log a warning and disconnect"). A
request that arrives whole but is not a valid policy request is returned as MalformedRequest, so
the server can answer it with DEFER_IF_PERMIT and keep the connection.
"""

from __future__ import annotations

import asyncio
import functools
from dataclasses import dataclass
from types import MappingProxyType
from typing import Callable, Mapping

from mailcloak.aio import Resume
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


@dataclass(frozen=True, slots=True)
class MalformedRequest:
    reason: str


async def read_request_lines(reader: asyncio.StreamReader, first_line_timeout: float | None,
                             request_timeout: float,
                             on_first_line: Callable[[], None] | None = None) -> list[bytes] | None:
    """Read one request's lines (without newlines). None on a clean EOF between requests.

    `first_line_timeout` bounds the wait for a request to start (idle connections); once it has
    started, the whole request must arrive within `request_timeout` (slow clients). A caller that
    bounds the wait itself passes None and learns from `on_first_line` when the request started.

    A request whose first line ends in CRLF is read line by line (`_read_lines`). One whose first
    line ends in LF alone (Postfix's) is LF-framed: it is read as one block up to the first empty
    LF line, and its lines are checked against the same bounds afterwards — one `readuntil`
    instead of one per line, the difference between this service and the floor in bench/. In an
    LF-framed request a line holding only CR is a (malformed) line, not the end of the request, so
    nothing past the request is ever consumed.
    """
    if first_line_timeout is None:
        raw = await _read_first_line(reader)
    else:
        try:
            async with asyncio.timeout(first_line_timeout):
                raw = await _read_first_line(reader)
        except TimeoutError:
            raise ProtocolError("idle timeout") from None
    if on_first_line is not None:
        on_first_line()
    if raw is None:
        return None
    first = raw[:-1].removesuffix(b"\r")
    if raw[-2:] == b"\r\n":
        rest = _read_lines(reader, [first], len(first))
    else:
        rest = _read_block(reader, first)
    try:
        waiting_on = rest.send(None)  # the rest has usually arrived with the first line: no timer
    except StopIteration as done:
        return done.value
    try:
        async with asyncio.timeout(request_timeout):
            return await Resume(rest, waiting_on)
    except TimeoutError:
        raise ProtocolError("request not completed in time") from None


async def _read_lines(reader: asyncio.StreamReader, lines: list[bytes], size: int,
                      prefix: bytes = b"") -> list[bytes]:
    """The rest of a request line by line; `prefix` is the start of the next line, already read."""
    while True:
        if len(lines) > MAX_ATTRIBUTES:
            raise ProtocolError(f"more than {MAX_ATTRIBUTES} attributes")
        raw = await _read_raw_line(reader, prefix)
        prefix = b""
        if raw is None:
            raise ProtocolError("connection closed in the middle of a request")
        line = raw[:-1].removesuffix(b"\r")
        size += len(line) + 1
        if size > MAX_REQUEST:
            raise ProtocolError(f"request larger than {MAX_REQUEST} bytes")
        if not line:
            return lines
        lines.append(line)


async def _read_block(reader: asyncio.StreamReader, first: bytes) -> list[bytes]:
    """The rest of a request whose first line ended in LF: up to the first empty line at once."""
    try:
        probe = await reader.readexactly(1)  # the empty line may follow at once
    except asyncio.IncompleteReadError:
        raise ProtocolError("connection closed in the middle of a request") from None
    if probe == b"\n":
        return [first]
    try:
        block = probe + await reader.readuntil(b"\n\n")
    except asyncio.LimitOverrunError:  # longer than the reader's limit: line by line
        return await _read_lines(reader, [first], len(first), probe)
    except asyncio.IncompleteReadError:
        raise ProtocolError("connection closed in the middle of a request") from None
    if (len(block) <= MAX_LINE and len(first) + len(block) <= MAX_REQUEST
            and b"\r" not in block):
        lines = block[:-2].split(b"\n")
        if len(lines) < MAX_ATTRIBUTES:
            lines.insert(0, first)
            return lines
    return _from_block(block, first)


def _from_block(block: bytes, first: bytes) -> list[bytes]:
    """The lines of an LF-framed block (ending in the empty line), checked against the bounds."""
    lines = [first]
    size = len(first)
    for raw in block[:-2].split(b"\n"):
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


async def _read_first_line(reader: asyncio.StreamReader) -> bytes | None:
    raw = await _read_raw_line(reader)
    while raw == b"\n" or raw == b"\r\n":  # a stray empty line between requests asks nothing
        raw = await _read_raw_line(reader)
    return raw


async def _read_raw_line(reader: asyncio.StreamReader, prefix: bytes = b"") -> bytes | None:
    """One line with its newline; None on EOF before any byte of it."""
    try:
        line = prefix + await reader.readuntil(b"\n")
    except asyncio.IncompleteReadError as exc:
        if exc.partial or prefix:
            raise ProtocolError("connection closed in the middle of a request") from None
        return None
    except asyncio.LimitOverrunError:
        raise ProtocolError(f"line longer than {MAX_LINE} bytes") from None
    if len(line) > MAX_LINE:
        raise ProtocolError(f"line longer than {MAX_LINE} bytes")
    return line


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
