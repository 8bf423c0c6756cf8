"""Helpers shared by the test layers: configs, a Go-project database, the daemon as a process."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import yaml
from argon2 import PasswordHasher, Type

REPO = Path(__file__).resolve().parent.parent

STATIC_USERS = [
    {"username": "alice", "email": "alice@d1.test"},
    {"username": "bob", "email": "Bob@D2.test"},
    {"username": "carol", "email": "carol@d1.test", "enabled": False},
]


def write_config(tmp_path: Path, **sections) -> Path:
    """A static-provider config under tmp_path; keyword sections replace or extend the defaults."""
    config = {
        "idp": {"provider": "static", "static": {"users": STATIC_USERS}},
        "sqlite": {"path": str(tmp_path / "state.db"), "poll_interval_seconds": 0.2},
        "policy": {"idp_failure_mode": "tempfail"},
        "sockets": {
            "policy_socket": str(tmp_path / "policy.sock"),
            "socketmap_socket": str(tmp_path / "socketmap.sock"),
            "socket_mode": "0666",
        },
        "daemon": {"user": "", "log_level": "debug", "shutdown_grace_seconds": 2},
    }
    for name, value in sections.items():
        if isinstance(value, dict) and isinstance(config.get(name), dict):
            config[name] = {**config[name], **value}
        else:
            config[name] = value
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


# The Go project's schema, written from COMPAT.md on purpose apart from mailcloak's own code, so
# that a test opening it shows mailcloak reads a database it did not create.
GO_SCHEMA = """
PRAGMA journal_mode = WAL;
PRAGMA foreign_keys = ON;
CREATE TABLE domains (
  domain_name TEXT PRIMARY KEY,
  enabled INTEGER NOT NULL DEFAULT 1,
  updated_at INTEGER NOT NULL DEFAULT (strftime('%s','now'))
);
CREATE TABLE aliases (
  alias_email TEXT PRIMARY KEY,
  target_user TEXT NOT NULL,
  alias_domain_name TEXT NOT NULL REFERENCES domains(domain_name) ON DELETE CASCADE,
  enabled INTEGER NOT NULL DEFAULT 1,
  updated_at INTEGER NOT NULL DEFAULT (strftime('%s','now'))
);
CREATE INDEX idx_aliases_target ON aliases(target_user);
CREATE INDEX idx_aliases_domain ON aliases(alias_domain_name);
CREATE TRIGGER trg_aliases_domain_ins BEFORE INSERT ON aliases
  WHEN NEW.alias_domain_name != substr(NEW.alias_email, instr(NEW.alias_email, '@') + 1)
  BEGIN SELECT RAISE(ABORT, 'alias domain mismatch'); END;
CREATE TRIGGER trg_aliases_domain_upd BEFORE UPDATE ON aliases
  WHEN NEW.alias_domain_name != substr(NEW.alias_email, instr(NEW.alias_email, '@') + 1)
  BEGIN SELECT RAISE(ABORT, 'alias domain mismatch'); END;
CREATE TABLE apps (
  app_id TEXT PRIMARY KEY,
  secret_hash TEXT NOT NULL,
  enabled INTEGER NOT NULL DEFAULT 1,
  updated_at INTEGER NOT NULL DEFAULT (strftime('%s','now'))
);
CREATE TABLE app_from (
  app_id TEXT NOT NULL REFERENCES apps(app_id) ON DELETE CASCADE,
  from_addr TEXT NOT NULL,
  enabled INTEGER NOT NULL DEFAULT 1,
  updated_at INTEGER NOT NULL DEFAULT (strftime('%s','now')),
  PRIMARY KEY (app_id, from_addr)
);
CREATE INDEX idx_app_from_addr ON app_from(from_addr);
CREATE TRIGGER trg_domains_updated AFTER UPDATE ON domains WHEN NEW.updated_at = OLD.updated_at
  BEGIN UPDATE domains SET updated_at = strftime('%s','now') WHERE domain_name = NEW.domain_name; END;
CREATE TRIGGER trg_aliases_updated AFTER UPDATE ON aliases WHEN NEW.updated_at = OLD.updated_at
  BEGIN UPDATE aliases SET updated_at = strftime('%s','now') WHERE alias_email = NEW.alias_email; END;
CREATE TRIGGER trg_apps_updated AFTER UPDATE ON apps WHEN NEW.updated_at = OLD.updated_at
  BEGIN UPDATE apps SET updated_at = strftime('%s','now') WHERE app_id = NEW.app_id; END;
CREATE TRIGGER trg_app_from_updated AFTER UPDATE ON app_from WHEN NEW.updated_at = OLD.updated_at
  BEGIN UPDATE app_from SET updated_at = strftime('%s','now')
        WHERE app_id = NEW.app_id AND from_addr = NEW.from_addr; END;
