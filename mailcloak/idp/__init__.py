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
    if provider == "authentik":
        from mailcloak.idp.authentik import AuthentikProvider

        return AuthentikProvider(config.idp.authentik)
    from mailcloak.errors import ConfigError

    raise ConfigError(f"idp.provider {provider} is not available in this version of mailcloak")
