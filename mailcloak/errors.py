"""Typed exceptions, so each layer can tell a bad config from an unreachable IdP from a locked database."""


class MailcloakError(Exception):
    """Base of every error mailcloak raises on purpose."""


class ConfigError(MailcloakError):
    """The configuration file is missing, unreadable or invalid; the message names the dotted key."""


class StoreError(MailcloakError):
    """The database cannot be used (missing, corrupt, locked past the wait, failed write)."""


class StoreMissing(StoreError):
    """The database file does not exist; only `mailcloakctl init` creates it."""


class StoreLocked(StoreError):
    """Another writer held the database longer than the configured wait."""


class SchemaOutdated(StoreError):
    """A write needs a newer schema than the database has (a Go database: version 1); the
    message tells to run `mailcloakctl init`."""


class InvalidInput(MailcloakError):
    """An argument given by an administrator is malformed (address, domain, app id, password)."""


class NotFound(MailcloakError):
    """A domain, alias or app named by an administrator does not exist."""


class IdPError(MailcloakError):
    """The identity provider could not answer (down, slow, refused, malformed)."""


class ProtocolError(MailcloakError):
    """A peer sent bytes that do not follow the protocol; the connection cannot continue."""
