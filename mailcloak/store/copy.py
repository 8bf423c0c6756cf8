"""Copy a site's data from one SQL store to another (`mailcloakctl migrate-store`).

Every table is copied row for row, secret hashes, timestamps and the daemons' `app_usage`
included, so the target answers exactly as the source did. The source is read in one
consistent transaction; the target is written in one transaction that also checks its row
counts, so a copy that fails (a row the target's constraints refuse, the database going away)
leaves the target as it was.
"""

from __future__ import annotations

from mailcloak.errors import InvalidInput, StoreError
from mailcloak.store.sql import SQLStore, Transaction

# (table, columns of schema version 1, columns added by version 2), parents before children.
TABLES: tuple[tuple[str, str, str], ...] = (
    ("domains", "domain_name, enabled, updated_at", ""),
    ("aliases", "alias_email, target_user, alias_domain_name, enabled, updated_at", "send_policy"),
    ("alias_targets", "", "alias_email, target_user, position"),
    ("alias_senders", "", "alias_email, sender_user"),
    ("apps", "app_id, secret_hash, enabled, updated_at", "description, expires_at, networks"),
    ("app_from", "app_id, from_addr, enabled, updated_at", ""),
    ("app_usage", "", "app_id, last_used_at, last_used_ip"),
)


def _columns(v1: str, v2: str, version: int) -> str:
    """The columns a database of `version` has (a Go database is version 0 or 1)."""
    return ", ".join(c for c in (v1, v2 if version >= 2 else "") if c)


async def copy_store(source: SQLStore, target: SQLStore, *, replace: bool = False) -> dict[str, int]:
    """Copy every row of `source` into `target` (created and migrated to the current schema);
    return the rows copied per table. Refuses a target that holds rows unless `replace`."""
    data: dict[str, tuple[str, list[tuple]]] = {}
    async with source._transaction(write=False) as tx:
        version = await source._schema_version(tx)
        for table, v1, v2 in TABLES:
            columns = _columns(v1, v2, version)
            if columns:
                data[table] = (columns, [tuple(map(_plain, row)) async for row in
                                         tx.rows(f"SELECT {columns} FROM {table}")])
    async with target._transaction(write=True) as tx:
        held = {table: await _count(tx, table) for table, _, _ in TABLES}
        if any(held.values()) and not replace:
            raise InvalidInput(
                f"target {target.location} is not empty ("
                + ", ".join(f"{table} {n}" for table, n in held.items() if n)
                + "); nothing copied. Use --replace to overwrite it"
            )
        for table, _, _ in reversed(TABLES):
            if held[table]:
                await tx.execute(f"DELETE FROM {table}")
        for table, (columns, rows) in data.items():
            if rows:
                marks = ", ".join("?" for _ in columns.split(", "))
                await tx.execute_many(f"INSERT INTO {table} ({columns}) VALUES ({marks})", rows)
        copied = {}
        for table, _, _ in TABLES:
            expected = len(data.get(table, ("", []))[1])
            found = await _count(tx, table)
            if found != expected:
                raise StoreError(f"copy of {table} not verified: {expected} rows read, {found} "
                                 f"in the target; nothing copied")
            copied[table] = found
    return copied


async def _count(tx: Transaction, table: str) -> int:
    (count,) = await tx.fetchone(f"SELECT count(*) FROM {table}")
    return int(count)


def _plain(value):
    """A value every backend accepts: SQLite may hold a BLOB in a TEXT column (read as the UTF-8
    it holds, as the store's loader does)."""
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else value
