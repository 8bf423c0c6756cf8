"""Checks that the fast paths of issue 6 mean what the code they sit in front of meant.

- mailcloak/policy/codec.py: RequestFramer against line-by-line reading, and parse_request's
  one-decode path against the line-by-line parse;
- mailcloak/socketmap/netstring.py: the one-whole-netstring path of NetstringDecoder.feed.

    python bench/check_codec.py [ITERATIONS]

`reference` below is the line-by-line reader of before issue 6; `framed_outcomes` what the
server makes of the same bytes through RequestFramer. Random streams (Postfix requests, CRLF,
mixed line endings, stray empty lines, long lines, many attributes, garbage), fed in random
pieces with EOF at the end, should give the same sequence of results (lines, None, or
ProtocolError with the same message) through both; they differ by design where line endings
are mixed (see bench/README.md), and in which message a stream that breaks two bounds gets.
"""

from __future__ import annotations

import asyncio
import random
import sys

from mailcloak.errors import ProtocolError
from mailcloak.socketmap.netstring import NetstringDecoder
from mailcloak.policy.codec import (MAX_ATTRIBUTES, MAX_LINE, MAX_REQUEST, MalformedRequest, RequestFramer,
                                    parse_request)


async def reference(reader, first_line_timeout, request_timeout):
    try:
        async with asyncio.timeout(first_line_timeout):
            first = await _ref_line(reader)
            while first == b"":
                first = await _ref_line(reader)
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
                line = await _ref_line(reader)
                if line is None:
                    raise ProtocolError("connection closed in the middle of a request")
                size += len(line) + 1
                if size > MAX_REQUEST:
                    raise ProtocolError(f"request larger than {MAX_REQUEST} bytes")
    except TimeoutError:
        raise ProtocolError("request not completed in time") from None
    return lines


async def _ref_line(reader):
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


def reference_parse(lines):
    """parse_request as it was: line by line."""
    attributes: dict[str, str] = {}
    for line in lines:
        name, sep, value = line.partition(b"=")
        if not sep or not name:
            return "a line is not name=value"
        if b"\x00" in line:
            return "NUL byte in request"
        try:
            key, text = name.decode("ascii"), value.decode("utf-8")
        except UnicodeDecodeError:
            return "request is not valid UTF-8"
        attributes.setdefault(key, text)
    if attributes.get("request") != "smtpd_access_policy":
        return "not an smtpd_access_policy request"
    return attributes


def parsed(lines):
    result = parse_request(lines)
    return result.reason if isinstance(result, MalformedRequest) else dict(result.attributes)


LINES = [b"request=smtpd_access_policy", b"sender=a@b", b"sender=c@d", b"x", b"=v", b"", b"a=\x00",
         b"\xc3\xa9=1", b"v=\xc3\xa9", b"v=\xc3", b"\xa9=", b"a=b=c", b"a=b\nc=d", b"\r", b"k=\r"]


REQUEST = (b"request=smtpd_access_policy\nprotocol_state=RCPT\nsender=a@d1.test\n"
           b"recipient=b@d2.test\nsasl_method=\n\n")
TOKENS = [REQUEST, REQUEST.replace(b"\n", b"\r\n"), b"request=smtpd_access_policy\n", b"\n", b"\r\n",
          b"\r", b"a=b\n", b"a=b\r\n", b"=\n", b"x" * 300, b"y" * 4000, b"\x00", b"\xff", b"sender=a@b\n",
          b"\n\n", b"\r\n\r\n", b"z=" + b"q" * 8300 + b"\n", b"".join(b"a%d=1\n" % i for i in range(120))]


def framed_outcomes(data: bytes, rng: random.Random) -> list:
    """What the server makes of `data` arriving in random pieces through RequestFramer: the
    requests in order, then None at the end or the error that closes the connection."""
    framer = RequestFramer()
    results: list = []
    pos = 0
    while pos < len(data):
        step = rng.choice((1, 3, 17, 200, 5000, len(data)))
        try:
            results.extend(framer.feed(data[pos:pos + step]))
        except ProtocolError as exc:
            return results + [("error", str(exc))]
        if framer.broken is not None:  # answered, then closed
            return results + [("error", str(framer.broken))]
        pos += step
    if framer.pending:
        return results + [("error", "connection closed in the middle of a request")]
    return results + [None]


