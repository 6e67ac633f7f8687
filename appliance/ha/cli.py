"""`appliance ha`: what an active/standby pair needs from the operator."""

from __future__ import annotations

import argparse
import sys

from appliance.core.config import add_config_arg, load
from appliance.ha import health, keepalived


def _cmd_keepalived_conf(args: argparse.Namespace) -> int:
    try:
        sys.stdout.write(keepalived.render(load(args.config)))
    except keepalived.HaDisabled as exc:
        print(f"appliance: {exc}", file=sys.stderr)
        return 2
    return 0


def _cmd_check(args: argparse.Namespace) -> int:
    return health.main(["--config", str(args.config)])


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    ha = sub.add_parser("ha", help="an active/standby pair (keepalived)")
    verbs = ha.add_subparsers(dest="verb", required=True, metavar="VERB")
    conf = verbs.add_parser("keepalived-conf", help="print keepalived.conf for this box, from [ha]")
    add_config_arg(conf)
    conf.set_defaults(func=_cmd_keepalived_conf)
    check = verbs.add_parser(
        "check", help="exit 0 when this box's guest-facing roles run (keepalived's vrrp_script)"
    )
    add_config_arg(check)
    check.set_defaults(func=_cmd_check)
