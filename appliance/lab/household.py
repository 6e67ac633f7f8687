"""The lab's household behind NAT, and the home relay it links to (docs/home-relay.md).

bob's home (192.0.2.0/24 behind the NAT router 203.0.113.20, no port forwarding) has
his personal agent (192.0.2.1) and his own POP server (192.0.2.3).  The agent keeps a
link out to the relay at 203.0.113.10 (`relay.example`, its certificate from the lab
CA) and registers the household `bob-home`; the appliance reaches it only through the
relay: bob logs in as `bob@bob-home.relay.example#PIN`.

A lab with a federation (`relay2` in the topology) runs a second relay at
203.0.113.11 under the same name, both on one PostgreSQL store at 203.0.113.12
(docs/home-relay.md "Federation"): bob's home resolves relay.example to .10 first, the
appliance asks .11 first, so a login goes appliance -> relay2 -> relay -> agent.
"""

from __future__ import annotations

import secrets
from pathlib import Path

from appliance.lab import servers
from appliance.lab.commands import agent_cmd, relay_cmd, run_checked
from appliance.lab.tls import LabCA
from appliance.lab.topology import (
    HOUSEHOLD_HOSTS,
    NETNS_ETC,
    RELAY2_HOST,
    RELAY_DB_HOST,
    RELAY_HOST,
    Topology,
)

RELAY_NAME = "relay.example"
RELAY_ADDR = RELAY_HOST.split("/")[0]
RELAY2_ADDR = RELAY2_HOST.split("/")[0]
RELAY_DB_ADDR = RELAY_DB_HOST.split("/")[0]
HOUSEHOLD = "bob-home"
AGENT_ADDR = HOUSEHOLD_HOSTS[0].split("/")[0]  # 192.0.2.1
POP_ADDR = HOUSEHOLD_HOSTS[1].split("/")[0]  # 192.0.2.3
AGENT_PORT = 8443
USER = ("bob", "bob-pass")
WELCOME = (
    b"From: home@bob-home.example\r\nTo: bob@bob-home.example\r\nSubject: through the relay\r\n"
    b"\r\nThis message waits on bob's POP server, behind his home router's NAT.\r\n"
)


def federated(topo: Topology) -> bool:
    return "relay2" in topo.nodes


def start_relay(topo: Topology, directory: Path, ca: LabCA) -> list[str]:
    """The home relay on 203.0.113.10:443 with a lab-CA certificate for relay.example
    (and, in a federation, the second relay and the relays' store); returns the
    directories of the servers it made."""
    made: list[str] = []
    federation: dict[str, str] = {}
    if federated(topo):
        pg, dsn = servers.start_postgres(
            topo["relaydb"], (RELAY_ADDR, RELAY2_ADDR), directory / "relays", host=RELAY_DB_ADDR
        )
        made.append(str(pg.directory))
        secret = directory / "relays" / "federation.key"
        secret.write_text(secrets.token_hex(32) + "\n")
        secret.chmod(0o600)
        federation = {"dsn": dsn, "secret": str(secret)}
    for node, addr in (("relay", RELAY_ADDR), ("relay2", RELAY2_ADDR))[: 2 if federation else 1]:
        rdir = directory / node
        rdir.mkdir(parents=True, exist_ok=True)
        cert, key = ca.issue([RELAY_NAME], rdir, "relay")
        conf = rdir / "relay.toml"
        text = (
            f'[relay]\nhost = "{RELAY_NAME}"\nlisten = "{addr}"\nport = 443\n'
            f'certificate = "{cert}"\nkey = "{key}"\nstate_directory = "{rdir / "state"}"\n'
        )
        if federation:
            text += (
                f'[state]\nbackend = "postgresql"\ndsn = "{federation["dsn"]}"\n'
                f'[federation]\nname = "{node}"\nurl = "wss://{addr}:443/v1/peer"\n'
                f'secret = "{federation["secret"]}"\nca = "{ca.cert}"\n'
            )
        conf.write_text(text)
        topo[node].start(*relay_cmd("--config", str(conf)), name="home-relay")
        topo[node].wait_port(443, addr, timeout=30)
    return made


def relay_section(ca: LabCA, directory: Path, federation: bool = False) -> str:
    """appliance.toml's [home_relay]: the lab's relay, by address (the name is the TLS's);
    in a federation both relays, the second first."""
    urls = [f"wss://{RELAY_ADDR}:443/v1/appliance"]
    if federation:
        urls.insert(0, f"wss://{RELAY2_ADDR}:443/v1/appliance")
    listed = ", ".join(f'"{u}"' for u in urls)
    return (
        f'\n[home_relay]\nca = "{ca.cert}"\nsocket = "{directory / "homelink.sock"}"\n'
        f'[home_relay.relays]\n"{RELAY_NAME}" = [{listed}]\n'
    )


def start_household(
    topo: Topology, directory: Path, config: Path, ca: LabCA, appliance_key: str
) -> tuple[str, servers.Server]:
    """bob's POP server and agent behind the NAT router: the agent's pin, the server."""
    home = topo["bobhome"]
    # bob's agent dials relay.example: his home's resolver knows it (ip netns exec
    # binds /etc/netns/NAME/hosts over /etc/hosts)
    # (in a federation the name has both relays' addresses, .10 first)
    second = f"{RELAY2_ADDR} {RELAY_NAME}\n" if federated(topo) else ""
    (NETNS_ETC / home.netns / "hosts").write_text(
        f"127.0.0.1 localhost\n{RELAY_ADDR} {RELAY_NAME}\n{second}"
    )
    pop = servers.start_mail_store(home, {USER[0]: USER[1]}, host=POP_ADDR, imap=True)
    servers.add_pop_message(pop, USER[0], WELCOME)
    adir = directory / "bob-agent"
    adir.mkdir(parents=True, exist_ok=True)
    agent_toml = adir / "agent.toml"
    agent_toml.write_text(
        f'[listen]\naddress = "{AGENT_ADDR}"\nport = {AGENT_PORT}\n'
        '[state]\ndirectory = "state"\n[appliances]\naccept = "listed"\n'
        f'[relay]\nurl = "wss://{RELAY_NAME}/v1/agent"\nhousehold = "{HOUSEHOLD}"\n'
        f'ca = "{ca.cert}"\n'
    )
    conf = ("--config", str(agent_toml))
    run_checked(
        None, agent_cmd("users", "add", *conf, USER[0], "--password-stdin"), stdin=USER[1] + "\n"
    )
    for service, target in (("pop3", f"{POP_ADDR}:110"), ("imap", f"{POP_ADDR}:143")):
        run_checked(None, agent_cmd("servers", "set", *conf, USER[0], service, target))
    run_checked(
        None,
        agent_cmd("appliances", "allow", *conf, "--name", "lab appliance", "--", appliance_key),
    )
    home.start(*agent_cmd("run", *conf), name="personal-agent-bob")
    home.wait_port(AGENT_PORT, AGENT_ADDR, timeout=30)
    return run_checked(None, agent_cmd("fingerprint", *conf)).split()[0], pop


def bob_spec(fingerprint: str) -> str:
    """What bob types in the portal's agent field (with his user id in front)."""
    return f"{USER[0]}@{HOUSEHOLD}.{RELAY_NAME}#{fingerprint}"
