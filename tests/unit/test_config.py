"""Configuration loading (SPEC §4, COMPAT.md "Config"): good configs, defaults, legacy keys, and
every kind of bad config failing with one clear message that names the key."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from mailcloak.config import Config, load_config, parse_config, parse_listen
from mailcloak.errors import ConfigError
from support import REPO, make_go_database, write_config

# The Go project's current sample, with every key it documents.
GO_SAMPLE = """
idp:
  provider: keycloak
  keycloak:
    base_url: https://sso.example.test
    realm: mail
    client_id: mailcloak
    client_secret: s3cret
    cache_ttl_seconds: 300
  authentik:
    base_url: https://authentik.example.test
    api_token: tok
    cache_ttl_seconds: 60
sqlite:
  path: /var/lib/mailcloak/state.db
policy:
  idp_failure_mode: dunno
sockets:
  policy_socket: /var/spool/postfix/private/mailcloak-policy
  socketmap_socket: /var/spool/postfix/private/mailcloak-socketmap
  socket_owner_user: postfix
  socket_owner_group: postfix
  socket_mode: "0660"
daemon:
  user: mailcloak
"""

KEYCLOAK = """
idp:
  provider: keycloak
  keycloak:
    base_url: https://sso.example.test
    realm: mail
    client_id: mailcloak
    client_secret: s3cret
"""

STATIC = """
idp:
  provider: static
  static:
    users:
      - {username: alice, email: alice@d1.test}
      - {username: bob, email: bob@d2.test, enabled: false}
"""


def parse(text: str) -> Config:
    return parse_config(textwrap.dedent(text), source="test.yaml")


def refused(text: str) -> str:
    with pytest.raises(ConfigError) as info:
        parse(text)
    message = str(info.value)
    assert "\n" not in message.strip()
    return message


# --- good configs ----------------------------------------------------------------------------


def test_go_sample_keys_are_all_honoured():
    config = parse(GO_SAMPLE)
    assert config.idp.provider == "keycloak"
    kc = config.idp.keycloak
    assert (kc.base_url, kc.realm, kc.client_id, kc.client_secret) == (
        "https://sso.example.test", "mail", "mailcloak", "s3cret")
    assert kc.cache_ttl_seconds == 300
    assert config.idp.authentik.base_url == "https://authentik.example.test"
    assert config.idp.authentik.api_token == "tok"
    assert config.idp.authentik.cache_ttl_seconds == 60
    assert config.sqlite.path == "/var/lib/mailcloak/state.db"
    assert config.policy.idp_failure_mode == "dunno"
    s = config.sockets
    assert s.policy_socket == "/var/spool/postfix/private/mailcloak-policy"
    assert s.socketmap_socket == "/var/spool/postfix/private/mailcloak-socketmap"
    assert (s.socket_owner_user, s.socket_owner_group) == ("postfix", "postfix")
    assert s.socket_mode == "0660" and s.mode == 0o660
    assert config.daemon.user == "mailcloak"
    assert config.source == "test.yaml"


@pytest.mark.parametrize("written, mode", [
    ('"0660"', 0o660),
    ("0660", 0o660),    # YAML 1.1 reads this as the octal integer 432
    ("'0600'", 0o600),
    ("0600", 0o600),
    ('"660"', 0o660),
])
def test_socket_mode_quoted_and_unquoted(written, mode):
    config = parse(KEYCLOAK + f"sockets:\n  socket_mode: {written}\n")
    assert config.sockets.mode == mode


def test_defaults():
    config = parse(KEYCLOAK)
    assert config.policy.idp_failure_mode == "tempfail"
    assert config.daemon.user == "mailcloak"
    assert config.idp.keycloak.cache_ttl_seconds == 120
    assert config.policy.recipient_delimiter == "+"
    assert config.sqlite.path == "/var/lib/mailcloak/state.db"
    assert config.sockets.policy_socket == "/var/spool/postfix/private/mailcloak-policy"
    assert config.sockets.socketmap_socket == "/var/spool/postfix/private/mailcloak-socketmap"
    assert config.sockets.mode == 0o660
    assert config.http.listen == ""


def test_authentik_defaults():
    config = parse("""
        idp:
          provider: authentik
          authentik: {base_url: "http://ak.test", api_token: t}
    """)
    assert config.idp.provider == "authentik"
    assert config.idp.authentik.cache_ttl_seconds == 120


def test_static_provider():
    config = parse(STATIC)
    assert config.idp.provider == "static"
    users = config.idp.static.users
    assert [(u.username, u.email, u.enabled) for u in users] == [
        ("alice", "alice@d1.test", True), ("bob", "bob@d2.test", False)]


def test_static_provider_without_users():
    config = parse("idp: {provider: static, static: {}}")
    assert config.idp.static.users == ()


@pytest.mark.parametrize("listen, expected", [
    ("127.0.0.1:8425", ("tcp", "127.0.0.1", 8425)),
    ("localhost:8425", ("tcp", "127.0.0.1", 8425)),
    ("[::1]:8425", ("tcp", "::1", 8425)),
    ("127.0.0.2:1", ("tcp", "127.0.0.2", 1)),
    ("unix:/run/mailcloak/http.sock", ("unix", "/run/mailcloak/http.sock", 0)),
])
def test_http_listen_accepted(listen, expected):
    config = parse(STATIC + f"http:\n  listen: {listen!r}\n")
    assert config.http.listen == listen
    assert parse_listen(listen) == expected


def test_numbers_accept_int_for_float():
    config = parse(KEYCLOAK + "    cache_ttl_seconds: 5\n")
    assert config.idp.keycloak.cache_ttl_seconds == 5.0


def test_load_config_from_file(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(STATIC)
    config = load_config(path)
    assert config.source == str(path)
    assert config.idp.provider == "static"


def test_load_config_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")


# --- legacy keys -----------------------------------------------------------------------------

LEGACY_KEYCLOAK = """
keycloak:
  base_url: https://sso.example.test
  realm: mail
  client_id: mailcloak
  client_secret: s3cret
