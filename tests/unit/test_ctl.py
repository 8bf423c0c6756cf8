"""mailcloakctl: every command's exact output, its effect on a Go-project database, and its errors.

Most commands run in-process (`main(argv)` with capsys); a few run through the real `mailcloakctl`
executable at the repository root and the installed console script.
"""

from __future__ import annotations

import base64
import getpass
import io
import json
import os
import re
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
from argon2 import PasswordHasher

from mailcloak import ctl
from mailcloak.policy.decision import NOT_OWNED
from stores import both_store_kinds, dump as dump_site  # noqa: F401 - both stores
from support import GO_APP_PASSWORD, REPO, make_go_database, write_config

MISSING = "sqlite db not found at {path}; create it with mailcloakctl init"

GO_DOMAINS = "d1.test\tenabled\nd2.test\tenabled\nd3.test\tdisabled\n"
GO_ALIASES = (
    "alias1@d1.test\talice\tenabled\n"
    "off@d1.test\talice\tdisabled\n"
    "old@d3.test\talice\tenabled\n"
    "sales@d2.test\tbob\tenabled\n"
)
GO_APPS = "Mailer\tenabled\t1700000000\n\t\tbilling@d1.test (disabled), noreply@d1.test\n"

HASH_FORMAT = re.compile(r"\{ARGON2ID\}\$argon2id\$v=19\$m=65536,t=3,p=1\$[A-Za-z0-9+/]+\$[A-Za-z0-9+/]+")


# Helpers -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def go_template(tmp_path_factory) -> Path:
    """One Go-project database per module (hashing its app secret is the slow part)."""
    return make_go_database(tmp_path_factory.mktemp("go-template") / "state.db")


@pytest.fixture
def go_db(tmp_path, go_template) -> Path:
    """conftest's `go_db` (the same file at the same place), copied from the module's template."""
    path = tmp_path / "state.db"
    shutil.copyfile(go_template, path)
    assert not Path(f"{go_template}-wal").exists()  # the template is checkpointed and closed
    return path


@pytest.fixture
def run(capsys):
    """main(argv) in-process: (exit code, stdout, stderr)."""

    def _run(*argv: str) -> tuple[int, str, str]:
        code = ctl.main(list(argv))
        captured = capsys.readouterr()
        return code, captured.out, captured.err

    return _run


@pytest.fixture
def sqlite_db(go_db, run):
    """The Go-project database and a runner bound to it with --db."""

    def _db(*argv: str) -> tuple[int, str, str]:
        return run("--db", str(go_db), *argv)

    _db.path = go_db
    return _db


@pytest.fixture
def db(store_kind, go_site, run, tmp_path, request):
    """The Go-project data in each store and a runner bound to it: SQLite with --db, PostgreSQL
    with --config (its store.backend). `db.path` is the SQLite file or the PostgreSQL site."""
    if store_kind == "sqlite":
        return request.getfixturevalue("sqlite_db")
    config = write_config(tmp_path, **go_site.config_sections())

    def _db(*argv: str) -> tuple[int, str, str]:
        return run("--config", str(config), *argv)

    _db.path = go_site
    return _db


def dump(path) -> str:
    if not isinstance(path, Path):
        return dump_site(path)
    con = sqlite3.connect(path)
    try:
        return "\n".join(con.iterdump())
    finally:
        con.close()


def rows(path, sql: str, params: tuple = ()) -> list[tuple]:
    """`path`: an SQLite file or a PostgreSQL site (tests/stores.py)."""
    if not isinstance(path, Path):
        return path.query(sql, params)
    con = sqlite3.connect(path)
    try:
        return con.execute(sql, params).fetchall()
    finally:
        con.close()


def secret_hash(path, app_id: str) -> str:
    (row,) = rows(path, "SELECT secret_hash FROM apps WHERE app_id = ?", (app_id,))
    return row[0]


def verifies(stored: str, secret: str) -> bool:
    assert stored.startswith("{ARGON2ID}")
    try:
        return PasswordHasher().verify(stored[len("{ARGON2ID}"):], secret)
    except Exception:
        return False


def assert_one_error_line(code: int, out: str, err: str, expected: str | None = None) -> None:
    assert code != 0
    assert out == ""
    assert err.startswith("mailcloakctl: "), err
    assert err.endswith("\n") and err.count("\n") == 1, err
    assert "Traceback" not in err
    if expected is not None:
        assert err == f"mailcloakctl: {expected}\n"


class FakeTty(io.StringIO):
    def isatty(self) -> bool:
        return True


class FakePipe(io.StringIO):
    def isatty(self) -> bool:
        return False


def fake_getpass(monkeypatch, answers: list[str]) -> list[str]:
    prompts: list[str] = []

    def _getpass(prompt: str = "Password: ", stream=None) -> str:
        prompts.append(prompt)
        return answers.pop(0)

    monkeypatch.setattr(getpass, "getpass", _getpass)
    return prompts


# init and the missing database ---------------------------------------------------------------


