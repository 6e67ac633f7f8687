"""The lab's household behind NAT: out through its router's masquerade, nothing in.

Issue #17: a household agent can only open connections outward (to a relay); these
tests check the lab really gives it that shape, so the relay tests prove something.
"""

from __future__ import annotations

import socket
import sys
import textwrap
import time
from collections.abc import Callable

import pytest

from appliance.lab.topology import Node, Topology

pytestmark = pytest.mark.netns

PORT = 7117
# Tells each client the address it came from, then echoes what it sends.
PEER_ECHO = textwrap.dedent(
    """
    import socket, sys, threading

    def serve(conn, peer):
        with conn:
            conn.sendall(f"{peer[0]}\\n".encode())
            while data := conn.recv(4096):
                conn.sendall(data)

    srv = socket.create_server((sys.argv[1], int(sys.argv[2])))
    while True:
        conn, peer = srv.accept()
        threading.Thread(target=serve, args=(conn, peer), daemon=True).start()
    """
)


def listen(node: Node, host: str, port: int = PORT) -> None:
    node.start(sys.executable, "-c", PEER_ECHO, host, str(port), name=f"peer-echo-{port}")
    node.wait_port(port, host=host)


def read_line(sock: socket.socket) -> bytes:
    data = b""
    while not data.endswith(b"\n"):
        chunk = sock.recv(1)
        if not chunk:
            raise ConnectionError(f"closed after {data!r}")
        data += chunk
    return data


def seen_as(node: Node, host: str, port: int = PORT) -> str:
    """The address a listener at host:port sees this node's connection come from."""
    with node.connect(host, port, timeout=5) as sock:
        return read_line(sock).decode().strip()


def refused_or_silent(node: Node, host: str, port: int = PORT) -> bool:
    """True when a TCP connect from node to host:port gets nowhere within 2 s."""
    try:
        node.connect(host, port, timeout=2).close()
    except OSError:
        return True
    return False


@pytest.fixture
def topo(make_topology: Callable[..., Topology]) -> Topology:
    return make_topology(guests=1, nat_household=True)


def test_the_internet_is_one_link_and_home_is_unchanged(topo: Topology) -> None:
    assert {"inet", "relay", "natrouter", "bobhome"} <= set(topo.nodes)
    home_addrs = topo["home"].run("ip", "-4", "-br", "addr", "show", "eth0").stdout
    for addr in ("203.0.113.1/24", "203.0.113.3/24", "203.0.113.80/24"):
        assert addr in home_addrs
    for node, peer in (("gw", "203.0.113.10"), ("home", "203.0.113.20"), ("relay", "203.0.113.1")):
        topo[node].run("ping", "-c1", "-W2", peer)
    listen(topo["relay"], "203.0.113.10")
    # on-link, unNATed: the relay sees the appliance and the home as themselves
    assert seen_as(topo["gw"], "203.0.113.10") == "203.0.113.254"
    assert seen_as(topo["home"], "203.0.113.10") == "203.0.113.1"
    # and the segment reaches the relay through the appliance, as it reaches home
    topo["seg"].run("ping", "-c1", "-W2", "203.0.113.10")


def test_the_household_goes_out_as_its_router(topo: Topology) -> None:
    bob = topo["bobhome"]
    listen(topo["home"], "203.0.113.1")
    listen(topo["relay"], "203.0.113.10")
    assert seen_as(bob, "203.0.113.1") == "203.0.113.20"
    assert seen_as(bob, "203.0.113.10") == "203.0.113.20"


def test_nothing_gets_into_the_household(topo: Topology) -> None:
    bob, home, gw = topo["bobhome"], topo["home"], topo["gw"]
    listen(bob, "0.0.0.0")
    # the listener is there for anyone on the household's own LAN
    assert seen_as(topo["natrouter"], "192.0.2.1") == "192.0.2.254"
    # an internet host that even routes the household's range at its router gets nowhere
    for node in (home, gw):
        node.run("ip", "route", "add", "192.0.2.0/24", "via", "203.0.113.20")
        assert refused_or_silent(node, "192.0.2.1")
        assert refused_or_silent(node, "192.0.2.3")
        assert refused_or_silent(node, "203.0.113.20")


def test_a_cut_uplink_cuts_the_household_off_and_back(topo: Topology) -> None:
    bob = topo["bobhome"]
    listen(topo["relay"], "203.0.113.10")
    before = bob.connect("203.0.113.10", PORT, timeout=5)
    with before:
        assert read_line(before) == b"203.0.113.20\n"
        topo.cut_household_link(True)
        assert refused_or_silent(bob, "203.0.113.10")
        before.sendall(b"during the cut\n")
        before.settimeout(1)
        with pytest.raises(TimeoutError):
            before.recv(100)
        topo.cut_household_link(False)
        assert seen_as(bob, "203.0.113.10") == "203.0.113.20"
        # the router kept its mapping: the older connection delivers what it queued
        before.settimeout(15)
        deadline = time.monotonic() + 15
        echoed = b""
        while not echoed.endswith(b"\n") and time.monotonic() < deadline:
            echoed += before.recv(100)
        assert echoed == b"during the cut\n"
    topo.cut_household_link(False)  # restoring twice is harmless
    assert seen_as(bob, "203.0.113.10") == "203.0.113.20"
