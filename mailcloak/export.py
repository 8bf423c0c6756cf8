"""The JSON document of `mailcloakctl export` and `import`: domains, aliases and apps, no secrets.

Made for moving a setup between hosts and for review in version control, so the output is
stable: keys sorted, lists in a fixed order (domains, aliases, apps and app senders by name; a
list alias's targets in their order, the first one being `aliases.target_user`), no timestamps
other than an app's expiry. Exporting, importing into an empty database and exporting again gives
the same bytes.

    {"format": "mailcloak-export", "version": 1,
     "domains": [{"domain": "d1.test", "enabled": true}],
     "aliases": [{"alias": "team@d1.test", "targets": ["alice", "bob"], "enabled": true,
                  "send_policy": "members", "listed_senders": []}],
     "apps": [{"app_id": "Mailer", "enabled": true, "description": "", "expires_at": null,
               "networks": ["192.0.2.0/24"],
               "senders": [{"address": "noreply@d1.test", "enabled": true}]}]}

A catch-all is the alias `@domain`. `expires_at` is ISO 8601 UTC or null (see
mailcloak.app_fields). `parse_document` checks the whole document before anything is written
and names the first bad field by its path (`apps[2].networks[0]: ...`).
"""

from __future__ import annotations

import json
from typing import Any

from mailcloak.addresses import check_address, check_domain, is_safe_token
from mailcloak.app_fields import check_app_id, check_description, check_network, format_utc, parse_expiry
from mailcloak.errors import InvalidInput
from mailcloak.store.model import Alias, App, AppSender, Domain, Rows

FORMAT = "mailcloak-export"
VERSION = 1
SEND_POLICIES = ("members", "nobody", "listed")


def export_document(rows: Rows) -> str:
    """The JSON text of `rows`, ending with a newline."""
    document = {
        "format": FORMAT,
        "version": VERSION,
        "domains": [{"domain": d.name, "enabled": d.enabled}
                    for d in sorted(rows.domains, key=lambda d: d.name)],
        "aliases": [{"alias": a.address, "targets": list(a.targets), "enabled": a.enabled,
                     "send_policy": a.send_policy, "listed_senders": sorted(a.listed_senders)}
                    for a in sorted(rows.aliases, key=lambda a: a.address)],
        "apps": [{"app_id": a.app_id, "enabled": a.enabled, "description": a.description,
                  "expires_at": None if a.expires_at is None else format_utc(a.expires_at),
                  "networks": list(a.networks),
                  "senders": [{"address": s.address, "enabled": s.enabled}
                              for s in sorted(a.senders, key=lambda s: s.address)]}
                 for a in sorted(rows.apps, key=lambda a: a.app_id)],
    }
    return json.dumps(document, indent=2, sort_keys=True, ensure_ascii=False) + "\n"


def parse_document(text: str) -> Rows:
    """The rows a document describes (apps without secrets); InvalidInput for anything wrong."""
    try:
        document = json.loads(text)
    except json.JSONDecodeError as exc:
        raise InvalidInput(f"not JSON: {exc.msg} at line {exc.lineno} column {exc.colno}") from None
    if not isinstance(document, dict) or document.get("format") != FORMAT:
        raise InvalidInput(f"not a mailcloak export (\"format\": \"{FORMAT}\" missing)")
    version = document.get("version")
    if version != VERSION or isinstance(version, bool):
        raise InvalidInput(f"version: {version!r} is not a format version this mailcloakctl "
                           f"reads ({VERSION})")
    top = _object(document, "document", {"format", "version", "domains", "aliases", "apps"})
    domains = [_domain(item, f"domains[{i}]") for i, item in enumerate(_list(top["domains"], "domains"))]
    aliases = [_alias(item, f"aliases[{i}]") for i, item in enumerate(_list(top["aliases"], "aliases"))]
    apps = [_app(item, f"apps[{i}]") for i, item in enumerate(_list(top["apps"], "apps"))]
    _unique([d.name for d in domains], "domains", "domain")
    _unique([a.address for a in aliases], "aliases", "alias")
    _unique([a.app_id.lower() for a in apps], "apps", "app id (compared case-insensitively)")
    return Rows(tuple(domains), tuple(aliases), tuple(apps))


# Fields --------------------------------------------------------------------------------------


def _domain(item: Any, where: str) -> Domain:
    fields = _object(item, where, {"domain", "enabled"})
    return Domain(_checked(check_domain, _str(fields["domain"], f"{where}.domain"), f"{where}.domain"),
                  _bool(fields["enabled"], f"{where}.enabled"), 0)