def test_init_creates_folder_file_and_schema(tmp_path, run):
    path = tmp_path / "new" / "folder" / "state.db"
    assert run("--db", str(path), "init") == (0, "", "")
    assert path.exists()
    tables = {r[0] for r in rows(path, "SELECT name FROM sqlite_master WHERE type = 'table'")}
    assert {"domains", "aliases", "apps", "app_from"} <= tables
    assert rows(path, "PRAGMA journal_mode") == [("wal",)]
    # Empty lists, and init is idempotent.
    assert run("--db", str(path), "domains", "list") == (0, "", "")
    assert run("--db", str(path), "init") == (0, "", "")
    assert run("--db", str(path), "aliases", "list", "--json") == (0, "[]\n", "")


def test_init_keeps_a_go_database_rows(db):
    go_columns = "SELECT alias_email, target_user, alias_domain_name, enabled, updated_at FROM aliases"
    before = rows(db.path, go_columns + " ORDER BY alias_email")
    assert db("init") == (0, "", "")
    assert rows(db.path, go_columns + " ORDER BY alias_email") == before
    assert db("aliases", "list") == (0, GO_ALIASES, "")


@pytest.mark.parametrize("argv", [
    ["domains", "list"], ["domains", "add", "d9.test"], ["domains", "del", "d1.test"],
    ["domains", "enable", "d1.test"], ["domains", "disable", "d1.test"],
    ["aliases", "list"], ["aliases", "list", "--user", "alice"], ["aliases", "add", "a@d1.test", "alice"],
    ["aliases", "del", "a@d1.test"], ["aliases", "enable", "a@d1.test"], ["aliases", "disable", "a@d1.test"],
    ["apps", "list"], ["apps", "list", "--json"], ["apps", "add", "X", "pw"], ["apps", "add", "X", "--generate"],
    ["apps", "del", "X"], ["apps", "enable", "X"], ["apps", "disable", "X"],
    ["apps", "allow", "X", "a@d1.test"], ["apps", "disallow", "X", "a@d1.test"],
])
def test_every_command_but_init_refuses_a_missing_database(tmp_path, run, argv):
    path = tmp_path / "absent" / "state.db"
    code, out, err = run("--db", str(path), *argv)
    assert_one_error_line(code, out, err, MISSING.format(path=path))
    assert not path.exists() and not path.parent.exists()


def test_missing_database_named_by_the_config(tmp_path, run):
    config = write_config(tmp_path)  # sqlite.path = tmp_path/state.db, not created
    code, out, err = run("--config", str(config), "domains", "list")
    assert_one_error_line(code, out, err, MISSING.format(path=tmp_path / "state.db"))


# Lists: exact text and JSON ------------------------------------------------------------------


def test_lists_show_the_go_rows_exactly(db):
    assert db("domains", "list") == (0, GO_DOMAINS, "")
    assert db("aliases", "list") == (0, GO_ALIASES, "")
    assert db("apps", "list") == (0, GO_APPS, "")


def test_aliases_list_for_one_user(db):
    alice = "alias1@d1.test\talice\tenabled\noff@d1.test\talice\tdisabled\nold@d3.test\talice\tenabled\n"
    assert db("aliases", "list", "--user", "alice") == (0, alice, "")
    assert db("aliases", "list", "--user", "ALICE") == (0, alice, "")
    assert db("aliases", "list", "--user", "bob") == (0, "sales@d2.test\tbob\tenabled\n", "")
    assert db("aliases", "list", "--user", "nobody") == (0, "", "")


def test_lists_are_sorted(db):
    assert db("domains", "add", "a0.test") == (0, "", "")
    assert db("aliases", "add", "zz@d1.test", "aaron") == (0, "", "")
    assert db("aliases", "add", "aa@d2.test", "bob") == (0, "", "")
    assert db("apps", "add", "Alpha", "pw") == (0, "", "")
    assert db("domains", "list")[1] == "a0.test\tenabled\n" + GO_DOMAINS
    assert db("aliases", "list")[1] == (
        "zz@d1.test\taaron\tenabled\n" + GO_ALIASES.replace(
            "sales@d2.test\tbob", "aa@d2.test\tbob\tenabled\nsales@d2.test\tbob")
    )
    out = db("apps", "list")[1].splitlines()
    assert out[0].startswith("Alpha\tenabled\t") and out[1] == "\t\t-"
    assert "\n".join(out[2:]) + "\n" == GO_APPS