"""


def test_legacy_top_level_keycloak():
    config = parse(LEGACY_KEYCLOAK)
    assert config.idp.provider == "keycloak"
    assert config.idp.keycloak.realm == "mail"
    assert config.idp.keycloak.client_secret == "s3cret"
    assert config.idp.keycloak.cache_ttl_seconds == 120


def test_legacy_keycloak_failure_mode():
    config = parse(LEGACY_KEYCLOAK + "policy:\n  keycloak_failure_mode: dunno\n")
    assert config.policy.idp_failure_mode == "dunno"


def test_legacy_failure_mode_agreeing_with_new_key():
    config = parse(KEYCLOAK + "policy:\n  keycloak_failure_mode: dunno\n  idp_failure_mode: dunno\n")
    assert config.policy.idp_failure_mode == "dunno"


def test_legacy_policy_cache_ttl_fills_provider_section():
    config = parse(LEGACY_KEYCLOAK + "policy:\n  cache_ttl_seconds: 45\n")
    assert config.idp.keycloak.cache_ttl_seconds == 45


def test_legacy_policy_cache_ttl_fills_new_style_section():
    config = parse(KEYCLOAK + "policy:\n  cache_ttl_seconds: 45\n")
    assert config.idp.keycloak.cache_ttl_seconds == 45


def test_legacy_policy_domain_accepted():
    config = parse(LEGACY_KEYCLOAK + "policy:\n  domain: d1.test\n")
    assert config.policy.domain == "d1.test"


def test_legacy_everything_at_once():
    config = parse(LEGACY_KEYCLOAK + textwrap.dedent("""
        policy:
          domain: d1.test
          keycloak_failure_mode: dunno
          cache_ttl_seconds: 10
    """))
    assert config.idp.provider == "keycloak"
    assert config.policy.idp_failure_mode == "dunno"
    assert config.idp.keycloak.cache_ttl_seconds == 10
    assert config.policy.domain == "d1.test"


@pytest.mark.parametrize("text, words", [
    (LEGACY_KEYCLOAK + KEYCLOAK, ["keycloak", "idp.keycloak"]),
    (KEYCLOAK + "policy:\n  keycloak_failure_mode: dunno\n  idp_failure_mode: tempfail\n",
     ["keycloak_failure_mode", "idp_failure_mode"]),
    (KEYCLOAK + "    cache_ttl_seconds: 30\npolicy:\n  cache_ttl_seconds: 45\n",
     ["cache_ttl_seconds"]),
], ids=["keycloak-block", "failure-mode", "cache-ttl"])
def test_conflicting_legacy_and_new_keys_refused(text, words):
    message = refused(text)
    assert message.startswith("test.yaml:")  # names the file like every other config error
    for word in words:
        assert word in message


# --- bad configs -----------------------------------------------------------------------------

@pytest.mark.parametrize("text, dotted", [
    (KEYCLOAK + "sockets:\n  sokcet_mode: '0660'\n", "sockets.sokcet_mode"),
    (KEYCLOAK + "    realmm: x\n", "idp.keycloak.realmm"),
    (KEYCLOAK + "polcy:\n  idp_failure_mode: dunno\n", "polcy"),
    (KEYCLOAK + "daemon:\n  usr: mail\n", "daemon.usr"),
    (STATIC + "      - {username: c, email: c@d1.test, enabeld: false}\n", "idp.static.users[2].enabeld"),
    (KEYCLOAK + "http:\n  listen_on: x\n", "http.listen_on"),
    (KEYCLOAK + "source: x\n", "source"),
    (KEYCLOAK + "sqlite:\n  pth: /x\n", "sqlite.pth"),
], ids=["sockets", "keycloak", "section", "daemon", "static-user", "http", "source", "sqlite"])
def test_unknown_key_names_dotted_key(text, dotted):
    message = refused(text)
    assert dotted in message
    assert "unknown" in message


@pytest.mark.parametrize("text, dotted", [
    (KEYCLOAK + "    cache_ttl_seconds: '120'\n", "idp.keycloak.cache_ttl_seconds"),
    (KEYCLOAK + "    cache_ttl_seconds: true\n", "idp.keycloak.cache_ttl_seconds"),
    (KEYCLOAK + "    cache_ttl_seconds: -1\n", "idp.keycloak.cache_ttl_seconds"),
    (KEYCLOAK + "    cache_max_entries: true\n", "idp.keycloak.cache_max_entries"),
    (KEYCLOAK + "    cache_max_entries: 1.5\n", "idp.keycloak.cache_max_entries"),
    (KEYCLOAK + "    cache_max_entries: '10'\n", "idp.keycloak.cache_max_entries"),
    (KEYCLOAK + "sockets:\n  max_connections: false\n", "sockets.max_connections"),
    (KEYCLOAK + "sockets: [a, b]\n", "sockets"),
    (KEYCLOAK + "sockets: text\n", "sockets"),
    (KEYCLOAK + "sockets:\n  policy_socket: [a]\n", "sockets.policy_socket"),
    (KEYCLOAK + "sockets:\n  policy_socket: {a: 1}\n", "sockets.policy_socket"),
    (KEYCLOAK + "sockets:\n  policy_socket: 12\n", "sockets.policy_socket"),
    (KEYCLOAK + "daemon:\n  user: true\n", "daemon.user"),
    (KEYCLOAK + "sqlite:\n  path: [a]\n", "sqlite.path"),
    ("idp: [keycloak]\n", "idp"),
    ("idp:\n  provider: keycloak\n  keycloak: [a]\n", "idp.keycloak"),
    (STATIC.replace("enabled: false", "enabled: 'no'"), "idp.static.users[1].enabled"),
    ("idp:\n  provider: static\n  static:\n    users: {username: a}\n", "idp.static.users"),
    ("idp:\n  provider: static\n  static:\n    users: [alice]\n", "idp.static.users[0]"),
])
def test_wrong_types_name_dotted_key(text, dotted):
    message = refused(text)
    assert dotted in message


@pytest.mark.parametrize("mode", ['"0999"', '"rw-rw----"', '"66"', '"06600"', "true", "660", '""', "[1]", '"0o660"'])
def test_bad_socket_mode(mode):
    message = refused(KEYCLOAK + f"sockets:\n  socket_mode: {mode}\n")
    assert "sockets.socket_mode" in message


@pytest.mark.parametrize("text, dotted", [
    (KEYCLOAK.replace("provider: keycloak", "provider: ldap"), "idp.provider"),
    (KEYCLOAK.replace("provider: keycloak", "provider: Keycloak"), "idp.provider"),
    (KEYCLOAK + "policy:\n  idp_failure_mode: reject\n", "policy.idp_failure_mode"),
    (KEYCLOAK + "policy:\n  idp_failure_mode: true\n", "policy.idp_failure_mode"),
    (LEGACY_KEYCLOAK + "policy:\n  keycloak_failure_mode: accept\n", "policy.idp_failure_mode"),
    (KEYCLOAK + "daemon:\n  log_level: verbose\n", "daemon.log_level"),
])
def test_invalid_literal_values(text, dotted):
    message = refused(text)
    assert dotted in message
    assert "must be one of" in message


@pytest.mark.parametrize("missing", ["base_url", "realm", "client_id", "client_secret"])
def test_missing_required_keycloak_key(missing):
    lines = [line for line in KEYCLOAK.splitlines() if not line.strip().startswith(missing + ":")]
    message = refused("\n".join(lines))
    assert f"idp.keycloak.{missing}" in message
    assert "missing" in message


def test_missing_required_authentik_key():
    message = refused("idp:\n  provider: authentik\n  authentik: {base_url: 'http://a.test'}\n")
    assert "idp.authentik.api_token" in message


def test_missing_static_user_field():
    message = refused("idp:\n  provider: static\n  static:\n    users:\n      - {username: a}\n")
    assert "idp.static.users[0].email" in message


@pytest.mark.parametrize("text, section", [
    ("idp:\n  provider: keycloak\n", "idp.keycloak"),
    ("idp:\n  provider: authentik\n" + KEYCLOAK.split("provider: keycloak\n")[1], "idp.authentik"),
    ("idp:\n  provider: static\n", "idp.static"),
    ("idp:\n  provider: static\n  static:\n", "idp.static"),
    ("sqlite:\n  path: /x\n", "idp.keycloak"),  # provider defaults to keycloak
])
def test_provider_without_its_section(text, section):
    assert section in refused(text)


@pytest.mark.parametrize("text, words", [
    (KEYCLOAK.replace("https://sso.example.test", "sso.example.test"), ["idp.keycloak.base_url"]),
    (STATIC.replace("alice@d1.test", "alice"), ["idp.static.users[0].email"]),
    (STATIC.replace("username: bob", "username: Alice"), ["idp.static.users[1].username"]),
    (STATIC.replace("username: bob", "username: ' '"), ["idp.static.users[1].username"]),
    (KEYCLOAK + "sockets:\n  policy_socket: /x\n  socketmap_socket: /x\n", ["policy_socket", "socketmap_socket"]),
    (KEYCLOAK + "sockets:\n  policy_socket: ''\n", ["sockets.policy_socket"]),
    (KEYCLOAK + "sockets:\n  max_connections: 0\n", ["sockets.max_connections"]),
    (KEYCLOAK + "policy:\n  recipient_delimiter: '@'\n", ["policy.recipient_delimiter"]),
    (KEYCLOAK + "policy:\n  recipient_delimiter: '+ '\n", ["policy.recipient_delimiter"]),
    (KEYCLOAK + "policy:\n  request_deadline_seconds: 0\n", ["policy.request_deadline_seconds"]),
    (KEYCLOAK + "sqlite:\n  path: ''\n", ["sqlite.path"]),
])
def test_cross_key_rules(text, words):
    message = refused(text)
    for word in words:
        assert word in message


@pytest.mark.parametrize("listen", [
    "0.0.0.0:8425", "192.0.2.1:8425", "[::]:8425", "mail.example.test:8425", ":8425", "8425",
    "127.0.0.1", "127.0.0.1:0", "127.0.0.1:70000", "127.0.0.1:http", "unix:",
])
def test_http_listen_refused(listen):
    message = refused(STATIC + f"http:\n  listen: {listen!r}\n")
    assert "http.listen" in message


def test_empty_recipient_delimiter_allowed():
    assert parse(KEYCLOAK + "policy:\n  recipient_delimiter: ''\n").policy.recipient_delimiter == ""


def test_yaml_syntax_error():
    message = refused(KEYCLOAK + "sockets:\n  policy_socket: [unclosed\n")
    assert "test.yaml" in message and "YAML" in message


def test_yaml_syntax_error_reports_line():
    message = refused("idp:\n  provider: static\n bad: : :\n")
    assert "line" in message


@pytest.mark.parametrize("text", ["", "\n", "# only a comment\n"])
def test_empty_file_is_refused(text):
    # Nothing configures an IdP, and the default provider (keycloak) needs its section.
    assert "idp.keycloak" in refused(text)


@pytest.mark.parametrize("text", ["- a\n- b\n", "just a string\n", "42\n"])
def test_non_mapping_top_level(text):
    assert "top level" in refused(text)


def test_message_names_the_file():
    assert refused(KEYCLOAK + "bogus: 1\n").startswith("test.yaml:")


# --- mailcloak --check-config ----------------------------------------------------------------


def run_check(config: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "mailcloak", "--config", str(config), "--check-config"],
        capture_output=True, text=True, cwd=REPO, timeout=60,
    )


def test_check_config_good(tmp_path):
    make_go_database(tmp_path / "state.db")
    config = write_config(tmp_path)
    result = run_check(config)
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    assert "result: OK" in out
    assert "database:" in out and "3 domains" in out and "4 aliases" in out and "1 apps" in out
    assert str(tmp_path / "policy.sock") in out
    assert str(tmp_path / "socketmap.sock") in out
    assert "idp: static OK" in out


def test_check_config_bad_config(tmp_path):
    make_go_database(tmp_path / "state.db")
    config = write_config(tmp_path, sockets={"sokcet_mode": "0660"})
    result = run_check(config)
    assert result.returncode == 1
    lines = [line for line in (result.stdout + result.stderr).splitlines() if line.strip()]
    assert len(lines) == 1, lines
    assert "sockets.sokcet_mode" in lines[0]
    assert "Traceback" not in result.stderr


def test_check_config_missing_config_file(tmp_path):
    result = run_check(tmp_path / "absent.yaml")
    assert result.returncode == 1
    lines = [line for line in (result.stdout + result.stderr).splitlines() if line.strip()]
    assert len(lines) == 1 and "not found" in lines[0]


def test_check_config_missing_database(tmp_path):
    config = write_config(tmp_path)  # no state.db created
    result = run_check(config)
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stdout.splitlines() if "ERROR" in line]
    assert errors and "result: ERROR" in result.stdout
    db_lines = [line for line in errors if line.startswith("database:")]
    assert len(db_lines) == 1
    assert "sqlite db not found at" in db_lines[0] and "mailcloakctl init" in db_lines[0]


def test_key_without_value_means_the_default_not_empty():
    # `daemon.user:` left empty must not mean "keep root".
    config = parse_config("idp:\n  provider: static\n  static: {users: []}\ndaemon:\n  user:\n")
    assert config.daemon.user == "mailcloak"


@pytest.mark.parametrize("value", [".nan", ".inf", "-.inf"])
def test_non_finite_numbers_refused(value):
    with pytest.raises(ConfigError, match="sockets.idle_timeout_seconds"):
        parse_config(f"sockets:\n  idle_timeout_seconds: {value}\n")


# --- passdb section ---------------------------------------------------------------------------

def test_passdb_defaults_are_the_documented_ones():
    passdb = parse(STATIC).passdb
    assert (passdb.verify_cache_seconds, passdb.verify_cache_entries) == (60, 10_000)
    assert (passdb.throttle_free_failures, passdb.throttle_base_delay_seconds,
            passdb.throttle_max_delay_seconds, passdb.throttle_forget_after_seconds,
            passdb.throttle_max_entries) == (3, 0.5, 5, 900, 10_000)
    assert passdb.last_use_flush_seconds == 30


@pytest.mark.parametrize("key, value", [
    ("verify_cache_seconds", "0"),            # 0 turns the cache off
    ("verify_cache_seconds", "3600"),
    ("verify_cache_entries", "1"),
    ("throttle_free_failures", "0"),          # every failure delays the next attempt
    ("throttle_base_delay_seconds", "0"),     # no delay at all
    ("throttle_max_delay_seconds", "8"),
    ("throttle_forget_after_seconds", "1"),
    ("throttle_max_entries", "1000000"),
    ("last_use_flush_seconds", "1"),
    ("last_use_flush_seconds", "2.5"),
])
def test_passdb_values_accepted(key, value):
    assert getattr(parse(STATIC + f"passdb:\n  {key}: {value}\n").passdb, key) == float(value)


@pytest.mark.parametrize("text, words", [
    ("passdb:\n  verify_cache_seconds: -1\n", ["passdb.verify_cache_seconds", "negative"]),
    ("passdb:\n  verify_cache_seconds: .nan\n", ["passdb.verify_cache_seconds", "a number"]),
    ("passdb:\n  verify_cache_seconds: .inf\n", ["passdb.verify_cache_seconds", "a number"]),
    ("passdb:\n  verify_cache_seconds: 3601\n", ["passdb.verify_cache_seconds", "between 0 and 3600"]),
    ("passdb:\n  verify_cache_seconds: '60'\n", ["passdb.verify_cache_seconds", "a number"]),
    ("passdb:\n  verify_cache_entries: 0\n", ["passdb.verify_cache_entries", "between 1 and"]),
    ("passdb:\n  verify_cache_entries: 1.5\n", ["passdb.verify_cache_entries", "an integer"]),
    ("passdb:\n  throttle_free_failures: true\n", ["passdb.throttle_free_failures", "an integer"]),
    ("passdb:\n  throttle_free_failures: 1001\n", ["passdb.throttle_free_failures"]),
    ("passdb:\n  throttle_max_delay_seconds: 9\n", ["passdb.throttle_max_delay_seconds",
                                                    "Lua passdb script gives up after 10 s"]),
    ("passdb:\n  throttle_base_delay_seconds: 6\n", ["passdb.throttle_base_delay_seconds must not "
                                                     "exceed passdb.throttle_max_delay_seconds"]),
    ("passdb:\n  throttle_forget_after_seconds: 0\n", ["passdb.throttle_forget_after_seconds"]),
    ("passdb:\n  throttle_max_entries: 0\n", ["passdb.throttle_max_entries"]),
    ("passdb:\n  last_use_flush_seconds: 0\n", ["passdb.last_use_flush_seconds", "between 1 and 3600"]),
    ("passdb:\n  last_use_flush_seconds: 86400\n", ["passdb.last_use_flush_seconds"]),
    ("passdb:\n  cache_seconds: 60\n", ["unknown key passdb.cache_seconds"]),
    ("passdb: [60]\n", ["passdb must be a mapping"]),
])
def test_passdb_values_refused(text, words):
    message = refused(STATIC + text)
    for word in words:
        assert word in message
