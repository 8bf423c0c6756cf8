"""The store interface. SQLite is the embedded default; PostgreSQL will implement the same.

Every write is one transaction and carries the meaning the Go project's mailcloakctl gave it
(upserts re-enable, `apps disallow` deletes, aliases need a known domain), so a second backend
cannot drift from the first: the meaning lives in these method contracts, the SQL in the backend.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Mapping

from mailcloak.store.model import Alias, Rows


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
        """Upsert that re-enables. The alias's domain must exist and be enabled."""

    @abstractmethod
    async def set_alias_enabled(self, alias: str, enabled: bool) -> None: ...

    @abstractmethod
    async def delete_alias(self, alias: str) -> None: ...

    @abstractmethod
    async def add_app(self, app_id: str, secret_hash: str) -> None:
        """Upsert that re-enables and replaces the secret. An id that differs from an existing
        one only in case is refused."""

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
