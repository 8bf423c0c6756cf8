"""Postfix policy delegation service (SPEC §6)."""
