"""Dropping root after the sockets are bound."""

from __future__ import annotations

import logging
import os
import pwd

from mailcloak.errors import ConfigError

log = logging.getLogger(__name__)


def drop_privileges(user: str) -> None:
    """Become `user` (its uid, primary gid and groups) when running as root.

    Not root: nothing to drop; a different configured user is only noted. Root with an empty
    `daemon.user`: keeps root, with a warning.
    """
    if os.geteuid() != 0:
        if user and pwd.getpwuid(os.geteuid()).pw_name != user:
            log.info("not started as root: running as the current user, not daemon.user %s", user)
        return
    if not user:
        log.warning("daemon.user is empty: running as root")
        return
    try:
        entry = pwd.getpwnam(user)
    except KeyError:
        raise ConfigError(f"daemon.user: no such user {user!r}") from None
    os.initgroups(user, entry.pw_gid)
    os.setgid(entry.pw_gid)
    os.setuid(entry.pw_uid)
    if os.getuid() != entry.pw_uid or os.geteuid() != entry.pw_uid:
        raise ConfigError(f"could not drop privileges to {user}")  # pragma: no cover
    log.info("dropped privileges to %s (uid %d, gid %d)", user, entry.pw_uid, entry.pw_gid)
