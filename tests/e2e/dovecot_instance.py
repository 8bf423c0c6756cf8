"""A real Dovecot 2.3 in a throwaway directory, set up with the files mailcloak ships.

The instance `!include`s `dovecot/2.3/10-mailcloak.conf` (the administrators' snippet, with its
two /etc/dovecot paths pointed at the repository's `dovecot/mailcloak.lua` and a copy of
`dovecot/2.3/mailcloak-oauth2.conf.ext` whose URL names the test daemon), and the Lua script
finds its settings through MAILCLOAK_DOVECOT_LUA_CONF, as an administrator's would.

Facts this relies on (measured with Dovecot 2.3.19 on Debian 12, see the shared notes):

- the master must start as root; `-F` keeps it our child, in its own session, so it is stopped by
  PID (SIGTERM, then SIGKILL of whatever is left in its process group);
- `base_dir` must be fresh: a stale `anvil-auth-penalty` socket costs ~5 s per auth;
- the anvil auth penalty (2, 4, 8 … s after failures) is switched off by not creating its
  listener (`mode = 0`), and `auth_failure_delay = 0`; Dovecot 2.3 still flushes failures on a
  500 ms timer, so every failed auth costs up to ~0.5 s;
- `doveadm -c <conf> auth test` talks to this instance's auth-client socket (exit 0 = success,
  77 = failure);
- the auth listener for Postfix is `auth-postfix` in base_dir, mode 0666 here (the test root is
  0755 so user postfix can reach it).
"""

from __future__ import annotations

import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

from postfix_instance import _alive, _process_groups, free_ports

REPO = Path(__file__).resolve().parents[2]
LUA_SCRIPT = REPO / "dovecot" / "mailcloak.lua"
SNIPPET_23 = REPO / "dovecot" / "2.3" / "10-mailcloak.conf"
OAUTH2_EXT_23 = REPO / "dovecot" / "2.3" / "mailcloak-oauth2.conf.ext"

DOVECOT = "/usr/sbin/dovecot"
DOVEADM = "/usr/bin/doveadm"
LUA_PLUGIN = "/usr/lib/dovecot/modules/auth/libauthdb_lua.so"


def dovecot_unavailable_reason() -> str | None:
    """Why a real Dovecot 2.3 with the Lua passdb cannot be driven here, or None when it can."""
    hint = "run `make test` as root to install dovecot-core, dovecot-auth-lua and dovecot-imapd"
    for path in (DOVECOT, DOVEADM):
        if not os.access(path, os.X_OK):
            return f"real Dovecot not installed ({path} missing): {hint}"
    if not os.path.exists(LUA_PLUGIN):
        return f"Dovecot's Lua passdb is not installed ({LUA_PLUGIN} missing): {hint}"
    if os.geteuid() != 0:
        return f"real Dovecot needs root to start: {hint}"
    for user in ("dovecot", "dovenull"):
        try:
            pwd.getpwnam(user)
        except KeyError:
            return f"real Dovecot not installed (no user {user!r}): {hint}"
    version = subprocess.run([DOVECOT, "--version"], capture_output=True, text=True).stdout
    match = re.match(r"(\d+)\.(\d+)\.(\d+)", version)
    if not match or not (2, 3, 19) <= tuple(map(int, match.groups())) < (2, 4, 0):
        return f"these tests drive Dovecot 2.3.19+ (2.3 syntax); found {version.strip() or '?'}"
    return None


