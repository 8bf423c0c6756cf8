"""mailcloakctl export / import: the JSON document, all-or-nothing import, merge and --replace."""

from __future__ import annotations

import io
import json
import shutil
import sqlite3
from pathlib import Path

import pytest

from mailcloak import ctl
from mailcloak.passwords import NO_SECRET
from support import make_go_database


@pytest.fixture(scope="module")
def go_template(tmp_path_factory) -> Path:
    return make_go_database(tmp_path_factory.mktemp("go") / "state.db")


@pytest.fixture
def run(capsys):
    def _run(*argv: str) -> tuple[int, str, str]:
        code = ctl.main(list(argv))
        captured = capsys.readouterr()
        return code, captured.out, captured.err

    return _run


def database(run, path: Path, template: Path | None = None):
    if template is not None:
        shutil.copyfile(template, path)
    assert run("--db", str(path), "init")[0] == 0

    def _db(*argv: str) -> tuple[int, str, str]:
        return run("--db", str(path), *argv)

    _db.path = path
    return _db


@pytest.fixture
def source(run, tmp_path, go_template):
    """The Go database, migrated, with the version 2 things: a list, a catch-all, app settings."""
    db = database(run, tmp_path / "source.db", go_template)
    con = sqlite3.connect(db.path)
    con.execute("PRAGMA foreign_keys = ON")
    con.execute("INSERT INTO aliases(alias_email, target_user, alias_domain_name, send_policy) "
                "VALUES ('team@d1.test', 'carol', 'd1.test', 'listed')")
    con.executemany("INSERT INTO alias_targets(alias_email, target_user, position) VALUES (?, ?, ?)",
                    [("team@d1.test", "alice", 1), ("team@d1.test", "bob", 2)])
    con.executemany("INSERT INTO alias_senders(alias_email, sender_user) VALUES (?, ?)",
                    [("team@d1.test", "dave"), ("team@d1.test", "alice")])
    con.execute("INSERT INTO aliases(alias_email, target_user, alias_domain_name) "
                "VALUES ('@d2.test', 'bob', 'd2.test')")
    con.commit()
    con.close()
    assert db("apps", "set", "Mailer", "--description", "Invoices – ünïcode", "--expires", "2030-01-01",
              "--networks", "192.0.2.0/24,2001:db8::/32")[0] == 0
    assert db("apps", "add", "Paused", "pw", "--networks", "10.0.0.0/8")[0] == 0
    assert db("apps", "disable", "Paused")[0] == 0
    return db


@pytest.fixture
def target(run, tmp_path):
    return database(run, tmp_path / "target.db")


def export(db) -> str:
    code, out, err = db("export")
    assert (code, err) == (0, "")
    return out


def write(tmp_path: Path, document) -> str:
    path = tmp_path / "import.json"
    path.write_text(document if isinstance(document, str) else json.dumps(document))
    return str(path)


def dump(path: Path) -> dict[str, list[tuple]]:
    con = sqlite3.connect(path)
    try:
        return {table: con.execute(f"SELECT * FROM {table} ORDER BY 1, 2").fetchall()
                for table in ("domains", "aliases", "alias_targets", "alias_senders", "apps", "app_from")}
    finally:
        con.close()


def test_export_is_stable_sorted_and_carries_no_secret(source):
    text = export(source)
    assert text == export(source)
    document = json.loads(text)
    assert text == json.dumps(document, indent=2, sort_keys=True, ensure_ascii=False) + "\n"
    assert (document["format"], document["version"]) == ("mailcloak-export", 1)
    assert [d["domain"] for d in document["domains"]] == ["d1.test", "d2.test", "d3.test"]
    aliases = {a["alias"]: a for a in document["aliases"]}
    assert aliases["team@d1.test"] == {"alias": "team@d1.test", "targets": ["carol", "alice", "bob"],
                                       "enabled": True, "send_policy": "listed",
                                       "listed_senders": ["alice", "dave"]}
    assert aliases["@d2.test"]["targets"] == ["bob"]
    apps = {a["app_id"]: a for a in document["apps"]}
    assert apps["Mailer"] == {
        "app_id": "Mailer", "enabled": True, "description": "Invoices – ünïcode",
        "expires_at": "2030-01-01T00:00:00Z", "networks": ["192.0.2.0/24", "2001:db8::/32"],
        "senders": [{"address": "billing@d1.test", "enabled": False},
                    {"address": "noreply@d1.test", "enabled": True}]}
    assert apps["Paused"]["enabled"] is False
    assert "argon2" not in text.lower() and "secret" not in text.lower()


