"""mailcloakctl (placeholder until the CLI lands)."""
import sys


def main(argv=None) -> int:
    print("mailcloakctl: not implemented yet", file=sys.stderr)
    return 1