def test_json_lists(db):
    code, out, err = db("domains", "list", "--json")
    assert (code, err) == (0, "")
    assert json.loads(out) == [
        {"domain": "d1.test", "enabled": True, "updated_at": 1700000000},
        {"domain": "d2.test", "enabled": True, "updated_at": 1700000000},
        {"domain": "d3.test", "enabled": False, "updated_at": 1700000000},
    ]
    code, out, err = db("aliases", "list", "--json", "--user", "bob")
    assert (code, err) == (0, "")
    assert json.loads(out) == [{"alias": "sales@d2.test", "user": "bob", "domain": "d2.test",
                                "enabled": True, "updated_at": 1700000000, "targets": ["bob"],
                                "catch_all": False, "send_policy": "members", "senders": []}]
    code, out, err = db("aliases", "list", "--json")
    assert [a["alias"] for a in json.loads(out)] == [
        "alias1@d1.test", "off@d1.test", "old@d3.test", "sales@d2.test"]
    code, out, err = db("apps", "list", "--json")
    assert (code, err) == (0, "")
    assert json.loads(out) == [{
        "app_id": "Mailer", "enabled": True, "updated_at": 1700000000,
        "senders": [{"address": "billing@d1.test", "enabled": False},
                    {"address": "noreply@d1.test", "enabled": True}],
        "description": "", "expires_at": None, "networks": [], "has_password": True,
        "last_used_at": None, "last_used_ip": None,
    }]
    assert "ARGON2" not in out and "argon2" not in out and "secret" not in out


# Domains -------------------------------------------------------------------------------------


def test_domains_add_disable_enable_del(db):
    assert db("domains", "add", " New.TEST ") == (0, "", "")
    assert db("domains", "list")[1] == GO_DOMAINS + "new.test\tenabled\n"
    assert db("domains", "disable", "new.test") == (0, "", "")
    assert db("domains", "list")[1] == GO_DOMAINS + "new.test\tdisabled\n"
    assert db("domains", "enable", "NEW.test") == (0, "", "")
    assert db("domains", "list")[1] == GO_DOMAINS + "new.test\tenabled\n"
    assert db("domains", "disable", "new.test") == (0, "", "")
    assert db("domains", "add", "new.test") == (0, "", "")  # add re-enables
    assert db("domains", "list")[1] == GO_DOMAINS + "new.test\tenabled\n"
    assert db("domains", "del", "new.test") == (0, "", "")
    assert db("domains", "list") == (0, GO_DOMAINS, "")


def test_domains_del_cascades_to_its_aliases(db):
    assert db("domains", "del", "d1.test") == (0, "", "")
    assert db("domains", "list")[1] == "d2.test\tenabled\nd3.test\tdisabled\n"
    assert db("aliases", "list")[1] == "old@d3.test\talice\tenabled\nsales@d2.test\tbob\tenabled\n"


def test_domains_enable_a_disabled_go_domain(db):
    assert db("domains", "enable", "d3.test") == (0, "", "")
    assert db("domains", "list")[1] == "d1.test\tenabled\nd2.test\tenabled\nd3.test\tenabled\n"
    (updated,) = rows(db.path, "SELECT updated_at FROM domains WHERE domain_name = 'd3.test'")
    assert updated[0] > 1700000000


# Aliases -------------------------------------------------------------------------------------


def test_aliases_add_disable_enable_del(db):
    assert db("aliases", "add", "New@D1.Test", "Carol") == (0, "", "")
    assert rows(db.path, "SELECT alias_email, target_user, alias_domain_name, enabled FROM aliases "
                         "WHERE alias_email = 'new@d1.test'") == [("new@d1.test", "Carol", "d1.test", 1)]
    assert db("aliases", "list", "--user", "carol")[1] == "new@d1.test\tCarol\tenabled\n"
    assert db("aliases", "disable", "new@d1.test") == (0, "", "")
    assert db("aliases", "list", "--user", "carol")[1] == "new@d1.test\tCarol\tdisabled\n"
    assert db("aliases", "enable", "NEW@d1.test") == (0, "", "")
    assert db("aliases", "list", "--user", "carol")[1] == "new@d1.test\tCarol\tenabled\n"
    assert db("aliases", "del", "new@d1.test") == (0, "", "")
    assert db("aliases", "list") == (0, GO_ALIASES, "")


def test_aliases_add_is_an_upsert_that_re_enables(db):
    assert db("aliases", "add", "off@d1.test", "bob") == (0, "", "")
    assert db("aliases", "list", "--user", "bob")[1] == (
        "off@d1.test\tbob\tenabled\nsales@d2.test\tbob\tenabled\n")


# Apps ----------------------------------------------------------------------------------------


def test_apps_add_with_a_password_argument_stores_only_an_argon2id_hash(db):
    assert db("apps", "add", "  Worker  ", "s3cret pass") == (0, "", "")
    stored = secret_hash(db.path, "Worker")  # surrounding whitespace stripped, case kept
    assert HASH_FORMAT.fullmatch(stored), stored
    assert verifies(stored, "s3cret pass")
    assert "s3cret" not in dump(db.path)
    out = db("apps", "list")[1].splitlines()
    assert out[:2] == GO_APPS.splitlines()
    assert re.fullmatch(r"Worker\tenabled\t\d+", out[2]) and out[3] == "\t\t-"


