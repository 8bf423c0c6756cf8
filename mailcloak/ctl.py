"""mailcloakctl: manage the domains, aliases and apps of mailcloak's database.

The words, arguments and tab-separated list output are those of the Go project's mailcloakctl
(COMPAT.md), so its users' scripts keep working. Choices made here, where the contract is silent:

- **One data layer.** Every command goes through the async `Store` the daemon uses (one
  `asyncio.run` per invocation); there is no second SQL layer. Lists are derived from
  `Store.load()` (one consistent read); each write is one store call, i.e. one transaction, so a
  failing command changes nothing. A running daemon notices the commit by itself within 2 s.
- **Database.** `--db PATH` (always SQLite), or `--config PATH` (the store its `store.backend`
  names: `sqlite.path`, or PostgreSQL at `postgres.dsn`), or the default
  `/var/lib/mailcloak/state.db`; the two options exclude each other and are accepted before or
  after the command words. `migrate-store --from SPEC --to SPEC` names both of its stores
  itself (`sqlite:PATH` or `postgres:DSN`) and takes neither option. Only `init` creates the file (and its folder) or migrates its schema.
  `check` needs the config (it asks the configured IdP); without `--config` it reads
  `/etc/mailcloak/config.yaml`.
- **Output.** Write commands print nothing on success, as the Go tool did; `apps add --generate`
  prints the new token alone on one line. Lists are sorted as COMPAT.md says (domains by name;
  aliases by user then alias; apps by id, each followed by `<TAB><TAB>` and its allowed senders,
  `addr (disabled)` for a disabled one, or `-`). `--json` on any list prints a JSON array of
  objects instead; apps carry their senders and never their secret hash.
- **Errors.** Every error is one line on stderr, `mailcloakctl: <what>`, and a non-zero exit:
  1 for what the database or the arguments' values refused, 2 for a malformed command line,
  130 when interrupted. Never a traceback. Warnings logged by the shared code (say, an alias row
  the daemon would skip, seen by `check`) go to stderr as `mailcloakctl: WARNING: ...`.
- **Input.** Domains and addresses are lower-cased and checked (`mailcloak.addresses`) where they
  are created or enabled; `del` and `disable` only normalise, so a bad row written by hand can
  still be removed. An alias target is an IdP username: case kept, no spaces, '@', commas or
  control characters (the socketmap answers `target@domain`). `aliases list --user` matches the
  user case-insensitively, as the policy does. `aliases add A U` keeps the Go meaning (A → U
  alone); more users make a distribution list and `@domain` is the domain's catch-all;
  `aliases senders` sets a list's sender rule; `aliases list` prints a list as one line per
  target (README "Distribution lists and catch-all"). App ids: surrounding whitespace stripped, case
  kept, matched case-insensitively; a new id may not contain whitespace or control characters,
  and `apps add` refuses one that differs from an existing id only in case, before it asks for
  a password.
- **App passwords.** Exactly one source: a `PASSWORD` argument (kept for compatibility; it shows
  in `ps`), `--password-stdin` (everything read, one trailing newline, LF or CRLF, stripped),
  `--generate` (`generate_token()`, 256 random bits, URL-safe), or, when none is given and
  standard input is a terminal, a prompt asked twice with getpass. An empty or mismatched
  password is refused; with no terminal and no source, the command fails and says how to give
  one. Only the argon2id hash (`{ARGON2ID}$argon2id$v=19$m=65536,t=3,p=1$...`) is stored.
- **App settings** (`apps add/set --description/--expires/--networks`, mailcloak.app_fields) and
  their `apps list` lines, and **export/import** (mailcloak.export): README "App credentials
  that age" and "Export and import".
- **check.** `check --sasl-method M --sasl-user U --sender S --recipient R [--state RCPT|MAIL]
  [--client-address IP]` builds the policy request Postfix would send and evaluates it with the daemon's own code
  (`StateCache` for the snapshot, `PolicyService.evaluate` for facts and decision), then prints
  `action: ...` and `rule: ...`. It exits 0 whatever the action.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import getpass
import json
import logging
import os
import sys
import time
from types import MappingProxyType
from typing import Any, Callable, NoReturn

from mailcloak import __version__
from mailcloak.addresses import check_address, check_alias_address, check_domain, is_safe_token, normalize
from mailcloak.app_fields import (
    ANY_NETWORK,
    NEVER,
    check_app_id,
    check_description,
    format_utc,
    parse_expiry,
    parse_networks,
)
from mailcloak.config import (
    DEFAULT_CONFIG_PATH,
    DEFAULT_DB_PATH,
    Config,
    PostgresConfig,
    SQLiteConfig,
    StoreConfig,
    load_config,
)
from mailcloak.errors import InvalidInput, MailcloakError, NotFound
from mailcloak.passwords import NO_SECRET, generate_token, hash_secret
from mailcloak.store import Store, open_store
from mailcloak.store.model import Alias, App, AppSettings, AppUsage, Rows
from mailcloak.export import export_document, parse_document

PROG = "mailcloakctl"


class UsageError(Exception):
    """The command line itself is malformed (exit 2)."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{message} (see '{self.prog} --help')")


