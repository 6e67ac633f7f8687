"""`appliance lab up|down|status|exec|shell`: the lab from the command line.

The lab's namespaces carry the fixed prefix `gglab`, so any later command (or a
script) finds them again; `lab down` removes them all, whatever state they are in.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

from appliance.lab import topology
from appliance.lab.topology import LAB_PREFIX, Topology

STATE_DIR = Path("/run/appliance-lab")


def _nodes() -> dict[str, str]:
    return {n.removeprefix(LAB_PREFIX + "-"): n for n in topology.our_namespaces(LAB_PREFIX)}


def _cmd_up(args: argparse.Namespace) -> int:
    if _nodes():
        print("lab: already up (appliance lab down removes it)", file=sys.stderr)
        return 1
    STATE_DIR.mkdir(parents=True, exist_ok=True)
    topo = Topology.build(guests=args.guests, prefix=LAB_PREFIX, workdir=STATE_DIR)
    (STATE_DIR / "state.json").write_text(
        json.dumps({"prefix": LAB_PREFIX, "guests": args.guests, "nodes": sorted(topo.nodes)})
    )
    print(f"lab: up with nodes {', '.join(sorted(topo.nodes))}")
    print("try:")
    print("  appliance lab status")
    print("  appliance lab exec gw -- ip -br addr")
    print("  appliance lab shell guest1")
    print("  appliance lab down")
    return 0


def _cmd_down(args: argparse.Namespace) -> int:
    names = topology.our_namespaces(LAB_PREFIX)
    topology.remove_namespaces(names)
    (STATE_DIR / "state.json").unlink(missing_ok=True)
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
    up.set_defaults(func=_cmd_up)
    labsub.add_parser("down", help="remove everything the lab made").set_defaults(func=_cmd_down)
    labsub.add_parser("status", help="show nodes and what runs in them").set_defaults(
        func=_cmd_status
    )
    ex = labsub.add_parser("exec", help="run a command in a node: lab exec NODE -- CMD ...")
    ex.add_argument("node")
    ex.add_argument("cmd", nargs=argparse.REMAINDER)
    ex.set_defaults(func=_cmd_exec)
    sh = labsub.add_parser("shell", help="an interactive shell in a node")
    sh.add_argument("node")
    sh.set_defaults(func=_cmd_shell)
