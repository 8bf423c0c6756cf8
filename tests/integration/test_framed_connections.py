"""mailcloak.unixserver.Connection with answers that wait (a remote IdP) next to answers given at
once: one request in flight per connection, answers in the order asked, and the socketmap's memo
never keeping an answer that waited."""

from __future__ import annotations

import asyncio

import pytest

from mailcloak.config import load_config
from mailcloak.idp import build_provider
from mailcloak.metrics import Metrics
from mailcloak.runtime import Runtime, RuntimeRef
from mailcloak.socketmap.maps import Reply
from mailcloak.socketmap.netstring import encode
from mailcloak.socketmap.server import SocketmapService
from mailcloak.state import StateCache
from mailcloak.store.sqlite import SQLiteStore
from mailcloak.unixserver import UnixServer
from support import write_config


class AskingSocketmap(SocketmapService):
    """The socketmap with a map that waits before it answers, as one asking the IdP does."""

    def __init__(self, ref, metrics):
        super().__init__(ref, metrics)
        self.asked = 0
        self.in_flight = 0
        self.most_in_flight = 0

    def answer(self, request: bytes):
        if not request.startswith(b"remote "):
            return super().answer(request)
        return self._remote(request)

    async def _remote(self, request: bytes) -> Reply:
        self.asked += 1
        self.in_flight += 1
        self.most_in_flight = max(self.most_in_flight, self.in_flight)
        try:
            await asyncio.sleep(0.05)
        finally:
            self.in_flight -= 1
        return Reply("OK", request.split(b" ", 1)[1].decode())


@pytest.fixture
async def served(tmp_path, go_db):
    config = load_config(write_config(tmp_path))
    store = await SQLiteStore.open(config.sqlite)
    state = StateCache(store)
    await state.load()
    service = AskingSocketmap(RuntimeRef(Runtime(config, build_provider(config), state)), Metrics())
    server = UnixServer(service, config.sockets.socketmap_socket, mode=0o600, owner=(-1, -1), max_connections=8)
    await server.start()
    yield service, config.sockets.socketmap_socket
    await server.stop(1)
    await store.close()


async def _exchange(path: str, data: bytes, answers: int) -> list[bytes]:
    reader, writer = await asyncio.open_unix_connection(path)
    writer.write(data)
    got = []
    for _ in range(answers):
        length = await reader.readuntil(b":")
        got.append(await reader.readexactly(int(length[:-1]) + 1))
    writer.close()
    return [answer[:-1] for answer in got]


async def test_pipelined_answers_come_in_order_with_one_in_flight(served):
    service, path = served
    requests = [b"remote one", b"alias nobody@nowhere.example", b"remote two", b"bogus x"]
    got = await asyncio.wait_for(_exchange(path, b"".join(map(encode, requests)), 4), 10)
    assert got == [b"OK one", b"NOTFOUND ", b"OK two", b"PERM unknown map or malformed request"]
    assert service.most_in_flight == 1


async def test_an_answer_that_waited_is_not_memoised(served):
    service, path = served
    for _ in range(2):
        assert await asyncio.wait_for(_exchange(path, encode(b"remote x"), 1), 10) == [b"OK x"]
    assert service.asked == 2
