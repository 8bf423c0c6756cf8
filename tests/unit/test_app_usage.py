"""Last use of apps (mailcloak.app_usage and the store's app_usage writes), over real SQLite files."""

from __future__ import annotations

import asyncio
import logging
import shutil
import sqlite3
from pathlib import Path

import pytest

from mailcloak.app_usage import UsageRecorder
from mailcloak.config import SQLiteConfig
from mailcloak.errors import SchemaOutdated, StoreLocked
from mailcloak.store.model import AppUsage
from mailcloak.store.sqlite import SQLiteStore
from support import make_go_database

POLL = 0.02


@pytest.fixture(scope="module")
def go_template(tmp_path_factory) -> Path:
    return make_go_database(tmp_path_factory.mktemp("go") / "state.db")


async def open_copy(template: Path, tmp_path: Path, *, migrate: bool, busy: float = 2) -> SQLiteStore:
    path = tmp_path / "state.db"
    shutil.copyfile(template, path)
    config = SQLiteConfig(path=str(path), poll_interval_seconds=POLL, busy_timeout_seconds=busy)
    if migrate:
        await (await SQLiteStore.open(config, create=True)).close()
    return await SQLiteStore.open(config)


def usage_rows(store: SQLiteStore) -> list[tuple]:
    con = sqlite3.connect(store.location)
    try:
        return con.execute("SELECT app_id, last_used_at, last_used_ip FROM app_usage").fetchall()
    finally:
        con.close()


class Clock:
    def __init__(self, now: float):
        self.now = now

    def __call__(self) -> float:
        return self.now


async def test_flush_writes_the_last_use_per_app_in_one_go(go_template, tmp_path):
    store = await open_copy(go_template, tmp_path, migrate=True)
    clock = Clock(1_800_000_000)
    recorder = UsageRecorder(clock)
    try:
        recorder.record("Mailer", "192.0.2.1")
        clock.now += 5
        recorder.record("Mailer", "192.0.2.2")
        assert await recorder.flush(store)
        assert usage_rows(store) == [("Mailer", 1_800_000_005, "192.0.2.2")]
        assert await store.app_usage() == {"Mailer": AppUsage(1_800_000_005, "192.0.2.2")}
        assert len(recorder) == 0
    finally:
        await store.close()


async def test_an_older_use_does_not_replace_a_newer_one_and_a_deleted_app_is_skipped(go_template, tmp_path):
    store = await open_copy(go_template, tmp_path, migrate=True)
    try:
        await store.record_app_usage({"Mailer": AppUsage(200, "192.0.2.2")})
        await store.record_app_usage({"Mailer": AppUsage(100, "192.0.2.1"), "Gone": AppUsage(300, "")})
        assert usage_rows(store) == [("Mailer", 200, "192.0.2.2")]
        await store.delete_app("Mailer")
        assert usage_rows(store) == []          # cascade
    finally:
        await store.close()


async def test_own_usage_writes_are_not_a_change_to_reload(go_template, tmp_path):
    store = await open_copy(go_template, tmp_path, migrate=True)
    try:
        await store.load()
        await store.record_app_usage({"Mailer": AppUsage(100, "192.0.2.1")})
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(store.wait_for_change(), timeout=POLL * 10)
        # ...while another process's commit is one.
        con = sqlite3.connect(store.location)
        con.execute("UPDATE domains SET enabled = 0 WHERE domain_name = 'd2.test'")
        con.commit()
        con.close()
        await asyncio.wait_for(store.wait_for_change(), timeout=10)
    finally:
        await store.close()


async def test_usage_writes_and_loads_share_the_connection_safely(go_template, tmp_path):
    """The daemon's refresh and flush tasks run concurrently on one connection."""
    store = await open_copy(go_template, tmp_path, migrate=True)
    try:
        writes = [store.record_app_usage({"Mailer": AppUsage(n, "192.0.2.1")}) for n in range(1, 30)]
        loads = [store.load() for _ in range(30)]
        await asyncio.gather(*writes, *loads)
        assert usage_rows(store) == [("Mailer", 29, "192.0.2.1")]
    finally:
        await store.close()


async def test_go_database_refuses_usage_writes_with_the_init_line(go_template, tmp_path):
    store = await open_copy(go_template, tmp_path, migrate=False)
    try:
        with pytest.raises(SchemaOutdated, match=r"version 1.*run mailcloakctl init"):
            await store.record_app_usage({"Mailer": AppUsage(100, "192.0.2.1")})
        assert await store.app_usage() == {}
    finally:
        await store.close()


async def test_failed_flush_keeps_the_batch_logs_once_and_recovers(go_template, tmp_path, caplog):
    store = await open_copy(go_template, tmp_path, migrate=True, busy=0.05)
    recorder = UsageRecorder(Clock(1_800_000_000))
    blocker = sqlite3.connect(store.location, isolation_level=None)
    try:
        recorder.record("Mailer", "192.0.2.1")
        blocker.execute("BEGIN IMMEDIATE")
        assert not await recorder.flush(store)
        assert not await recorder.flush(store)
        warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
        assert len(warnings) == 1 and "locked" in warnings[0].getMessage()
        assert len(recorder) == 1
        blocker.execute("ROLLBACK")
        assert await recorder.flush(store)
        assert usage_rows(store) == [("Mailer", 1_800_000_000, "192.0.2.1")]
    finally:
        blocker.close()
        await store.close()


async def test_a_login_during_a_failed_flush_is_not_overwritten(go_template, tmp_path):
    store = await open_copy(go_template, tmp_path, migrate=False)
    clock = Clock(100)
    recorder = UsageRecorder(clock)
    try:
        recorder.record("Mailer", "192.0.2.1")
        flushing = asyncio.ensure_future(recorder.flush(store))
        await asyncio.sleep(0)
        clock.now = 200
        recorder.record("Mailer", "192.0.2.2")
        assert not await flushing
        await (await SQLiteStore.open(SQLiteConfig(path=store.location), create=True)).close()
        assert await recorder.flush(store)
        assert usage_rows(store) == [("Mailer", 200, "192.0.2.2")]
    finally:
        await store.close()


async def test_run_flushes_periodically_until_cancelled(go_template, tmp_path):
    store = await open_copy(go_template, tmp_path, migrate=True)
    recorder = UsageRecorder(Clock(100))
    try:
        recorder.record("Mailer", "192.0.2.1")
        task = asyncio.ensure_future(recorder.run(store, interval=0.01))
        for _ in range(500):
            if usage_rows(store):
                break
            await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert usage_rows(store) == [("Mailer", 100, "192.0.2.1")]
    finally:
        await store.close()
