"""`personal-agent`: run the agent and edit its tables (users, their servers, appliance keys).

Every edit is a locked read-modify-write with an atomic rename, so a running
agent sees the old table or the new one; it re-reads the file on the next request.
Passwords are read from the terminal (twice) or, for scripts, from stdin with
`--password-stdin`; they never appear in argv, logs or output.
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import os
import re
import sys
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

from appliance.agent import settings as settings_mod
from appliance.agent import tables, tlscert
from appliance.agent.settings import AgentSettings
from appliance.core import agent_protocol as wire
from appliance.core import logs, passwords, tomledit
from appliance.core.atomic_file import locked, write_atomically
from appliance.core.attributes import (
    CLI_HELP,
    AttrValue,
    BadAttribute,
    check_attributes,
    parse_attribute_args,
)
from appliance.core.tomlfile import ConfigError

log = logging.getLogger("appliance.agent")


class UsageError(Exception):
    pass


def _settings(args: argparse.Namespace) -> AgentSettings:
    return settings_mod.load(args.config)


def _read_password(args: argparse.Namespace) -> str:
    try:
        pw = passwords.read_new_password(args.password_stdin)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    if not 1 <= len(pw) <= wire.MAX_PASSWORD_LEN:
        raise UsageError(f"a password has 1 to {wire.MAX_PASSWORD_LEN} characters")
    return pw


def _attr_pairs(pairs: list[str]) -> dict[str, AttrValue]:
    """--attr department=Sales --attr groups=a,b (the syntax of appliance.core.attributes)."""
    try:
        return parse_attribute_args(pairs)
    except BadAttribute as exc:
        raise UsageError(f"--attr: {exc}") from None


def _edit_users(s: AgentSettings, change: Callable[[dict[str, tables.User]], str]) -> None:
    with locked(s.users_file):
        text = tomledit.read(s.users_file)
        users = dict(tables.load_users(s.users_file).users)
        message = change(users)
        write_atomically(s.users_file, tables.dump_users(tables.UserTable(users), text))
    print(message)


def _need(users: dict[str, tables.User], name: str) -> tables.User:
    if name not in users:
        raise UsageError(f"no user {name!r}")
    return users[name]


def cmd_users(args: argparse.Namespace) -> int:
    s = _settings(args)
    if args.action == "list":
        table = tables.load_users(s.users_file)
        for name in sorted(table.users):
            u = table.users[name]
            shown = ", ".join(
                f"{k}={','.join(v) if isinstance(v, tuple) else v}"
                for k, v in sorted(u.attributes.items())
            )
            print(f"{name}{' (locked)' if u.locked else ''}  {shown}")
        return 0
    name = args.user
    if not wire.USER_RE.fullmatch(name):
        raise UsageError(f"{name!r}: user ids are letters, digits and . _ + - (at most 64)")
    if args.action == "add":
        attrs = _attr_pairs(args.attr)
        pw = _read_password(args)
        hashed = passwords.hash_password(pw)

        def add(users: dict[str, tables.User]) -> str:
            if name in users:
                raise UsageError(f"user {name!r} exists; use passwd, or del first")
            users[name] = tables.User(name, hashed, attributes=attrs)
            return f"added {name}"

        _edit_users(s, add)
    elif args.action == "del":

        def delete(users: dict[str, tables.User]) -> str:
            _need(users, name)
            del users[name]
            return f"deleted {name}"

        _edit_users(s, delete)
    elif args.action == "passwd":
        pw = _read_password(args)
        hashed = passwords.hash_password(pw)
        _edit_users(
            s,
            lambda users: _set(users, name, password_hash=hashed, msg=f"new password for {name}"),
        )
    elif args.action in ("lock", "unlock"):
        flag = args.action == "lock"
        _edit_users(s, lambda users: _set(users, name, locked=flag, msg=f"{args.action}ed {name}"))
    elif args.action == "attr":
        new_attrs = _attr_pairs(args.attr)

        def set_attrs(users: dict[str, tables.User]) -> str:
            merged = {**_need(users, name).attributes, **new_attrs}
            for k in args.unset or ():
                merged.pop(k, None)
            try:
                merged = check_attributes(merged)
            except BadAttribute as exc:
                raise UsageError(str(exc)) from None
            users[name] = replace(users[name], attributes=merged)
            return f"attributes of {name} updated"

        _edit_users(s, set_attrs)
    return 0


def _set(users: dict[str, tables.User], name: str, msg: str, **changes: Any) -> str:
    users[name] = replace(_need(users, name), **changes)
    return msg


def cmd_servers(args: argparse.Namespace) -> int:
    s = _settings(args)
    if args.action == "list":
        table = tables.load_users(s.users_file)
        for name in sorted(table.users):
            if args.user and name != args.user:
                continue
            for service, target in sorted(table.users[name].servers.items()):
                print(f"{name}  {service}  {target}")
        return 0
    service = args.service
    if not wire.SERVICE_RE.fullmatch(service):
        raise UsageError(f"{service!r}: service names are like pop3, imap, nntp")
    target = args.target
    if args.action == "set":
        try:
            wire.parse_server(target)
        except ValueError as exc:
            raise UsageError(str(exc)) from None

    def change(users: dict[str, tables.User]) -> str:
        servers = dict(_need(users, args.user).servers)
        if args.action == "set":
            servers[service] = target
        elif servers.pop(service, None) is None:
            raise UsageError(f"{args.user} has no {service} server")
        users[args.user] = replace(users[args.user], servers=servers)
        return f"{args.user} {service} -> {target}" if target else f"{args.user} {service} removed"

    _edit_users(s, change)
    return 0


def _pending(s: AgentSettings) -> dict[str, dict[str, Any]]:
    try:
        data = json.loads(s.pending_file.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


MIN_KEY_PREFIX = 22  # base64url characters: 132 bits, too many to grind a look-alike key


def _find_key(s: AgentSettings, text: str) -> str:
    """A full key, or a prefix of at least MIN_KEY_PREFIX characters of exactly one known key.

    Whoever asks chooses the key, so a short prefix of a visitor's key is cheap to
    match with a key of one's own (6 characters: 2**36 tries) and be allowed instead."""
    if wire.valid_key_id(text):
        return text
    if len(text) < MIN_KEY_PREFIX:
        raise UsageError(
            f"{text!r} is too short: give the whole key (43 characters) or at least "
            f"{MIN_KEY_PREFIX} of its first characters, as `personal-agent appliances list` "
            "shows it"
        )
    if len(text) > 43 or not re.fullmatch(r"[A-Za-z0-9_-]+", text):
        raise UsageError(f"{text!r} is not an appliance key (43 base64url characters)")
    known = set(_pending(s)) | set(tables.load_appliances(s.appliances_file).entries)
    hits = sorted(k for k in known if k.startswith(text))
    if len(hits) != 1:
        raise UsageError(
            f"{text!r} matches {len(hits)} known keys; give the whole key (43 characters)"
        )
    return hits[0]


