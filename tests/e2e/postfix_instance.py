"""A real Postfix instance in a throwaway directory, for end-to-end tests.

Facts this relies on (measured with Postfix 3.7 on Debian 12, see the shared notes on running
Postfix here):

- `postfix start` must run as root; it writes its fatal errors to stderr only when stderr is a
  TTY, so it runs on a pty and its output is kept for the error message;
- `maillog_file` needs the `postlog` service and `maillog_file_prefixes`;
- `data_directory` must belong to user postfix; `queue_directory` must exist (root, 0755), its
  subdirectories are created and chowned by postfix-script;
- Postfix re-reads a config file whose mtime is under ~1 s old, sleeping 300 ms each time, so
  main.cf/master.cf are backdated after writing;
- `alias_maps`/`alias_database` are emptied (Debian's default points at the system aliases db);
- every service runs unchrooted (column 5 = n), so absolute socket paths work;
- user postfix must traverse every directory above the daemon's sockets (mkdtemp is 0700);
- the master daemonizes: stop it by the PID in `$queue_directory/pid/master.pid` (it leads its
  own process group), then SIGKILL whatever is still alive in that group.

`PostfixInstance` takes extra main.cf parameters and extra master.cf lines, so that a later test
module can add `smtpd_sasl_*` settings (Dovecot SASL) or more listeners without changing this file.
"""

from __future__ import annotations

import os
import pty
import pwd
import re
import select
import shutil
import signal
import smtplib
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

POSTFIX = "/usr/sbin/postfix"
POSTCONF = "/usr/sbin/postconf"
POSTMAP = "/usr/sbin/postmap"

# The stock internal services, all unchrooted. `postlog` is what makes maillog_file work.
INTERNAL_SERVICES = """\
pickup    unix  n       -       n       60      1       pickup
cleanup   unix  n       -       n       -       0       cleanup
qmgr      unix  n       -       n       300     1       qmgr
rewrite   unix  -       -       n       -       -       trivial-rewrite
bounce    unix  -       -       n       -       0       bounce
defer     unix  -       -       n       -       0       bounce
trace     unix  -       -       n       -       0       bounce
verify    unix  -       -       n       -       1       verify
flush     unix  n       -       n       1000?   0       flush
proxymap  unix  -       -       n       -       -       proxymap
proxywrite unix -       -       n       -       1       proxymap
smtp      unix  -       -       n       -       -       smtp
relay     unix  -       -       n       -       -       smtp
showq     unix  n       -       n       -       -       showq
error     unix  -       -       n       -       -       error
retry     unix  -       -       n       -       -       error
discard   unix  -       -       n       -       -       discard
anvil     unix  -       -       n       -       1       anvil
scache    unix  -       -       n       -       1       scache
postlog   unix-dgram n  -       n       -       1       postlogd
"""


def postfix_unavailable_reason() -> str | None:
    """Why real Postfix cannot be driven here, or None when it can."""
    hint = "run `make test` as root to install it"
    for tool in (POSTFIX, POSTCONF, POSTMAP):
        if not os.access(tool, os.X_OK):
            return f"real Postfix not installed ({tool} missing): {hint}"
    if os.geteuid() != 0:
        return f"real Postfix needs root to start (`postfix start` is reserved for the superuser): {hint}"
    try:
        pwd.getpwnam("postfix")
    except KeyError:
        return f"real Postfix not installed (no user 'postfix'): {hint}"
    return None


def world_readable_tmpdir(prefix: str) -> Path:
    """A fresh directory under /tmp that user postfix may traverse (mkdtemp makes it 0700)."""
    path = Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))
    path.chmod(0o755)
    return path


def free_ports(count: int) -> list[int]:
    """`count` distinct TCP ports free on 127.0.0.1 right now (all held until all are chosen)."""
    sockets = []
    try:
        for _ in range(count):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            sockets.append(s)
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def run_on_pty(argv: list[str], timeout: float = 60) -> tuple[int, str]:
    """Run a command with stdin/stdout/stderr on a pty; return (exit code, output)."""
    master_fd, slave_fd = pty.openpty()
    try:
        proc = subprocess.Popen(argv, stdin=slave_fd, stdout=slave_fd, stderr=slave_fd,
                                start_new_session=True)
    finally:
        os.close(slave_fd)
    output = b""
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([master_fd], [], [], 0.1)
            if ready:
                try:
                    chunk = os.read(master_fd, 4096)
                except OSError:  # EIO: every writer closed the pty
                    chunk = b""
                if chunk:
                    output += chunk
                    continue
                if proc.poll() is not None:
                    break
            elif proc.poll() is not None:
                break
        else:
            proc.kill()
        rc = proc.wait(timeout=5)
    finally:
        os.close(master_fd)
    return rc, output.decode(errors="replace").replace("\r\n", "\n")


