"""The store: one interface over the database that both the daemon and mailcloakctl use."""

from mailcloak.store.base import Store
from mailcloak.store.model import Alias, App, AppSender, Domain, Rows, Snapshot

__all__ = ["Store", "Alias", "App", "AppSender", "Domain", "Rows", "Snapshot", "open_store"]


async def open_store(config, *, create: bool = False) -> Store:
    """Open the store the config names (`store.backend`). Only `create=True` (mailcloakctl init)
    makes a new one or migrates its schema."""
    if config.store.backend == "postgres":
        from mailcloak.store.postgres import PostgresStore

        return await PostgresStore.open(config.postgres, create=create)
    from mailcloak.store.sqlite import SQLiteStore

    return await SQLiteStore.open(config.sqlite, create=create)
