"""`appliance users add|del|list|passwd` and `appliance sessions list|show|end`.

Users live in the table file `policies.users`; sessions in the shared state store.
Passwords are read from the terminal (twice) or with --password-stdin from one
line of standard input; they are never echoed, logged or put on a command line.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from appliance.accounts import site as accounts
from appliance.core import passwords
from appliance.core.atomic_file import locked
from appliance.core.attributes import CLI_HELP, Attributes, as_json, parse_attribute_args
from appliance.core.config import Config, load
from appliance.net.firewall import revoker
from appliance.state.sessions import Session, SessionStore


def _config(args: argparse.Namespace) -> Config:
    return load(args.config)


def _users_path(args: argparse.Namespace) -> Path:
    return Path(_config(args).policies.users)


def _read_password(args: argparse.Namespace) -> str | None:
    try:
        pw = passwords.read_new_password(args.password_stdin)
    except ValueError as exc:
        print(f"appliance: {exc}", file=sys.stderr)
        return None
    if len(pw) < 8:
        print("appliance: a password needs at least 8 characters", file=sys.stderr)
        return None
    return pw


def _users_add(args: argparse.Namespace) -> int:
    path = _users_path(args)
    with locked(path):  # two admins editing at once: one waits for the other
        table = accounts.load(path)
        if not accounts.valid_user_id(args.user):
            print(f"appliance: {args.user!r} is not a valid user id", file=sys.stderr)
            return 2
        if args.user in table:
            print(f"appliance: user {args.user} exists (use passwd)", file=sys.stderr)
            return 1
        try:
            attrs = parse_attribute_args(args.attr)
        except ValueError as exc:
            print(f"appliance: {exc}", file=sys.stderr)
            return 2
        pw = _read_password(args)
        if pw is None:
            return 2
        table[args.user] = accounts.Account(args.user, passwords.hash_password(pw), attrs)
        accounts.save(path, table)
        print(f"user {args.user} added to {path}")
        return 0


def _users_del(args: argparse.Namespace) -> int:
    path = _users_path(args)
    with locked(path):  # two admins editing at once: one waits for the other
        table = accounts.load(path)
        if table.pop(args.user, None) is None:
            print(f"appliance: no user {args.user}", file=sys.stderr)
            return 1
        accounts.save(path, table)
        print(f"user {args.user} removed")
        return 0


def _users_passwd(args: argparse.Namespace) -> int:
    path = _users_path(args)
    with locked(path):  # two admins editing at once: one waits for the other
        table = accounts.load(path)
        acc = table.get(args.user)
        if acc is None:
            print(f"appliance: no user {args.user}", file=sys.stderr)
            return 1
        pw = _read_password(args)
        if pw is None:
            return 2
        table[args.user] = accounts.Account(acc.user, passwords.hash_password(pw), acc.attributes)
        accounts.save(path, table)
        print(f"password of {args.user} changed")
        return 0


def _fmt_attrs(attrs: Attributes) -> str:
    return ", ".join(
        f"{k}={'|'.join(v) if isinstance(v, tuple) else v}" for k, v in sorted(attrs.items())
    )


def _users_list(args: argparse.Namespace) -> int:
    table = accounts.load(_users_path(args))
    if args.json:
        print(json.dumps({u: dict(a.attributes) for u, a in sorted(table.items())}, indent=2))
        return 0
    for user, acc in sorted(table.items()):
        print(f"{user}\t{_fmt_attrs(acc.attributes)}")
    return 0


def _store(args: argparse.Namespace) -> SessionStore:
    config = _config(args)
    return SessionStore.from_config(config, revoke=revoker(config))


def _sessions_list(args: argparse.Namespace) -> int:
    st = _store(args)
    now = time.time()
    rows = st.list(include_ended=args.all)
    if args.json:
        print(json.dumps([_session_json(s, now) for s in rows], indent=2))
        return 0
    print("ID\tUSER\tSOURCE\tIP\tMAC\tLEFT")
    for s in rows:
        left = f"{s.seconds_remaining(now)}s" if s.active else f"ended: {s.end_reason}"
        print(f"{s.id}\t{s.user}\t{s.source}\t{s.ip}\t{s.mac}\t{left}")
    return 0


def _session_json(s: Session, now: float) -> dict[str, object]:
    return {
        "id": s.id,
        "user": s.user,
        "source": s.source,
        "attributes": as_json(s.attributes),
        "personal_servers": dict(s.personal_servers),
        "ip": s.ip,
        "mac": s.mac,
        "created": s.created,
        "last_seen": s.last_seen,
        "idle_expiry": s.idle_expiry,
        "absolute_expiry": s.absolute_expiry,
        "seconds_remaining": s.seconds_remaining(now) if s.active else 0,
        "ended": s.ended,
        "end_reason": s.end_reason,
    }


def _sessions_show(args: argparse.Namespace) -> int:
    st = _store(args)
    s = st.get(args.id)
    if s is None:
        print(f"appliance: no session {args.id}", file=sys.stderr)
        return 1
    for k, v in _session_json(s, time.time()).items():
        print(f"{k}: {json.dumps(v) if isinstance(v, dict | list) else v}")
    return 0


def _sessions_end(args: argparse.Namespace) -> int:
    st = _store(args)
    if not st.end(args.id, args.reason):
        print(f"appliance: no active session {args.id}", file=sys.stderr)
        return 1
    print(f"session {args.id} ended")
    return 0


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    from appliance.core.config import add_config_arg

    users = sub.add_parser("users", help="site accounts (policies.users)")
    usub = users.add_subparsers(dest="users_command", required=True, metavar="ACTION")
    p = usub.add_parser("add", help="add a site account")
    add_config_arg(p)
    p.add_argument("user")
    p.add_argument("--attr", action="append", default=[], metavar="KEY=VALUE", help=CLI_HELP)
    p.add_argument("--password-stdin", action="store_true", help="read the password from stdin")
    p.set_defaults(func=_users_add)
    p = usub.add_parser("del", help="remove a site account")
    add_config_arg(p)
    p.add_argument("user")
    p.set_defaults(func=_users_del)
    p = usub.add_parser("passwd", help="set a new password")
    add_config_arg(p)
    p.add_argument("user")
    p.add_argument("--password-stdin", action="store_true", help="read the password from stdin")
    p.set_defaults(func=_users_passwd)
    p = usub.add_parser("list", help="list accounts and attributes (never hashes)")
    add_config_arg(p)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_users_list)

    sessions = sub.add_parser("sessions", help="guest sessions")
    ssub = sessions.add_subparsers(dest="sessions_command", required=True, metavar="ACTION")
    p = ssub.add_parser("list", help="active sessions")
    add_config_arg(p)
    p.add_argument("--all", action="store_true", help="include ended sessions")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_sessions_list)
    p = ssub.add_parser("show", help="one session in full")
    add_config_arg(p)
    p.add_argument("id")
    p.set_defaults(func=_sessions_show)
    p = ssub.add_parser("end", help="end a session (revokes its network access)")
    add_config_arg(p)
    p.add_argument("id")
    p.add_argument("--reason", default="ended by an admin")
    p.set_defaults(func=_sessions_end)
