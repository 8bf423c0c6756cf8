"""Configuration: YAML loaded into frozen dataclasses.

Each section is a dataclass; the loader walks the YAML against the dataclass fields, so an unknown
key or a wrong type fails with its dotted name (``sockets.socket_mode``) before anything starts.
Keys of the Go daemon's older configs are mapped onto the current ones first (see
``_map_legacy_keys``). Relative paths are taken relative to the current working directory, as a
shell user would expect.
"""

from __future__ import annotations

import dataclasses
import functools
import ipaddress
import logging
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit, urlunsplit

import yaml

from mailcloak.errors import ConfigError

log = logging.getLogger(__name__)

DEFAULT_CONFIG_PATH = "/etc/mailcloak/config.yaml"
DEFAULT_DB_PATH = "/var/lib/mailcloak/state.db"


@dataclass(frozen=True)
class KeycloakConfig:
    base_url: str
    realm: str
    client_id: str
    client_secret: str
    cache_ttl_seconds: float = 120
    negative_cache_ttl_seconds: float = 30
    stale_if_error_seconds: float = 600
    cache_max_entries: int = 100_000
    connect_timeout_seconds: float = 2
    request_timeout_seconds: float = 3
    alias_attribute: str = ""
    # Groups as distribution lists (README "Distribution lists"): a group whose `list_attribute`
    # holds an address receives for its enabled members; `list_senders_attribute` holds its
    # sender rule (absent or "members", "nobody", or the usernames allowed). Empty: off.
    list_attribute: str = ""
    list_senders_attribute: str = "mailListSenders"


@dataclass(frozen=True)
class AuthentikConfig:
    base_url: str
    api_token: str
    cache_ttl_seconds: float = 120
    negative_cache_ttl_seconds: float = 30
    stale_if_error_seconds: float = 600
    cache_max_entries: int = 100_000
    connect_timeout_seconds: float = 2
    request_timeout_seconds: float = 3


@dataclass(frozen=True)
class StaticUser:
    username: str
    email: str
    enabled: bool = True


@dataclass(frozen=True)
class StaticList:
    """A distribution list of the static provider (as a Keycloak group list, for demos/tests)."""

    address: str
    members: tuple[str, ...] = ()   # usernames of `users`
    send_policy: Literal["members", "nobody", "listed"] = "members"
    senders: tuple[str, ...] = ()   # usernames, for send_policy "listed"


@dataclass(frozen=True)
class StaticConfig:
    users: tuple[StaticUser, ...] = ()
    lists: tuple[StaticList, ...] = ()


@dataclass(frozen=True)
class IdPConfig:
    provider: Literal["keycloak", "authentik", "static"] = "keycloak"
    keycloak: KeycloakConfig | None = None
    authentik: AuthentikConfig | None = None
    static: StaticConfig | None = None


@dataclass(frozen=True)
class SQLiteConfig:
    path: str = DEFAULT_DB_PATH
    # How often the daemon asks SQLite whether another process committed (PRAGMA data_version).
    poll_interval_seconds: float = 0.5
    # How long a read or write waits for a lock held by another writer before giving up.
    busy_timeout_seconds: float = 2


@dataclass(frozen=True)
class StoreConfig:
    # sqlite: one host, the database file of `sqlite.path`. postgres: several hosts sharing the
    # database of `postgres.dsn` (README "Choosing a store").
    backend: Literal["sqlite", "postgres"] = "sqlite"


@dataclass(frozen=True)
class PostgresConfig:
    # libpq-style URI or key=value string. A password in it is never logged (masked as ***).
    dsn: str
    # A file holding only the password (one line), so the config file can stay readable; it
    # replaces a password in the DSN.
    password_file: str = ""
    # Connections each process keeps open for reads and writes (plus one for LISTEN).
    pool_size: int = 4
    # A statement (or a wait for the write lock) that takes longer is cancelled: StoreError.
    statement_timeout_seconds: float = 5
    connect_timeout_seconds: float = 3

    def password(self) -> str | None:
        """The password of `password_file`, or None to use the DSN's own (or PGPASSWORD)."""
        if not self.password_file:
            return None
        try:
            text = Path(self.password_file).read_text(encoding="utf-8")
        except OSError as exc:
            raise ConfigError(
                f"postgres.password_file: cannot read {self.password_file}: {exc.strerror}"
            ) from None
        return text.rstrip("\r\n")

    @property
    def location(self) -> str:
        return mask_dsn(self.dsn)