"""

GO_APP_PASSWORD = "go-app-secret"


def go_hash(secret: str) -> str:
    """An app secret hashed as the Go project does (COMPAT.md parameters)."""
    hasher = PasswordHasher(time_cost=3, memory_cost=65536, parallelism=1, hash_len=32,
                            salt_len=16, type=Type.ID)
    return "{ARGON2ID}" + hasher.hash(secret)


def make_go_database(path: Path) -> Path:
    """A state.db as the Go project's mailcloakctl leaves it: d1.test and d2.test (enabled),
    d3.test (disabled); aliases; an app allowed to send as two addresses, one disabled."""
    con = sqlite3.connect(path)
    con.executescript(GO_SCHEMA)
    con.executemany("INSERT INTO domains(domain_name, enabled, updated_at) VALUES (?, ?, 1700000000)",
                    [("d1.test", 1), ("d2.test", 1), ("d3.test", 0)])
    con.executemany(
        "INSERT INTO aliases(alias_email, target_user, alias_domain_name, enabled, updated_at) "
        "VALUES (?, ?, ?, ?, 1700000000)",
        [("alias1@d1.test", "alice", "d1.test", 1),
         ("off@d1.test", "alice", "d1.test", 0),
         ("sales@d2.test", "bob", "d2.test", 1),
         ("old@d3.test", "alice", "d3.test", 1)],
    )
    con.execute("INSERT INTO apps(app_id, secret_hash, enabled, updated_at) VALUES (?, ?, 1, 1700000000)",
                ("Mailer", go_hash(GO_APP_PASSWORD)))
    con.executemany("INSERT INTO app_from(app_id, from_addr, enabled, updated_at) VALUES (?, ?, ?, 1700000000)",
                    [("Mailer", "noreply@d1.test", 1), ("Mailer", "billing@d1.test", 0)])
    con.commit()
    con.close()
    return path


class DaemonProcess:
    """`python -m mailcloak --config PATH` as a real process, with its stderr kept in a file."""

    def __init__(self, config_path: Path, log_path: Path | None = None):
        self.config_path = Path(config_path)
        self.config = yaml.safe_load(self.config_path.read_text())
        self.log_path = log_path or self.config_path.with_suffix(".log")
        self.proc: subprocess.Popen | None = None

    @property
    def policy_socket(self) -> str:
        return self.config["sockets"]["policy_socket"]

    @property
    def socketmap_socket(self) -> str:
        return self.config["sockets"]["socketmap_socket"]

    def start(self, timeout: float = 15) -> "DaemonProcess":
        self._log = open(self.log_path, "ab")
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "mailcloak", "--config", str(self.config_path)],
            stdout=self._log, stderr=self._log, env=env, cwd=REPO,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"daemon exited with {self.proc.returncode}:\n{self.log()}")
            if "ready" in self.log():
                return self
            time.sleep(0.05)
        raise RuntimeError(f"daemon not ready after {timeout}s:\n{self.log()}")

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def signal(self, signum: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(signum)

    def stop(self, timeout: float = 15) -> int:
        if self.proc is None:
            return 0
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        return self.proc.returncode


@contextlib.contextmanager
def running(service):
    """A daemon, Postfix or Dovecot (anything with start() returning itself, and stop()) started
    for the block and stopped after it, also when starting or the block fails: a fixture that
    yields inside it stops what it started whatever its tests did."""
    try:
        yield service.start()
    finally:
        service.stop()


def mailcloakctl(config: Path, *argv: str) -> None:
    """A mailcloakctl command that must succeed, on the store that `config` names (a daemon's).
    In this process (its `main`): a fixture that sets up a site saves an interpreter start each."""
    from mailcloak import ctl

    assert ctl.main(["--config", str(config), *argv]) == 0, argv


def policy_request(**attributes: str) -> bytes:
    """One policy request as Postfix frames it (only the given attributes plus `request`)."""
    lines = ["request=smtpd_access_policy"] + [f"{k}={v}" for k, v in attributes.items()]
    return ("\n".join(lines) + "\n\n").encode()


class PolicyClient:
    """A blocking client that keeps one connection, as Postfix's smtpd does."""

    def __init__(self, path: str, timeout: float = 10):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        self.sock.connect(path)
        self._buffer = b""

    def ask(self, **attributes: str) -> str:
        self.sock.sendall(policy_request(**attributes))
        return self.read_reply()

    def read_reply(self) -> str:
        while b"\n\n" not in self._buffer:
            chunk = self.sock.recv(4096)
            if not chunk:
                raise ConnectionError("policy server closed the connection")
            self._buffer += chunk
        reply, self._buffer = self._buffer.split(b"\n\n", 1)
        assert reply.startswith(b"action="), reply
        return reply[len(b"action="):].decode()

    def close(self) -> None:
        self.sock.close()


class SocketmapClient:
    def __init__(self, path: str, timeout: float = 10):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        self.sock.connect(path)
        self._buffer = b""

    def ask(self, key: str, map_name: str = "alias") -> str:
        payload = f"{map_name} {key}".encode()
        self.sock.sendall(b"%d:%s," % (len(payload), payload))
        return self.read_reply()

    def read_reply(self) -> str:
        while True:
            head, sep, rest = self._buffer.partition(b":")
            if sep and len(rest) > int(head):
                length = int(head)
                reply, self._buffer = rest[:length], rest[length + 1:]
                return reply.decode()
            chunk = self.sock.recv(4096)
            if not chunk:
                raise ConnectionError("socketmap server closed the connection")
            self._buffer += chunk

    def close(self) -> None:
        self.sock.close()
