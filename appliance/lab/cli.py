"""`appliance lab up|down|status|exec|shell`: the lab from the command line.

The lab's namespaces carry the fixed prefix `gglab`, so any later command (or a
script) finds them again; `lab down` removes them all, whatever state they are in.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import subprocess
import sys
import time
from pathlib import Path

from appliance.lab import topology
from appliance.lab.topology import LAB_PREFIX, Topology

STATE_DIR = Path("/run/appliance-lab")

LAB_READY = """
lab: up. A whole site runs in network namespaces (appliance lab status shows what runs).

  appliance = gw: guests 192.168.1.0/24, segment 198.51.100.0/24 (hidden), home 203.0.113.0/24
  config    = {config}
  lab CA    = {ca}   (guests trust it: curl --cacert, to check the servers' own certificates)

Try next:
  appliance lab demo                                  one visitor, every step checked
  appliance lab exec guest1 -- dhclient -v eth0       get an address like any laptop
  appliance lab exec guest1 -- curl -si http://www.example.com/    the captive page (302)
  appliance lab shell guest1                          a shell on a guest laptop
  appliance lab exec guest1 -- ping -c1 198.51.100.3  the segment stays unreachable

Accounts:
  site account  carol / carol-pass           (a contractor: web on port 80 only)
  home account  alice / alice-pass  agent {spec}
  behind NAT    bob / bob-pass      agent {bob}
                (appliance lab cut-home 10: his home link drops for 10 s)
  admin pages   http://198.51.100.1:8000/  admin / admin-pass  (from the segment:
                appliance lab exec seg -- curl http://198.51.100.1:8000/)
  metrics       Prometheus at http://198.51.100.5:9090/ scrapes every role on 198.51.100.1:9101-9107
                (appliance lab exec seg -- curl -s 'http://198.51.100.5:9090/api/v1/targets')

  appliance lab down                                  removes everything
"""


def _nodes() -> dict[str, str]:
    return {n.removeprefix(LAB_PREFIX + "-"): n for n in topology.our_namespaces(LAB_PREFIX)}


def _cmd_up(args: argparse.Namespace) -> int:
    if _nodes():
        print("lab: already up (appliance lab down removes it)", file=sys.stderr)
        return 1
    from appliance.lab import site

    STATE_DIR.mkdir(parents=True, exist_ok=True)
    topo = Topology.build(
        guests=max(args.guests, 3),
        prefix=LAB_PREFIX,
        workdir=STATE_DIR,
        nat_household=True,
        ha=args.ha,
        federation=args.federation,
    )
    print(f"lab: namespaces up: {', '.join(sorted(topo.nodes))}; starting servers...")
    try:
        info = site.start(topo, STATE_DIR, postgres=args.state == "postgresql")
    except BaseException as exc:
        topo.destroy()
        site.cleanup(STATE_DIR)
        if isinstance(exc, topology.LabError):
            print(f"lab: {exc}\nlab: removed again", file=sys.stderr)
            return 1
        raise
    print(LAB_READY.format(config=info.config, spec=info.agent_spec, ca=info.ca, bob=info.bob_spec))
    return 0


def _cmd_down(args: argparse.Namespace) -> int:
    from appliance.lab import site

    names = topology.our_namespaces(LAB_PREFIX)
    topology.remove_namespaces(names)
    site.cleanup(STATE_DIR)
    print(f"lab: removed {len(names)} namespaces" if names else "lab: nothing to remove")
    return 0


def _cmd_status(args: argparse.Namespace) -> int:
    nodes = _nodes()
    if not nodes:
        print("lab: down")
        return 3
    for short, full in sorted(nodes.items()):
        pids = subprocess.run(
            ["ip", "netns", "pids", full], capture_output=True, text=True, check=False
        ).stdout.split()
        procs = []
        for pid in pids:
            try:
                procs.append(Path(f"/proc/{pid}/comm").read_text().strip() + f"[{pid}]")
            except OSError:
                continue
        print(f"{short:8} {full:16} {' '.join(procs) or '-'}")
    from appliance.lab import site

    with contextlib.suppress(topology.LabError):
        print(f"lab CA: {site.load_info(STATE_DIR).ca}")
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from appliance.lab import demo

    if not _nodes():
        print("lab: down (appliance lab up first)", file=sys.stderr)
        return 3
    topo = Topology.attach(LAB_PREFIX, STATE_DIR)
    return demo.run(topo.nodes, STATE_DIR)


def _cmd_cut_home(args: argparse.Namespace) -> int:
    """bob's home uplink goes silent for a while (his agent's link to the relay dies and
    comes back; his open streams resume)."""
    topo = Topology.attach(LAB_PREFIX, STATE_DIR)
    if "natrouter" not in topo.nodes:
        print("lab: no household behind NAT in this lab", file=sys.stderr)
        return 1
    topo.cut_household_link(True)
    print(f"lab: bob's home link is cut for {args.seconds:g} s")
    try:
        time.sleep(args.seconds)
    finally:
        topo.cut_household_link(False)
    print("lab: bob's home link is back")
    return 0


def _resolve(node: str) -> str:
    nodes = _nodes()
    if node not in nodes:
        raise SystemExit(f"lab: no node {node!r} (nodes: {', '.join(sorted(nodes)) or 'none'})")
    return nodes[node]


def _cmd_exec(args: argparse.Namespace) -> int:
    cmd = args.cmd[1:] if args.cmd[:1] == ["--"] else args.cmd
    if not cmd:
        print("lab exec: no command given (appliance lab exec NODE -- CMD ...)", file=sys.stderr)
        return 2
    return subprocess.call(["ip", "netns", "exec", _resolve(args.node), *cmd])


def _cmd_shell(args: argparse.Namespace) -> int:
    full = _resolve(args.node)
    shell = os.environ.get("SHELL", "/bin/bash")
    env = {**os.environ, "PS1": f"[lab {args.node}] \\w# "}
    return subprocess.call(["ip", "netns", "exec", full, shell, "--norc"], env=env)


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    lab = sub.add_parser("lab", help="a whole site in network namespaces")
    labsub = lab.add_subparsers(dest="lab_command", required=True, metavar="ACTION")
    up = labsub.add_parser("up", help="build the lab topology")
    up.add_argument("--guests", type=int, default=2, help="number of guest nodes (default 2)")
    up.add_argument(
        "--state",
        choices=("sqlite", "postgresql"),
        default="sqlite",
        help="the shared store: SQLite (default) or PostgreSQL in the segment at 198.51.100.6",
    )
    up.add_argument(
        "--ha",
        action="store_true",
        help="an active/standby pair: a second appliance gw2 (198.51.100.11), keepalived "
        "on both, the store on PostgreSQL",
    )
    up.add_argument(
        "--federation",
        action="store_true",
        help="federated relays: a second relay at 203.0.113.11 under relay.example, both "
        "on one PostgreSQL at 203.0.113.12",
    )
    up.set_defaults(func=_cmd_up)
    labsub.add_parser(
        "demo", help="walk one visitor through the lab, checking each step"
    ).set_defaults(func=_cmd_demo)
    labsub.add_parser("down", help="remove everything the lab made").set_defaults(func=_cmd_down)
    labsub.add_parser("status", help="show nodes and what runs in them").set_defaults(
        func=_cmd_status
    )
    ex = labsub.add_parser("exec", help="run a command in a node: lab exec NODE -- CMD ...")
    ex.add_argument("node")
    ex.add_argument("cmd", nargs=argparse.REMAINDER)
    ex.set_defaults(func=_cmd_exec)
    cut = labsub.add_parser("cut-home", help="drop bob's home link (behind NAT) for SECONDS")
    cut.add_argument("seconds", type=float)
    cut.set_defaults(func=_cmd_cut_home)
    sh = labsub.add_parser("shell", help="an interactive shell in a node")
    sh.add_argument("node")
    sh.set_defaults(func=_cmd_shell)