def mask_dsn(dsn: str) -> str:
    """The DSN with its password replaced by ***, for messages and logs."""
    if "://" in dsn:
        parts = urlsplit(dsn)
        if parts.password is not None:
            host = parts.netloc.rpartition("@")[2]
            parts = parts._replace(netloc=f"{parts.username or ''}:***@{host}")
        query = re.sub(r"(?i)(^|&)(password=)[^&]*", r"\1\2***", parts.query)
        return urlunsplit(parts._replace(query=query))
    return re.sub(r"(?i)(\bpassword\s*=\s*)('(?:[^'\\]|\\.)*'|\S+)", r"\1***", dsn)


@dataclass(frozen=True)
class PolicyConfig:
    idp_failure_mode: Literal["tempfail", "dunno"] = "tempfail"
    recipient_delimiter: str = "+"
    # A policy request is always answered within this many seconds, even when the IdP hangs.
    request_deadline_seconds: float = 5
    # Obsolete single-domain key of the Go daemon: treated as one more enabled local domain.
    domain: str = ""

    @property
    def extra_local_domains(self) -> frozenset[str]:
        """Domains local by config rather than by the `domains` table (legacy `policy.domain`)."""
        return frozenset({self.domain.strip().lower()}) if self.domain.strip() else frozenset()


@dataclass(frozen=True)
class SocketsConfig:
    policy_socket: str = "/var/spool/postfix/private/mailcloak-policy"
    socketmap_socket: str = "/var/spool/postfix/private/mailcloak-socketmap"
    socket_owner_user: str = ""
    socket_owner_group: str = ""
    socket_mode: str = "0660"
    # Time a connection may stay silent between requests. Postfix closes idle policy connections
    # after 300 s and socketmap ones after 10 s, so the default lets Postfix close first.
    idle_timeout_seconds: float = 330
    # Time a started request may take to arrive completely (defeats a byte-a-second client).
    request_timeout_seconds: float = 10
    # Connections served at once per socket; more wait in the kernel backlog.
    max_connections: int = 512

    @property
    def mode(self) -> int:
        return int(self.socket_mode, 8)


@dataclass(frozen=True)
class DaemonConfig:
    # Privileges are dropped to this user after binding when started as root; "" keeps root.
    user: str = "mailcloak"
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    log_format: Literal["text", "json"] = "text"
    # Level of the one line logged per policy decision (debug keeps the hot path quiet).
    decision_log_level: Literal["debug", "info"] = "debug"
    # Bound on the wait for in-flight requests at SIGTERM.
    shutdown_grace_seconds: float = 5


@dataclass(frozen=True)
class HTTPConfig:
    # "127.0.0.1:PORT", "[::1]:PORT" or "unix:PATH"; empty means no HTTP listener.
    listen: str = ""
    shared_secret_file: str = ""


@dataclass(frozen=True)
class PassdbConfig:
    """App-password logins (mailcloak.apps_auth, mailcloak.app_usage); README "Passdb settings"."""

    # A successful argon2id verification is remembered this long (0: off, every login verifies).
    verify_cache_seconds: float = 60
    verify_cache_entries: int = 10_000
    # Failures of one (login, remote IP) that cost nothing extra; then each attempt waits
    # base_delay * 2**(failures - free_failures), at most max_delay, before it is checked.
    throttle_free_failures: int = 3
    throttle_base_delay_seconds: float = 0.5
    throttle_max_delay_seconds: float = 5
    # A pair with no failure for this long starts afresh; at most max_entries pairs are tracked.
    throttle_forget_after_seconds: float = 900
    throttle_max_entries: int = 10_000
    # How often the apps' last use is written to the database (and once more at stop).
    last_use_flush_seconds: float = 30