def cmd_appliances(args: argparse.Namespace) -> int:
    s = _settings(args)
    table = tables.load_appliances(s.appliances_file)
    if args.action == "list":
        rows = []
        for key, e in sorted(table.entries.items()):
            rows.append((key, e.status, e.name, e.since))
        for key in s.trusted:
            if key not in table.entries:
                rows.append((key, "allowed", "(agent.toml trusted)", ""))
        for key, p in sorted(_pending(s).items()):
            if key in table.entries or key in s.trusted:
                continue
            seen = datetime.datetime.fromtimestamp(float(p.get("last_seen", 0)), datetime.UTC)
            rows.append(
                (key, "pending", f"from {p.get('address', '?')}", seen.strftime("%Y-%m-%d %H:%M"))
            )
        for key, status, name, when in rows:
            print(f"{key}  {status:8}  {when:16}  {name}")
        if s.accept == "any":
            print('(accept = "any": keys not denied are answered too)')
        return 0
    key = _find_key(s, args.key)
    status = "allowed" if args.action == "allow" else "denied"
    with locked(s.appliances_file):
        text = tomledit.read(s.appliances_file)
        entries = dict(tables.load_appliances(s.appliances_file).entries)
        stamp = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        entries[key] = tables.ApplianceEntry(key, status, args.name or "", stamp)
        new = tables.dump_appliances(tables.ApplianceTable(entries), text)
        write_atomically(s.appliances_file, new)
    print(f"{status} {key}")
    return 0