# Output --------------------------------------------------------------------------------------


def _out(line: str = "") -> None:
    print(line, file=sys.stdout)


def _json(items: list[dict[str, Any]]) -> None:
    _out(json.dumps(items, indent=2, ensure_ascii=False))


def _state(enabled: bool) -> str:
    return "enabled" if enabled else "disabled"


def _one_line(text: str) -> str:
    """An error message as one printable line, whatever the input it quotes."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


# Input ---------------------------------------------------------------------------------------


def _lookup_domain(value: str) -> str:
    domain = normalize(value)
    if not domain:
        raise InvalidInput("invalid domain: ''")
    return domain


def _lookup_address(value: str) -> str:
    address = normalize(value)
    if not address:
        raise InvalidInput("invalid address: ''")
    return address


def _check_user(value: str) -> str:
    user = value.strip()
    if not is_safe_token(user) or "@" in user:
        raise InvalidInput(
            f"invalid user: {value!r} (an IdP username: no spaces, '@', commas or control characters)"
        )
    return user


def _check_users(values: list[str]) -> tuple[str, ...]:
    users = tuple(_check_user(value) for value in values)
    seen: set[str] = set()
    for user in users:
        if user.lower() in seen:
            raise InvalidInput(f"user listed twice: {user}")
        seen.add(user.lower())
    return users


def _lookup_app(value: str) -> str:
    app_id = value.strip()
    if not app_id:
        raise InvalidInput("invalid app id: ''")
    return app_id


def _app_settings(args: argparse.Namespace) -> AppSettings:
    """The --description/--expires/--networks options given (others stay as stored)."""
    given = {}
    if args.description is not None:
        given["description"] = check_description(args.description)
    if args.expires is not None:
        given["expires_at"] = parse_expiry(args.expires)
    if args.networks is not None:
        given["networks"] = parse_networks(args.networks)
    return AppSettings(**given)


def _read_password(args: argparse.Namespace, app_id: str) -> str:
    """The new secret from exactly one source (see the module docstring)."""
    given = [args.password is not None, args.password_stdin, args.generate]
    if sum(given) > 1:
        raise InvalidInput("give the password one way only: PASSWORD, --password-stdin or --generate")
    if args.generate:
        return generate_token()
    if args.password is not None:
        secret = args.password
    elif args.password_stdin:
        secret = sys.stdin.read()
        if secret.endswith("\n"):
            secret = secret[:-1]
            if secret.endswith("\r"):
                secret = secret[:-1]
    elif sys.stdin is not None and sys.stdin.isatty():
        try:
            secret = getpass.getpass(f"Password for app {app_id}: ")
            if secret:
                again = getpass.getpass("Repeat the password: ")
                if again != secret:
                    raise InvalidInput("passwords do not match; nothing changed")
        except EOFError:
            raise InvalidInput("no password entered; nothing changed") from None
    else:
        raise InvalidInput(
            "no password given and standard input is not a terminal: "
            "use --password-stdin, --generate or a PASSWORD argument"
        )
    if not secret:
        raise InvalidInput("empty password refused")
    return secret


# Commands ------------------------------------------------------------------------------------

Command = Callable[[Store, argparse.Namespace], Any]


async def _domains_list(store: Store, args: argparse.Namespace) -> None:
    rows = await store.load()
    domains = sorted(rows.domains, key=lambda d: d.name)
    if args.json:
        _json([{"domain": d.name, "enabled": d.enabled, "updated_at": d.updated_at} for d in domains])
        return
    for d in domains:
        _out(f"{d.name}\t{_state(d.enabled)}")


async def _domains_add(store: Store, args: argparse.Namespace) -> None:
    await store.add_domain(check_domain(args.domain))


async def _domains_del(store: Store, args: argparse.Namespace) -> None:
    await store.delete_domain(_lookup_domain(args.domain))


async def _domains_enable(store: Store, args: argparse.Namespace) -> None:
    await store.set_domain_enabled(check_domain(args.domain), True)


async def _domains_disable(store: Store, args: argparse.Namespace) -> None:
    await store.set_domain_enabled(_lookup_domain(args.domain), False)


async def _aliases_list(store: Store, args: argparse.Namespace) -> None:
    rows = await store.load()
    # One line per target: a list `team -> alice, bob` is two lines, so scripts reading the Go
    # tool's `alias<TAB>user<TAB>state` lines keep working and `--user` finds every list a user is in.
    lines = sorted(((target, a) for a in rows.aliases for target in a.targets),
                   key=lambda line: (line[0], line[1].address))
    if args.user is not None:
        user = args.user.strip().lower()
        lines = [(target, a) for target, a in lines if target.lower() == user]
    if args.json:
        seen: dict[str, Alias] = {}
        for _target, a in lines:
            seen.setdefault(a.address, a)
        _json([
            {"alias": a.address, "user": a.target_user, "domain": a.domain, "enabled": a.enabled,
             "updated_at": a.updated_at, "targets": list(a.targets), "catch_all": a.address.startswith("@"),
             "send_policy": a.send_policy, "senders": list(a.listed_senders)}
            for a in seen.values()
        ])
        return
    for target, a in lines:
        _out(f"{a.address}\t{target}\t{_state(a.enabled)}")


async def _aliases_add(store: Store, args: argparse.Namespace) -> None:
    alias = check_alias_address(args.alias)
    users = _check_users(args.users)
    if len(users) == 1:
        await store.add_alias(alias, users[0])
    else:
        await store.set_alias_targets(alias, users)


async def _aliases_add_member(store: Store, args: argparse.Namespace) -> None:
    await store.add_alias_member(_lookup_address(args.alias), _check_user(args.user))


async def _aliases_del_member(store: Store, args: argparse.Namespace) -> None:
    await store.remove_alias_member(_lookup_address(args.alias), args.user.strip())


async def _aliases_senders(store: Store, args: argparse.Namespace) -> None:
    await store.set_alias_senders(_lookup_address(args.alias), args.policy.strip().lower(),
                                  _check_users(args.users) if args.users else ())


async def _aliases_del(store: Store, args: argparse.Namespace) -> None:
    await store.delete_alias(_lookup_address(args.alias))


async def _aliases_enable(store: Store, args: argparse.Namespace) -> None:
    await store.set_alias_enabled(check_alias_address(args.alias), True)


async def _aliases_disable(store: Store, args: argparse.Namespace) -> None:
    await store.set_alias_enabled(_lookup_address(args.alias), False)


async def _apps_list(store: Store, args: argparse.Namespace) -> None:
    rows = await store.load()
    usage = await store.app_usage()
    apps = sorted(rows.apps, key=lambda a: a.app_id)
    if args.json:
        _json([
            {"app_id": a.app_id, "enabled": a.enabled, "updated_at": a.updated_at,
             "senders": [{"address": s.address, "enabled": s.enabled}
                         for s in sorted(a.senders, key=lambda s: s.address)],
             "description": a.description, "expires_at": a.expires_at, "networks": list(a.networks),
             "has_password": a.secret_hash != NO_SECRET,
             "last_used_at": usage[a.app_id].last_used_at if a.app_id in usage else None,
             "last_used_ip": usage[a.app_id].last_used_ip if a.app_id in usage else None}
            for a in apps
        ])
        return
    now = time.time()
    for a in apps:
        _out(f"{a.app_id}\t{_state(a.enabled)}\t{a.updated_at}")
        senders = [s.address if s.enabled else f"{s.address} (disabled)"
                   for s in sorted(a.senders, key=lambda s: s.address)]
        _out("\t\t" + (", ".join(senders) if senders else "-"))
        for line in _app_detail_lines(a, usage.get(a.app_id), now):
            _out("\t\t" + line)


def _app_detail_lines(app: App, usage: AppUsage | None, now: float) -> list[str]:
    """The version 2 fields, as `key: value` continuation lines after the Go tool's senders line,
    only those that are set: an app without them prints exactly the Go tool's two lines, and
    every line keeps the Go format's three tab-separated fields."""
    lines = []
    if app.secret_hash == NO_SECRET:
        lines.append(f"password: none (imported; set one with {PROG} apps add {app.app_id})")
    if app.description:
        lines.append(f"description: {app.description}")
    if app.expires_at is not None:
        lines.append(f"expires: {format_utc(app.expires_at)}"
                     + (" (expired)" if now >= app.expires_at else ""))
    if app.networks:
        lines.append("networks: " + ", ".join(app.networks))
    if usage is not None:
        lines.append(f"last used: {format_utc(usage.last_used_at)} from {usage.last_used_ip or '-'}")
    return lines


