"""The `static` provider: users listed in the config, for small sites, demos and tests."""

from __future__ import annotations

from mailcloak.config import StaticConfig
from mailcloak.idp.base import IdentityProvider, IdPList, IdPUser


class StaticProvider(IdentityProvider):
    name = "static"

    def __init__(self, config: StaticConfig):
        users = [u for u in config.users if u.enabled]
        self._by_username = {u.username.lower(): IdPUser(u.username, u.email.lower()) for u in users}
        self._by_address = {user.email: user for user in self._by_username.values()}
        self._lists = {
            group.address.lower(): IdPList(
                group.address.lower(),
                tuple(self._by_username[m.lower()] for m in group.members if m.lower() in self._by_username),
                group.send_policy, group.senders)
            for group in config.lists
        }
        self.lists_enabled = bool(self._lists)

    async def list_by_address(self, address: str) -> IdPList | None:
        return self._lists.get(address.lower())

    async def user_by_address(self, address: str) -> IdPUser | None:
        return self._by_address.get(address.lower())

    async def user_by_username(self, username: str) -> IdPUser | None:
        return self._by_username.get(username.lower())