def test_round_trip_into_an_empty_database_is_identical(source, target, tmp_path):
    first = export(source)
    code, out, err = target("import", write(tmp_path, first))
    assert (code, err) == (0, "")
    assert out.splitlines() == [
        f"app {app} created without a password (exports carry none); it cannot log in until "
        f"'mailcloakctl apps add {app}' gives it one" for app in ("Mailer", "Paused")]
    assert export(target) == first
    secrets = {row[0]: row[1] for row in dump(target.path)["apps"]}
    assert secrets == {"Mailer": NO_SECRET, "Paused": NO_SECRET}
    assert "password: none" in target("apps", "list")[1]


def test_export_to_a_file_and_import_from_stdin(source, target, tmp_path, monkeypatch):
    path = tmp_path / "out.json"
    assert source("export", "--output", str(path)) == (0, "", "")
    assert not Path(f"{path}.partial").exists()
    monkeypatch.setattr("sys.stdin", io.StringIO(path.read_text()))
    assert target("import", "-")[0] == 0
    assert export(target) == path.read_text()


def test_merge_keeps_secrets_and_rows_not_in_the_file(source, target, tmp_path):
    assert target("domains", "add", "other.test")[0] == 0
    assert target("apps", "add", "mailer", "target-pw", "--description", "old")[0] == 0
    secret = dump(target.path)["apps"][0][1]
    code, out, err = target("import", write(tmp_path, export(source)))
    assert (code, err) == (0, "")
    assert "Mailer" not in out and "Paused" in out         # "mailer" existed (case-insensitive)
    apps = {row[0]: row for row in dump(target.path)["apps"]}
    assert set(apps) == {"mailer", "Paused"}
    assert apps["mailer"][1] == secret                      # its secret stays
    assert "other.test" in [row[0] for row in dump(target.path)["domains"]]
    exported = json.loads(export(target))
    assert {a["app_id"]: a["description"] for a in exported["apps"]} == {
        "mailer": "Invoices – ünïcode", "Paused": ""}


def test_replace_deletes_what_the_file_does_not_name(source, target, tmp_path):
    target("domains", "add", "other.test")
    target("aliases", "add", "x@other.test", "eve")
    target("apps", "add", "Extra", "pw")
    assert target("import", "--replace", write(tmp_path, export(source)))[0] == 0
    assert export(target) == export(source)


def test_import_replaces_an_objects_sub_lists(source, target, tmp_path):
    document = json.loads(export(source))
    assert target("import", write(tmp_path, document))[0] == 0
    team = next(a for a in document["aliases"] if a["alias"] == "team@d1.test")
    team["targets"], team["listed_senders"], team["send_policy"] = ["bob"], [], "members"
    mailer = next(a for a in document["apps"] if a["app_id"] == "Mailer")
    mailer["senders"], mailer["networks"], mailer["expires_at"] = [], [], None
    assert target("import", write(tmp_path, document))[0] == 0
    assert json.loads(export(target)) == document


GOOD = {"format": "mailcloak-export", "version": 1,
        "domains": [{"domain": "d1.test", "enabled": True}],
        "aliases": [{"alias": "a@d1.test", "targets": ["alice"], "enabled": True,
                     "send_policy": "members", "listed_senders": []}],
        "apps": [{"app_id": "App", "enabled": True, "description": "", "expires_at": None,
                  "networks": [], "senders": [{"address": "a@d1.test", "enabled": True}]}]}