async def outcomes(reader_fn, data: bytes, limit: int, rng: random.Random) -> list:
    reader = asyncio.StreamReader(limit=limit)
    results: list = []

    async def consume():
        while True:
            try:
                lines = await reader_fn(reader, None, 60)
            except ProtocolError as exc:
                results.append(("error", str(exc)))
                return
            results.append(lines)
            if lines is None:
                return

    task = asyncio.create_task(consume())
    pos = 0
    while pos < len(data):
        step = rng.choice((1, 3, 17, 200, 5000, len(data)))
        reader.feed_data(data[pos:pos + step])
        pos += step
        for _ in range(rng.randrange(3)):
            await asyncio.sleep(0)
    reader.feed_eof()
    await asyncio.wait_for(task, 10)
    return results


class ReferenceDecoder:
    """NetstringDecoder.feed as it was (the general path alone)."""

    def __init__(self, max_length: int):
        self._max_length = max_length
        self._max_digits = len(str(max_length))
        self._buffer = bytearray()

    def feed(self, data: bytes) -> list[bytes]:
        self._buffer += data
        payloads = []
        while self._buffer:
            colon = self._buffer.find(b":", 0, self._max_digits + 1)
            if colon < 0:
                head = bytes(self._buffer[: self._max_digits + 1])
                if not head.isdigit():
                    raise ProtocolError("netstring length is not a number")
                if len(head) > self._max_digits:
                    raise ProtocolError(f"netstring longer than {self._max_length} bytes")
                break
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
                break
            if self._buffer[end] != ord(","):
                raise ProtocolError("netstring does not end with ','")
            payloads.append(bytes(self._buffer[colon + 1 : end]))
            del self._buffer[: end + 1]
        return payloads


def feed_all(decoder, chunks):
    out = []
    for chunk in chunks:
        try:
            out.append(decoder.feed(chunk))
        except ProtocolError as exc:
            out.append(("error", str(exc)))
            break
    out.append(len(decoder._buffer))
    return out


NETSTRINGS = [b"20:alias alias1@d1.test,", b"0:,", b"3:abc,", b"03:abc,", b"3:abcd", b"x:", b"12", b"3:ab,",
              b"99999:", b"10266:", b"10267:", b"5:hello,", b"1:a,2:bc,", b":", b",", b"4:a\x00b\xff,"]


async def main(iterations: int) -> int:
    rng = random.Random(6)
    failures = 0
    for i in range(iterations):
        data = b"".join(rng.choice(TOKENS) for _ in range(rng.randrange(1, 40)))
        limit = rng.choice((MAX_LINE + 1, MAX_LINE + 1, 2 ** 16))
        chunk_seed = rng.random()
        want = await outcomes(reference, data, limit, random.Random(chunk_seed))
        got = framed_outcomes(data, random.Random(chunk_seed))
        if want != got:
            failures += 1
            if failures <= 3:
                print(f"DIFFERENT (limit {limit}) for {data[:300]!r}...\n  reference {str(want)[:400]}\n"
                      f"  block     {str(got)[:400]}")
    print(f"{iterations} streams, {failures} different")
    parse_failures = 0
    for i in range(iterations * 5):
        lines = [rng.choice(LINES) for _ in range(rng.randrange(0, 8))]
        if rng.random() < 0.7:
            lines.insert(0, LINES[0])
        if reference_parse(lines) != parsed(lines):
            parse_failures += 1
            print(f"PARSE DIFFERENT for {lines!r}: {reference_parse(lines)!r} != {parsed(lines)!r}")
    print(f"{iterations * 5} line lists parsed, {parse_failures} different")
    failures += parse_failures
    net_failures = 0
    for i in range(iterations * 5):
        data = b"".join(rng.choice(NETSTRINGS) for _ in range(rng.randrange(1, 6)))
        cuts = sorted(rng.sample(range(len(data) + 1), k=min(len(data), rng.randrange(0, 4))))
        chunks = [data[a:b] for a, b in zip([0] + cuts, cuts + [len(data)])]
        limit = rng.choice((10_256, 5, 100))
        want, got = feed_all(ReferenceDecoder(limit), chunks), feed_all(NetstringDecoder(limit), chunks)
        if want != got:
            net_failures += 1
            print(f"NETSTRING DIFFERENT for {chunks!r} (max {limit}): {want!r} != {got!r}")
    print(f"{iterations * 5} netstring streams, {net_failures} different")
    failures += net_failures
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main(int(sys.argv[1]) if len(sys.argv) > 1 else 3000)))