# Bounds of the passdb keys: (smallest, largest) allowed, with why in the error when it matters.
_PASSDB_BOUNDS: dict[str, tuple[float, float, str]] = {
    "verify_cache_seconds": (0, 3600, ""),
    "verify_cache_entries": (1, 1_000_000, ""),
    "throttle_free_failures": (0, 1000, ""),
    "throttle_base_delay_seconds": (0, 8, ""),
    "throttle_max_delay_seconds": (0, 8, " (the Lua passdb script gives up after 10 s)"),
    "throttle_forget_after_seconds": (1, 86_400, ""),
    "throttle_max_entries": (1, 1_000_000, ""),
    "last_use_flush_seconds": (1, 3600, ""),
}


@dataclass(frozen=True)
class Config:
    idp: IdPConfig = field(default_factory=IdPConfig)
    sqlite: SQLiteConfig = field(default_factory=SQLiteConfig)
    store: StoreConfig = field(default_factory=StoreConfig)
    postgres: PostgresConfig | None = None
    policy: PolicyConfig = field(default_factory=PolicyConfig)
    sockets: SocketsConfig = field(default_factory=SocketsConfig)
    daemon: DaemonConfig = field(default_factory=DaemonConfig)
    http: HTTPConfig = field(default_factory=HTTPConfig)
    passdb: PassdbConfig = field(default_factory=PassdbConfig)
    source: str = ""  # the file it came from, for messages; not a YAML key

    @property
    def store_location(self) -> str:
        """The configured database for messages: the SQLite path or the masked DSN."""
        if self.store.backend == "postgres":
            return self.postgres.location
        return self.sqlite.path


# libyaml's safe loader where PyYAML was built with it: the same documents and types, about 10 x
# faster (a static provider's 1000 users: 0.2 s of every start and SIGHUP with the Python one).
_SAFE_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def load_config(path: str | Path) -> Config:
    """Read, map legacy keys, validate. Raises ConfigError with one clear line."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from None
    return parse_config(text, source=str(path))


def parse_config(text: str, source: str = "<string>") -> Config:
    try:
        data = yaml.load(text, Loader=_SAFE_LOADER)
    except yaml.YAMLError as exc:
        where = getattr(exc, "problem_mark", None)
        line = f" at line {where.line + 1}" if where is not None else ""
        raise ConfigError(f"{source}: not valid YAML{line}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: the top level must be a mapping of sections")
    try:
        data = _map_legacy_keys(data)
        config = _build(Config, data, "")
    except ConfigError as exc:
        raise ConfigError(f"{source}: {exc}") from None
    config = dataclasses.replace(config, source=source)
    try:
        _validate_store(config)
        _validate(config)
    except ConfigError as exc:
        raise ConfigError(f"{source}: {exc}") from None
    return config


def _map_legacy_keys(data: dict[str, Any]) -> dict[str, Any]:
    """Map the Go daemon's older keys onto the current ones; a conflict between both is an error."""
    data = dict(data)
    idp = data.get("idp")
    idp = dict(idp) if isinstance(idp, dict) else idp
    if "keycloak" in data:
        legacy = data.pop("keycloak")
        if idp is None:
            idp = {}
        if isinstance(idp, dict):
            if "keycloak" in idp:
                raise ConfigError("both the legacy top-level 'keycloak' and 'idp.keycloak' are set; keep one")
            idp.setdefault("provider", "keycloak")
            idp["keycloak"] = legacy
    policy = data.get("policy")
    if isinstance(policy, dict):
        policy = dict(policy)
        if "keycloak_failure_mode" in policy:
            legacy = policy.pop("keycloak_failure_mode")
            if "idp_failure_mode" in policy and policy["idp_failure_mode"] != legacy:
                raise ConfigError(
                    "policy.keycloak_failure_mode (legacy) and policy.idp_failure_mode disagree; keep one"
                )
            policy["idp_failure_mode"] = legacy
        if "cache_ttl_seconds" in policy:
            ttl = policy.pop("cache_ttl_seconds")
            if isinstance(idp, dict):
                for name in ("keycloak", "authentik"):
                    section = idp.get(name)
                    if isinstance(section, dict):
                        if "cache_ttl_seconds" in section and section["cache_ttl_seconds"] != ttl:
                            raise ConfigError(
                                f"policy.cache_ttl_seconds (legacy) and idp.{name}.cache_ttl_seconds "
                                "disagree; keep one"
                            )
                        idp[name] = {"cache_ttl_seconds": ttl, **section}
        data["policy"] = policy
    if idp is not None:
        data["idp"] = idp
    return data


