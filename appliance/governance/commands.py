"""`appliance keys ...`, `appliance usage` and `appliance admin-key`: the admin's side of governance.

Secrets are printed once, alone on the last line of stdout; the database keeps their hashes.
A running gateway sees every change within two seconds.
"""

from __future__ import annotations

import argparse
import csv
import getpass
import json
import os
import sys
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from appliance.auth import check_key_name, hash_key, new_key
from appliance.governance.clock import Clock
from appliance.governance.keyadmin import change_key, create_key, key_fields, revoke_key, rotate_key
from appliance.governance.keys import ZONES
from appliance.governance.store import Store, UsageFilter, open_store

if TYPE_CHECKING:
    from appliance.config import Settings

Fail = Callable[[str], int]


def add_parsers(sub: Any, handler: Callable[[argparse.Namespace], int]) -> None:
    keys = sub.add_parser(
        "keys", help="client API keys: owners, tiers, models, limits (only hashes are stored)"
    )
    keys_sub = keys.add_subparsers(dest="keys_command", metavar="COMMAND")
    keys.set_defaults(group=keys, group_dest="keys_command")  # `appliance keys` alone: its help
    keys_sub.add_parser("list", help="keys with their last use and today's usage").add_argument(
        "--json", action="store_true"
    )
    add = keys_sub.add_parser("add", help="create a key and print it once (last line)")
    add.add_argument("name")
    _key_options(add)
    keys_sub.add_parser("show", help="one key's settings and today's usage").add_argument("name")
    keys_sub.add_parser("rotate", help="a new secret for a key: same identity and history").add_argument(
        "name"
    )
    for name in ("revoke", "remove"):
        keys_sub.add_parser(name, help="revoke a key at once (its history stays)").add_argument("name")
    change = keys_sub.add_parser("set", help="change a key's tier, labels, models, ceiling or expiry")
    change.add_argument("name")
    _key_options(change)
    change.add_argument("--all-models", action="store_true", help="allow every model again")
    change.add_argument("--no-expiry", action="store_true", help="remove the expiry date")
    keys.set_defaults(handler=handler)

    usage = sub.add_parser("usage", help="the usage ledger: requests, tokens, audio, where they were served")
    usage.add_argument("--since", metavar="DATE", help="first day, YYYY-MM-DD")
    usage.add_argument("--until", metavar="DATE", help="last day, YYYY-MM-DD")
    who = usage.add_mutually_exclusive_group()
    who.add_argument("--key", metavar="NAME")
    who.add_argument("--school")
    who.add_argument("--group")
    usage.add_argument(
        "--by",
        choices=["day", "key", "model", "school", "group", "app"],
        help="sum per day, key, model, school, group or app",
    )
    form = usage.add_mutually_exclusive_group()
    form.add_argument("--json", action="store_true")
    form.add_argument("--csv", action="store_true")
    usage.set_defaults(handler=handler)

    admin = sub.add_parser("admin-key", help="create the admin key for /admin/api (printed once)")
    admin.add_argument("--rotate", action="store_true", help="replace the existing admin key")
    admin.set_defaults(handler=handler)


def _key_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--tier", help="a tier from the configuration (default: default_tier)")
    parser.add_argument("--school", help="owner label: the school")
    parser.add_argument("--group", help="owner label: a class or department")
    parser.add_argument("--app", help="owner label: the app")
    parser.add_argument(
        "--models", nargs="+", metavar="MODEL", help="public model names it may use (default: all)"
    )
    parser.add_argument(
        "--max-zone", choices=ZONES, help="how far its requests may travel (box keeps them here)"
    )
    parser.add_argument("--expires", metavar="DATE", help="last day it works, YYYY-MM-DD")


def run(args: argparse.Namespace, settings: Settings, fail: Fail) -> int:
    if getattr(args, "keys_command", None) == "add":
        try:
            check_key_name(args.name)  # before anything is written: the name goes into logs and reports
        except ValueError as exc:
            return fail(str(exc))
    store = open_store(settings.data_dir, settings.resolved_keys_file)
    for problem in store.import_problems:  # the older keys file's lines left behind, once
        print(f"appliance: {problem} (not imported)", file=sys.stderr)
    try:
        if args.command == "usage":
            return _usage(args, store)
        if args.command == "admin-key":
            return _admin_key(args, store, fail)
        return _keys(args, store, settings, fail)
    except ValueError as exc:  # KeyInputError, or a bad date
        return fail(str(exc))
    finally:
        store.close()