def test_apps_add_replaces_the_secret_and_re_enables(db):
    assert db("apps", "disable", "mailer") == (0, "", "")
    assert db("apps", "add", "Mailer", "rotated") == (0, "", "")
    stored = secret_hash(db.path, "Mailer")
    assert verifies(stored, "rotated") and not verifies(stored, GO_APP_PASSWORD)
    assert db("apps", "list")[1].splitlines()[0].startswith("Mailer\tenabled\t")
    # The senders survive a password change.
    assert db("apps", "list")[1].splitlines()[1] == "\t\tbilling@d1.test (disabled), noreply@d1.test"


def test_apps_add_password_stdin(db, monkeypatch):
    monkeypatch.setattr(sys, "stdin", FakePipe("from stdin\n"))
    assert db("apps", "add", "Piped", "--password-stdin") == (0, "", "")
    assert verifies(secret_hash(db.path, "Piped"), "from stdin")
    # Only one trailing newline is stripped; the rest is the password.
    monkeypatch.setattr(sys, "stdin", FakePipe("two lines\n\n"))
    assert db("apps", "add", "Piped", "--password-stdin") == (0, "", "")
    assert verifies(secret_hash(db.path, "Piped"), "two lines\n")
    monkeypatch.setattr(sys, "stdin", FakePipe(" no newline "))
    assert db("apps", "add", "Piped", "--password-stdin") == (0, "", "")
    assert verifies(secret_hash(db.path, "Piped"), " no newline ")


@pytest.mark.parametrize("data", ["", "\n"])
def test_apps_add_password_stdin_refuses_an_empty_password(db, monkeypatch, data):
    before = dump(db.path)
    monkeypatch.setattr(sys, "stdin", FakePipe(data))
    code, out, err = db("apps", "add", "Piped", "--password-stdin")
    assert_one_error_line(code, out, err, "empty password refused")
    assert dump(db.path) == before


def test_apps_add_generate_prints_the_token_alone(db):
    code, out, err = db("apps", "add", "Generated", "--generate")
    assert (code, err) == (0, "")
    assert out.endswith("\n") and out.count("\n") == 1
    token = out[:-1]
    assert re.fullmatch(r"[A-Za-z0-9_-]+", token), token
    raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
    assert len(raw) * 8 >= 160
    stored = secret_hash(db.path, "Generated")
    assert HASH_FORMAT.fullmatch(stored) and verifies(stored, token)
    assert token not in dump(db.path)
    # A second token differs.
    code, out2, err = db("apps", "add", "Generated", "--generate")
    assert code == 0 and out2 != out


def test_apps_add_prompts_twice_on_a_terminal(db, monkeypatch):
    monkeypatch.setattr(sys, "stdin", FakeTty(""))
    prompts = fake_getpass(monkeypatch, ["typed secret", "typed secret"])
    assert db("apps", "add", "Prompted") == (0, "", "")
    assert len(prompts) == 2 and "Prompted" in prompts[0]
    assert verifies(secret_hash(db.path, "Prompted"), "typed secret")


@pytest.mark.parametrize("answers, message", [
    (["one", "two"], "passwords do not match; nothing changed"),
    (["", ""], "empty password refused"),
])
def test_apps_add_prompt_refuses_mismatch_and_empty(db, monkeypatch, answers, message):
    before = dump(db.path)
    monkeypatch.setattr(sys, "stdin", FakeTty(""))
    fake_getpass(monkeypatch, list(answers))
    code, out, err = db("apps", "add", "Prompted")
    assert_one_error_line(code, out, err, message)
    assert dump(db.path) == before


def test_apps_add_without_password_and_without_terminal_fails_clearly(db, monkeypatch):
    before = dump(db.path)
    monkeypatch.setattr(sys, "stdin", FakePipe("ignored\n"))
    fake_getpass(monkeypatch, [])  # would raise IndexError if called
    code, out, err = db("apps", "add", "NoPass")
    assert_one_error_line(
        code, out, err,
        "no password given and standard input is not a terminal: "
        "use --password-stdin, --generate or a PASSWORD argument",
    )
    assert dump(db.path) == before


def test_apps_add_refuses_two_password_sources(db, monkeypatch):
    before = dump(db.path)
    monkeypatch.setattr(sys, "stdin", FakePipe("x\n"))
    for argv in (["pw", "--generate"], ["pw", "--password-stdin"], ["--generate", "--password-stdin"]):
        code, out, err = db("apps", "add", "Two", *argv)
        assert_one_error_line(code, out, err,
                              "give the password one way only: PASSWORD, --password-stdin or --generate")
    code, out, err = db("apps", "add", "Two", "")
    assert_one_error_line(code, out, err, "empty password refused")
    assert dump(db.path) == before


def test_apps_add_refuses_an_id_differing_only_in_case_before_asking(db, monkeypatch):
    before = dump(db.path)
    monkeypatch.setattr(sys, "stdin", FakeTty(""))
    prompts = fake_getpass(monkeypatch, ["pw", "pw"])
    code, out, err = db("apps", "add", "MAILER")
    assert_one_error_line(code, out, err, "app id 'MAILER' differs from existing app 'Mailer' only in case")
    assert prompts == []
    code, out, err = db("apps", "add", "mailer", "--generate")
    assert_one_error_line(code, out, err)
    assert dump(db.path) == before