def _type_name(tp: Any) -> str:
    if tp is bool:
        return "a boolean"
    if tp is int:
        return "an integer"
    if tp is float:
        return "a number"
    if tp is str:
        return "a string"
    if dataclasses.is_dataclass(tp):
        return "a mapping"
    return str(tp)


def _optional(tp: Any) -> bool:
    return typing.get_origin(tp) in (typing.Union, types.UnionType) and type(None) in typing.get_args(tp)


# A section's annotations, resolved once per class (not once per list item: 1000 static users
# took 70 ms to resolve again and again).
_type_hints = functools.cache(typing.get_type_hints)


def _build(tp: Any, value: Any, path: str) -> Any:
    """Turn parsed YAML into the annotated type, naming `path` in every error."""
    name = path or "the top level"
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
        return _build(args[0], value, path)
    if origin is Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            raise ConfigError(f"{name} must be one of {', '.join(map(str, choices))} (got {value!r})")
        return value
    if origin is tuple:
        (item_tp, _ellipsis) = typing.get_args(tp)
        if value is None:
            return ()
        if not isinstance(value, list):
            raise ConfigError(f"{name} must be a list")
        return tuple(_build(item_tp, item, f"{path}[{i}]") for i, item in enumerate(value))
    if dataclasses.is_dataclass(tp):
        if value is None:
            value = {}
        if not isinstance(value, dict):
            raise ConfigError(f"{name} must be a mapping")
        hints = _type_hints(tp)
        known = {f.name: f for f in dataclasses.fields(tp) if f.name != "source"}
        kwargs = {}
        for key, item in value.items():
            dotted = f"{path}.{key}" if path else str(key)
            if key not in known:
                raise ConfigError(f"unknown key {dotted}")
            if item is None and not _optional(hints[key]):
                continue  # `key:` with no value means the default, never "" (daemon.user: keeps root)
            kwargs[key] = _build(hints[key], item, dotted)
        for fname, f in known.items():
            if fname in kwargs:
                continue
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                dotted = f"{path}.{fname}" if path else fname
                raise ConfigError(f"missing key {dotted}")
        return tp(**kwargs)
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ConfigError(f"{name} must be {_type_name(tp)} (got {value!r})")
        if value < 0:
            raise ConfigError(f"{name} must not be negative (got {value!r})")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{name} must be {_type_name(tp)} (got {value!r})")
        if value < 0:
            raise ConfigError(f"{name} must not be negative (got {value!r})")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{name} must be {_type_name(tp)} (got {value!r})")
        return value
    if tp is str:
        if path.endswith("socket_mode") and isinstance(value, int) and not isinstance(value, bool):
            # YAML 1.1 reads an unquoted 0660 as the octal number 432.
            return format(value, "04o")
        if value is None:
            return ""
        if not isinstance(value, str):
            raise ConfigError(f"{name} must be {_type_name(tp)} (got {value!r})")
        return value
    raise ConfigError(f"{name}: unsupported type {tp!r}")  # pragma: no cover - schema bug


_MODE = re.compile(r"0?[0-7]{3}")