def _keys(args: argparse.Namespace, store: Store, settings: Settings, fail: Fail) -> int:
    command = args.keys_command
    if command == "list":
        return _list(store, args.json)
    if command == "add":
        if store.key(args.name) is not None:
            return fail(
                f"key '{args.name}' exists; `appliance keys rotate {args.name}` gives it a new secret"
            )
        record, secret = create_key(store, args.name, _fields(args, settings), _actor())
        print(f"key '{record.name}' added, tier {record.tier or settings.default_tier}", file=sys.stderr)
        print(secret)  # alone on stdout, shown once: only its hash is stored
        return 0
    record = store.key(args.name)
    if record is None:
        return fail(f"no active key named '{args.name}'")
    if command == "show":
        print(_dumps({**record.public(), "today": _today(store).get(record.name)}), end="")
        return 0
    if command == "rotate":
        secret = rotate_key(store, args.name, _actor())
        print(f"key '{record.name}' has a new secret; the old one no longer works", file=sys.stderr)
        print(secret)
        return 0
    if command in ("revoke", "remove"):
        revoke_key(store, args.name, _actor())
        print(f"key '{record.name}' revoked")
        return 0
    fields = _fields(args, settings)  # set
    if args.all_models:
        fields["models"] = None
    if args.no_expiry:
        fields["expires"] = None
    if not fields:
        return fail(
            "nothing to change: give --tier, --school, --group, --app, --models, --max-zone or --expires"
        )
    change_key(store, args.name, fields, _actor())
    print(f"key '{record.name}' updated")
    return 0


def _fields(args: argparse.Namespace, settings: Settings) -> dict[str, Any]:
    """The key options given, validated; options not given are left out."""
    options = ("tier", "school", "group", "app", "models", "max_zone", "expires")
    return key_fields(settings, **{name: getattr(args, name) for name in options})


def _actor() -> str:
    """Who, in the audit list: the command and the system user who ran it."""
    try:
        user = getpass.getuser()
    except (KeyError, OSError):  # no passwd entry (a container's numeric user)
        user = str(os.getuid())
    return f"appliance keys (user {user})"


def _today(store: Store) -> dict[str, dict[str, Any]]:
    day = Clock().day
    return {row["key"]: row for row in store.usage_report(UsageFilter(since=day, until=day, by="key"))}


def _list(store: Store, as_json: bool) -> int:
    today = _today(store)
    records = store.keys()
    if as_json:
        print(_dumps([{**r.public(), "today": today.get(r.name)} for r in records]), end="")
        return 0
    print("NAME\tTIER\tSCHOOL\tGROUP\tAPP\tMAX_ZONE\tEXPIRES\tLAST_USED\tTODAY_REQUESTS\tTODAY_TOKENS")
    for r in records:
        used = today.get(r.name) or {}
        tokens = used.get("prompt_tokens", 0) + used.get("completion_tokens", 0)
        print(
            "\t".join(
                str(v)
                for v in (
                    r.name,
                    r.tier or "-",
                    r.school or "-",
                    r.group or "-",
                    r.app or "-",
                    r.max_zone,
                    r.expires or "-",
                    _when(r.last_used),
                    used.get("requests", 0),
                    tokens,
                )
            )
        )
    return 0


def _when(at: float | None) -> str:
    return "never" if at is None else time.strftime("%Y-%m-%d %H:%M", time.localtime(at))


def _usage(args: argparse.Namespace, store: Store) -> int:
    where = UsageFilter(args.since, args.until, args.key, args.school, args.group, args.by)
    rows = store.usage_report(where)
    if args.json:
        print(_dumps(rows), end="")
    elif args.csv or rows:
        writer = csv.DictWriter(
            sys.stdout,
            fieldnames=list(rows[0]) if rows else ["key", "model", "day"],
            delimiter="," if args.csv else "\t",
            lineterminator="\n",
        )
        writer.writeheader()
        writer.writerows(rows)
    return 0


def _admin_key(args: argparse.Namespace, store: Store, fail: Fail) -> int:
    if store.admin_digest() is not None and not args.rotate:
        return fail("an admin key exists; `appliance admin-key --rotate` replaces it")
    secret = new_key("admin-")
    store.set_admin_digest(hash_key(secret))
    print(
        "admin key for /admin/api (Authorization: Bearer <key>); the previous one, if any, no longer works",
        file=sys.stderr,
    )
    print(secret)
    return 0


def _dumps(value: Any) -> str:
    return json.dumps(value, indent=2) + "\n"