def _case_clash(rows: Rows, app_id: str) -> str | None:
    for app in rows.apps:
        if app.app_id != app_id and app.app_id.lower() == app_id.lower():
            return app.app_id
    return None


async def _apps_add(store: Store, args: argparse.Namespace) -> None:
    app_id = check_app_id(args.app)
    # Refuse a case clash before asking for a password; the store refuses it again, atomically.
    clash = _case_clash(await store.load(), app_id)
    if clash is not None:
        raise InvalidInput(f"app id {app_id!r} differs from existing app {clash!r} only in case")
    settings = _app_settings(args)   # refused before the password is asked
    secret = _read_password(args, app_id)
    await store.add_app(app_id, hash_secret(secret), settings)
    if args.generate:
        _out(secret)


async def _apps_set(store: Store, args: argparse.Namespace) -> None:
    settings = _app_settings(args)
    if not settings.changes():
        raise UsageError("apps set needs at least one of --description, --expires, --networks")
    await store.set_app_settings(_lookup_app(args.app), settings)


async def _apps_del(store: Store, args: argparse.Namespace) -> None:
    await store.delete_app(_lookup_app(args.app))


async def _apps_enable(store: Store, args: argparse.Namespace) -> None:
    await store.set_app_enabled(_lookup_app(args.app), True)