def changed(path: str, value):
    """GOOD with the field at `path` (dotted, numeric list indexes) set to `value`."""
    document = json.loads(json.dumps(GOOD))
    *parents, last = path.split(".")
    node = document
    for key in parents:
        node = node[int(key)] if key.isdigit() else node[key]
    node[int(last) if last.isdigit() else last] = value
    return document


@pytest.mark.parametrize("document,message", [
    ("{not json", "not JSON: Expecting property name enclosed in double quotes at line 1 column 2"),
    ([], 'not a mailcloak export ("format": "mailcloak-export" missing)'),
    (changed("version", 2), "version: 2 is not a format version this mailcloakctl reads (1)"),
    (changed("version", True), "version: True is not a format version"),
    (changed("extra", 1), "document: unknown key 'extra'"),
    (changed("domains", {}), "domains: expected a list, got an object"),
    (changed("domains.0.domain", "bad domain"), "domains[0].domain: invalid domain: 'bad domain'"),
    (changed("domains.0.enabled", 1), "domains[0].enabled: expected true or false, got a number"),
    (changed("aliases.0.alias", "no-at"), "aliases[0].alias: invalid address: 'no-at'"),
    (changed("aliases.0.targets", []), "aliases[0].targets: an alias needs at least one target"),
    (changed("aliases.0.targets", ["a b"]), "aliases[0].targets[0]: invalid user 'a b'"),
    (changed("aliases.0.targets", ["x@y"]), "aliases[0].targets[0]: invalid user 'x@y'"),
    (changed("aliases.0.send_policy", "all"), "aliases[0].send_policy: 'all' is not one of"),
    (changed("apps.0.app_id", "has space"), "apps[0].app_id: invalid app id: 'has space'"),
    (changed("apps.0.expires_at", "soon"), "apps[0].expires_at: invalid expiry: 'soon'"),
    (changed("apps.0.expires_at", "never"), "apps[0].expires_at: use null"),
    (changed("apps.0.networks", ["10.0.0.0/33"]), "apps[0].networks[0]: invalid network"),
    (changed("apps.0.description", "a\nb"), "apps[0].description: invalid description"),
    (changed("apps.0.senders.0.address", "x"), "apps[0].senders[0].address: invalid address"),
    (changed("apps.0.secret_hash", "x"), "apps[0]: unknown key 'secret_hash'"),
    (changed("apps", GOOD["apps"] + [dict(GOOD["apps"][0], app_id="APP")]),
     "apps: app id (compared case-insensitively) 'app' appears twice"),
    (changed("aliases.0.alias", "a@unknown.test"), "domain not found: unknown.test (alias a@unknown.test)"),
])
def test_a_bad_file_is_one_line_and_writes_nothing(target, tmp_path, document, message):
    target("domains", "add", "keep.test")
    before = dump(target.path)
    path = write(tmp_path, document)
    code, out, err = target("import", "--replace", path)
    assert (code, out) == (1, "")
    assert err.startswith(f"mailcloakctl: {path}: {message}"), err
    assert err.endswith("; nothing imported\n") and err.count("\n") == 1
    assert dump(target.path) == before


def test_a_go_database_refuses_import_with_the_init_line(run, tmp_path, go_template):
    path = tmp_path / "go.db"
    shutil.copyfile(go_template, path)
    code, out, err = run("--db", str(path), "import", write(tmp_path, GOOD))
    assert code == 1 and "run mailcloakctl init" in err and err.count("\n") == 1
    con = sqlite3.connect(path)
    assert con.execute("SELECT count(*) FROM apps").fetchone() == (1,)
    con.close()
    # Export works on a Go database as it is.
    assert run("--db", str(path), "export")[0] == 0


def test_export_to_a_missing_folder_is_one_line(source, tmp_path):
    code, out, err = source("export", "--output", str(tmp_path / "nope" / "x.json"))
    assert code == 1 and err.startswith("mailcloakctl: No such file or directory")
