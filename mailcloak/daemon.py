"""The daemon: wires config, store, IdP and the protocol servers into one aiohttp application.

aiohttp owns the lifecycle: each long-lived part is a `cleanup_ctx` generator (opened in order at
`AppRunner.setup()`, closed in reverse at `cleanup()`), so the servers stop before the IdP session
and the database close. Sockets are bound as root, then privileges are dropped. SIGHUP re-reads
the config (as `daemon.user`) and the database; SIGTERM/SIGINT stop gracefully.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import stat
import sys
from typing import AsyncIterator

from aiohttp import web

from mailcloak import __version__, logs
from mailcloak.appkeys import CONFIG, CONFIG_PATH, METRICS, RUNTIME, SERVERS, STATE
from mailcloak.config import DEFAULT_CONFIG_PATH, Config, ConfigError, load_config, parse_listen
from mailcloak.errors import MailcloakError
from mailcloak.http.app import PASSDB, setup_http
from mailcloak.idp import build_provider
from mailcloak.metrics import Metrics, daemon_families
from mailcloak.policy.server import PolicyService
from mailcloak.privileges import drop_privileges
from mailcloak.runtime import Runtime, RuntimeRef
from mailcloak.socketmap.server import SocketmapService
from mailcloak.state import StateCache
from mailcloak.store import open_store
from mailcloak.unixserver import SocketInUse, UnixServer, bind_unix_socket, resolve_owner

log = logging.getLogger("mailcloak")


async def _state_ctx(app: web.Application) -> AsyncIterator[None]:
    config = app[CONFIG]
    store = await open_store(config)
    try:
        state = StateCache(store, config.policy.extra_local_domains)
        await state.load()
        state.start()
        app[STATE] = state
        yield
        await state.stop()
    finally:
        await store.close()


async def _runtime_ctx(app: web.Application) -> AsyncIterator[None]:
    ref = RuntimeRef(Runtime(app[CONFIG], build_provider(app[CONFIG]), app[STATE]))
    app[RUNTIME] = ref
    yield
    await ref.current.idp.close()


async def _unix_servers_ctx(app: web.Application) -> AsyncIterator[None]:
    config = app[CONFIG]
    sockets = config.sockets
    ref = app[RUNTIME]
    owner = resolve_owner(sockets)
    servers = [
        UnixServer(PolicyService(ref, app[METRICS]), sockets.policy_socket, mode=sockets.mode,
                   owner=owner, max_connections=sockets.max_connections),
        UnixServer(SocketmapService(ref, app[METRICS]), sockets.socketmap_socket, mode=sockets.mode,
                   owner=owner, max_connections=sockets.max_connections),
    ]
    app[SERVERS] = servers
    passdb_counters = app[PASSDB].authenticator.counters
    app[METRICS].add_scrape_time_source(lambda: daemon_families(servers, ref, passdb_counters))
    started: list[UnixServer] = []
    try:
        for server in servers:
            await server.start()
            started.append(server)
        yield
    finally:
        grace = ref.current.config.daemon.shutdown_grace_seconds
        await asyncio.gather(*(server.stop(grace) for server in started))


def build_app(config: Config, config_path: str) -> web.Application:
    app = web.Application()
    app[CONFIG] = config
    app[CONFIG_PATH] = config_path
    app[METRICS] = Metrics()
    app.cleanup_ctx.append(_state_ctx)
    app.cleanup_ctx.append(_runtime_ctx)
    app.cleanup_ctx.append(_unix_servers_ctx)
    setup_http(app)
    return app


async def _start_http_site(runner: web.AppRunner, config: Config) -> None:
    """The HTTP listener: loopback TCP or a unix socket (bound like the Postfix-facing ones)."""
    kind, where, port = parse_listen(config.http.listen)
    if kind == "unix":
        sockets = config.sockets
        sock = bind_unix_socket(where, sockets.mode, resolve_owner(sockets))
        site: web.BaseSite = web.SockSite(runner, sock)
    else:
        site = web.TCPSite(runner, where, port, reuse_address=True)
    try:
        await site.start()
    except OSError as exc:
        raise SocketInUse(f"cannot listen on {config.http.listen}: {exc.strerror}") from None
    log.info("http listening on %s", config.http.listen)


async def reload(app: web.Application) -> None:
    """SIGHUP: new config and IdP in one swap; database state re-read. A bad file changes nothing."""
    ref = app[RUNTIME]
    old = ref.current
    try:
        config = load_config(app[CONFIG_PATH])
        idp = build_provider(config)
    except MailcloakError as exc:
        log.error("reload refused, keeping the running configuration: %s", exc)
        return
    for key in ("sockets", "sqlite", "store", "postgres", "http", "passdb"):
        if getattr(config, key) != getattr(old.config, key):
            log.warning("reload: changes under %s take effect at the next restart", key)
    logs.set_level(config.daemon.log_level)
    old.state.set_extra_local_domains(config.policy.extra_local_domains)
    ref.current = Runtime(config, idp, old.state)
    old.state.request_reload()
    log.info("configuration reloaded")
    if old.idp is not idp:
        # Requests that started with the old provider have at most their deadline to finish.
        await asyncio.sleep(old.config.policy.request_deadline_seconds)
        await old.idp.close()


async def serve(config: Config, config_path: str, ready: asyncio.Event | None = None) -> None:
    """Run until SIGTERM/SIGINT. Raises MailcloakError for anything that prevents starting."""
    app = build_app(config, config_path)
    # No access log: one line per Dovecot login would be a log line per request on the hot path.
    runner = web.AppRunner(app, handle_signals=False, access_log=None)
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    background: set[asyncio.Task] = set()
    try:
        await runner.setup()
        if config.http.listen:
            await _start_http_site(runner, config)
        drop_privileges(config.daemon.user)

        def on_hup() -> None:
            task = asyncio.ensure_future(reload(app))
            background.add(task)
            task.add_done_callback(background.discard)

        loop.add_signal_handler(signal.SIGHUP, on_hup)
        loop.add_signal_handler(signal.SIGTERM, stop.set)
        loop.add_signal_handler(signal.SIGINT, stop.set)
        log.info("mailcloak %s ready (idp %s, database %s)", __version__, config.idp.provider,
                 config.store_location)
        if ready is not None:
            ready.set()
        await stop.wait()
        log.info("stopping")
    finally:
        for sig in (signal.SIGHUP, signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
        for task in background:
            task.cancel()
        await runner.cleanup()


async def check(config: Config) -> int:
    """--check-config: the config, the database and what the daemon would listen on, on stdout."""
    ok = True
    print(f"config: {config.source} OK")
    _warn_if_secrets_readable(config, print)
    try:
        store = await open_store(config)
        try:
            rows = await store.load()
        finally:
            await store.close()
        print(f"database: {config.store_location} OK ({len(rows.domains)} domains, "
              f"{len(rows.aliases)} aliases, {len(rows.apps)} apps)")
    except MailcloakError as exc:
        print(f"database: ERROR {exc}")
        ok = False
    try:
        idp = build_provider(config)
        try:
            summary = await idp.probe()
        finally:
            await idp.close()
        print(f"idp: {config.idp.provider} OK ({summary})")
    except MailcloakError as exc:
        print(f"idp: ERROR {exc}")
        ok = False
    try:
        resolve_owner(config.sockets)
    except ConfigError as exc:
        print(f"sockets: ERROR {exc}")
        ok = False
    s = config.sockets
    owner = f"{s.socket_owner_user or '-'}:{s.socket_owner_group or '-'}"
    print(f"policy socket: {s.policy_socket} (mode {s.socket_mode}, owner {owner})")
    print(f"socketmap socket: {s.socketmap_socket} (mode {s.socket_mode}, owner {owner})")
    if config.http.listen:
        parse_listen(config.http.listen)
        print(f"http: {config.http.listen}")
    else:
        print("http: not configured")
    print("result: OK" if ok else "result: ERROR")
    return 0 if ok else 1


def _warn_if_secrets_readable(config: Config, say) -> None:
    has_secret = any(
        section is not None and (getattr(section, "client_secret", "") or getattr(section, "api_token", ""))
        for section in (config.idp.keycloak, config.idp.authentik)
    )
    try:
        mode = os.stat(config.source).st_mode
    except OSError:
        return
    if has_secret and mode & stat.S_IROTH:
        say(f"warning: {config.source} holds secrets and is readable by every user; chmod o-r it")


def _use_uvloop_if_installed() -> None:
    """uvloop's event loop when it is installed (`pip install 'mailcloak[perf]'`): it takes about
    a third off the socketmap's cost per request (bench/README.md)."""
    try:
        import uvloop
    except ImportError:
        return
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())


