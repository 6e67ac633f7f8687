"""`appliance agent-key` and `appliance agent-login`: the appliance's side of personal agents.

A household allows this appliance with `personal-agent appliances allow <key>`;
`agent-key` prints that key (made on first use).  `agent-login` asks an agent the
way the portal does, to check an agent from the appliance without a browser, and
shows what the portal would take from the answer (the trusted-agents table).
"""

from __future__ import annotations

import argparse
import getpass
import json
import sys

from appliance.core.attributes import as_json
from appliance.core.config import load


def _cmd_key(args: argparse.Namespace) -> int:
    from appliance.agent.client import appliance_key_id

    print(appliance_key_id(load(args.config)))
    return 0


def _cmd_login(args: argparse.Namespace) -> int:
    from appliance.agent.client import AgentError, authenticate, parse_spec
    from appliance.policy import trusted_agents

    config = load(args.config)
    if args.password_stdin:
        password = sys.stdin.readline().rstrip("\r\n")
    else:
        password = getpass.getpass("password: ")
    try:
        answer = authenticate(config, args.spec, password)
        spec = parse_spec(args.spec, config.agent.default_port)
    except AgentError as exc:
        print(f"refused: {exc.code}: {exc.message}", file=sys.stderr)
        return 1
    try:  # what the portal would take from this answer (the trusted-agents table)
        taken = trusted_agents.load(config.policies.agents).vouch(
            answer.user,
            answer.attributes,
            spec.host,
            spec.port,
            config.agent.default_port,
            answer.fingerprint,
            answer.verified_name,
        )
    except trusted_agents.NotThatAgent as exc:
        print(f"refused: bad_certificate: {exc}", file=sys.stderr)
        return 1
    print(
        json.dumps(
            {
                "user": answer.user,
                "agent": answer.agent,
                "fingerprint": answer.fingerprint,
                "attributes": as_json(answer.attributes),
                "servers": dict(answer.servers),
                "session": {
                    "user": taken.user,
                    "trusted": taken.trusted,
                    "attributes": as_json(taken.attributes),
                    "not_taken": list(taken.dropped),
                },
            },
            indent=1,
        )
    )
    return 0


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    from appliance.core.config import add_config_arg

    key = sub.add_parser("agent-key", help="print this appliance's key for personal agents")
    add_config_arg(key)
    key.set_defaults(func=_cmd_key)
    login = sub.add_parser("agent-login", help="ask a personal agent as the portal would")
    add_config_arg(login)
    login.add_argument("spec", help="user@host[:port][#sha256:...]")
    login.add_argument("--password-stdin", action="store_true")
    login.set_defaults(func=_cmd_login)