def cmd_fingerprint(args: argparse.Namespace) -> int:
    s = _settings(args)
    tlscert.secure_dir(s.state_directory)
    tlscert.ensure_certificate(s.tls_certificate, s.tls_key, s.tls_names)
    print(tlscert.certificate_fingerprint(s.tls_certificate))
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    """Is the agent running, and its relay link up?  Exit 0 up (or no relay), 1 down,
    3 not running (no fresh status file)."""
    s = _settings(args)
    try:
        doc = json.loads(s.status_file.read_text())
        pid, relay = int(doc["pid"]), doc["relay"]
    except (OSError, ValueError, KeyError, TypeError):
        print(f"personal-agent: not running (no status in {s.status_file})")
        return 3
    try:
        os.kill(pid, 0)
        alive = True
    except PermissionError:
        alive = True  # running as another user
    except OSError:
        alive = False
    if not alive:
        print(f"personal-agent: not running (pid {pid} is gone)")
        return 3
    if relay is None:
        print(f"personal-agent: running (pid {pid}); no [relay]: reached directly")
        return 0
    up = bool(relay.get("up"))
    print(
        f"personal-agent: running (pid {pid}); relay {relay.get('relay')} household "
        f"{relay.get('household')}: link {'up' if up else 'DOWN'}"
        + ("" if up else f" ({relay.get('last_error') or 'no link yet'})")
        + f"; {relay.get('streams', 0)} streams open"
    )
    return 0 if up else 1


def cmd_run(args: argparse.Namespace) -> int:
    from appliance.agent import server

    return server.serve(_settings(args))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="personal-agent",
        description="A household's personal agent: vouches for its users to guest appliances.",
    )
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def with_config(sp: argparse.ArgumentParser) -> argparse.ArgumentParser:
        sp.add_argument(
            "--config",
            "-c",
            type=Path,
            default=settings_mod.DEFAULT_PATH,
            help=f"agent configuration (default {settings_mod.DEFAULT_PATH})",
        )
        return sp

    with_config(sub.add_parser("run", help="serve the HTTPS API")).set_defaults(func=cmd_run)
    with_config(
        sub.add_parser("status", help="is the agent running, and its relay link up")
    ).set_defaults(func=cmd_status)
    with_config(
        sub.add_parser("fingerprint", help="print the certificate fingerprint visitors pin")
    ).set_defaults(func=cmd_fingerprint)

    users = sub.add_parser("users", help="add, delete, list users; set passwords")
    usub = users.add_subparsers(dest="action", required=True)
    with_config(usub.add_parser("list"))
    for action in ("add", "passwd"):
        sp = with_config(usub.add_parser(action))
        sp.add_argument("user")
        sp.add_argument("--password-stdin", action="store_true", help="read one line from stdin")
        if action == "add":
            sp.add_argument(
                "--attr", action="append", default=[], metavar="NAME=VALUE", help=CLI_HELP
            )
    for action in ("del", "lock", "unlock"):
        with_config(usub.add_parser(action)).add_argument("user")
    sp = with_config(usub.add_parser("attr", help="set (--attr) or remove (--unset) attributes"))
    sp.add_argument("user")
    sp.add_argument("--attr", action="append", default=[], metavar="NAME=VALUE", help=CLI_HELP)
    sp.add_argument("--unset", action="append", metavar="NAME")
    users.set_defaults(func=cmd_users)

    servers = sub.add_parser("servers", help="a user's own servers (pop3, imap, nntp ...)")
    ssub = servers.add_subparsers(dest="action", required=True)
    sp = with_config(ssub.add_parser("list"))
    sp.add_argument("user", nargs="?")
    sp = with_config(ssub.add_parser("set"))
    sp.add_argument("user")
    sp.add_argument("service")
    sp.add_argument(
        "target",
        metavar="HOST:PORT[#sha256:PIN]",
        help="with #PIN the appliance speaks TLS to it and accepts only that certificate",
    )
    sp = with_config(ssub.add_parser("del"))
    sp.add_argument("user")
    sp.add_argument("service")
    sp.set_defaults(target="")
    servers.set_defaults(func=cmd_servers)

    appl = sub.add_parser("appliances", help="appliance keys: list pending, allow, deny")
    asub = appl.add_subparsers(dest="action", required=True)
    with_config(asub.add_parser("list"))
    for action in ("allow", "deny"):
        sp = with_config(asub.add_parser(action))
        sp.add_argument(
            "key",
            help="the appliance key (43 characters), or a unique prefix of at least "
            f'{MIN_KEY_PREFIX} characters of a pending one (put "--" before one that starts '
            'with "-")',
        )
        sp.add_argument("--name", help="a note, e.g. 'Hotel Example lobby'")
    appl.set_defaults(func=cmd_appliances)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logs.setup(args.log_level)
    try:
        rc: int = args.func(args)
        return rc
    except ConfigError as exc:
        print(f"personal-agent: config error: {exc}", file=sys.stderr)
        return 2
    except UsageError as exc:
        print(f"personal-agent: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
