"""The lab's household behind NAT, and the home relay it links to (docs/home-relay.md).

bob's home (192.0.2.0/24 behind the NAT router 203.0.113.20, no port forwarding) has
his personal agent (192.0.2.1) and his own POP server (192.0.2.3).  The agent keeps a
link out to the relay at 203.0.113.10 (`relay.example`, its certificate from the lab
CA) and registers the household `bob-home`; the appliance reaches it only through the
relay: bob logs in as `bob@bob-home.relay.example#PIN`.
"""

from __future__ import annotations

from pathlib import Path

from appliance.lab import servers
from appliance.lab.commands import agent_cmd, relay_cmd, run_checked
from appliance.lab.tls import LabCA
from appliance.lab.topology import (
    HOUSEHOLD_HOSTS,
    NETNS_ETC,
    RELAY_HOST,
    Topology,
)

RELAY_NAME = "relay.example"
RELAY_ADDR = RELAY_HOST.split("/")[0]
HOUSEHOLD = "bob-home"
AGENT_ADDR = HOUSEHOLD_HOSTS[0].split("/")[0]  # 192.0.2.1
POP_ADDR = HOUSEHOLD_HOSTS[1].split("/")[0]  # 192.0.2.3
AGENT_PORT = 8443
USER = ("bob", "bob-pass")
WELCOME = (
    b"From: home@bob-home.example\r\nTo: bob@bob-home.example\r\nSubject: through the relay\r\n"
    b"\r\nThis message waits on bob's POP server, behind his home router's NAT.\r\n"
)


def start_relay(topo: Topology, directory: Path, ca: LabCA) -> None:
    """The home relay on 203.0.113.10:443 with a lab-CA certificate for relay.example."""
    rdir = directory / "relay"
    rdir.mkdir(parents=True, exist_ok=True)
    cert, key = ca.issue([RELAY_NAME], rdir, "relay")
    conf = rdir / "relay.toml"
    conf.write_text(
        f'[relay]\nhost = "{RELAY_NAME}"\nlisten = "{RELAY_ADDR}"\nport = 443\n'
        f'certificate = "{cert}"\nkey = "{key}"\nstate_directory = "{rdir / "state"}"\n'
    )
    node = topo["relay"]
    node.start(*relay_cmd("--config", str(conf)), name="home-relay")
    node.wait_port(443, RELAY_ADDR, timeout=30)


def relay_section(ca: LabCA, directory: Path) -> str:
    """appliance.toml's [home_relay]: the lab's relay, by address (the name is the TLS's)."""
    return (
        f'\n[home_relay]\nca = "{ca.cert}"\nsocket = "{directory / "homelink.sock"}"\n'
        f'[home_relay.relays]\n"{RELAY_NAME}" = "wss://{RELAY_ADDR}:443/v1/appliance"\n'
    )


def start_household(
    topo: Topology, directory: Path, config: Path, ca: LabCA, appliance_key: str
) -> tuple[str, servers.Server]:
    """bob's POP server and agent behind the NAT router: the agent's pin, the server."""
    home = topo["bobhome"]
    # bob's agent dials relay.example: his home's resolver knows it (ip netns exec
    # binds /etc/netns/NAME/hosts over /etc/hosts)
    (NETNS_ETC / home.netns / "hosts").write_text(
        f"127.0.0.1 localhost\n{RELAY_ADDR} {RELAY_NAME}\n"
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