async def _apps_disable(store: Store, args: argparse.Namespace) -> None:
    await store.set_app_enabled(_lookup_app(args.app), False)


async def _apps_allow(store: Store, args: argparse.Namespace) -> None:
    await store.allow_sender(_lookup_app(args.app), check_address(args.address))


async def _apps_disallow(store: Store, args: argparse.Namespace) -> None:
    await store.disallow_sender(_lookup_app(args.app), _lookup_address(args.address))


async def _export(store: Store, args: argparse.Namespace) -> None:
    text = export_document(await store.load())
    if args.output in (None, "-"):
        sys.stdout.write(text)
        return
    # Written beside the target and renamed over it: a failed export leaves no half file.
    partial = f"{args.output}.partial"
    try:
        with open(partial, "w", encoding="utf-8") as out:
            out.write(text)
        os.replace(partial, args.output)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(partial)
        raise


async def _import(store: Store, args: argparse.Namespace) -> None:
    if args.file == "-":
        text = sys.stdin.read()
    else:
        with open(args.file, encoding="utf-8") as source:
            text = source.read()
    try:
        rows = parse_document(text)
    except InvalidInput as exc:
        raise InvalidInput(f"{args.file}: {exc}; nothing imported") from None
    try:
        created = await store.import_rows(rows, replace=args.replace)
    except NotFound as exc:
        raise NotFound(f"{args.file}: {exc}; nothing imported") from None
    for app_id in created:
        _out(f"app {app_id} created without a password (exports carry none); it cannot log in "
             f"until '{PROG} apps add {app_id}' gives it one")