@pytest.mark.parametrize("app_id", ["", "   ", "two words", "tab\there", "ctl\x01"])
def test_apps_add_refuses_a_malformed_id(db, app_id):
    before = dump(db.path)
    code, out, err = db("apps", "add", app_id, "pw")
    assert_one_error_line(code, out, err)
    assert "invalid app id" in err
    assert dump(db.path) == before


def test_apps_are_matched_case_insensitively(db):
    assert db("apps", "disable", "MAILER") == (0, "", "")
    assert db("apps", "list")[1].splitlines()[0].startswith("Mailer\tdisabled\t")
    assert db("apps", "enable", "mailer") == (0, "", "")
    assert db("apps", "allow", "mAiLeR", "Billing@D1.test") == (0, "", "")
    assert db("apps", "list")[1].splitlines()[1] == "\t\tbilling@d1.test, noreply@d1.test"
    assert db("apps", "disallow", "mailer", "NOREPLY@d1.test") == (0, "", "")
    assert db("apps", "list")[1].splitlines()[1] == "\t\tbilling@d1.test"
    assert rows(db.path, "SELECT app_id FROM app_from") == [("Mailer",)]
    assert db("apps", "del", "mailer") == (0, "", "")
    assert db("apps", "list") == (0, "", "")
    assert rows(db.path, "SELECT * FROM app_from") == []  # cascade


def test_apps_enable_disable(db):
    assert db("apps", "disable", "Mailer") == (0, "", "")
    line = db("apps", "list")[1].splitlines()[0]
    assert re.fullmatch(r"Mailer\tdisabled\t\d+", line)
    assert int(line.split("\t")[2]) > 1700000000
    assert db("apps", "enable", "Mailer") == (0, "", "")
    assert db("apps", "list")[1].splitlines()[0].startswith("Mailer\tenabled\t")


def test_apps_allow_is_an_upsert_and_disallow_deletes(db):
    assert db("apps", "allow", "Mailer", "new@d2.test") == (0, "", "")
    assert db("apps", "allow", "Mailer", "new@d2.test") == (0, "", "")
    assert db("apps", "list")[1].splitlines()[1] == (
        "\t\tbilling@d1.test (disabled), new@d2.test, noreply@d1.test")
    assert db("apps", "disallow", "Mailer", "billing@d1.test") == (0, "", "")
    assert db("apps", "disallow", "Mailer", "new@d2.test") == (0, "", "")
    assert db("apps", "disallow", "Mailer", "noreply@d1.test") == (0, "", "")
    assert db("apps", "list")[1] == "Mailer\tenabled\t1700000000\n\t\t-\n"


# Errors: one line, non-zero, nothing changed ---------------------------------------------------


@pytest.mark.parametrize("argv, message", [
    (["aliases", "add", "new@d9.test", "alice"], "domain not found: d9.test"),
    (["aliases", "add", "new@d3.test", "alice"], "domain disabled: d3.test"),
    (["aliases", "add", "a b@d1.test", "alice"], "invalid address: 'a b@d1.test'"),
    (["aliases", "add", "a\x01b@d1.test", "alice"], "invalid address: 'a\\x01b@d1.test'"),
    (["aliases", "add", "@", "alice"], "invalid address: '@'"),  # '@d1.test' is a catch-all (test_lists.py)
    (["aliases", "add", "new@", "alice"], "invalid address: 'new@'"),
    (["aliases", "add", "a@b@d1.test", "alice"], "invalid address: 'a@b@d1.test'"),
    (["aliases", "add", "nodomain", "alice"], "invalid address: 'nodomain'"),
    (["aliases", "add", "new@d1 .test", "alice"], "invalid address: 'new@d1 .test'"),
    (["aliases", "add", "new@d1.test", "al ice"], None),
    (["aliases", "add", "new@d1.test", "alice@d1.test"], None),
    (["aliases", "add", "new@d1.test", ""], None),
    (["aliases", "del", "nobody@d1.test"], "alias not found: nobody@d1.test"),
    (["aliases", "enable", "nobody@d1.test"], "alias not found: nobody@d1.test"),
    (["aliases", "disable", "nobody@d1.test"], "alias not found: nobody@d1.test"),
    (["aliases", "enable", "bad address"], "invalid address: 'bad address'"),
    (["aliases", "del", "a\nb@d1.test"], "alias not found: a\\nb@d1.test"),
    (["domains", "add", "bad domain.test"], "invalid domain: 'bad domain.test'"),
    (["domains", "add", ""], "invalid domain: ''"),
    (["domains", "add", "a@b.test"], "invalid domain: 'a@b.test'"),
    (["domains", "del", "d9.test"], "domain not found: d9.test"),
    (["domains", "enable", "d9.test"], "domain not found: d9.test"),
    (["domains", "disable", "d9.test"], "domain not found: d9.test"),
    (["apps", "del", "Nope"], "app not found: Nope"),
    (["apps", "enable", "Nope"], "app not found: Nope"),
    (["apps", "disable", "Nope"], "app not found: Nope"),
    (["apps", "allow", "Nope", "x@d1.test"], "app not found: Nope"),
    (["apps", "disallow", "Nope", "x@d1.test"], "app not found: Nope"),
    (["apps", "allow", "Mailer", "not an address"], "invalid address: 'not an address'"),
    (["apps", "disallow", "Mailer", "x@d1.test"], "app Mailer is not allowed to send as x@d1.test"),
])
def test_errors_are_one_line_and_change_nothing(db, argv, message):
    before = dump(db.path)
    code, out, err = db(*argv)
    assert code == 1
    assert_one_error_line(code, out, err, message)
    assert dump(db.path) == before


