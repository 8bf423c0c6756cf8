"""A unix-socket stream server with what both Postfix-facing services need.

- Binding: a stale socket file left by a crash is replaced; a live daemon answering on the path,
  or a file that is not a socket, makes start-up fail with one clear line. The socket is created
  with the configured mode already in force (umask around bind), then chowned.
- A cap on connections served at once; one log line when it is reached and one when it clears.
- Graceful stop: stop accepting, close idle connections at once, let busy ones finish their
  request within a bound, then remove the socket file where the folder allows it.
- Peers that do not read their answers: answers left unread for the request timeout cut the
  connection off (`Connection.pause_writing`), a deadline closes at once even with answers
  still queued (`Connection.close_now`), and a closed connection gets CLOSE_GRACE_SECONDS to
  flush them; so no such peer holds a socket open for ever, inside or outside the cap.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import errno
import grp
import logging
import os
import pwd
import socket
import stat
from typing import Awaitable, Callable, Protocol

from mailcloak.config import SocketsConfig
from mailcloak.errors import ConfigError, MailcloakError, ProtocolError

log = logging.getLogger(__name__)


class SocketInUse(MailcloakError):
    """Another process answers on the socket path, or the path is not a socket."""


# How long a closed connection may take to flush the answers already written to its peer.
CLOSE_GRACE_SECONDS = 2.0


class Service(Protocol):
    """What a Postfix-facing service gives the server: framing, answers and what it logs."""

    name: str

    @property
    def sockets(self) -> SocketsConfig:
        """The socket settings in force (read once per connection)."""

    def framer(self) -> Framer: ...

    def respond(self, request) -> bytes | Awaitable[bytes]:
        """The framed answer; an awaitable when it must wait (for the IdP), then run in a task."""

    def protocol_error(self, exc: ProtocolError) -> None:
        """A peer broke the protocol or a bound; the connection is closed after this."""

    def expired(self, mid_request: bool) -> None:
        """A connection idle too long (or, `mid_request`, a request not completed in time)."""


class Framer(Protocol):
    pending: int  # bytes received that do not yet form a whole request
    # a bound broken after whole requests in the same bytes: they are answered, then it closes
    broken: ProtocolError | None

    def feed(self, data: bytes) -> list: ...


class Connection(asyncio.Protocol):
    """One client connection, framing requests as bytes arrive (no reader task, no await per
    request). One request is answered at a time, in order: requests that arrived together are
    queued, and reading pauses while an answer is awaited in a task or while the peer does not
    read its answers (the kernel's socket buffer then pushes back on it). An answer available at
    once is written from `data_received` itself.

    Bounds: idle_timeout between requests and request_timeout for a request to arrive whole
    (one ReadDeadline), request_timeout for a peer to take answers it left unread, then abort.
    """

    def __init__(self, server: UnixServer):
        self._server = server
        self._service = server.service
        self._sockets = server.service.sockets
        self._loop = asyncio.get_running_loop()
        self._framer = self._service.framer()
        self._queue: collections.deque = collections.deque()
        self._deadline = ReadDeadline(self._loop, self._expire)
        self._started = 0.0  # when the request now arriving began
        self._write_timer: asyncio.TimerHandle | None = None
        self._close_timer: asyncio.TimerHandle | None = None
        self._write_paused = False
        self._eof = False
        self.transport: asyncio.Transport | None = None
        self.task: asyncio.Task | None = None  # an answer being awaited
        self.closing = False

    @property
    def busy(self) -> bool:
        return self.task is not None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        if not self._server.admit(self):
            self._deadline.stop()
            transport.close()
            return
        self._wait()

    def data_received(self, data: bytes) -> None:
        framer = self._framer
        fresh = not framer.pending
        try:
            requests = framer.feed(data)
        except ProtocolError as exc:
            self._service.protocol_error(exc)
            self.close()
            return
        if requests:
            fresh = True
            self._queue.extend(requests)
            self._serve()
        if framer.pending and fresh:
            self._started = self._loop.time()
        if not self._queue and self.task is None:
            self._wait()

    def eof_received(self) -> bool:
        self._eof = True
        if self.task is None and not self._queue:
            self._finish()
        return True  # keep the transport open for the answers still to write

    def _serve(self) -> None:
        """Answer queued requests in order while none is awaited and the peer takes its answers."""
        queue, respond, transport = self._queue, self._service.respond, self.transport
        while queue and self.task is None and not self._write_paused and not self.closing:
            try:
                reply = respond(queue.popleft())
            except Exception:  # a bug must cost one connection, never the daemon
                log.exception("%s: unexpected error on a connection", self._service.name)
                transport.abort()
                return
            if type(reply) is bytes:
                transport.write(reply)
            else:
                self._deadline.done()
                transport.pause_reading()
                self.task = self._loop.create_task(self._answer_later(reply))
                return
        if self.closing or self._eof or self._framer.broken is not None:
            if not self._queue and self.task is None:
                self._finish()

    async def _answer_later(self, pending: Awaitable[bytes]) -> None:
        try:
            reply = await pending
        except asyncio.CancelledError:  # cut off at shutdown
            self.transport.abort()
            return
        except Exception:  # noqa: BLE001 - a bug must cost one connection, never the daemon
            log.exception("%s: unexpected error on a connection", self._service.name)
            self.transport.abort()
            return
        finally:
            self.task = None
        if self.transport.is_closing():
            return
        self.transport.write(reply)
        self._serve()
        if self.task is None and not self._write_paused and not self.transport.is_closing():
            self.transport.resume_reading()
            self._wait()

    def _wait(self) -> None:
        """Bound the wait for what comes next: a request to start (idle) or to end (slow peer)."""
        if self.transport.is_closing():
            return
        if self._framer.pending:
            self._deadline.reading_until(self._started + self._sockets.request_timeout_seconds)
        else:
            self._deadline.reading_until(self._loop.time() + self._sockets.idle_timeout_seconds)

    def _finish(self) -> None:
        """End of input, a broken bound or shutdown: close, and say so when a request was cut short."""
        if self._framer.broken is not None:
            self._service.protocol_error(self._framer.broken)
        elif self._eof and self._framer.pending and not self.closing:
            self._service.protocol_error(ProtocolError("connection closed in the middle of a request"))
        self.close()

    def _expire(self) -> None:
        self._service.expired(bool(self._framer.pending))
        self.close_now()

    def pause_writing(self) -> None:
        self._write_paused = True
        self._deadline.done()
        self.transport.pause_reading()
        self._write_timer = self._loop.call_later(self._sockets.request_timeout_seconds, self._unread)

    def resume_writing(self) -> None:
        self._write_paused = False
        if self._write_timer is not None:
            self._write_timer.cancel()
            self._write_timer = None
        self._serve()
        if self.task is None and not self._write_paused and not self.transport.is_closing():
            self.transport.resume_reading()
            self._wait()

    def _unread(self) -> None:
        log.warning("%s: closing a connection whose client has not read its answers for %gs",
                    self._service.name, self._sockets.request_timeout_seconds)
        # abort(), not close(): close() would wait for the unread answers to be flushed
        self.transport.abort()

    def close(self) -> None:
        """Close once the answers written are flushed; a peer that does not take them within
        CLOSE_GRACE_SECONDS is cut off (close() alone would wait for it for ever)."""
        self._deadline.stop()
        if self.transport.is_closing():
            return
        self.transport.close()
        if self.transport.get_write_buffer_size():
            self._close_timer = self._loop.call_later(CLOSE_GRACE_SECONDS, self.transport.abort)

    def close_now(self) -> None:
        """Close after a deadline passed, dropping answers the peer has not taken."""
        self._deadline.stop()
        if self.transport.get_write_buffer_size():
            self.transport.abort()
        else:
            self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self._deadline.stop()
        for timer in (self._write_timer, self._close_timer):
            if timer is not None:
                timer.cancel()
        self._queue.clear()
        self._server.release(self)


class ReadDeadline:
    """Ends a read that has not finished by its deadline, by calling `on_expire` (which closes
    the connection, so that the read sees EOF).

    One timer per connection rather than one per request: moving the deadline on, as every
    request does, is an assignment; the timer is moved only when it fires before the deadline,
    or when a deadline comes earlier than it (a request arriving in pieces). Only a read in
    progress (between `reading_until` and `done`) is bounded.
    """

    __slots__ = ("_loop", "_on_expire", "_timer", "_due", "deadline", "reading", "expired")

    def __init__(self, loop: asyncio.AbstractEventLoop, on_expire: Callable[[], None]):
        self._loop, self._on_expire = loop, on_expire
        self._timer: asyncio.TimerHandle | None = None
        self._due = 0.0
        self.deadline = 0.0
        self.reading = False
        self.expired = False

    def reading_until(self, deadline: float) -> None:
        self.deadline = deadline
        self.reading = True
        if self._timer is None or deadline < self._due:
            self._arm(deadline)

    def done(self) -> None:
        self.reading = False

    def _arm(self, when: float) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._due = when
        self._timer = self._loop.call_at(when, self._fire)

    def _fire(self) -> None:
        self._timer = None
        if not self.reading:
            return  # armed again when the next read starts
        if self._loop.time() >= self.deadline:
            self.expired = True
            self._on_expire()
        else:
            self._arm(self.deadline)

    def stop(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None


def resolve_owner(config: SocketsConfig) -> tuple[int, int]:
    """uid and gid for the socket files (-1 keeps the current one)."""
    uid = gid = -1
    if config.socket_owner_user:
        try:
            uid = pwd.getpwnam(config.socket_owner_user).pw_uid
        except KeyError:
            raise ConfigError(f"sockets.socket_owner_user: no such user {config.socket_owner_user!r}") from None
    if config.socket_owner_group:
        try:
            gid = grp.getgrnam(config.socket_owner_group).gr_gid
        except KeyError:
            raise ConfigError(f"sockets.socket_owner_group: no such group {config.socket_owner_group!r}") from None
    return uid, gid


def bind_unix_socket(path: str, mode: int, owner: tuple[int, int]) -> socket.socket:
    """A listening unix socket at `path` with `mode` and `owner`; see the module docstring."""
    _clear_stale(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old_umask = os.umask(0o777 & ~mode)
    try:
        sock.bind(path)
    except OSError as exc:
        sock.close()
        raise SocketInUse(f"cannot create socket {path}: {exc.strerror}") from None
    finally:
        os.umask(old_umask)
    try:
        os.chmod(path, mode)
        if owner != (-1, -1):
            os.chown(path, *owner)
    except OSError as exc:
        sock.close()
        with contextlib.suppress(OSError):
            os.unlink(path)
        raise SocketInUse(f"cannot set owner/mode of socket {path}: {exc.strerror}") from None
    sock.listen(socket.SOMAXCONN)
    sock.setblocking(False)
    return sock


def _clear_stale(path: str) -> None:
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise SocketInUse(f"{path} exists and is not a socket; refusing to replace it")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(1)
    try:
        probe.connect(path)
    except (ConnectionRefusedError, FileNotFoundError):
        log.info("removing stale socket %s", path)
        os.unlink(path)
        return
    except OSError as exc:
        if exc.errno in (errno.ECONNREFUSED, errno.ENOENT):
            os.unlink(path)
            return
        raise SocketInUse(f"cannot probe existing socket {path}: {exc.strerror}") from None
    finally:
        probe.close()
    raise SocketInUse(f"another process is already listening on {path}")


class UnixServer:
    def __init__(self, service: Service, path: str, *, mode: int, owner: tuple[int, int],
                 max_connections: int):
        self.service = service
        self.name = service.name
        self.path = path
        self._mode = mode
        self._max_connections = max_connections
        self._owner = owner
        self._server: asyncio.base_events.Server | None = None
        self._connections: set[Connection] = set()
        self._at_capacity = False
        self._inode: int | None = None
        self._all_closed: asyncio.Future | None = None

    @property
    def open_connections(self) -> int:
        return len(self._connections)

    async def start(self) -> None:
        sock = bind_unix_socket(self.path, self._mode, self._owner)
        self._inode = os.stat(self.path).st_ino
        loop = asyncio.get_running_loop()
        self._server = await loop.create_unix_server(lambda: Connection(self), sock=sock)
        log.info("%s listening on %s", self.name, self.path)

    @property
    def listening(self) -> bool:
        return self._server is not None and self._server.is_serving()

    def admit(self, conn: Connection) -> bool:
        """Count a new connection in, or refuse it at the cap (one log line until it clears)."""
        if len(self._connections) >= self._max_connections:
            if not self._at_capacity:
                self._at_capacity = True
                log.warning("%s: %d connections open, the sockets.max_connections cap; "
                            "refusing new ones until some close", self.name, self._max_connections)
            return False
        self._connections.add(conn)
        return True

    def release(self, conn: Connection) -> None:
        if conn not in self._connections:
            return
        self._connections.discard(conn)
        if self._at_capacity and len(self._connections) < self._max_connections:
            self._at_capacity = False
            log.info("%s: below the connection cap again", self.name)
        if not self._connections and self._all_closed is not None and not self._all_closed.done():
            self._all_closed.set_result(None)

    async def stop(self, grace: float) -> None:
        """Stop accepting, close idle connections, give busy ones `grace` seconds, unlink."""
        if self._server is None:
            return
        self._server.close()
        self._all_closed = asyncio.get_running_loop().create_future()
        if not self._connections:
            self._all_closed.set_result(None)
        for conn in list(self._connections):
            conn.closing = True
            if not conn.busy:
                conn.close()
        busy = [c.task for c in self._connections if c.task is not None]
        if busy:
            done, pending = await asyncio.wait(busy, timeout=grace)
            for task in pending:
                task.cancel()
            if pending:
                log.warning("%s: %d request(s) cut off at shutdown", self.name, len(pending))
                await asyncio.wait(pending, timeout=1)
        # the answers written are flushed (or cut off after CLOSE_GRACE_SECONDS)
        await asyncio.wait([self._all_closed], timeout=CLOSE_GRACE_SECONDS + 0.5)
        self._server = None
        self._remove_socket_file()

    def _remove_socket_file(self) -> None:
        try:
            if os.stat(self.path).st_ino != self._inode:
                return  # someone else's socket now
            os.unlink(self.path)
        except FileNotFoundError:
            pass
        except OSError as exc:
            log.info("%s: could not remove %s (%s); it is replaced at the next start",
                     self.name, self.path, exc.strerror)