async def _check(store: Store, args: argparse.Namespace, config: Config) -> None:
    """Evaluate one policy request with the daemon's own code (see the module docstring)."""
    # The daemon's modules, imported only here: `check` is the one command that needs them.
    from mailcloak.idp import build_provider
    from mailcloak.metrics import Metrics
    from mailcloak.policy.codec import PolicyRequest
    from mailcloak.policy.server import PolicyService
    from mailcloak.runtime import Runtime, RuntimeRef
    from mailcloak.state import StateCache

    attributes = {"request": "smtpd_access_policy", "protocol_state": args.state}
    if args.sasl_method:
        attributes["sasl_method"] = args.sasl_method
    if args.sasl_user:
        attributes["sasl_username"] = args.sasl_user
    attributes["sender"] = args.sender
    attributes["recipient"] = args.recipient if args.state == "RCPT" else ""
    if args.client_address:
        attributes["client_address"] = args.client_address
    request = PolicyRequest(MappingProxyType(attributes))

    state = StateCache(store, config.policy.extra_local_domains)
    await state.load()
    idp = build_provider(config)
    try:
        service = PolicyService(RuntimeRef(Runtime(config, idp, state)), Metrics())
        decision = await service.evaluate(request)
    finally:
        await idp.close()
    _out(f"action: {decision.action}")
    _out(f"rule: {decision.rule}")


def _store_spec(value: str) -> Config:
    """`sqlite:PATH` or `postgres:DSN` as a config naming that one store (migrate-store). The
    DSN's password may instead come from PGPASSWORD or ~/.pgpass, which `ps` does not show."""
    kind, _, rest = value.partition(":")
    if kind == "sqlite" and rest:
        return dataclasses.replace(Config(), sqlite=SQLiteConfig(path=os.path.expanduser(rest)))
    if kind in ("postgres", "postgresql") and rest:
        dsn = value if rest.startswith("//") else rest  # a postgresql://... URI is the DSN as is
        return dataclasses.replace(Config(), store=StoreConfig(backend="postgres"),
                                   postgres=PostgresConfig(dsn=dsn))
    raise argparse.ArgumentTypeError(
        f"invalid store {value.split('@')[-1]!r} (sqlite:PATH or postgres:DSN)"
    )


async def _migrate_store(args: argparse.Namespace) -> None:
    """Copy every row from --from into --to (see mailcloak.store.copy)."""
    from mailcloak.store.copy import TABLES, copy_store

    source = await open_store(args.source)
    try:
        target = await open_store(args.target, create=True)
        try:
            copied = await copy_store(source, target, replace=args.replace)
        finally:
            await target.close()
    finally:
        await source.close()
    for table, _, _ in TABLES:
        _out(f"{table}\t{copied[table]}")
    _out(f"copied {sum(copied.values())} rows from {source.location} to {target.location}; "
         "row counts verified")


# Command line --------------------------------------------------------------------------------


def _state_arg(value: str) -> str:
    state = value.strip().upper()
    if state not in ("RCPT", "MAIL"):
        raise argparse.ArgumentTypeError(f"invalid state {value!r} (choose RCPT or MAIL)")
    return state


_APP_SETTING_OPTIONS = (
    ("--description", {"metavar": "TEXT", "default": None, "help": "what the app is for"}),
    ("--expires", {"metavar": "WHEN", "default": None,
                   "help": f"YYYY-MM-DD (refused from 00:00 UTC that day), an ISO time, or {NEVER}"}),
    ("--networks", {"metavar": "CIDR,...", "default": None,
                    "help": f"client networks it may log in from, or {ANY_NETWORK}"}),
)


