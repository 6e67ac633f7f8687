"""`appliance policy check|show|explain` and `appliance reload`.

`reload` validates both tables first (an invalid table is reported here and
nothing is signalled), then sends SIGHUP to every running role found by its
pid file in `<state.directory>/run/` (written by `appliance run`).  Each role
re-validates on SIGHUP and keeps its old tables if the files are invalid.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from appliance.core.attributes import CLI_HELP, AttrValue, parse_attribute_args, read_attributes
from appliance.core.config import load
from appliance.core.tomlfile import ConfigError, TomlFile
from appliance.policy import trusted_agents
from appliance.policy.access_rights import AccessTable
from appliance.policy.server_info import ServerTable
from appliance.policy.tables import Policy

NETWORK = "network"  # `explain USER network`: the network-use right itself


def site_user_attributes(path: Path, user: str) -> dict[str, AttrValue] | None:
    """A site user's attributes from the users table, or None if there is no such user.

    The accounts module owns that file's format (`[users.NAME.attributes]`); this
    reads only the attributes, under the same rules a login reads them with, and never
    the password hash.
    """
    users = TomlFile.load(path).reader().sub("users")
    if not users.has(user):
        return None
    return read_attributes(users.sub(user).sub("attributes"))


def format_servers(table: ServerTable) -> list[str]:
    lines = ["services:"]
    for s in table.services.values():
        ups = ", ".join(str(e) for e in s.upstreams) or "(personal server only)"
        flags = [s.protocol]
        if s.personal_allowed:
            flags.append("personal allowed")
        if s.tls:
            flags.append("tls")
        ports = ",".join(map(str, s.intercept_ports)) or "-"
        names = ",".join(s.guest_names) or "-"
        lines.append(
            f"  {s.name:<10} :{s.listen_port:<5} intercepts {ports:<8} -> {ups}"
            f"  [{'; '.join(flags)}] names {names}"
        )
    return lines


def format_rules(table: AccessTable) -> list[str]:
    services = list(table.services)
    width = max([len(r.name) for r in table.rules] + [4])
    head = f"  {'#':>3} {'rule':<{width}}  " + " ".join(f"{s:^6}" for s in services)
    lines = ["rules (first match wins per service; default deny):", head]
    for r in table.rules:
        cells = []
        for s in services:
            v = r.verdict(s)
            cells.append(f"{'allow' if v else 'deny' if v is False else '-':^6}")
        limits = []
        if r.max_connections:
            limits.append(f"max {r.max_connections} conn")
        if r.session_max:
            limits.append(f"session {r.session_max}s")
        if r.quota_bytes_per_day:
            limits.append(f"quota {r.quota_bytes_per_day} B/day")
        extra = f"  ({', '.join(limits)})" if limits else ""
        lines.append(
            f"  {r.index + 1:>3} {r.name:<{width}}  {' '.join(cells)}  {r.describe_match()}{extra}"
        )
    return lines


def _cmd_check(args: argparse.Namespace) -> int:
    config = load(args.config)
    policy = Policy.load(config)
    print(f"{config.policies.servers}: ok ({len(policy.servers.services)} services)")
    print(f"{config.policies.access}: ok ({len(policy.access.rules)} rules)")
    agents = trusted_agents.load(config.policies.agents)
    if config.policies.agents.exists():
        print(f"{config.policies.agents}: ok ({len(agents.agents)} trusted agents)")
    else:
        print(f"{config.policies.agents}: absent (no agent is trusted to assert attributes)")
    return 0


def _cmd_show(args: argparse.Namespace) -> int:
    policy = Policy.load(load(args.config))
    print("\n".join([*format_servers(policy.servers), "", *format_rules(policy.access)]))
    return 0


def _cmd_explain(args: argparse.Namespace) -> int:
    config = load(args.config)
    policy = Policy.load(config)
    if args.attr:
        try:
            attrs = parse_attribute_args(args.attr)
        except ValueError as exc:
            print(f"appliance: {exc}", file=sys.stderr)
            return 2
    else:
        if not config.policies.users.exists():
            print(f"appliance: no users table {config.policies.users}; use --attr", file=sys.stderr)
            return 2
        found = site_user_attributes(config.policies.users, args.user)
        if found is None:
            print(
                f"appliance: no site user {args.user!r} in {config.policies.users}", file=sys.stderr
            )
            return 2
        attrs = found
    shown = ", ".join(f"{k}={v if isinstance(v, str) else '|'.join(v)}" for k, v in attrs.items())
    print(f"user {args.user} ({shown or 'no attributes'})")
    if args.service == NETWORK:
        d = policy.may_use_network(attrs)
        print(f"network use: {'allowed' if d.allowed else 'refused'}: {d.reason}")
        return 0 if d.allowed else 1
    lines, d = policy.access.explain(attrs, args.service)
    print("\n".join(lines))
    print(f"{args.service}: {'allowed' if d.allowed else 'denied'}: {d.reason}")
    if d.max_connections:
        print(f"limit: {d.max_connections} connections at once")
    if d.quota_bytes_per_day:
        print(f"quota: {d.quota_bytes_per_day} bytes a day (both ways)")
    return 0 if d.allowed else 1


def _cmd_reload(args: argparse.Namespace) -> int:
    from appliance.core.pidfiles import signal_roles

    config = load(args.config)
    Policy.load(config)  # refuse here, with the error, before anything is signalled
    trusted_agents.load(config.policies.agents)
    reached = signal_roles(config)
    if not reached:
        print(f"appliance: tables ok; no running roles found in {config.state.directory}/run")
        return 1
    for role, pid in reached.items():
        print(f"reload: sent SIGHUP to {role} (pid {pid})")
    return 0


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    from appliance.core.config import add_config_arg

    p = sub.add_parser("policy", help="check, show and explain the access-rights tables")
    psub = p.add_subparsers(dest="policy_command", required=True, metavar="ACTION")
    check = psub.add_parser("check", help="validate servers.toml, access.toml and agents.toml")
    add_config_arg(check)
    check.set_defaults(func=_cmd_check)
    show = psub.add_parser("show", help="print both tables")
    add_config_arg(show)
    show.set_defaults(func=_cmd_show)
    explain = psub.add_parser(
        "explain", help="which rule decides USER's SERVICE, and why (exit 0 allowed, 1 denied)"
    )
    add_config_arg(explain)
    explain.add_argument("user", metavar="USER", help="a site user (users table) or a label")
    explain.add_argument("service", metavar="SERVICE", help=f"a service, or {NETWORK!r}")
    explain.add_argument(
        "--attr",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help=f"attributes instead of the users table: {CLI_HELP}",
    )
    explain.set_defaults(func=_cmd_explain)

    reload = sub.add_parser("reload", help="validate the tables, then SIGHUP the running roles")
    add_config_arg(reload)
    reload.set_defaults(func=_cmd_reload)


__all__ = ["ConfigError", "register", "site_user_attributes"]
