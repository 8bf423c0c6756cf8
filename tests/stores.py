"""One test, both stores: a "site" is a database of either backend holding the Go project's data
(support.make_go_database), with what a test needs around it: open it as a Store, write to it as
another process would, read it back, and the config sections that name it.

Tests ask for `go_site` / `new_site` (tests/conftest.py); a module runs them against both
stores by importing `both_store_kinds` (the `store_kind` fixture with both values). PostgreSQL
sites are fresh databases of one throwaway cluster per session (tests/pg_cluster.py), made from a
template that holds the Go data, copied there by mailcloakctl's own migrate-store code.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from mailcloak.config import PostgresConfig, SQLiteConfig

STORE_KINDS = ["sqlite", "postgres"]


@pytest.fixture(params=STORE_KINDS, name="store_kind")
def both_store_kinds(request) -> str:
    return request.param


class SQLiteSite:
    kind = "sqlite"
    integrity_error = sqlite3.IntegrityError

    def __init__(self, path: Path):
        self.path = Path(path)

    @property
    def location(self) -> str:
        return str(self.path)

    async def open(self, create: bool = False):
        from mailcloak.store.sqlite import SQLiteStore

        return await SQLiteStore.open(
            SQLiteConfig(path=str(self.path), poll_interval_seconds=0.02, busy_timeout_seconds=2),
            create=create)

    def execute(self, sql: str, params: tuple = ()) -> None:
        con = sqlite3.connect(self.path)
        try:
            con.execute("PRAGMA foreign_keys = ON")
            con.execute(sql, params)
            con.commit()
        finally:
            con.close()

    def query(self, sql: str, params: tuple = ()) -> list[tuple]:
        con = sqlite3.connect(self.path)
        try:
            return con.execute(sql, params).fetchall()
        finally:
            con.close()

    def config_sections(self) -> dict:
        return {"sqlite": {"path": str(self.path), "poll_interval_seconds": 0.2}}

    def spec(self) -> str:
        """As mailcloakctl migrate-store names it."""
        return f"sqlite:{self.path}"


class PostgresSite:
    kind = "postgres"

    def __init__(self, cluster, database: str):
        import asyncpg

        self.cluster = cluster
        self.database = database
        self.dsn = cluster.dsn(database)
        self.integrity_error = asyncpg.PostgresError

    @property
    def location(self) -> str:
        return self.postgres_config().location

    def postgres_config(self) -> PostgresConfig:
        return PostgresConfig(dsn=self.dsn, statement_timeout_seconds=5, connect_timeout_seconds=2)

    async def open(self, create: bool = False):
        from mailcloak.store.postgres import PostgresStore

        return await PostgresStore.open(self.postgres_config(), create=create)

    def execute(self, sql: str, params: tuple = ()) -> None:
        from mailcloak.store.postgres import placeholders

        self.cluster.execute(self.database, placeholders(sql), *params)

    def query(self, sql: str, params: tuple = ()) -> list[tuple]:
        from mailcloak.store.postgres import placeholders

        return self.cluster.query(self.database, placeholders(sql), *params)

    def config_sections(self) -> dict:
        return {"store": {"backend": "postgres"},
                "postgres": {"dsn": self.dsn, "statement_timeout_seconds": 5,
                             "connect_timeout_seconds": 2}}

    def spec(self) -> str:
        return f"postgres:{self.dsn}"


def postgres_site(request, template: str | None) -> PostgresSite:
    """A fresh database of the session's cluster, a copy of the database the fixture named
    `template` returns (if any), dropped when `request`'s scope (test or module) ends."""
    cluster = request.getfixturevalue("pg_cluster")
    if template is not None:
        template = request.getfixturevalue(template)
    site = PostgresSite(cluster, cluster.create_database(template))
    request.addfinalizer(lambda: cluster.drop_database(site.database))
    return site


def dump(site) -> str:
    """Every row of every table, in a stable order: equal dumps mean nothing changed."""
    from mailcloak.store.copy import TABLES

    lines = []
    for table, _, _ in TABLES:
        try:
            rows = site.query(f"SELECT * FROM {table}")
        except Exception:  # noqa: BLE001 - a Go database lacks the version 2 tables
            continue
        lines.append(f"{table}: {sorted(rows, key=repr)!r}")
    return "\n".join(lines)