def _alias(item: Any, where: str) -> Alias:
    fields = _object(item, where, {"alias", "targets", "enabled", "send_policy", "listed_senders"})
    address = _checked(_alias_address, _str(fields["alias"], f"{where}.alias"), f"{where}.alias")
    targets = [_user(t, f"{where}.targets[{i}]")
               for i, t in enumerate(_list(fields["targets"], f"{where}.targets"))]
    if not targets:
        raise InvalidInput(f"{where}.targets: an alias needs at least one target")
    _unique(targets, f"{where}.targets", "target")
    policy = _str(fields["send_policy"], f"{where}.send_policy")
    if policy not in SEND_POLICIES:
        raise InvalidInput(f"{where}.send_policy: {policy!r} is not one of {', '.join(SEND_POLICIES)}")
    senders = [_user(s, f"{where}.listed_senders[{i}]")
               for i, s in enumerate(_list(fields["listed_senders"], f"{where}.listed_senders"))]
    _unique(senders, f"{where}.listed_senders", "sender")
    return Alias(address, targets[0], address.rpartition("@")[2], _bool(fields["enabled"], f"{where}.enabled"),
                 0, tuple(targets[1:]), policy, tuple(senders))


def _app(item: Any, where: str) -> App:
    fields = _object(item, where, {"app_id", "enabled", "description", "expires_at", "networks", "senders"})
    app_id = _checked(check_app_id, _str(fields["app_id"], f"{where}.app_id"), f"{where}.app_id")
    expires = fields["expires_at"]
    expires_at = None if expires is None else _checked(
        parse_expiry, _str(expires, f"{where}.expires_at"), f"{where}.expires_at")
    if expires is not None and expires_at is None:   # "never" is a CLI word, not a value here
        raise InvalidInput(f"{where}.expires_at: use null for an app that never expires")
    networks = [_checked(check_network, _str(n, f"{where}.networks[{i}]"), f"{where}.networks[{i}]")
                for i, n in enumerate(_list(fields["networks"], f"{where}.networks"))]
    senders = []
    for i, sender in enumerate(_list(fields["senders"], f"{where}.senders")):
        at = f"{where}.senders[{i}]"
        sender = _object(sender, at, {"address", "enabled"})
        senders.append(AppSender(_checked(check_address, _str(sender["address"], f"{at}.address"),
                                          f"{at}.address"),
                                 _bool(sender["enabled"], f"{at}.enabled")))
    _unique([s.address for s in senders], f"{where}.senders", "address")
    return App(app_id, "", _bool(fields["enabled"], f"{where}.enabled"), 0, tuple(senders),
               _checked(check_description, _str(fields["description"], f"{where}.description"),
                        f"{where}.description"),
               expires_at, tuple(dict.fromkeys(networks)))


def _alias_address(value: str) -> str:
    """An address, or `@domain` for a domain's catch-all."""
    if value.strip().startswith("@"):
        return "@" + check_domain(value.strip()[1:])
    return check_address(value)


def _user(value: Any, where: str) -> str:
    user = _str(value, where)
    if user != user.strip() or not is_safe_token(user) or "@" in user:
        raise InvalidInput(f"{where}: invalid user {user!r} (an IdP username: no spaces, '@', "
                           "commas or control characters)")
    return user


# Shapes --------------------------------------------------------------------------------------


def _object(value: Any, where: str, keys: set[str]) -> dict:
    _typed(dict, value, where)
    unknown = sorted(set(value) - keys)
    if unknown:
        raise InvalidInput(f"{where}: unknown key {unknown[0]!r}")
    missing = sorted(keys - set(value))
    if missing:
        raise InvalidInput(f"{where}: missing key {missing[0]!r}")
    return value


def _typed(kind: type, value: Any, where: str):
    if not isinstance(value, kind):
        raise InvalidInput(f"{where}: expected {_KINDS[kind]}, got {_kind(value)}")
    return value


def _list(value: Any, where: str) -> list:
    return _typed(list, value, where)


def _str(value: Any, where: str) -> str:
    return _typed(str, value, where)


def _bool(value: Any, where: str) -> bool:
    return _typed(bool, value, where)


def _checked(check, value: str, where: str):
    try:
        return check(value)
    except InvalidInput as exc:
        raise InvalidInput(f"{where}: {exc}") from None


def _unique(values: list[str], where: str, what: str) -> None:
    seen: set[str] = set()
    for value in values:
        if value in seen:
            raise InvalidInput(f"{where}: {what} {value!r} appears twice")
        seen.add(value)


_KINDS = {dict: "an object", list: "a list", str: "a string", bool: "true or false",
          type(None): "null"}


def _kind(value: Any) -> str:
    return _KINDS.get(type(value), "a number")