def build_parser() -> argparse.ArgumentParser:
    # --db / --config are accepted before or after the command words; SUPPRESS keeps a value
    # given before the words from being reset by a sub-parser's default.
    common = _Parser(add_help=False)
    common.add_argument("--db", metavar="PATH", default=argparse.SUPPRESS,
                        help=f"SQLite database (default {DEFAULT_DB_PATH})")
    common.add_argument("--config", metavar="PATH", default=argparse.SUPPRESS,
                        help="mailcloak config file; its sqlite.path is the database")
    parser = _Parser(prog=PROG, parents=[common],
                     description="Manage mailcloak's domains, aliases and apps.")
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    groups = parser.add_subparsers(dest="group", metavar="COMMAND", required=True, parser_class=_Parser)

    def leaf(sub, name: str, func, help_text: str, *arguments, **kw) -> argparse.ArgumentParser:
        p = sub.add_parser(name, parents=[common], help=help_text, description=help_text)
        for arg in arguments:
            p.add_argument(arg[0], **arg[1])
        p.set_defaults(func=func, **kw)
        return p

    leaf(groups, "init", None, "create the database (and its folder) or bring its schema up to date",
         init=True)

    domains = groups.add_parser("domains", parents=[common], help="local mail domains")
    dsub = domains.add_subparsers(dest="cmd", metavar="ACTION", required=True, parser_class=_Parser)
    leaf(dsub, "list", _domains_list, "list domains (domain<TAB>enabled|disabled)",
         ("--json", {"action": "store_true", "help": "print a JSON array"}))
    domain_arg = ("domain", {"metavar": "DOMAIN"})
    leaf(dsub, "add", _domains_add, "add a domain, or re-enable it", domain_arg)
    leaf(dsub, "del", _domains_del, "delete a domain and its aliases", domain_arg)
    leaf(dsub, "enable", _domains_enable, "enable a domain", domain_arg)
    leaf(dsub, "disable", _domains_disable, "disable a domain", domain_arg)

    aliases = groups.add_parser("aliases", parents=[common], help="aliases of IdP users")
    asub = aliases.add_subparsers(dest="cmd", metavar="ACTION", required=True, parser_class=_Parser)
    leaf(asub, "list", _aliases_list, "list aliases (alias<TAB>user<TAB>enabled|disabled)",
         ("--user", {"metavar": "USER", "help": "only this IdP user's aliases"}),
         ("--json", {"action": "store_true", "help": "print a JSON array"}))
    alias_arg = ("alias", {"metavar": "ALIAS"})
    leaf(asub, "add", _aliases_add,
         "add an alias for an IdP user, or update and re-enable it; several users make a "
         "distribution list; ALIAS @DOMAIN is the domain's catch-all",
         alias_arg, ("users", {"metavar": "USER", "nargs": "+"}))
    leaf(asub, "add-member", _aliases_add_member, "add a user to a distribution list",
         alias_arg, ("user", {"metavar": "USER"}))
    leaf(asub, "del-member", _aliases_del_member, "remove a user from a distribution list",
         alias_arg, ("user", {"metavar": "USER"}))
    leaf(asub, "senders", _aliases_senders,
         "who may send as the alias: members (its targets, the default), nobody, or listed USERs",
         alias_arg, ("policy", {"metavar": "members|nobody|listed"}),
         ("users", {"metavar": "USER", "nargs": "*"}))
    leaf(asub, "del", _aliases_del, "delete an alias", alias_arg)
    leaf(asub, "enable", _aliases_enable, "enable an alias", alias_arg)
    leaf(asub, "disable", _aliases_disable, "disable an alias", alias_arg)

    apps = groups.add_parser("apps", parents=[common], help="applications that send with a password")
    psub = apps.add_subparsers(dest="cmd", metavar="ACTION", required=True, parser_class=_Parser)
    leaf(psub, "list", _apps_list, "list apps and the addresses they may send as",
         ("--json", {"action": "store_true", "help": "print a JSON array"}))
    app_arg = ("app", {"metavar": "APP"})
    leaf(psub, "add", _apps_add,
         "add an app or replace its password (asked on the terminal when not given)",
         app_arg,
         ("password", {"metavar": "PASSWORD", "nargs": "?", "default": None,
                       "help": "the password (visible to other users in ps; prefer the prompt "
                               "or --password-stdin)"}),
         ("--password-stdin", {"action": "store_true",
                               "help": "read the password from standard input"}),
         ("--generate", {"action": "store_true",
                         "help": "generate a random token and print it on standard output"}),
         *_APP_SETTING_OPTIONS)
    leaf(psub, "set", _apps_set,
         "change an app's description, expiry or networks (its password and senders stay)",
         app_arg, *_APP_SETTING_OPTIONS)
    leaf(psub, "del", _apps_del, "delete an app", app_arg)
    leaf(psub, "enable", _apps_enable, "enable an app", app_arg)
    leaf(psub, "disable", _apps_disable, "disable an app", app_arg)
    addr_arg = ("address", {"metavar": "ADDR"})
    leaf(psub, "allow", _apps_allow, "allow an app to send as an address", app_arg, addr_arg)
    leaf(psub, "disallow", _apps_disallow, "withdraw an address from an app", app_arg, addr_arg)

    leaf(groups, "export", _export,
         "write domains, aliases and apps (no secrets) as JSON, for another host or for review",
         ("--output", {"metavar": "FILE", "default": None, "help": "write here (default: standard output)"}))
    leaf(groups, "import", _import,
         "apply a JSON file made by export, all or nothing (apps new here get no password)",
         ("file", {"metavar": "FILE", "help": "the file ('-' for standard input)"}),
         ("--replace", {"action": "store_true",
                        "help": "also delete domains, aliases and apps that are not in the file"}))

    leaf(groups, "check", _check, "show what the policy service would answer to a request",
         ("--sasl-method", {"metavar": "M", "default": "", "help": "e.g. XOAUTH2, PLAIN; none: unauthenticated"}),
         ("--sasl-user", {"metavar": "U", "default": ""}),
         ("--sender", {"metavar": "S", "default": "", "help": "envelope sender (empty: null sender)"}),
         ("--recipient", {"metavar": "R", "default": ""}),
         ("--state", {"metavar": "RCPT|MAIL", "type": _state_arg, "default": "RCPT"}),
         ("--client-address", {"metavar": "IP", "default": "",
                               "help": "the SMTP client's address (checked against an app's networks)"}),
         check=True)

    migrate = groups.add_parser(
        "migrate-store", help="copy every row from one store to another, in one transaction",
        description="Copy domains, aliases, apps (secret hashes included) and every other table "
                    "from one store to another in one transaction, then verify the row counts. "
                    "The target is created or migrated first; a target that holds rows is "
                    "refused unless --replace is given.")
    migrate.add_argument("--from", dest="source", metavar="SPEC", type=_store_spec, required=True,
                         help="sqlite:PATH or postgres:DSN")
    migrate.add_argument("--to", dest="target", metavar="SPEC", type=_store_spec, required=True,
                         help="sqlite:PATH or postgres:DSN")
    migrate.add_argument("--replace", action="store_true",
                         help="delete the target's rows first")
    migrate.set_defaults(migrate=True)
    return parser


