"""mailcloakctl migrate-store: every row of every table, secret hashes and timestamps included,
copied in one transaction and verified; a non-empty target refused; a failing copy leaves the
target as it was. Both directions, with a real PostgreSQL."""

from __future__ import annotations

import pytest

from mailcloak import ctl
from stores import PostgresSite, SQLiteSite, dump
from support import GO_APP_PASSWORD, make_go_database

COUNTS = "domains\t{}\naliases\t{}\nalias_targets\t{}\nalias_senders\t{}\napps\t{}\napp_from\t{}\napp_usage\t{}\n"


def go_columns(site) -> dict[str, list[tuple]]:
    """The rows of a Go (version 1) database's four tables, as they read in any later version."""
    from mailcloak.store.copy import TABLES

    return {table: sorted(site.query(f"SELECT {v1} FROM {table}")) for table, v1, _ in TABLES if v1}


@pytest.fixture
def run(capsys):
    def _run(*argv: str) -> tuple[int, str, str]:
        code = ctl.main(list(argv))
        captured = capsys.readouterr()
        return code, captured.out, captured.err

    return _run


@pytest.fixture
def pg(pg_cluster):
    site = PostgresSite(pg_cluster, pg_cluster.create_database())
    yield site
    pg_cluster.drop_database(site.database)


@pytest.fixture
def full_sqlite(tmp_path, run) -> SQLiteSite:
    """A version 2 SQLite database with rows in every table."""
    site = SQLiteSite(tmp_path / "full.db")
    assert run("--db", str(site.path), "init")[0] == 0
    for argv in (["domains", "add", "d1.test"], ["domains", "add", "d2.test"],
                 ["aliases", "add", "team@d1.test", "alice"], ["aliases", "add", "x@d2.test", "bob"],
                 ["domains", "disable", "d2.test"],
                 ["apps", "add", "Mailer", GO_APP_PASSWORD], ["apps", "allow", "Mailer", "n@d1.test"]):
        assert run("--db", str(site.path), *argv) == (0, "", ""), argv
    site.execute("UPDATE aliases SET send_policy = 'listed' WHERE alias_email = 'team@d1.test'")
    site.execute("INSERT INTO alias_targets VALUES ('team@d1.test', 'carol', 1)")
    site.execute("INSERT INTO alias_senders VALUES ('team@d1.test', 'dave')")
    site.execute("UPDATE apps SET description = 'printer', expires_at = 1900000000, networks = '192.0.2.0/24'")
    site.execute("INSERT INTO app_usage VALUES ('Mailer', 1800000000, '192.0.2.7')")
    site.execute("UPDATE domains SET updated_at = 1700000000")
    return site


def test_round_trip_sqlite_postgres_sqlite_keeps_every_row(full_sqlite, pg, tmp_path, run):
    code, out, err = run("migrate-store", "--from", full_sqlite.spec(), "--to", pg.spec())
    assert (code, err) == (0, "")
    assert out == COUNTS.format(2, 2, 1, 1, 1, 1, 1) + (
        f"copied 9 rows from {full_sqlite.path} to {pg.location}; row counts verified\n")
    assert pg.location.startswith("postgresql://postgres:***@")
    assert dump(pg) == dump(full_sqlite)
    back = SQLiteSite(tmp_path / "back" / "state.db")
    code, out, err = run("migrate-store", "--from", pg.spec(), "--to", back.spec())
    assert (code, err) == (0, "")
    assert dump(back) == dump(full_sqlite)
    # The copied app secret still verifies through the daemon's own code path (the hash is intact).
    assert run("--db", str(back.path), "apps", "list")[1].startswith("Mailer\tenabled\t")


def test_a_go_database_moves_with_its_hashes(tmp_path, pg, run):
    go = SQLiteSite(make_go_database(tmp_path / "go.db"))
    code, out, err = run("migrate-store", "--from", go.spec(), "--to", pg.spec())
    assert (code, err) == (0, "")
    assert out.startswith(COUNTS.format(3, 4, 0, 0, 1, 2, 0))
    assert go_columns(pg) == go_columns(go)  # secret hashes and timestamps included


def test_non_empty_target_refused_unless_replace(full_sqlite, pg, tmp_path, run):
    assert run("migrate-store", "--from", full_sqlite.spec(), "--to", pg.spec())[0] == 0
    go = SQLiteSite(make_go_database(tmp_path / "go.db"))
    before = dump(pg)
    code, out, err = run("migrate-store", "--from", go.spec(), "--to", pg.spec())
    assert (code, out) == (1, "")
    assert err == (f"mailcloakctl: target {pg.location} is not empty (domains 2, aliases 2, "
                   "alias_targets 1, alias_senders 1, apps 1, app_from 1, app_usage 1); nothing "
                   "copied. Use --replace to overwrite it\n")
    assert dump(pg) == before
    code, out, err = run("migrate-store", "--from", go.spec(), "--to", pg.spec(), "--replace")
    assert (code, err) == (0, "")
    assert go_columns(pg) == go_columns(go)
    assert pg.query("SELECT count(*) FROM alias_targets") == [(0,)]


def test_a_row_the_target_refuses_copies_nothing(tmp_path, pg, run):
    go = SQLiteSite(make_go_database(tmp_path / "go.db"))
    go.execute("UPDATE apps SET enabled = 2")  # the Go schema has no CHECK; PostgreSQL's has
    code, out, err = run("migrate-store", "--from", go.spec(), "--to", pg.spec())
    assert (code, out) == (1, "")
    assert err.startswith(f"mailcloakctl: database {pg.location}: ") and "apps" in err
    assert err.count("\n") == 1
    assert pg.query("SELECT count(*) FROM domains") == [(0,)]


@pytest.mark.parametrize("argv, message", [
    (["migrate-store", "--from", "mysql:x", "--to", "sqlite:y"], "invalid store 'mysql:x'"),
    (["migrate-store", "--from", "sqlite:", "--to", "sqlite:y"], "invalid store 'sqlite:'"),
    (["migrate-store", "--from", "postgres:postgresql://u:pw@h/db"], "the following arguments are required: --to"),
    (["--db", "x.db", "migrate-store", "--from", "sqlite:a", "--to", "sqlite:b"],
     "migrate-store names its stores with --from and --to, not --db or --config"),
])
def test_usage_errors(run, argv, message):
    code, out, err = run(*argv)
    assert (code, out) == (2, "")
    assert message in err and err.count("\n") == 1
    assert "pw@" not in err


def test_a_missing_source_is_one_line(tmp_path, run):
    code, out, err = run("migrate-store", "--from", f"sqlite:{tmp_path}/absent.db", "--to", f"sqlite:{tmp_path}/t.db")
    assert (code, out) == (1, "")
    assert err == f"mailcloakctl: sqlite db not found at {tmp_path}/absent.db; create it with mailcloakctl init\n"
