"""mailcloak: an identity provider as the single source of truth for Postfix and Dovecot."""

__version__ = "0.1.0"
