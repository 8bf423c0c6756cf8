"""mailcloakctl apps add/set --description/--expires/--networks and what apps list shows of them."""

from __future__ import annotations

import json
import shutil
import sqlite3
import time
from pathlib import Path

import pytest

from mailcloak import ctl
from support import make_go_database

GO_APPS = "Mailer\tenabled\t1700000000\n\t\tbilling@d1.test (disabled), noreply@d1.test\n"


@pytest.fixture(scope="module")
def go_template(tmp_path_factory) -> Path:
    return make_go_database(tmp_path_factory.mktemp("go") / "state.db")


@pytest.fixture
def db(tmp_path, go_template, capsys):
    """Runner bound to a copy of the Go database; `migrated` runs init first."""
    path = tmp_path / "state.db"
    shutil.copyfile(go_template, path)

    def _run(*argv: str) -> tuple[int, str, str]:
        code = ctl.main(["--db", str(path), *argv])
        captured = capsys.readouterr()
        return code, captured.out, captured.err

    _run.path = path
    return _run


@pytest.fixture
def migrated(db):
    assert db("init")[0] == 0
    return db


def app_row(path: Path, app_id: str = "Mailer",
            columns: str = "secret_hash, enabled, description, expires_at, networks") -> tuple:
    con = sqlite3.connect(path)
    try:
        return con.execute(f"SELECT {columns} FROM apps WHERE app_id = ?", (app_id,)).fetchone()
    finally:
        con.close()


def test_set_changes_settings_and_leaves_secret_enabled_and_senders(migrated):
    before = app_row(migrated.path)
    code, out, err = migrated("apps", "set", "mailer", "--description", " Invoice mailer ",
                              "--expires", "2030-01-01", "--networks", "192.0.2.7/24, 2001:db8::/32 10.0.0.1")
    assert (code, out, err) == (0, "", "")
    assert app_row(migrated.path) == (before[0], 1, "Invoice mailer", 1893456000,
                                      "192.0.2.0/24 2001:db8::/32 10.0.0.1/32")
    code, out, _ = migrated("apps", "set", "Mailer", "--expires", "never", "--networks", "any")
    assert code == 0
    assert app_row(migrated.path)[2:] == ("Invoice mailer", None, "")


@pytest.mark.parametrize("when,seconds", [
    ("2030-01-01", 1893456000),
    ("2030-01-01T12:30", 1893501000),
    ("2030-01-01T12:30:15Z", 1893501015),
    ("2030-01-01T14:30:00+02:00", 1893501000),
])
def test_expiry_forms(migrated, when, seconds):
    assert migrated("apps", "set", "Mailer", "--expires", when)[0] == 0
    assert app_row(migrated.path)[3] == seconds


@pytest.mark.parametrize("option,value,message", [
    ("--networks", "192.0.2.0/33", "invalid network: '192.0.2.0/33'"),
    ("--networks", "10.0.0.0/8,example.org", "invalid network: 'example.org'"),
    ("--expires", "31.12.2030", "invalid expiry: '31.12.2030'"),
    ("--expires", "2030-02-30", "invalid expiry: '2030-02-30'"),
    ("--description", "two\nlines", "invalid description"),
    ("--description", "tab\there", "invalid description"),
    ("--description", "x" * 201, "invalid description"),
])
def test_bad_values_are_one_line_and_write_nothing(migrated, option, value, message):
    before = app_row(migrated.path)
    for argv in (["apps", "set", "Mailer", option, value],
                 ["apps", "add", "Other", "pw", option, value]):
        code, out, err = migrated(*argv)
        assert code == 1 and out == ""
        assert err.startswith(f"mailcloakctl: {message}") and err.count("\n") == 1, err
    assert app_row(migrated.path) == before
    assert app_row(migrated.path, "Other") is None


def test_set_needs_an_option_and_an_existing_app(migrated):
    code, _, err = migrated("apps", "set", "Mailer")
    assert code == 2 and "at least one of --description, --expires, --networks" in err
    code, _, err = migrated("apps", "set", "ghost", "--description", "x")
    assert (code, err) == (1, "mailcloakctl: app not found: ghost\n")


def test_add_with_settings_writes_them_in_the_same_transaction(migrated):
    code, out, err = migrated("apps", "add", "Backup", "pw-1", "--description", "nightly backup",
                              "--networks", "198.51.100.0/24")
    assert (code, out, err) == (0, "", "")
    assert app_row(migrated.path, "Backup")[1:] == (1, "nightly backup", None, "198.51.100.0/24")
    # Replacing the password keeps what was not given again.
    assert migrated("apps", "add", "Backup", "pw-2")[0] == 0
    assert app_row(migrated.path, "Backup")[2:] == ("nightly backup", None, "198.51.100.0/24")


def test_go_database_refuses_the_new_settings_with_the_init_line(db):
    go_columns = "secret_hash, enabled, updated_at"
    before = app_row(db.path, columns=go_columns)
    for argv in (["apps", "set", "Mailer", "--description", "x"],
                 ["apps", "add", "Other", "pw", "--expires", "2030-01-01"]):
        code, out, err = db(*argv)
        assert code == 1 and out == ""
        assert "schema (version 1)" in err and "run mailcloakctl init" in err and err.count("\n") == 1
    assert app_row(db.path, columns=go_columns) == before
    assert app_row(db.path, "Other", columns=go_columns) is None
    # A Go-style add (no new settings) still works on a version 1 database.
    assert db("apps", "add", "Other", "pw")[0] == 0


def test_list_keeps_the_go_lines_exactly_for_an_app_without_new_settings(migrated):
    assert migrated("apps", "list") == (0, GO_APPS, "")


def test_list_shows_settings_and_last_use_as_continuation_lines(migrated):
    migrated("apps", "set", "Mailer", "--description", "Invoice mailer", "--expires", "2001-01-01",
             "--networks", "192.0.2.0/24,2001:db8::/32")
    con = sqlite3.connect(migrated.path)
    con.execute("INSERT INTO app_usage(app_id, last_used_at, last_used_ip) VALUES "
                "('Mailer', 1800000000, '192.0.2.9')")
    con.commit()
    con.close()
    code, out, err = migrated("apps", "list")
    assert (code, err) == (0, "")
    lines = out.splitlines()
    assert lines[0].startswith("Mailer\tenabled\t")
    assert lines[1:] == [
        "\t\tbilling@d1.test (disabled), noreply@d1.test",
        "\t\tdescription: Invoice mailer",
        "\t\texpires: 2001-01-01T00:00:00Z (expired)",
        "\t\tnetworks: 192.0.2.0/24, 2001:db8::/32",
        "\t\tlast used: 2027-01-15T08:00:00Z from 192.0.2.9",
    ]
    # Every line keeps the Go format's three tab-separated fields.
    assert all(len(line.split("\t")) == 3 for line in lines)
    code, out, _ = migrated("apps", "list", "--json")
    (entry,) = json.loads(out)
    assert {k: entry[k] for k in ("description", "expires_at", "networks", "last_used_at",
                                  "last_used_ip", "has_password")} == {
        "description": "Invoice mailer", "expires_at": 978307200,
        "networks": ["192.0.2.0/24", "2001:db8::/32"], "last_used_at": 1800000000,
        "last_used_ip": "192.0.2.9", "has_password": True}


def test_future_expiry_is_not_marked_expired(migrated):
    future = time.strftime("%Y-%m-%d", time.gmtime(time.time() + 400 * 86400))
    migrated("apps", "set", "Mailer", "--expires", future)
    out = migrated("apps", "list")[1]
    assert f"\t\texpires: {future}T00:00:00Z\n" in out