def _process_groups() -> dict[int, tuple[int, str]]:
    """pid -> (process group, state letter) for every process, read from /proc."""
    result = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        # "pid (comm) state ppid pgrp ..."; comm may contain spaces and parentheses.
        fields = stat[stat.rfind(")") + 2:].split()
        result[int(entry)] = (int(fields[2]), fields[0])
    return result


def _alive(pid: int) -> bool:
    state = _process_groups().get(pid)
    return state is not None and state[1] not in ("Z", "X")


@dataclass
class Listener:
    """One `smtpd` line of master.cf: `name` is used in syslog_name, `options` are -o pairs."""

    name: str
    options: dict[str, str] = field(default_factory=dict)
    port: int = 0


class PostfixInstance:
    """Postfix with its own config, queue, data directory and maillog under `root`.

    Main.cf parameters can be added or replaced with `main_cf`; extra master.cf lines go in
    `services`. Every listener is an unchrooted smtpd on 127.0.0.1 and a port chosen at start.
    """

    def __init__(self, root: Path, *, policy_socket: str, socketmap_socket: str,
                 listeners: list[Listener] | None = None, main_cf: dict[str, str] | None = None,
                 services: list[str] | None = None):
        self.root = Path(root)
        self.config_dir = self.root / "postfix"
        self.queue_dir = self.root / "postfix-spool"
        self.data_dir = self.root / "postfix-data"
        self.maillog_path = self.root / "maillog"
        self.policy_socket = policy_socket
        self.socketmap_socket = socketmap_socket
        self.listeners = listeners or [Listener("smtpd")]
        self.extra_main_cf = dict(main_cf or {})
        self.extra_services = list(services or [])
        self.master_pid: int | None = None
        self.start_output = ""

    # -- configuration -------------------------------------------------------------------

    @property
    def socketmap_alias(self) -> str:
        return f"socketmap:unix:{self.socketmap_socket}:alias"

    def main_cf(self) -> dict[str, str]:
        meta = subprocess.run([POSTCONF, "-dh", "meta_directory"], check=True,
                              capture_output=True, text=True).stdout.strip()
        params = {
            "compatibility_level": "3.6",
            "config_directory": str(self.config_dir),
            "queue_directory": str(self.queue_dir),
            "data_directory": str(self.data_dir),
            "meta_directory": meta,
            "maillog_file": str(self.maillog_path),
            "maillog_file_prefixes": str(self.root),
            "myhostname": "mx.e2e.test",
            "mydomain": "e2e.test",
            "myorigin": "$myhostname",
            "mydestination": "",
            "alias_maps": "",
            "alias_database": "",
            "mynetworks": "",
            "relay_domains": "",
            "inet_interfaces": "127.0.0.1",
            "inet_protocols": "ipv4",
            "smtpd_peername_lookup": "no",
            "smtpd_tls_security_level": "none",
            "smtp_tls_security_level": "none",
            "biff": "no",
            "recipient_delimiter": "+",
            "virtual_mailbox_domains": "d1.test d2.test",
            # virtual_mailbox_maps stays unset: every local part would be accepted by Postfix
            # itself, so recipient validation is entirely the policy's (SPEC §6 row 2).
            "virtual_alias_maps": self.socketmap_alias,
            # virtual_alias_domains keeps its default ($virtual_alias_maps) on purpose: Postfix
            # then asks the socketmap about bare domains, which the daemon must answer NOTFOUND.
            # Nothing ever leaves the machine: every transport is discard(8).
            "virtual_transport": "discard:virtual-delivered",
            "default_transport": "discard:outbound-delivered",
            "relay_transport": "discard:relay-delivered",
            "local_transport": "discard:local-delivered",
            # The policy check, named once so master.cf -o options can reuse it.
            "mailcloak_policy": f"check_policy_service unix:{self.policy_socket}",
            # Policy first, then Postfix's own relay check. Safe because the policy never answers
            # OK (SPEC §6): after its DUNNO, reject_unauth_destination still runs; and placing
            # it first makes the policy's own answer the one the client sees for a non-local
            # recipient (row 3) instead of Postfix's "554 5.7.1 Relay access denied". The
            # listener "relayfirst" below keeps the conventional order (smtpd_relay_restrictions
            # evaluated before the policy) to show what that layout answers.
            "smtpd_relay_restrictions": "",
            "smtpd_recipient_restrictions":
                "$mailcloak_policy, permit_sasl_authenticated, reject_unauth_destination",
        }
        params.update(self.extra_main_cf)
        return params

    def master_cf(self) -> str:
        lines = []
        for listener in self.listeners:
            options = dict(listener.options)
            if listener.name != "smtpd":  # its log lines then read "postfix/<name>/smtpd[pid]"
                options = {"syslog_name": f"postfix/{listener.name}", **options}
            opts = "".join(f"\n  -o {k}={v}" for k, v in options.items())
            lines.append(f"127.0.0.1:{listener.port} inet n - n - - smtpd{opts}")
        return "\n".join(lines) + "\n" + INTERNAL_SERVICES + "".join(
            line.rstrip("\n") + "\n" for line in self.extra_services)

    def port(self, name: str = "smtpd") -> int:
        for listener in self.listeners:
            if listener.name == name:
                return listener.port
        raise KeyError(name)

    # -- life cycle ----------------------------------------------------------------------

    def start(self, timeout: float = 30) -> "PostfixInstance":
        for listener, port in zip(self.listeners, free_ports(len(self.listeners))):
            listener.port = port
        for directory in (self.root, self.config_dir, self.queue_dir, self.data_dir):
            directory.mkdir(parents=True, exist_ok=True)
            directory.chmod(0o755)
        postfix_user = pwd.getpwnam("postfix")
        os.chown(self.data_dir, postfix_user.pw_uid, postfix_user.pw_gid)
        main = "".join(f"{k} = {v}\n" for k, v in self.main_cf().items())
        (self.config_dir / "main.cf").write_text(main)
        (self.config_dir / "master.cf").write_text(self.master_cf())
        past = time.time() - 60
        for name in ("main.cf", "master.cf"):
            os.utime(self.config_dir / name, (past, past))

        rc, self.start_output = run_on_pty([POSTFIX, "-c", str(self.config_dir), "start"])
        if rc != 0:
            raise RuntimeError(f"`postfix start` exited {rc}:\n{self.start_output}\n{self.maillog()}")
        pid_file = self.queue_dir / "pid" / "master.pid"
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                self.master_pid = int(pid_file.read_text().split()[0])
                break
            except (OSError, ValueError, IndexError):
                time.sleep(0.05)
        else:
            raise RuntimeError(f"no {pid_file} after {timeout}s:\n{self.start_output}\n{self.maillog()}")
        for listener in self.listeners:
            self._wait_for_banner(listener.port, deadline)
        return self

    def _wait_for_banner(self, port: int, deadline: float) -> None:
        last_error: Exception | None = None
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
                    if s.recv(512).startswith(b"220"):
                        s.sendall(b"QUIT\r\n")
                        return
            except OSError as exc:
                last_error = exc
            time.sleep(0.05)
        raise RuntimeError(f"no SMTP banner on port {port}: {last_error}\n{self.maillog()}")

    def stop(self, timeout: float = 10) -> None:
        """SIGTERM the master, wait, then SIGKILL anything left in its process group."""
        pid = self.master_pid
        if pid is None:
            try:
                pid = int((self.queue_dir / "pid" / "master.pid").read_text().split()[0])
            except (OSError, ValueError, IndexError):
                return
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and _alive(pid):
            time.sleep(0.05)
        for other, (group, state) in _process_groups().items():
            if group == pid and state not in ("Z", "X"):
                try:
                    os.kill(other, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        self.master_pid = None

    def remove(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)

    # -- observation ---------------------------------------------------------------------

    def maillog(self) -> str:
        try:
            return self.maillog_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def wait_for_log(self, pattern: str, timeout: float = 10) -> re.Match:
        """The first maillog match of the regular expression `pattern`, polling until `timeout`."""
        regex = re.compile(pattern, re.MULTILINE)
        deadline = time.monotonic() + timeout
        while True:
            match = regex.search(self.maillog())
            if match:
                return match
            if time.monotonic() >= deadline:
                raise AssertionError(f"no maillog line matches {pattern!r} within {timeout}s:\n"
                                     f"{self.maillog()}")
            time.sleep(0.1)

    def wait_for_delivery(self, queue_id: str, timeout: float = 10) -> list[str]:
        """The maillog lines of `queue_id`'s deliveries, once the queue manager removed it."""
        self.wait_for_log(rf"\b{re.escape(queue_id)}: removed$", timeout)
        return [line for line in self.maillog().splitlines()
                if f" {queue_id}: to=<" in line]

    def postmap_query(self, key: str, table: str | None = None) -> subprocess.CompletedProcess:
        return subprocess.run(
            [POSTMAP, "-c", str(self.config_dir), "-q", key, table or self.socketmap_alias],
            capture_output=True, text=True, timeout=30)

    def smtp(self, listener: str = "smtpd") -> smtplib.SMTP:
        client = smtplib.SMTP("127.0.0.1", self.port(listener), timeout=30)
        client.ehlo("client.e2e.test")
        return client