@pytest.mark.parametrize("argv", [
    [], ["domains"], ["nope"], ["domains", "nope"], ["aliases", "add", "only@d1.test"],
    ["apps", "allow", "Mailer"], ["domains", "list", "--bogus"], ["check", "--state", "DATA"],
])
def test_usage_errors_are_one_line(db, argv):
    before = dump(db.path)
    code, out, err = db(*argv)
    assert code == 2
    assert_one_error_line(code, out, err)
    assert dump(db.path) == before


def test_db_and_config_exclude_each_other(tmp_path, sqlite_db):
    config = write_config(tmp_path)
    code, out, err = sqlite_db("--config", str(config), "domains", "list")
    assert_one_error_line(code, out, err, "give either --db or --config, not both")


def test_bad_config_is_one_line(tmp_path, run):
    bad = tmp_path / "bad.yaml"
    bad.write_text("sqlite: {path: x, nope: 1}\n")
    code, out, err = run("--config", str(bad), "domains", "list")
    assert_one_error_line(code, out, err)
    assert "sqlite.nope" in err
    code, out, err = run("--config", str(tmp_path / "absent.yaml"), "domains", "list")
    assert_one_error_line(code, out, err, f"config file not found: {tmp_path / 'absent.yaml'}")


def test_not_a_database_is_one_line(tmp_path, run):
    path = tmp_path / "state.db"
    path.write_bytes(b"this is not sqlite" * 100)
    code, out, err = run("--db", str(path), "domains", "list")
    assert_one_error_line(code, out, err)
    assert path.read_bytes() == b"this is not sqlite" * 100


def test_help_exits_zero(run):
    code, out, err = run("--help")
    assert code == 0 and "domains" in out and err == ""


# Options: --config, and --db after the command words -----------------------------------------


def test_config_names_the_database(tmp_path, go_db, run):
    config = write_config(tmp_path)  # sqlite.path is go_db
    assert run("--config", str(config), "domains", "list") == (0, GO_DOMAINS, "")
    assert run("domains", "list", "--config", str(config)) == (0, GO_DOMAINS, "")
    assert run("aliases", "add", "x@d2.test", "bob", "--config", str(config)) == (0, "", "")
    assert run("domains", "list", "--db", str(go_db)) == (0, GO_DOMAINS, "")


# The Go database stays a Go database ---------------------------------------------------------


