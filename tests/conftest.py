import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from pg_cluster import PostgresCluster, run_sync, unavailable_reason  # noqa: E402
from stores import PostgresSite, SQLiteSite, postgres_site  # noqa: E402
from support import DaemonProcess, make_go_database, write_config  # noqa: E402


@pytest.fixture
def go_db(tmp_path):
    """A Go-project state.db (see support.make_go_database)."""
    return make_go_database(tmp_path / "state.db")


@pytest.fixture(scope="session")
def pg_cluster():
    """One throwaway PostgreSQL cluster for the session (tests/pg_cluster.py)."""
    reason = unavailable_reason()
    if reason is not None:
        pytest.skip(reason)
    cluster = PostgresCluster()
    try:
        cluster.start()
    except Exception as exc:  # noqa: BLE001 - a cluster that cannot start is a loud skip, as for e2e
        cluster.destroy()
        pytest.skip(f"PostgreSQL tests SKIPPED: the throwaway cluster did not start: {exc}")
    yield cluster
    cluster.destroy()


@pytest.fixture(scope="session")
def pg_go_template(pg_cluster, tmp_path_factory) -> str:
    """A PostgreSQL database holding the Go project's rows, copied by migrate-store's own code;
    the template of each test's fresh database."""
    from mailcloak.store.copy import copy_store

    source = SQLiteSite(make_go_database(tmp_path_factory.mktemp("go-pg") / "state.db"))
    name = pg_cluster.create_database()
    target = PostgresSite(pg_cluster, name)

    async def copy():
        src, dst = await source.open(), await target.open(create=True)
        try:
            await copy_store(src, dst)
        finally:
            await src.close()
            await dst.close()

    run_sync(copy())
    return name


@pytest.fixture
def store_kind() -> str:
    """The store the site and daemon fixtures use; `stores.both_store_kinds` gives both."""
    return "sqlite"


@pytest.fixture
def go_site(request, store_kind, tmp_path):
    """The Go project's data in a store of `store_kind` (for SQLite, conftest's go_db file)."""
    if store_kind == "postgres":
        return postgres_site(request, "pg_go_template")
    return SQLiteSite(request.getfixturevalue("go_db"))


@pytest.fixture
def new_site(request, store_kind, tmp_path):
    """An empty database of `store_kind` (the SQLite file does not exist yet)."""
    if store_kind == "postgres":
        return postgres_site(request, None)
    return SQLiteSite(tmp_path / "new" / "state.db")


@pytest.fixture
def daemon(tmp_path, go_site):
    """The daemon as a real process on temporary sockets, over the Go-project data."""
    proc = DaemonProcess(write_config(tmp_path, **go_site.config_sections())).start()
    yield proc
    proc.stop()