def _config_for(args: argparse.Namespace) -> Config | None:
    db = getattr(args, "db", None)
    config_path = getattr(args, "config", None)
    if getattr(args, "migrate", False):
        if db is not None or config_path is not None:
            raise UsageError("migrate-store names its stores with --from and --to, not --db or --config")
        return None
    if db is not None and config_path is not None:
        raise UsageError("give either --db or --config, not both")
    if getattr(args, "check", False):
        if db is not None:
            raise UsageError("check needs --config PATH (it asks the configured identity provider)")
        return load_config(config_path or DEFAULT_CONFIG_PATH)
    if config_path is not None:
        return load_config(config_path)
    path = os.path.expanduser(db) if db is not None else DEFAULT_DB_PATH
    if not path:
        raise UsageError("--db needs a path")
    return dataclasses.replace(Config(), sqlite=SQLiteConfig(path=path))


async def _run(args: argparse.Namespace, config: Config | None) -> None:
    if getattr(args, "migrate", False):
        await _migrate_store(args)
        return
    if getattr(args, "init", False):
        store = await open_store(config, create=True)
        await store.close()
        return
    store = await open_store(config)
    try:
        if getattr(args, "check", False):
            await _check(store, args, config)
        else:
            await args.func(store, args)
    finally:
        await store.close()


def main(argv: list[str] | None = None) -> int:
    # Warnings of the shared code (e.g. a database row the daemon would skip) as prefixed lines.
    logging.basicConfig(stream=sys.stderr, level=logging.WARNING,
                        format=f"{PROG}: %(levelname)s: %(message)s")
    try:
        args = build_parser().parse_args(argv)
        config = _config_for(args)
        asyncio.run(_run(args, config))
        sys.stdout.flush()
        return 0
    except UsageError as exc:
        print(f"{PROG}: {_one_line(str(exc))}", file=sys.stderr)
        return 2
    except MailcloakError as exc:
        print(f"{PROG}: {_one_line(str(exc))}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # stdout closed early (`mailcloakctl aliases list | head`): quiet, like other tools.
        try:
            sys.stdout = open(os.devnull, "w")
        except OSError:
            pass
        return 1
    except SystemExit as exc:  # --help, --version
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 2)
    except OSError as exc:
        print(f"{PROG}: {_one_line(exc.strerror or str(exc))}"
              + (f": {_one_line(str(exc.filename))}" if exc.filename else ""), file=sys.stderr)
        return 1
    except Exception as exc:  # noqa: BLE001 - the contract is one line, never a traceback
        print(f"{PROG}: internal error: {type(exc).__name__}: {_one_line(str(exc))}", file=sys.stderr)
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
