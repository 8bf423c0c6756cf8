"""Stand-ins for the identity providers: small aiohttp servers answering as the real ones do.

Each runs in a background thread with its own event loop on 127.0.0.1 and a free port, so both
async tests (the provider in the test's loop) and blocking tests (the daemon as a process, driven
by blocking sockets) can use it. Every request is counted per endpoint (`counts`); faults are
switched on per endpoint with `set_fault()`:

- "500": HTTP 500 with a JSON error body;
- "hang": never answers until the fault is cleared (`clear_fault()` releases waiting handlers);
- "slow": answers after `delay` seconds;
- "malformed": 200 with a body that is not JSON;
- "huge": 200 with a 50 MB JSON-looking body, streamed in chunks without Content-Length.

`stop()` closes the listener (connections are refused) and `start()` reopens it on the same port.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import Counter
from concurrent.futures import Future

from aiohttp import web

HUGE_BODY_BYTES = 50 * 1024 * 1024


class FakeClock:
    """A monotonic clock tests move by hand; shareable by a provider and a stand-in."""

    def __init__(self, start: float = 1000.0):
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class StandInServer:
    """Base of the stand-ins: the thread, the listener, counting and faults."""

    def __init__(self, clock=time.monotonic):
        self.clock = clock
        self.counts: Counter[str] = Counter()
        self.peers: set = set()  # client (host, port) pairs seen: one per TCP connection
        self.fault: str | None = None
        self.fault_endpoints: frozenset[str] | None = None  # None: every endpoint
        self.delay = 0.0
        self.port = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._runner: web.AppRunner | None = None
        self._release: asyncio.Event | None = None

    # -- subclasses --------------------------------------------------------------------------

    def routes(self, app: web.Application) -> None:
        raise NotImplementedError

    # -- lifecycle ---------------------------------------------------------------------------

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> "StandInServer":
        if self._loop is None:
            ready: Future = Future()
            self._loop = asyncio.new_event_loop()
            self._thread = threading.Thread(target=self._run_loop, args=(ready,), daemon=True,
                                            name=type(self).__name__)
            self._thread.start()
            ready.result(5)
        self._call(self._open())
        return self

    def _run_loop(self, ready: Future) -> None:
        asyncio.set_event_loop(self._loop)
        self._loop.call_soon(ready.set_result, None)
        self._loop.run_forever()

    def _call(self, coro, timeout: float = 10):
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    async def _open(self) -> None:
        self._release = asyncio.Event()
        app = web.Application()
        self.routes(app)
        self._runner = web.AppRunner(app, shutdown_timeout=0.2)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", self.port, reuse_address=True)
        await site.start()
        if not self.port:
            self.port = self._runner.addresses[0][1]

    async def _shut(self) -> None:
        if self._release is not None:
            self._release.set()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    def stop(self) -> None:
        """Close the listener: new connections are refused until start()."""
        if self._loop is not None:
            self._call(self._shut())

    def close(self) -> None:
        if self._loop is None:
            return
        self.stop()
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)
        self._loop.close()
        self._loop = None

    # -- faults ------------------------------------------------------------------------------

    def set_fault(self, fault: str | None, endpoints: set[str] | None = None, delay: float = 0.0) -> None:
        if fault not in (None, "500", "hang", "slow", "malformed", "huge"):
            raise ValueError(f"unknown fault {fault!r}")
        self.fault_endpoints = frozenset(endpoints) if endpoints else None
        self.delay = delay
        self.fault = fault
        if fault is None:
            self._release_waiters()

    def clear_fault(self) -> None:
        self.set_fault(None)

    def _release_waiters(self) -> None:
        if self._loop is None:
            return

        def release() -> None:
            if self._release is not None:
                self._release.set()
            self._release = asyncio.Event()

        self._loop.call_soon_threadsafe(release)

    async def faulted(self, endpoint: str, request: web.Request) -> web.StreamResponse | None:
        """Count the request; the fault's response if one applies to `endpoint`, else None."""
        self.counts[endpoint] += 1
        self.peers.add(request.transport.get_extra_info("peername") if request.transport else None)
        fault = self.fault
        if fault is None or (self.fault_endpoints is not None and endpoint not in self.fault_endpoints):
            return None
        if fault == "500":
            return web.json_response({"error": "unknown_error"}, status=500)
        if fault == "hang":
            await self._release.wait()
            return None
        if fault == "slow":
            await asyncio.sleep(self.delay)
            return None
        if fault == "malformed":
            return web.Response(text='{"access_token": "', status=200, content_type="application/json")
        if fault == "huge":
            response = web.StreamResponse(status=200, headers={"Content-Type": "application/json"})
            response.enable_chunked_encoding()
            await response.prepare(request)
            chunk = b"[" + b'"xxxxxxxxxxxxxxxxxxxxxxxxxxxxxx",' * (1024 * 1024 // 33)
            sent = 0
            try:
                while sent < HUGE_BODY_BYTES:
                    await response.write(chunk)
                    sent += len(chunk)
                await response.write_eof()
            except (ConnectionError, RuntimeError):
                pass  # the client gave up reading, as it should
            return response
        return None
