"""The fields of an app an administrator writes, checked and shown one way for mailcloakctl's
`apps add/set` options and for `import` files.

- **id**: 1 to 255 printable characters, no whitespace (it is a SASL login name).
- **description**: one line of printable text, at most 200 characters (it is shown on a
  tab-separated line, so tabs and newlines are refused).
- **expiry**: `never`, a date `YYYY-MM-DD` (the app is refused from 00:00 UTC that day on), or a
  time `YYYY-MM-DDTHH:MM[:SS]` with `Z` or an offset (UTC when none is given). Shown as ISO 8601
  UTC (`2027-01-01T00:00:00Z`), which this reads back unchanged.
- **networks**: IPv4/IPv6 CIDRs or single addresses; stored in canonical form (`192.0.2.7/24`
  becomes `192.0.2.0/24`, `192.0.2.7` becomes `192.0.2.7/32`); `any` (or nothing) = no limit.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import re
import time

from mailcloak.errors import InvalidInput

_APP_ID = re.compile(r"[^\s\x00-\x1f\x7f]+")
APP_ID_MAX = 255
DESCRIPTION_MAX = 200
NEVER = "never"
ANY_NETWORK = "any"


def check_app_id(value: str) -> str:
    app_id = value.strip()
    if not _APP_ID.fullmatch(app_id) or len(app_id) > APP_ID_MAX:
        raise InvalidInput(
            f"invalid app id: {value!r} (1 to {APP_ID_MAX} characters, no spaces or control characters)"
        )
    return app_id


def check_description(value: str) -> str:
    text = value.strip()
    if len(text) > DESCRIPTION_MAX or not text.isprintable():
        raise InvalidInput(f"invalid description: {value!r} (one line of at most "
                           f"{DESCRIPTION_MAX} printable characters)")
    return text


def parse_expiry(value: str) -> int | None:
    """Unix seconds of the first instant the app is refused; None for `never`."""
    text = value.strip()
    if text.lower() == NEVER:
        return None
    try:
        if re.fullmatch(r"\d{4}-\d{2}-\d{2}", text):
            when = dt.datetime.combine(dt.date.fromisoformat(text), dt.time(), dt.timezone.utc)
        elif re.fullmatch(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}(:\d{2})?(Z|[+-]\d{2}:\d{2})?", text):
            when = dt.datetime.fromisoformat(text)
            if when.tzinfo is None:
                when = when.replace(tzinfo=dt.timezone.utc)
        else:
            raise ValueError(text)
        return int(when.timestamp())
    except (ValueError, OverflowError):
        raise InvalidInput(f"invalid expiry: {value!r} (YYYY-MM-DD, YYYY-MM-DDTHH:MM[:SS][Z|+HH:MM] "
                           f"or {NEVER})") from None


def format_utc(seconds: int) -> str:
    """Unix seconds as ISO 8601 UTC, the form shown, exported and read back."""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(seconds))


def check_network(value: str) -> str:
    try:
        return str(ipaddress.ip_network(value.strip(), strict=False))
    except ValueError:
        raise InvalidInput(f"invalid network: {value!r} (an IPv4 or IPv6 CIDR such as "
                           "192.0.2.0/24 or 2001:db8::/32)") from None


def parse_networks(value: str) -> tuple[str, ...]:
    """A comma- or space-separated list, or `any`: canonical CIDRs, duplicates dropped."""
    items = [item for item in re.split(r"[,\s]+", value.strip()) if item]
    if items == [ANY_NETWORK] or not items:
        return ()
    return tuple(dict.fromkeys(check_network(item) for item in items))
