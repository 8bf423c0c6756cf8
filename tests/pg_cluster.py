"""A throwaway PostgreSQL cluster for the tests: initdb + pg_ctl in a temporary folder.

Debian's `postgresql` package (installed by scripts/install-system-deps.sh) provides the
binaries. initdb refuses to run as root, so the cluster runs as the `postgres` user; it listens on
127.0.0.1 at a free port, and its superuser has a password, so DSNs carry one as a site's would.
"""

from __future__ import annotations

import asyncio
import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import threading
from pathlib import Path

SUPERUSER_PASSWORD = "pg-test-s3cret"


def find_bindir() -> str | None:
    candidates = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), reverse=True)
    if not candidates and shutil.which("initdb"):
        candidates = [os.path.realpath(shutil.which("initdb"))]
    return os.path.dirname(candidates[0]) if candidates else None


def unavailable_reason() -> str | None:
    """Why no cluster can be started here, or None."""
    if find_bindir() is None:
        return ("PostgreSQL tests SKIPPED: no initdb (install the Debian package postgresql: "
                "make system-deps as root)")
    if os.geteuid() != 0:
        return "PostgreSQL tests SKIPPED: starting a cluster as user postgres needs root"
    try:
        pwd.getpwnam("postgres")
    except KeyError:
        return "PostgreSQL tests SKIPPED: no postgres user (install the Debian package postgresql)"
    return None


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class PostgresCluster:
    def __init__(self):
        self.bindir = find_bindir()
        self.root = Path(tempfile.mkdtemp(prefix="mailcloak-pg-"))
        self.data = self.root / "data"
        self.port = _free_port()
        self._user = pwd.getpwnam("postgres")
        self._databases = 0
        self._lock = threading.Lock()

    def _run_as_postgres(self, *argv: str) -> None:
        result = subprocess.run(["runuser", "-u", "postgres", "--", *argv], capture_output=True,
                                text=True, timeout=120)
        if result.returncode != 0:
            raise RuntimeError(f"{' '.join(argv)} failed:\n{result.stdout}{result.stderr}")

    def start(self) -> "PostgresCluster":
        os.chown(self.root, self._user.pw_uid, self._user.pw_gid)
        pwfile = self.root / "pwfile"
        pwfile.write_text(SUPERUSER_PASSWORD + "\n")
        os.chown(pwfile, self._user.pw_uid, self._user.pw_gid)
        self._run_as_postgres(f"{self.bindir}/initdb", "-D", str(self.data), "-U", "postgres",
                              "-E", "UTF8", "--locale=C", "--auth=scram-sha-256",
                              f"--pwfile={pwfile}")
        pwfile.unlink()
        self.start_server()
        return self

    def start_server(self) -> None:
        options = (f"-p {self.port} -c listen_addresses=127.0.0.1 -k {self.root} "
                   "-c fsync=off -c synchronous_commit=off -c full_page_writes=off "
                   "-c max_connections=300")
        self._run_as_postgres(f"{self.bindir}/pg_ctl", "-w", "-t", "60", "-D", str(self.data),
                              "-l", str(self.root / "server.log"), "-o", options, "start")

    def stop_server(self, mode: str = "fast") -> None:
        self._run_as_postgres(f"{self.bindir}/pg_ctl", "-w", "-D", str(self.data), "-m", mode,
                              "stop")

    def destroy(self) -> None:
        try:
            self.stop_server("immediate")
        except RuntimeError:
            pass
        shutil.rmtree(self.root, ignore_errors=True)

    def dsn(self, database: str = "postgres") -> str:
        return f"postgresql://postgres:{SUPERUSER_PASSWORD}@127.0.0.1:{self.port}/{database}"

    def new_database_name(self) -> str:
        with self._lock:
            self._databases += 1
            return f"mc_test_{self._databases}"

    def create_database(self, template: str | None = None) -> str:
        """A new empty (or `template`'s copy of a) database; its name."""
        name = self.new_database_name()
        clause = f" TEMPLATE {template}" if template else ""
        self.admin(f"CREATE DATABASE {name}{clause}")
        return name

    def drop_database(self, name: str) -> None:
        self.admin(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")

    def admin(self, sql: str, database: str = "postgres") -> None:
        run_sync(_execute(self.dsn(database), sql))

    def execute(self, database: str, sql: str, *args) -> None:
        run_sync(_execute(self.dsn(database), sql, *args))

    def query(self, database: str, sql: str, *args) -> list[tuple]:
        return run_sync(_fetch(self.dsn(database), sql, *args))


async def _execute(dsn: str, sql: str, *args) -> None:
    import asyncpg

    conn = await asyncpg.connect(dsn)
    try:
        await conn.execute(sql, *args)
    finally:
        await conn.close()


async def _fetch(dsn: str, sql: str, *args) -> list[tuple]:
    import asyncpg

    conn = await asyncpg.connect(dsn)
    try:
        return [tuple(r) for r in await conn.fetch(sql, *args)]
    finally:
        await conn.close()


def run_sync(coro):
    """Run a coroutine to completion on its own loop in another thread, so that a synchronous
    helper works from inside an async test too (like a separate process writing)."""
    result: list = []

    def target():
        try:
            result.append(("ok", asyncio.run(coro)))
        except BaseException as exc:  # noqa: BLE001 - handed back to the caller
            result.append(("error", exc))

    thread = threading.Thread(target=target)
    thread.start()
    thread.join()
    kind, value = result[0]
    if kind == "error":
        raise value
    return value