class DovecotInstance:
    """Dovecot with its own config, base_dir, state, mail and log under `root`.

    `daemon_url` is the mailcloak daemon's HTTP base URL; `secret_file` its shared secret (or
    None). With `imap=True` an IMAP listener on 127.0.0.1 (port chosen at start) is added.
    """

    def __init__(self, root: Path, *, daemon_url: str, secret_file: str | None = None,
                 imap: bool = True, extra_conf: str = ""):
        self.root = Path(root)
        self.daemon_url = daemon_url.rstrip("/")
        self.secret_file = secret_file
        self.imap = imap
        self.extra_conf = extra_conf
        self.conf_path = self.root / "dovecot.conf"
        self.lua_conf_path = self.root / "dovecot-lua.conf"
        self.log_path = self.root / "dovecot.log"
        self.base_dir = self.root / "run"
        self.auth_postfix_socket = self.base_dir / "auth-postfix"
        self.imap_port = 0
        self.proc: subprocess.Popen | None = None

    # -- configuration -------------------------------------------------------------------

    def snippet(self) -> str:
        """The shipped 2.3 snippet, its /etc paths pointed at this instance's files."""
        text = SNIPPET_23.read_text()
        text = text.replace("/etc/dovecot/mailcloak.lua", str(LUA_SCRIPT))
        text = text.replace("/etc/dovecot/mailcloak-oauth2.conf.ext", str(self.root / "oauth2.conf.ext"))
        return text

    def oauth2_ext(self) -> str:
        return OAUTH2_EXT_23.read_text().replace("http://127.0.0.1:8425", self.daemon_url)

    def lua_conf(self) -> str:
        lines = [f"url={self.daemon_url}"]
        if self.secret_file:
            lines.append(f"secret_file={self.secret_file}")
        return "# written by tests/e2e/dovecot_instance.py\n" + "\n".join(lines) + "\n"

    def dovecot_conf(self) -> str:
        root = self.root
        imap = ""
        if self.imap:
            imap = f"""
service imap-login {{
  inet_listener imap {{
    address = 127.0.0.1
    port = {self.imap_port}
  }}
  inet_listener imaps {{
    port = 0
  }}
}}
"""
        return f"""\
# written by tests/e2e/dovecot_instance.py
base_dir = {self.base_dir}
state_dir = {root}/state
instance_name = mailcloak-e2e-{root.name}
log_path = {self.log_path}
protocols = {"imap" if self.imap else ""}
listen = 127.0.0.1
ssl = no
disable_plaintext_auth = no
auth_failure_delay = 0
auth_debug = yes
auth_verbose = yes
mail_location = maildir:{root}/mail/%u
first_valid_uid = 1

!include {root}/10-mailcloak.conf

userdb {{
  driver = static
  args = uid=dovecot gid=dovecot home={root}/mail/%u allow_all_users=yes
}}
service auth {{
  unix_listener auth-postfix {{
    mode = 0666
  }}
}}
service anvil {{
  unix_listener anvil-auth-penalty {{
    mode = 0
  }}
}}
{imap}
{self.extra_conf}
"""

    # -- life cycle ----------------------------------------------------------------------

    def start(self, timeout: float = 20) -> "DovecotInstance":
        if self.imap:
            (self.imap_port,) = free_ports(1)
        if self.base_dir.exists():
            shutil.rmtree(self.base_dir)
        for directory in (self.root, self.root / "state", self.root / "mail"):
            directory.mkdir(parents=True, exist_ok=True)
            directory.chmod(0o755)
        dovecot_user = pwd.getpwnam("dovecot")
        os.chown(self.root / "mail", dovecot_user.pw_uid, dovecot_user.pw_gid)
        (self.root / "10-mailcloak.conf").write_text(self.snippet())
        (self.root / "oauth2.conf.ext").write_text(self.oauth2_ext())
        self.lua_conf_path.write_text(self.lua_conf())
        self.conf_path.write_text(self.dovecot_conf())
        check = subprocess.run([DOVECOT, "-c", str(self.conf_path), "-n"],
                               capture_output=True, text=True)
        if check.returncode != 0:
            raise RuntimeError(f"dovecot -n refused the config:\n{check.stderr}")
        env = {**os.environ, "MAILCLOAK_DOVECOT_LUA_CONF": str(self.lua_conf_path)}
        self._stderr = open(self.root / "dovecot.stderr", "ab")
        self.proc = subprocess.Popen([DOVECOT, "-F", "-c", str(self.conf_path)], env=env,
                                     stdout=self._stderr, stderr=self._stderr,
                                     start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"dovecot exited with {self.proc.returncode}:\n{self.log()}")
            if (self.base_dir / "auth-client").exists() and self.auth_postfix_socket.exists() \
                    and (not self.imap or self._imap_ready()):
                return self
            time.sleep(0.05)
        raise RuntimeError(f"dovecot not ready after {timeout}s:\n{self.log()}")

    def _imap_ready(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.imap_port), timeout=2) as s:
                return s.recv(512).startswith(b"* OK")
        except OSError:
            return False

    def stop(self, timeout: float = 10) -> None:
        if self.proc is None:
            return
        pid = self.proc.pid
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        for other, (group, state) in _process_groups().items():
            if group == pid and state not in ("Z", "X") and _alive(other):
                try:
                    os.kill(other, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        self._stderr.close()
        self.proc = None

    # -- use -----------------------------------------------------------------------------

    def auth_test(self, user: str, password: str, **fields: str) -> subprocess.CompletedProcess:
        """`doveadm auth test -x k=v ... user password` against this instance (PLAIN)."""
        argv = [DOVEADM, "-c", str(self.conf_path), "auth", "test"]
        for key, value in fields.items():
            argv += ["-x", f"{key}={value}"]
        argv += [user, password]
        return subprocess.run(argv, capture_output=True, text=True, timeout=60)

    def flush_auth_cache(self) -> None:
        subprocess.run([DOVEADM, "-c", str(self.conf_path), "auth", "cache", "flush"],
                       capture_output=True, text=True, timeout=30)

    def log(self) -> str:
        text = ""
        for path in (self.root / "dovecot.stderr", self.log_path):
            try:
                text += path.read_text(errors="replace")
            except FileNotFoundError:
                pass
        return text
