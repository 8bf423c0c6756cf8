"""Rows of the four tables, and the in-memory snapshot the daemon answers from.

The daemon never queries the database per request: it holds one immutable `Snapshot`, rebuilt
when the store reports a change, and swapped in whole.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from types import MappingProxyType
from typing import Mapping


@dataclass(frozen=True, slots=True)
class Domain:
    name: str
    enabled: bool
    updated_at: int


# Who may send as an alias (aliases.send_policy): its targets, nobody, or its alias_senders rows.
SEND_POLICIES = ("members", "nobody", "listed")


@dataclass(frozen=True, slots=True)
class Alias:
    address: str       # alias_email, lower-case
    target_user: str   # an IdP username, not an address
    domain: str        # alias_domain_name
    enabled: bool
    updated_at: int
    # Schema version 2 (lists). A one-target alias has no extra targets and policy "members".
    extra_targets: tuple[str, ...] = ()   # further IdP usernames of a distribution list
    send_policy: str = "members"          # who may send as it: members | nobody | listed
    listed_senders: tuple[str, ...] = ()  # IdP usernames, for send_policy "listed"

    @property
    def targets(self) -> tuple[str, ...]:
        """Every target username, the first one (aliases.target_user) first."""
        return (self.target_user, *self.extra_targets)

    @property
    def target_addresses(self) -> tuple[str, ...]:
        """What the socketmap rewrites the alias to: each target `@<domain of the alias>`."""
        return tuple(f"{target}@{self.domain}" for target in self.targets)

    @property
    def sender_users(self) -> tuple[str, ...]:
        """The IdP usernames that may send as this alias, by its send_policy."""
        if self.send_policy == "members":
            return self.targets
        if self.send_policy == "listed":
            return self.listed_senders
        return ()


@dataclass(frozen=True, slots=True)
class AppSender:
    address: str
    enabled: bool


@dataclass(frozen=True, slots=True)
class App:
    app_id: str        # case kept as written
    secret_hash: str   # "{ARGON2ID}$argon2id$..."
    enabled: bool
    updated_at: int
    senders: tuple[AppSender, ...] = ()
    # Schema version 2: credentials that age.
    description: str = ""
    expires_at: int | None = None       # unix seconds; None = never
    networks: tuple[str, ...] = ()      # allowed client networks (CIDR); empty = any

    def may_send_as(self, address: str) -> bool:
        return any(s.enabled and s.address == address for s in self.senders)


class _Keep:
    """The type of KEEP."""

    def __repr__(self) -> str:
        return "KEEP"


KEEP = _Keep()  # an AppSettings field left as it is in the database


@dataclass(frozen=True, slots=True)
class AppSettings:
    """The settings of an app besides its secret and senders, as one write changes them: a field
    at KEEP is left as stored (`expires_at=None` means "never expires", so None cannot mean
    "unchanged")."""

    description: str | _Keep = KEEP
    expires_at: int | None | _Keep = KEEP
    networks: tuple[str, ...] | _Keep = KEEP

    def changes(self) -> dict[str, object]:
        """The fields to write, by column name (networks as the stored space-separated text)."""
        out: dict[str, object] = {}
        if self.description is not KEEP:
            out["description"] = self.description
        if self.expires_at is not KEEP:
            out["expires_at"] = self.expires_at
        if self.networks is not KEEP:
            out["networks"] = " ".join(self.networks)
        return out


@dataclass(frozen=True, slots=True)
class AppUsage:
    """When and from where an app last logged in (table app_usage; not part of the snapshot)."""

    last_used_at: int
    last_used_ip: str


@dataclass(frozen=True, slots=True)
class Rows:
    """Everything in the database, as loaded in one read transaction."""

    domains: tuple[Domain, ...] = ()
    aliases: tuple[Alias, ...] = ()
    apps: tuple[App, ...] = ()
    # Where the store's alias change log stood when these rows were read (Store.load_changes);
    # None when it keeps none. Not part of what the rows are (equality).
    log_position: int | None = field(default=None, compare=False)


@dataclass(frozen=True, slots=True)
class AliasChanges:
    """What a store read since a log position: domains and apps whole (small tables), and the
    aliases whose addresses the change log names: their rows now, and in `removed` those (as
    stored) that have none any more."""

    domains: tuple[Domain, ...]
    aliases: tuple[Alias, ...]
    apps: tuple[App, ...]
    removed: tuple[str, ...]
    log_position: int


_EMPTY: Mapping = MappingProxyType({})


@dataclass(frozen=True)
class Snapshot:
    """Indexed, read-only view of `Rows` for the hot path. Keys are lower-case."""

    domains: Mapping[str, Domain] = field(default_factory=lambda: _EMPTY)
    aliases: Mapping[str, Alias] = field(default_factory=lambda: _EMPTY)
    apps: Mapping[str, App] = field(default_factory=lambda: _EMPTY)
    # Domains that are local although not in the table (legacy `policy.domain`).
    extra_local_domains: frozenset[str] = field(default_factory=frozenset)

    @classmethod
    def from_rows(cls, rows: Rows, extra_local_domains: frozenset[str] = frozenset(),
                  alias_index: dict[str, Alias] | None = None) -> "Snapshot":
        """`alias_index`: `rows.aliases` by lower-case address, when the caller built it already."""
        if alias_index is None:
            alias_index = {a.address.lower(): a for a in rows.aliases}
        return cls(
            domains=MappingProxyType({d.name.lower(): d for d in rows.domains}),
            aliases=MappingProxyType(alias_index),
            apps=MappingProxyType({a.app_id.lower(): a for a in rows.apps}),
            extra_local_domains=extra_local_domains,
        )

    def is_local(self, domain: str) -> bool:
        """A domain is local when it is in `domains` and enabled."""
        row = self.domains.get(domain)
        if row is not None:
            return row.enabled
        return domain in self.extra_local_domains

    def active_alias(self, address: str) -> Alias | None:
        """The enabled alias for a lower-case address, in an enabled local domain."""
        alias = self.aliases.get(address)
        if alias is None or not alias.enabled or not self.is_local(alias.domain.lower()):
            return None
        return alias

    def catch_all(self, domain: str) -> Alias | None:
        """The enabled catch-all (`@domain` alias) of a lower-case local domain."""
        return self.active_alias("@" + domain)

    def is_alias_target(self, address: str) -> bool:
        """Does an enabled alias or list rewrite to this lower-case address? Postfix looks every
        answer up again, and such an address must never fall into its domain's catch-all (a loop,
        or mail for a mistyped target silently landing elsewhere)."""
        local, _, domain = address.rpartition("@")
        return local in self._alias_targets_in(domain)

    def _alias_targets_in(self, domain: str) -> frozenset[str]:
        """Lower-case target local parts of the enabled aliases of `domain`, built on first use
        per domain and snapshot (only catch-all domains ask), one pass over the aliases."""
        memo = self._targets_memo
        found = memo.get(domain)
        if found is None:
            found = memo[domain] = frozenset(
                target.lower() for alias in self.aliases.values()
                if alias.enabled and alias.domain.lower() == domain for target in alias.targets)
        return found

    @cached_property
    def _targets_memo(self) -> dict[str, frozenset[str]]:
        return {}

    def app(self, login: str) -> App | None:
        """The app whose id matches a login name case-insensitively (Dovecot lower-cases it)."""
        return self.apps.get(login.lower())
