"""The `appliance` command: run roles, check config, drive the lab, and admin subcommands.

Each group of subcommands lives in its own module with a `register(subparsers)`
function, listed in COMMANDS; this file only wires them together.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from pathlib import Path

from appliance import __version__
from appliance.core import logs
from appliance.core.config import DEFAULT_PATH, ConfigError, add_config_arg, load

log = logging.getLogger("appliance")

# modules that add subcommands: each has register(subparsers) and sets func=...
COMMANDS = [
    "appliance.lab.cli",
    "appliance.install",
    "appliance.agent.appliance_cli",
    "appliance.net.cli",
    "appliance.policy.cli",
    "appliance.admin.cli",
    "appliance.portal.cli",
    "appliance.ha.cli",
    "dhcp.cli",
]


def _cmd_run(args: argparse.Namespace) -> int:
    from appliance import roles

    config = load(args.config)
    wanted = args.roles or list(roles.ROLES)
    try:
        if len(wanted) == 1:
            return roles.run_one(wanted[0], config)
        return roles.supervise(wanted, args.config, args.log_level)
    except roles.RoleUnavailable as exc:
        print(f"appliance: {exc}", file=sys.stderr)
        return 2


def _cmd_check_config(args: argparse.Namespace) -> int:
    from appliance.policy import files as policy_files

    config = load(args.path)
    tables = policy_files.check(config)
    print(f"{args.path}: ok")
    for t in tables:
        print(f"{t}: ok")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="appliance",
        description="Guest gateway appliance: DHCP, captive portal, access rights, service relay.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument(
        "--log-level",
        default="info",
        choices=["debug", "info", "warning", "error"],
        help="log verbosity",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = sub.add_parser("run", help="run appliance roles (all by default)")
    add_config_arg(run)
    run.add_argument(
        "roles", nargs="*", metavar="ROLE", help="dhcp, dns, portal, proxy (default: all)"
    )
    run.set_defaults(func=_cmd_run)

    check = sub.add_parser("check-config", help="validate a configuration and the tables it names")
    check.add_argument("path", type=Path, nargs="?", default=DEFAULT_PATH)
    check.set_defaults(func=_cmd_check_config)

    for name in COMMANDS:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logs.setup(args.log_level)
    try:
        rc: int = args.func(args)
        return rc
    except ConfigError as exc:
        print(f"appliance: config error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
