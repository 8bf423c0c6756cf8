"""Identity providers behind one interface; `idp.provider` selects which."""

from mailcloak.config import Config
from mailcloak.idp.base import IdentityProvider, IdPUser

__all__ = ["IdentityProvider", "IdPUser", "build_provider"]


def build_provider(config: Config) -> IdentityProvider:
    provider = config.idp.provider
    if provider == "static":
        from mailcloak.idp.static import StaticProvider

        return StaticProvider(config.idp.static)
    if provider == "keycloak":
        from mailcloak.idp.keycloak import KeycloakProvider

        return KeycloakProvider(config.idp.keycloak)
    from mailcloak.idp.authentik import AuthentikProvider  # the config allows no other value

    return AuthentikProvider(config.idp.authentik)