def data_dir() -> str:
    """Where the shipped files are: <prefix>/share/mailcloak once installed, else the checkout."""
    installed = os.path.join(sys.prefix, "share", "mailcloak")
    if os.path.isdir(installed):
        return installed
    return os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="mailcloak", description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=DEFAULT_CONFIG_PATH, help="YAML config file")
    parser.add_argument("--check-config", action="store_true",
                        help="validate the config and the database, print what would listen, exit")
    parser.add_argument("--log-level", choices=["debug", "info", "warning", "error"],
                        help="overrides daemon.log_level")
    parser.add_argument("--version", action="version", version=f"mailcloak {__version__}")
    parser.add_argument("--data-dir", action="store_true",
                        help="print the folder holding the Dovecot script, snippets and samples, exit")
    args = parser.parse_args(argv)
    if args.data_dir:
        print(data_dir())
        return 0
    logs.configure()
    try:
        config = load_config(args.config)
    except ConfigError as exc:
        print(f"mailcloak: {exc}", file=sys.stderr)
        return 1
    logs.configure(config.daemon.log_format)
    logs.set_level(args.log_level or config.daemon.log_level)
    if args.check_config:
        try:
            return asyncio.run(check(config))
        except MailcloakError as exc:
            print(f"result: ERROR {exc}")
            return 1
    _warn_if_secrets_readable(config, log.warning)
    _use_uvloop_if_installed()
    try:
        asyncio.run(serve(config, args.config))
    except MailcloakError as exc:
        print(f"mailcloak: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        pass
    return 0