def _validate(config: Config) -> None:
    """Rules that span keys or need more than a type check."""
    idp = config.idp
    section = getattr(idp, idp.provider)
    if section is None:
        raise ConfigError(f"idp.provider is {idp.provider} but idp.{idp.provider} is not set")
    if idp.provider == "static":
        seen: set[str] = set()
        for i, user in enumerate(idp.static.users):
            if not user.username.strip():
                raise ConfigError(f"idp.static.users[{i}].username must not be empty")
            if user.email.count("@") != 1:
                raise ConfigError(f"idp.static.users[{i}].email must be an address (got {user.email!r})")
            key = user.username.lower()
            if key in seen:
                raise ConfigError(f"idp.static.users[{i}].username {user.username!r} is listed twice")
            seen.add(key)
        for i, group in enumerate(idp.static.lists):
            where = f"idp.static.lists[{i}]"
            if group.address.count("@") != 1:
                raise ConfigError(f"{where}.address must be an address (got {group.address!r})")
            if not group.members:
                raise ConfigError(f"{where}.members must name at least one user")
            for name in (*group.members, *group.senders):
                if name.lower() not in seen:
                    raise ConfigError(f"{where}: {name!r} is not in idp.static.users")
            if (group.send_policy == "listed") != bool(group.senders):
                raise ConfigError(f"{where}.senders must be given with send_policy listed, and only then")
    for name in ("keycloak", "authentik"):
        sub = getattr(idp, name)
        if sub is not None and not re.match(r"https?://", sub.base_url):
            raise ConfigError(f"idp.{name}.base_url must start with http:// or https://")
    if not _MODE.fullmatch(config.sockets.socket_mode):
        raise ConfigError(f"sockets.socket_mode must be an octal mode such as \"0660\" (got {config.sockets.socket_mode!r})")
    if not config.sockets.policy_socket or not config.sockets.socketmap_socket:
        raise ConfigError("sockets.policy_socket and sockets.socketmap_socket must be set")
    if config.sockets.policy_socket == config.sockets.socketmap_socket:
        raise ConfigError("sockets.policy_socket and sockets.socketmap_socket must differ")
    if config.sockets.max_connections < 1:
        raise ConfigError("sockets.max_connections must be at least 1")
    if any(c.isspace() or c == "@" for c in config.policy.recipient_delimiter):
        raise ConfigError("policy.recipient_delimiter must not contain spaces or '@'")
    if config.policy.request_deadline_seconds <= 0:
        raise ConfigError("policy.request_deadline_seconds must be positive")
    if config.http.listen:
        parse_listen(config.http.listen)
    _validate_passdb(config.passdb)
    if not config.sqlite.path:
        raise ConfigError("sqlite.path must be set")


def _validate_passdb(passdb: PassdbConfig) -> None:
    for key, (low, high, why) in _PASSDB_BOUNDS.items():
        value = getattr(passdb, key)
        if not low <= value <= high:
            raise ConfigError(f"passdb.{key} must be between {low:g} and {high:g}{why} (got {value!r})")
    if passdb.throttle_base_delay_seconds > passdb.throttle_max_delay_seconds:
        raise ConfigError("passdb.throttle_base_delay_seconds must not exceed "
                          "passdb.throttle_max_delay_seconds")


def _validate_store(config: Config) -> None:
    """Exactly one store per process, the one `store.backend` names. A DSN given while the
    backend is sqlite is refused rather than ignored: on a multi-host site that host would
    otherwise answer from its own file while the others share PostgreSQL. (The sqlite section
    is ignored with backend postgres, as unused idp sections are.)"""
    backend = config.store.backend
    if backend == "postgres":
        if config.postgres is None or not config.postgres.dsn.strip():
            raise ConfigError("store.backend is postgres but postgres.dsn is not set")
        if config.postgres.pool_size < 1:
            raise ConfigError("postgres.pool_size must be at least 1")
        for key in ("statement_timeout_seconds", "connect_timeout_seconds"):
            if getattr(config.postgres, key) <= 0:
                raise ConfigError(f"postgres.{key} must be positive")
    elif config.postgres is not None and config.postgres.dsn.strip():
        raise ConfigError(
            "postgres.dsn is set but store.backend is sqlite; set store.backend: postgres "
            "or empty postgres.dsn"
        )


def parse_listen(listen: str) -> tuple[str, str, int]:
    """`unix:PATH` → ("unix", PATH, 0); `HOST:PORT` → ("tcp", HOST, PORT), loopback hosts only."""
    if listen.startswith("unix:"):
        path = listen[len("unix:"):]
        if not path:
            raise ConfigError("http.listen: unix: needs a path")
        return ("unix", path, 0)
    host, sep, port_text = listen.rpartition(":")
    if not sep or not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise ConfigError(f"http.listen must be HOST:PORT or unix:PATH (got {listen!r})")
    host = host.strip("[]")
    if host == "localhost":
        host = "127.0.0.1"
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        raise ConfigError(f"http.listen host must be a loopback IP address (got {host!r})") from None
    if not address.is_loopback:
        raise ConfigError(f"http.listen must be a loopback address or a unix socket (got {listen!r})")
    return ("tcp", host, int(port_text))
