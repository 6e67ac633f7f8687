"""IPv6 where the uplink has it: the agent client logs in over IPv6 and never reaches a
hidden IPv6 network, nor the hidden segment through an IPv6 spelling of its address.

The test's own namespaces get IPv6 (documentation prefixes): the segment
2001:db8:5::/64 (listed in hidden_networks), the home 2001:db8:113::/64.  A recorder
in the segment listens on its IPv4 and IPv6 addresses and counts every connection.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from agent_helpers import appliance_config, make_agent_dir
from test_agent import agent_cli, login, refused

from appliance import config as config_mod
from appliance.config import Config
from appliance.lab.topology import Topology

pytestmark = pytest.mark.netns

RECORDER = """
import socket, sys, threading
log = open(sys.argv[1], "a", buffering=1)
def serve(family, host, port):
    s = socket.socket(family, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind((host, port))
    s.listen(16)
    while True:
        c, peer = s.accept()
        log.write(f"{host} {port} from {peer[0]}\\n")
        c.close()
for port in (8443, 110):
    threading.Thread(target=serve, args=(socket.AF_INET, "198.51.100.3", port)).start()
    threading.Thread(target=serve, args=(socket.AF_INET6, "2001:db8:5::3", port)).start()
"""


def add6(topo: Topology, node: str, dev: str, *addrs: str) -> None:
    for a in addrs:
        topo[node].run("ip", "-6", "addr", "add", a, "dev", dev, "nodad")


def ipv6_site(topo: Topology, tmp_path: Path) -> Config:
    add6(topo, "gw", "seg0", "2001:db8:5::1/64")
    add6(topo, "seg", "eth0", "2001:db8:5::3/64")
    add6(topo, "gw", "home0", "2001:db8:113::fe/64")
    add6(topo, "home", "eth0", "2001:db8:113::1/64", "2001:db8:113::3/64")
    appliance_config(tmp_path)
    path = tmp_path / "appliance.toml"
    text = path.read_text()
    old = 'hidden_networks = ["198.51.100.0/24"]'
    assert old in text
    path.write_text(text.replace(old, 'hidden_networks = ["198.51.100.0/24", "2001:db8:5::/64"]'))
    return config_mod.load(path)


def test_agent_logins_over_ipv6_and_no_way_into_the_hidden_segment(
    make_topology: Callable[..., Topology], tmp_path: Path
) -> None:
    topo = make_topology(guests=0)
    config = ipv6_site(topo, tmp_path / "appliance")
    seen = tmp_path / "recorder.log"
    seen.touch()
    topo["seg"].start(sys.executable, "-c", RECORDER, str(seen), name="recorder")
    topo["seg"].wait_port(8443, host="[2001:db8:5::3]")
    topo["seg"].wait_port(110, host="198.51.100.3")
    # the recorder answers from the appliance over both families (so silence below means
    # the client never tried, not that the segment is unreachable)
    topo["gw"].run(sys.executable, "-c", PROBE)
    assert len(seen.read_text().splitlines()) == 2
    seen.write_text("")

    agent = make_agent_dir(
        tmp_path / "agent",
        "2001:db8:113::1",
        users={
            "alice": ("alice-pw", {"role": "staff"}, {"pop3": "203.0.113.3:110"}),
            "v6only": ("v6-pw", {}, {"pop3": "[2001:db8:113::3]:110"}),
            "sneaky": ("s-pw", {}, {"pop3": "[2001:db8:5::3]:110"}),
            "mapped": ("m-pw", {}, {"pop3": "[::ffff:198.51.100.3]:110"}),
        },
        extra='[appliances]\naccept = "any"\n',
    )
    fp = agent_cli(agent, "fingerprint").strip()
    topo["home"].start(
        sys.executable,
        "-m",
        "appliance.agent.cli",
        "run",
        "--config",
        str(agent.path),
        name="agent6",
    )
    topo["home"].wait_port(agent.port, host="[2001:db8:113::1]")
    here = f"[2001:db8:113::1]#{fp}"
    # an agent on the internet over IPv6 works
    answer = login(topo, config, f"alice@{here}", "alice-pw")
    assert answer.user == "alice" and dict(answer.servers) == {"pop3": "203.0.113.3:110"}
    assert answer.agent == "[2001:db8:113::1]:8443"
    # a personal server the relay could not use, or one in a hidden network: refused at
    # login, so no session ever names it
    for user, pw in (("v6only", "v6-pw"), ("sneaky", "s-pw"), ("mapped", "m-pw")):
        assert refused(topo, config, f"{user}@{here}", pw)[0] == "refused_servers", user
    # an "agent" in the hidden segment, by its IPv6 address or an IPv6 spelling of its
    # IPv4 one, is never contacted
    for host in ("[2001:db8:5::3]", "[::ffff:198.51.100.3]", "[::ffff:c633:6403]"):
        assert refused(topo, config, f"alice@{host}#{fp}", "alice-pw")[0] == "bad_address", host
    time.sleep(0.2)
    assert seen.read_text() == ""


PROBE = """
import socket
for host in ("198.51.100.3", "2001:db8:5::3"):
    socket.create_connection((host, 8443), timeout=2).close()
"""
