"""The store interface. SQLite is the embedded default; PostgreSQL implements the same.

Every write is one transaction and carries the meaning the Go project's mailcloakctl gave it
(upserts re-enable, `apps disallow` deletes, aliases need a known domain), so a second backend
cannot drift from the first: the meaning lives in these method contracts, and the SQL that keeps
them in mailcloak.store.sql, shared by the SQL backends.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Mapping

from mailcloak.store.model import Alias, AliasChanges, AppSettings, AppUsage, Rows


class Store(ABC):
    """An open database. Raise StoreError (or a subclass) for anything the database refuses."""

    location: str

    @abstractmethod
    async def close(self) -> None: ...

    @abstractmethod
    async def reconnect(self) -> None:
        """Drop the connection and open a new one, after a failure that may have left it unusable
        (a file replaced or repaired under it; for a server database, a lost connection)."""

    # Reads -----------------------------------------------------------------------------------

    @abstractmethod
    async def load(self, reuse: Mapping[str, Alias] | None = None) -> Rows:
        """Every row of every table, read in one consistent transaction. `reuse`: the aliases of
        the previous load by lower-case address; an alias row that has not changed comes back as
        that same object."""

    @abstractmethod
    async def load_changes(self, log_position: int) -> AliasChanges | None:
        """In one consistent transaction: domains and apps, and the aliases changed since the
        load (or load_changes) that returned `log_position`. None when the store cannot tell
        what changed (it keeps no change log, the log was pruned past that position, or the
        database is not the one of that position): then `load()` everything."""

    @abstractmethod
    async def wait_for_change(self) -> None:
        """Return once another writer may have committed since the previous call or the last
        `load()`, whichever came later. Cheap: it must not read the tables."""

    # Writes: each one transaction; NotFound / InvalidInput for what an administrator got wrong -

    @abstractmethod
    async def add_domain(self, domain: str) -> None:
        """Insert, or re-enable an existing domain."""

    @abstractmethod
    async def set_domain_enabled(self, domain: str, enabled: bool) -> None: ...

    @abstractmethod
    async def delete_domain(self, domain: str) -> None:
        """Delete a domain and (cascade) its aliases."""

    @abstractmethod
    async def add_alias(self, alias: str, target_user: str) -> None:
        """Upsert that re-enables: afterwards the alias means `alias → target_user` alone (a list's
        further targets are removed; its sender rule stays). The domain must exist and be enabled.
        `alias` may be `@domain`, the domain's catch-all."""

    @abstractmethod
    async def set_alias_targets(self, alias: str, targets: tuple[str, ...]) -> None:
        """Like add_alias, with every target of a distribution list, in order (distinct IdP
        usernames). More than one target on a version 1 (Go) database: InvalidInput saying to run
        `mailcloakctl init`."""

    @abstractmethod
    async def add_alias_member(self, alias: str, user: str) -> None:
        """Append `user` to the alias's targets (nothing when it is one already, in any case).
        The alias must exist; its enabled state is kept; a version 1 database: InvalidInput."""

    @abstractmethod
    async def remove_alias_member(self, alias: str, user: str) -> None:
        """Remove `user` from the alias's targets (the next one becomes aliases.target_user).
        NotFound when it is no target; InvalidInput for the last one (delete the alias)."""

    @abstractmethod
    async def set_alias_senders(self, alias: str, policy: str, users: tuple[str, ...]) -> None:
        """Who may send as the alias: `members` (its targets), `nobody`, or `listed` (exactly
        `users`, given only then). The alias must exist; a version 1 database: InvalidInput."""

    @abstractmethod
    async def set_alias_enabled(self, alias: str, enabled: bool) -> None: ...

    @abstractmethod
    async def delete_alias(self, alias: str) -> None: ...

    @abstractmethod
    async def add_app(self, app_id: str, secret_hash: str, settings: AppSettings = AppSettings()) -> None:
        """Upsert that re-enables and replaces the secret. An id that differs from an existing
        one only in case is refused. `settings` fields not at KEEP are written in the same
        transaction (SchemaOutdated on a version 1 database)."""

    @abstractmethod
    async def set_app_settings(self, app_id: str, settings: AppSettings) -> None:
        """Change description, expiry or networks, leaving the secret, the enabled flag and the
        senders alone. SchemaOutdated on a version 1 database."""

    @abstractmethod
    async def set_app_enabled(self, app_id: str, enabled: bool) -> None: ...

    @abstractmethod
    async def delete_app(self, app_id: str) -> None: ...

    @abstractmethod
    async def allow_sender(self, app_id: str, address: str) -> None:
        """Upsert that re-enables."""

    @abstractmethod
    async def disallow_sender(self, app_id: str, address: str) -> None:
        """Delete the row."""

    # Last use: written by the daemon, read by `apps list`; not part of `load()`, so that these
    # writes never count as a change (wait_for_change must not report them) ---------------------

    @abstractmethod
    async def record_app_usage(self, usage: Mapping[str, AppUsage]) -> None:
        """Upsert last use by stored app id, in one transaction; a use older than the stored one
        and an app deleted meanwhile are skipped. SchemaOutdated on a version 1 database."""

    @abstractmethod
    async def app_usage(self) -> dict[str, AppUsage]:
        """Last use by stored app id; empty on a version 1 database."""

    # Import ------------------------------------------------------------------------------------

    @abstractmethod
    async def import_rows(self, rows: Rows, *, replace: bool) -> tuple[str, ...]:
        """Write domains, aliases (with their list targets, send policy and listed senders) and
        apps (settings and senders; secrets are not in `rows`) in one transaction, all or nothing.

        Each object in `rows` ends up as `rows` says, its sub-lists included; objects not in
        `rows` are kept, or deleted with `replace=True`. An existing app (matched
        case-insensitively) keeps its secret; a new one gets NO_SECRET, which matches no password,
        so it cannot log in before `apps add` gives it one. Returns the ids of the apps created. NotFound
        when an alias's domain is neither in `rows` nor (merging) in the database;
        SchemaOutdated on a version 1 database."""
