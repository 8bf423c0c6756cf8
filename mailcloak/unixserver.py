"""A unix-socket stream server with what both Postfix-facing services need.

- Binding: a stale socket file left by a crash is replaced; a live daemon answering on the path,
  or a file that is not a socket, makes start-up fail with one clear line. The socket is created
  with the configured mode already in force (umask around bind), then chowned.
- A cap on connections served at once; one log line when it is reached and one when it clears.
- Graceful stop: stop accepting, close idle connections at once, let busy ones finish their
  request within a bound, then remove the socket file where the folder allows it.
- Peers that do not read their answers: a write that cannot drain within the request timeout
  cuts the connection off (`Connection.drain`), a deadline closes at once even with answers
  still queued (`Connection.close_now`), and a closed connection gets CLOSE_GRACE_SECONDS to
  flush them; so no such peer holds a socket open for ever, inside or outside the cap.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import grp
import logging
import os
import pwd
import socket
import stat
from dataclasses import dataclass, field
from typing import Awaitable, Callable

from mailcloak.config import SocketsConfig
from mailcloak.errors import ConfigError, MailcloakError

log = logging.getLogger(__name__)


class SocketInUse(MailcloakError):
    """Another process answers on the socket path, or the path is not a socket."""


@dataclass(eq=False)
class Connection:
    """One client connection; the service marks it busy while it handles a request."""

    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    busy: bool = False
    closing: bool = False
    task: asyncio.Task | None = field(default=None, repr=False)

    async def drain(self, timeout: float) -> None:
        """`writer.drain()`, bounded. A client that pipelines requests and never reads the answers
        would otherwise hold the handler (and a connection slot) in drain() for ever: it is cut
        off after `timeout` seconds. Free while the kernel takes the answers (nothing buffered)."""
        if not self.writer.transport.get_write_buffer_size():
            return
        try:
            async with asyncio.timeout(timeout):
                await self.writer.drain()
        except TimeoutError:
            log.warning("closing a connection whose client has not read its answers for %gs", timeout)
            # abort(), not close(): close() would wait for the unread answers to be flushed
            self.writer.transport.abort()
            raise ConnectionAbortedError("client does not read its answers") from None

    def close_now(self) -> None:
        """Close after a deadline passed; a pending read then sees EOF. With answers still queued
        (the peer is not reading them) close() would wait for them to be flushed, for ever, and
        the read would never end: abort() then."""
        if self.writer.transport.get_write_buffer_size():
            self.writer.transport.abort()
        else:
            self.writer.close()


Handler = Callable[[Connection], Awaitable[None]]

# How long a closed connection may take to flush the answers already written to its peer.
CLOSE_GRACE_SECONDS = 2.0


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
    def __init__(self, name: str, path: str, handler: Handler, *, mode: int,
                 owner: tuple[int, int], max_connections: int, stream_limit: int):
        self.name = name
        self.path = path
        self._handler = handler
        self._mode = mode
        self._owner = owner
        self._max_connections = max_connections
        self._stream_limit = stream_limit
        self._server: asyncio.base_events.Server | None = None
        self._connections: set[Connection] = set()
        self._at_capacity = False
        self._inode: int | None = None

    @property
    def open_connections(self) -> int:
        return len(self._connections)

    async def start(self) -> None:
        sock = bind_unix_socket(self.path, self._mode, self._owner)
        self._inode = os.stat(self.path).st_ino
        self._server = await asyncio.start_unix_server(
            self._on_connect, sock=sock, limit=self._stream_limit
        )
        log.info("%s listening on %s", self.name, self.path)

    @property
    def listening(self) -> bool:
        return self._server is not None and self._server.is_serving()

    async def _on_connect(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if len(self._connections) >= self._max_connections:
            if not self._at_capacity:
                self._at_capacity = True
                log.warning("%s: %d connections open, the sockets.max_connections cap; "
                            "refusing new ones until some close", self.name, self._max_connections)
            writer.close()
            return
        conn = Connection(reader, writer, task=asyncio.current_task())
        self._connections.add(conn)
        try:
            await self._handler(conn)
        except asyncio.CancelledError:
            pass
        except ConnectionError:
            pass
        except Exception:  # a bug must cost one connection, never the daemon
            log.exception("%s: unexpected error on a connection", self.name)
        finally:
            self._connections.discard(conn)
            if self._at_capacity and len(self._connections) < self._max_connections:
                self._at_capacity = False
                log.info("%s: below the connection cap again", self.name)
            writer.close()
            try:
                async with asyncio.timeout(CLOSE_GRACE_SECONDS):
                    await writer.wait_closed()
            except TimeoutError:
                # Answers still unsent and a peer that does not read them: close() would wait for
                # them for ever, keeping the socket open outside the connection cap.
                writer.transport.abort()
            except Exception:  # noqa: BLE001 - the connection is gone either way
                pass

    async def stop(self, grace: float) -> None:
        """Stop accepting, close idle connections, give busy ones `grace` seconds, unlink."""
        if self._server is None:
            return
        self._server.close()
        for conn in list(self._connections):
            conn.closing = True
            if not conn.busy and conn.task is not None:
                conn.task.cancel()
        busy = [c.task for c in self._connections if c.task is not None]
        if busy:
            done, pending = await asyncio.wait(busy, timeout=grace)
            for task in pending:
                task.cancel()
            if pending:
                log.warning("%s: %d request(s) cut off at shutdown", self.name, len(pending))
                await asyncio.wait(pending, timeout=1)
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
