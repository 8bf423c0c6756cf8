"""The HTTP side of the daemon (Dovecot endpoints, health, metrics), on loopback or a unix socket."""
