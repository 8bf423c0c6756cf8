"""Netstrings (`<length>:<bytes>,`), decoded incrementally with a bound on the length.

A frame that cannot be a netstring (non-digit or over-long length, leading zero, missing ':'
or ',') raises ProtocolError: a stream cannot be resynchronised after that, so the connection
is closed.
"""

from __future__ import annotations

from mailcloak.errors import ProtocolError


def encode(payload: bytes) -> bytes:
    return b"%d:%s," % (len(payload), payload)


class NetstringDecoder:
    broken = None  # a bad frame raises at once (mailcloak.unixserver.Framer)

    def __init__(self, max_length: int):
        self._max_length = max_length
        self._max_digits = len(str(max_length))
        self._buffer = bytearray()
        self.pending = 0  # bytes received that do not yet form a whole netstring

    def feed(self, data: bytes) -> list[bytes]:
        """Add received bytes; return every netstring payload now complete."""
        if not self._buffer:
            # Fast path: exactly one whole netstring, as Postfix sends a query. Anything else
            # (several, a part, a bad frame) takes the general path below, which says what.
            colon = data.find(b":", 0, self._max_digits + 1)
            if colon > 0:
                digits = data[:colon]
                if digits.isdigit() and (colon == 1 or data[0] != 48):  # 48: no leading "0"
                    end = colon + 1 + int(digits)
                    if end - colon - 1 <= self._max_length and len(data) == end + 1 and data[end] == 44:
                        return [data[colon + 1 : end]]  # 44: ","
        self._buffer += data
        self.pending = len(self._buffer)
        payloads = []
        while self._buffer:
            colon = self._buffer.find(b":", 0, self._max_digits + 1)
            if colon < 0:
                head = bytes(self._buffer[: self._max_digits + 1])
                if not head.isdigit():
                    raise ProtocolError("netstring length is not a number")
                if len(head) > self._max_digits:
                    raise ProtocolError(f"netstring longer than {self._max_length} bytes")
                break  # length still arriving
            digits = bytes(self._buffer[:colon])
            if not digits.isdigit():
                raise ProtocolError("netstring length is not a number")
            if len(digits) > 1 and digits.startswith(b"0"):
                raise ProtocolError("netstring length has a leading zero")
            length = int(digits)
            if length > self._max_length:
                raise ProtocolError(f"netstring longer than {self._max_length} bytes")
            end = colon + 1 + length
            if len(self._buffer) <= end:
                break  # payload or comma still arriving
            if self._buffer[end] != ord(","):
                raise ProtocolError("netstring does not end with ','")
            payloads.append(bytes(self._buffer[colon + 1 : end]))
            del self._buffer[: end + 1]
        self.pending = len(self._buffer)
        return payloads