def test_go_database_edited_by_the_cli_still_holds_its_rules(sqlite_db):
    db = sqlite_db
    assert db("domains", "add", "d4.test") == (0, "", "")
    assert db("aliases", "add", "x@d4.test", "dave") == (0, "", "")
    assert db("aliases", "disable", "alias1@d1.test") == (0, "", "")
    assert db("aliases", "del", "sales@d2.test") == (0, "", "")
    assert db("apps", "add", "Other", "pw") == (0, "", "")
    assert db("apps", "allow", "Other", "x@d4.test") == (0, "", "")
    assert db("domains", "disable", "d2.test") == (0, "", "")

    con = sqlite3.connect(db.path)
    try:
        con.execute("PRAGMA foreign_keys = ON")
        assert con.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
        assert con.execute("PRAGMA foreign_key_check").fetchall() == []
        triggers = {r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type = 'trigger'")}
        assert {"trg_aliases_domain_ins", "trg_aliases_domain_upd", "trg_domains_updated",
                "trg_aliases_updated", "trg_apps_updated", "trg_app_from_updated"} <= triggers
        # The alias domain must match the address: both Go triggers still abort.
        with pytest.raises(sqlite3.IntegrityError):
            con.execute("INSERT INTO aliases(alias_email, target_user, alias_domain_name) "
                        "VALUES ('y@d4.test', 'dave', 'd1.test')")
        with pytest.raises(sqlite3.IntegrityError):
            con.execute("UPDATE aliases SET alias_domain_name = 'd1.test' WHERE alias_email = 'x@d4.test'")
        # updated_at is touched by an update that does not set it.
        con.execute("UPDATE aliases SET updated_at = 5 WHERE alias_email = 'x@d4.test'")
        con.execute("UPDATE aliases SET enabled = 0 WHERE alias_email = 'x@d4.test'")
        (updated,) = con.execute("SELECT updated_at FROM aliases WHERE alias_email = 'x@d4.test'").fetchone()
        assert updated > 5
        # Cascades.
        con.execute("DELETE FROM domains WHERE domain_name = 'd4.test'")
        assert con.execute("SELECT count(*) FROM aliases WHERE alias_domain_name = 'd4.test'").fetchone() == (0,)
        con.execute("DELETE FROM apps WHERE app_id = 'Other'")
        assert con.execute("SELECT count(*) FROM app_from WHERE app_id = 'Other'").fetchone() == (0,)
        con.rollback()
    finally:
        con.close()

    assert db("domains", "list")[1] == (
        "d1.test\tenabled\nd2.test\tdisabled\nd3.test\tdisabled\nd4.test\tenabled\n")
    assert db("aliases", "list")[1] == (
        "alias1@d1.test\talice\tdisabled\noff@d1.test\talice\tdisabled\nold@d3.test\talice\tenabled\n"
        "x@d4.test\tdave\tenabled\n")
    # The Go app's hash is untouched and still verifies.
    assert verifies(secret_hash(db.path, "Mailer"), GO_APP_PASSWORD)


# check: the policy decision, as the daemon makes it ------------------------------------------


@pytest.fixture
def check(tmp_path, go_db, run):
    config = write_config(tmp_path)

    def _check(*argv: str) -> tuple[int, str, str]:
        return run("--config", str(config), "check", *argv)

    return _check


@pytest.mark.parametrize("argv, action, rule", [
    (["--sender", "x@outside.example", "--recipient", "nobody@d1.test"],
     "550 5.1.1 No such user", "2 local recipient does not exist"),
    (["--sender", "x@outside.example", "--recipient", "someone@outside.example"],
     "550 5.7.1 Recipient domain not local", "3 unauthenticated, recipient not local"),
    (["--sender", "alice@d1.test", "--recipient", "alias1@d1.test"],
     "553 5.7.1 Sending from local domains requires authentication", "4 unauthenticated, sender local"),
    (["--sender", "x@outside.example", "--recipient", "Alias1+tag@D1.test"],
     "DUNNO", "5 unauthenticated"),
    (["--sasl-method", "XOAUTH2", "--sasl-user", "alice", "--sender", "alias1@d1.test",
      "--recipient", "x@outside.example"],
     "DUNNO", "6 user owns sender"),
    (["--sasl-method", "oauthbearer", "--sasl-user", "alice@d1.test", "--sender", "alice+x@d1.test",
      "--recipient", "x@outside.example"],
     "DUNNO", "6 user owns sender"),
    (["--sasl-method", "PLAIN", "--sasl-user", "mailer", "--sender", "noreply@d1.test",
      "--recipient", "x@outside.example"],
     "DUNNO", "7 app may send as sender"),
    (["--sasl-method", "XOAUTH2", "--sasl-user", "alice", "--sender", "sales@d2.test",
      "--recipient", "x@outside.example"],
     "553 5.7.1 Sender not owned by authenticated user", "8 sender not owned by user"),
    (["--sasl-method", "LOGIN", "--sasl-user", "Mailer", "--sender", "billing@d1.test",
      "--recipient", "x@outside.example"],
     "553 5.7.1 Sender not owned by authenticated user", "8 sender not owned by app"),
    (["--sasl-method", "CRAM-MD5", "--sasl-user", "alice", "--sender", "alice@d1.test",
      "--recipient", "x@outside.example"],
     "553 5.7.1 Unsupported authentication method", "9 unsupported authentication method"),
    (["--state", "mail", "--sasl-method", "XOAUTH2", "--sasl-user", "bob", "--sender", "alice@d1.test"],
     "553 5.7.1 Sender not owned by authenticated user", "8 sender not owned by user"),
    (["--state", "MAIL", "--sender", "x@outside.example"], "DUNNO", "5 unauthenticated"),
])
def test_check_prints_action_and_rule(check, argv, action, rule):
    assert check(*argv) == (0, f"action: {action}\nrule: {rule}\n", "")


def test_check_sees_cli_changes(check, go_db, run):
    argv = ["--sasl-method", "PLAIN", "--sasl-user", "Mailer", "--sender", "billing@d1.test",
            "--recipient", "x@outside.example"]
    assert check(*argv)[1].startswith("action: 553 ")
    assert run("--db", str(go_db), "apps", "allow", "Mailer", "billing@d1.test") == (0, "", "")
    assert check(*argv) == (0, "action: DUNNO\nrule: 7 app may send as sender\n", "")


def test_check_applies_an_apps_networks_and_expiry(check, go_db, run):
    argv = ["--sasl-method", "PLAIN", "--sasl-user", "Mailer", "--sender", "noreply@d1.test",
            "--recipient", "x@outside.example"]
    assert check(*argv) == (0, "action: DUNNO\nrule: 7 app may send as sender\n", "")
    assert run("--db", str(go_db), "init")[0] == 0
    assert run("--db", str(go_db), "apps", "set", "Mailer", "--networks", "192.0.2.0/24") == (0, "", "")
    refused = f"action: {NOT_OWNED}\nrule: 8 "
    assert check(*argv) == (0, refused + "no remote IP to check against the app's networks\n", "")
    assert check(*argv, "--client-address", "192.0.2.9") == (
        0, "action: DUNNO\nrule: 7 app may send as sender\n", "")
    assert run("--db", str(go_db), "apps", "set", "Mailer", "--expires", "2001-01-01") == (0, "", "")
    assert check(*argv, "--client-address", "192.0.2.9") == (
        0, refused + "app expired at 2001-01-01T00:00:00Z\n", "")


def test_check_needs_the_config(tmp_path, go_db, run):
    code, out, err = run("--db", str(go_db), "check", "--sender", "a@d1.test")
    assert code == 2
    assert_one_error_line(code, out, err,
                          "check needs --config PATH (it asks the configured identity provider)")


def test_check_with_a_missing_database(tmp_path, run):
    config = write_config(tmp_path)
    code, out, err = run("--config", str(config), "check", "--recipient", "a@d1.test")
    assert_one_error_line(code, out, err, MISSING.format(path=tmp_path / "state.db"))


# The real executables ------------------------------------------------------------------------


def _executables() -> list[list[str]]:
    found = [[sys.executable, str(REPO / "mailcloakctl")]]
    script = Path(sys.executable).parent / "mailcloakctl"
    if script.exists():
        found.append([str(script)])
    return found


@pytest.fixture(params=_executables(), ids=lambda argv: "console-script" if len(argv) == 1 else "repo-wrapper")
def exe(request, tmp_path):
    def _exe(*argv: str, stdin: str | None = None) -> subprocess.CompletedProcess:
        return subprocess.run(
            [*request.param, *argv], input=stdin, capture_output=True, text=True, timeout=60,
            cwd=tmp_path, stdin=subprocess.DEVNULL if stdin is None else None,
        )

    return _exe


def test_repo_wrapper_is_executable():
    path = REPO / "mailcloakctl"
    assert os.access(path, os.X_OK)
    assert path.read_text().startswith("#!/usr/bin/env python3\n")


def test_executable_lists_and_writes(exe, go_db):
    result = exe("--db", str(go_db), "domains", "list")
    assert (result.returncode, result.stdout, result.stderr) == (0, GO_DOMAINS, "")
    result = exe("aliases", "list", "--db", str(go_db))
    assert (result.returncode, result.stdout, result.stderr) == (0, GO_ALIASES, "")
    result = exe("--db", str(go_db), "apps", "list")
    assert (result.returncode, result.stdout, result.stderr) == (0, GO_APPS, "")
    result = exe("--db", str(go_db), "aliases", "add", "cli@d2.test", "bob")
    assert (result.returncode, result.stdout, result.stderr) == (0, "", "")
    result = exe("--db", str(go_db), "aliases", "list", "--user", "bob")
    assert result.stdout == "cli@d2.test\tbob\tenabled\nsales@d2.test\tbob\tenabled\n"


def test_executable_errors(exe, tmp_path, go_db):
    absent = tmp_path / "absent.db"
    result = exe("--db", str(absent), "domains", "list")
    assert result.returncode == 1 and result.stdout == ""
    assert result.stderr == f"mailcloakctl: {MISSING.format(path=absent)}\n"
    before = dump(go_db)
    result = exe("--db", str(go_db), "aliases", "add", "x@d9.test", "alice")
    assert (result.returncode, result.stderr) == (1, "mailcloakctl: domain not found: d9.test\n")
    result = exe("--db", str(go_db), "apps", "add", "NoTty")
    assert result.returncode == 1 and result.stderr.count("\n") == 1
    assert "standard input is not a terminal" in result.stderr
    assert dump(go_db) == before


def test_executable_init_and_passwords(exe, tmp_path):
    path = tmp_path / "fresh" / "state.db"
    assert exe("--db", str(path), "init").returncode == 0
    result = exe("--db", str(path), "apps", "add", "Piped", "--password-stdin", stdin="piped pw\n")
    assert (result.returncode, result.stdout, result.stderr) == (0, "", "")
    assert verifies(secret_hash(path, "Piped"), "piped pw")
    result = exe("--db", str(path), "apps", "add", "Gen", "--generate")
    assert result.returncode == 0 and result.stderr == ""
    token = result.stdout.removesuffix("\n")
    assert "\n" not in token and len(token) >= 27
    assert verifies(secret_hash(path, "Gen"), token)


def test_executable_check(exe, tmp_path, go_db):
    config = write_config(tmp_path)
    result = exe("--config", str(config), "check", "--sasl-method", "XOAUTH2", "--sasl-user", "alice",
                 "--sender", "sales@d2.test", "--recipient", "x@outside.example")
    assert (result.returncode, result.stdout, result.stderr) == (
        0, "action: 553 5.7.1 Sender not owned by authenticated user\nrule: 8 sender not owned by user\n", "")
