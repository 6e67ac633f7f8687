"""`appliance net up|close|down|status`: the guest-side isolation by hand, in this namespace."""

from __future__ import annotations

import argparse
import subprocess
import sys

from appliance.core.config import load


def _cmd_up(args: argparse.Namespace) -> int:
    from appliance.net import interface, nft, service

    try:
        service.up(load(args.config))
    except (interface.InterfaceError, nft.NftError, OSError) as exc:
        print(f"net: {exc}", file=sys.stderr)
        return 1
    print("net: guest side closed (table inet appliance loaded)")
    return 0


def _cmd_close(args: argparse.Namespace) -> int:
    from appliance.net import nft, service

    try:
        service.close(load(args.config))
    except (nft.NftError, OSError) as exc:
        print(f"net: {exc}", file=sys.stderr)
        return 1
    print("net: guest side closed (drop-everything table inet appliance loaded)")
    return 0


def _cmd_down(args: argparse.Namespace) -> int:
    from appliance.net import service

    service.down(load(args.config))
    print("net: table inet appliance removed")
    return 0


def _cmd_status(args: argparse.Namespace) -> int:
    from appliance.net import interface, nft

    config = load(args.config)
    g = interface.link_state(config.interfaces.guest)
    u = interface.link_state(config.interfaces.uplink)
    for role, st in (("guest", g), ("uplink", u)):
        state = ("up" if st.up else "down") if st.exists else "missing"
        print(f"{role:7} {st.name:10} {state:8} {' '.join(st.addresses) or '-'}")
    if g.exists:
        print(f"forwarding on {g.name}: {interface.forwarding(g.name)}")
    if not nft.table_exists():
        print("table inet appliance: absent")
        return 3
    from appliance.net import setup

    if setup.is_closed():
        print("table inet appliance: closed (the net role is not running; nothing gets through)")
        return 4
    auth = nft.set_elements("authenticated")
    leased = nft.set_elements("leased")
    print(f"table inet appliance: loaded; {len(leased)} leased, {len(auth)} authenticated")
    for ip, mac in sorted(auth):
        print(f"  authenticated {ip} {mac}")
    out = subprocess.run(
        ["nft", "list", "counters", "table", "inet", nft.TABLE],
        capture_output=True,
        text=True,
        check=False,
    ).stdout
    name = ""
    for line in out.splitlines():
        line = line.strip()
        if line.startswith("counter "):
            name = line.split()[1]
        elif line.startswith("packets ") and name:
            print(f"  {name}: {line}")
    return 0


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    from appliance.core.config import add_config_arg

    p = sub.add_parser("net", help="guest-side isolation: nftables table and interface")
    nsub = p.add_subparsers(dest="net_command", required=True, metavar="ACTION")
    for name, fn, text in (
        ("up", _cmd_up, "bring the guest interface up and load the ruleset"),
        ("close", _cmd_close, "replace the ruleset with one that drops all guest traffic"),
        ("down", _cmd_down, "remove the ruleset: the guest side is then unfiltered"),
        (
            "status",
            _cmd_status,
            "interfaces, sets and drop counters (exit 3 when absent, 4 when closed)",
        ),
    ):
        sp = nsub.add_parser(name, help=text)
        add_config_arg(sp)
        sp.set_defaults(func=fn)
