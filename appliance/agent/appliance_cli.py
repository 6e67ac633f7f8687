"""`appliance agent-key` and `appliance agent-login`: the appliance's side of personal agents.

A household allows this appliance with `personal-agent appliances allow <key>`;
`agent-key` prints that key (made on first use).  `agent-login` asks an agent the
way the portal does, to check an agent from the appliance without a browser.
"""

from __future__ import annotations

import argparse
import getpass
import json
import sys

from appliance.config import load


def _cmd_key(args: argparse.Namespace) -> int:
    from appliance.agent.client import appliance_key_id

    print(appliance_key_id(load(args.config)))
    return 0


def _cmd_login(args: argparse.Namespace) -> int:
    from appliance.agent.client import AgentError, authenticate

    config = load(args.config)
    if args.password_stdin:
        password = sys.stdin.readline().rstrip("\r\n")
    else:
        password = getpass.getpass("password: ")
    try:
        answer = authenticate(config, args.spec, password)
    except AgentError as exc:
        print(f"refused: {exc.code}: {exc.message}", file=sys.stderr)
        return 1
    print(
        json.dumps(
            {
                "user": answer.user,
                "agent": answer.agent,
                "attributes": {
                    k: list(v) if isinstance(v, tuple) else v for k, v in answer.attributes.items()
                },
                "servers": dict(answer.servers),
            },
            indent=1,
        )
    )
    return 0


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    from appliance.cli import add_config_arg

    key = sub.add_parser("agent-key", help="print this appliance's key for personal agents")
    add_config_arg(key)
    key.set_defaults(func=_cmd_key)
    login = sub.add_parser("agent-login", help="ask a personal agent as the portal would")
    add_config_arg(login)
    login.add_argument("spec", help="user@host[:port][#sha256:...]")
    login.add_argument("--password-stdin", action="store_true")
    login.set_defaults(func=_cmd_login)
