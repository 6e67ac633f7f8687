"""`appliance admins add|del|list|passwd`: the admin accounts of the admin pages."""

from __future__ import annotations

import argparse
import getpass
import sys

from appliance.core.config import load


def _cmd(args: argparse.Namespace) -> int:
    from appliance.accounts import admins as accounts
    from appliance.core import passwords  # argon2 set-up costs: only when used

    config = load(args.config)
    path = config.policies.admins
    if args.admins_command != "list":
        from appliance.admin import audit
        from appliance.state.connection import STORE_ERRORS

        try:  # a change the audit log could not record is not made
            audit.reachable(config)
        except STORE_ERRORS as exc:
            print(f"appliance: cannot reach the state store for the audit log ({exc}); "
                  "nothing changed", file=sys.stderr)  # fmt: skip
            return 1
    try:
        if args.admins_command == "list":
            for name in sorted(accounts.load_admins(path)):
                print(name)
        elif args.admins_command == "del":
            accounts.delete(path, args.name)
            print(f"admin {args.name} removed")
        else:
            create = args.admins_command == "add"
            accounts.set_password(
                path, args.name, passwords.read_new_password(args.password_stdin), create=create
            )
            print(f"admin {args.name} {'added' if create else 'password changed'} ({path})")
    except ValueError as exc:
        print(f"appliance: {exc}", file=sys.stderr)
        return 2
    # no store yet (before the first start): no logins to end, and a store made now by
    # root would be one the roles' own user cannot write.  Ended before the log is
    # written: a log that fails now must not leave a removed admin's cookie working.
    if args.admins_command in ("del", "passwd") and config.state.made:
        from appliance.state import store
        from appliance.state.admin_logins import AdminLogins

        ended = AdminLogins(store.open_store(config.state)).end_all(args.name)
        if ended:
            print(f"ended {ended} open admin login(s) of {args.name}")
    if args.admins_command != "list":
        who = f"cli:{getpass.getuser()}"
        audit.record(config, who, f"admins {args.admins_command}", args.name)  # never the hash
    return 0


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    from appliance.core.config import add_config_arg

    p = sub.add_parser("admins", help="admin accounts of the admin pages")
    psub = p.add_subparsers(dest="admins_command", required=True, metavar="ACTION")
    for action, help_text in (
        ("add", "add an admin (asks for the password)"),
        ("passwd", "change an admin's password"),
        ("del", "remove an admin"),
        ("list", "list the admins"),
    ):
        a = psub.add_parser(action, help=help_text)
        add_config_arg(a)
        if action != "list":
            a.add_argument("name", metavar="NAME")
        if action in ("add", "passwd"):
            a.add_argument(
                "--password-stdin", action="store_true", help="read the password from stdin"
            )
        a.set_defaults(func=_cmd)
