"""Postfix socketmap_table(5) service."""
