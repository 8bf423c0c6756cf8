"""Postfix policy delegation wire format: `name=value` lines ending with an empty line.

Reading is bounded (line length, attribute count, request size); a peer that breaks a bound is
cut off with ProtocolError, as SMTPD_POLICY_README asks ("log a warning and disconnect"). A
request that arrives whole but is not a valid policy request is returned as MalformedRequest, so
the server can answer it with DEFER_IF_PERMIT and keep the connection.
"""

from __future__ import annotations

import asyncio
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
        return self.get("protocol_state").upper()

    @property
    def sender(self) -> str:
        return self.get("sender").lower()

    @property
    def recipient(self) -> str:
        return self.get("recipient").lower()

    @property
    def sasl_method(self) -> str:
        return self.get("sasl_method").upper()

    @property
    def sasl_username(self) -> str:
        return self.get("sasl_username")

    @property
    def authenticated(self) -> bool:
        return bool(self.get("sasl_method") or self.get("sasl_username"))


@dataclass(frozen=True, slots=True)
class MalformedRequest:
    reason: str


async def read_request_lines(reader: asyncio.StreamReader, first_line_timeout: float | None,
                             request_timeout: float) -> list[bytes] | None:
    """Read one request's lines (without newlines). None on a clean EOF between requests.

    `first_line_timeout` bounds the wait for a request to start (idle connections); once it has
    started, the whole request must arrive within `request_timeout` (slow clients).
    """
    try:
        async with asyncio.timeout(first_line_timeout):
            first = await _read_line(reader)
            while first == b"":  # a stray empty line between requests asks nothing
                first = await _read_line(reader)
    except TimeoutError:
        raise ProtocolError("idle timeout") from None
    if first is None:
        return None
    lines: list[bytes] = []
    size = len(first)
    try:
        async with asyncio.timeout(request_timeout):
            line = first
            while line != b"":
                lines.append(line)
                if len(lines) > MAX_ATTRIBUTES:
                    raise ProtocolError(f"more than {MAX_ATTRIBUTES} attributes")
                line = await _read_line(reader)
                if line is None:
                    raise ProtocolError("connection closed in the middle of a request")
                size += len(line) + 1
                if size > MAX_REQUEST:
                    raise ProtocolError(f"request larger than {MAX_REQUEST} bytes")
    except TimeoutError:
        raise ProtocolError("request not completed in time") from None
    return lines


async def _read_line(reader: asyncio.StreamReader) -> bytes | None:
    try:
        line = await reader.readuntil(b"\n")
    except asyncio.IncompleteReadError as exc:
        if exc.partial:
            raise ProtocolError("connection closed in the middle of a request") from None
        return None
    except asyncio.LimitOverrunError:
        raise ProtocolError(f"line longer than {MAX_LINE} bytes") from None
    if len(line) > MAX_LINE:
        raise ProtocolError(f"line longer than {MAX_LINE} bytes")
    return line[:-1].removesuffix(b"\r")


def parse_request(lines: list[bytes]) -> PolicyRequest | MalformedRequest:
    """Attributes from the lines of one request; unknown attributes are kept and ignored."""
    attributes: dict[str, str] = {}
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


def encode_reply(action: str) -> bytes:
    """`action=...` and the empty line. CR, LF and NUL can never reach the wire."""
    safe = action.replace("\r", " ").replace("\n", " ").replace("\x00", " ")
    return f"action={safe}\n\n".encode("utf-8", "replace")
