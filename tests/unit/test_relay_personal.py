"""A personal server the relay cannot use is a refusal, never the site's server instead.

The appliance's own gate (the real server and access tables, the real session store)
behind the real relay on loopback; the site's POP server is a recorder on 127.0.0.1.
The visitor's mail client speaks POP3 and sends its home password: the recorder must
get neither a connection nor the password.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import cast

import pytest
from agent_helpers import appliance_config
from relay_helpers import (  # noqa: F401  (loop_kind: a fixture, used by every test)
    free_port,
    loop_kind,
    read_until,
    run,
)

import appliance.proxy.gate as gate_mod
from appliance.core.config import Config
from appliance.policy import Policy
from appliance.proxy.gate import Listener, PolicyGate, StaticGate
from appliance.proxy.relay import Relay
from appliance.state import leases
from appliance.state.leases import Lease
from appliance.state.sessions import SessionStore, read_only

pytestmark = pytest.mark.unit
V6_CONFIG = 'hidden_networks = ["198.51.100.0/24", "2001:db8:5::/48"]'


class Recorder(asyncio.Protocol):
    """A POP server that records every connection and every byte it is sent."""

    connections: list[bytes]

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.t = cast(asyncio.Transport, transport)
        self.connections.append(b"")
        self.t.write(b"+OK site POP\r\n")

    def data_received(self, data: bytes) -> None:
        self.connections[-1] += data
        self.t.write(b"+OK\r\n")


def site_config(tmp_path: Path, site_pop: int) -> Config:
    """The example config (with an IPv6 hidden network) whose site POP server is ours."""
    appliance_config(tmp_path)
    text = (tmp_path / "appliance.toml").read_text()
    assert 'hidden_networks = ["198.51.100.0/24"]' in text
    (tmp_path / "appliance.toml").write_text(
        text.replace('hidden_networks = ["198.51.100.0/24"]', V6_CONFIG)
    )
    servers = (tmp_path / "servers.toml").read_text()
    assert 'upstream = "198.51.100.3:110"' in servers
    (tmp_path / "servers.toml").write_text(
        servers.replace('upstream = "198.51.100.3:110"', f'upstream = "127.0.0.1:{site_pop}"')
    )
    from appliance.core import config as config_mod

    return config_mod.load(tmp_path / "appliance.toml")


NEIGHBOURS = {"127.0.0.1": "02:00:00:00:00:11"}  # the neighbour table: alice's MAC


def logged_in(config: Config, personal: str) -> SessionStore:
    """The store with alice's session (from her agent) on 127.0.0.1, as the portal makes it."""
    store = SessionStore.from_config(config, revoke=read_only)
    mac = "02:00:00:00:00:11"
    leases.record(store.conn, "granted", Lease("127.0.0.1", mac, time.time() + 3600), time.time())
    store.create(
        user="alice",
        source="agent:203.0.113.1",
        attributes={"role": "staff"},
        ip="127.0.0.1",
        mac=mac,
        personal_servers={"pop3": personal},
    )
    return store


async def pop_login(port: int) -> list[bytes]:
    """What a mail client sees when it logs in with its home password."""
    r, w = await asyncio.open_connection("127.0.0.1", port)
    lines = [await read_until(r, b"\n")]
    w.write(b"USER alice\r\n")
    lines.append(await read_until(r, b"\n"))
    w.write(b"PASS home-secret\r\n")
    lines.append(await read_until(r, b"\n"))
    w.write(b"QUIT\r\n")
    w.close()
    return lines


UNUSABLE = [
    "[2001:db8:113::3]:110",  # what the agent client stored for an IPv6-only home server
    "[2001:db8:5::3]:110",  # IPv6, and in a hidden network
    "198.51.100.3:110",  # the hidden segment
    "192.168.1.20:110",  # another guest
    "127.0.0.1:110",  # the appliance itself
    "pop.home.example:110",  # a name: resolved later, it could point anywhere
    "not a server",
]


@pytest.mark.parametrize("personal", UNUSABLE)
def test_an_unusable_personal_server_is_refused_not_replaced(tmp_path: Path, personal: str) -> None:
    async def body() -> None:
        loop = asyncio.get_running_loop()
        seen: list[bytes] = []
        recorder = type("R", (Recorder,), {"connections": seen})
        site_pop = free_port()
        site = await loop.create_server(recorder, "127.0.0.1", site_pop)
        config = site_config(tmp_path, site_pop)
        store = logged_in(config, personal)
        gate = PolicyGate(config, Policy.load(config), store, neighbour=NEIGHBOURS.get)
        port = free_port()
        relay = Relay(gate, connect_timeout=1.0, idle_timeout=5.0)
        await relay.start("127.0.0.1", (Listener("pop3", "pop3", port),))
        try:
            lines = await pop_login(port)
            await asyncio.sleep(0.1)
        finally:
            await relay.stop()
            site.close()
        assert lines[0].startswith(b"+OK guest gateway")  # the relay's refusal dialog
        assert lines[1].startswith(b"-ERR [SYS/PERM]") and lines[2].startswith(b"-ERR")
        assert seen == []  # the site's POP server got no connection, so no password
        assert relay.counters[("pop3", "refused-denied")] == 1

    run(body())


def test_a_usable_personal_server_is_the_only_choice(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The control: the same set-up with a usable home server goes there, not to the site."""

    async def body() -> None:
        loop = asyncio.get_running_loop()
        site_seen: list[bytes] = []
        home_seen: list[bytes] = []
        site_pop, home_pop = free_port(), free_port()
        site = await loop.create_server(
            type("S", (Recorder,), {"connections": site_seen}), "127.0.0.1", site_pop
        )
        home = await loop.create_server(
            type("H", (Recorder,), {"connections": home_seen}), "127.0.0.1", home_pop
        )
        config = site_config(tmp_path, site_pop)
        store = logged_in(config, f"127.0.0.1:{home_pop}")
        gate = PolicyGate(config, Policy.load(config), store, neighbour=NEIGHBOURS.get)
        # loopback is never a personal server on the appliance: only the address check
        # is left out here, to show where a usable one goes (the checks are tested above)
        real = gate_mod.personal_problem
        monkeypatch.setattr(gate_mod, "personal_problem", lambda text, _ifs=None: real(text))
        port = free_port()
        relay = Relay(gate, connect_timeout=1.0, idle_timeout=5.0)
        await relay.start("127.0.0.1", (Listener("pop3", "pop3", port),))
        try:
            lines = await pop_login(port)
            await asyncio.sleep(0.1)
        finally:
            await relay.stop()
            site.close()
            home.close()
        assert lines == [b"+OK site POP\r\n", b"+OK\r\n", b"+OK\r\n"]
        assert site_seen == [] and home_seen and b"PASS home-secret" in home_seen[0]

    run(body())


@pytest.mark.parametrize("personal", ["[2001:db8::3]:110", "not a server", "h:0"])
def test_the_static_gate_refuses_too(personal: str) -> None:
    """The lab's and benchmarks' gate: a personal server alone, and refused when unusable."""

    async def body() -> None:
        loop = asyncio.get_running_loop()
        seen: list[bytes] = []
        site_pop = free_port()
        site = await loop.create_server(
            type("R", (Recorder,), {"connections": seen}), "127.0.0.1", site_pop
        )
        port = free_port()
        gate = StaticGate(
            {
                "portal_url": "http://192.168.1.1/",
                "listeners": [{"service": "pop3", "protocol": "pop3", "port": port}],
                "servers": {"pop3": [f"127.0.0.1:{site_pop}"]},
                "personal_allowed": ["pop3"],
                "users": {
                    "127.0.0.1": {
                        "user": "alice",
                        "allow": ["pop3"],
                        "personal": {"pop3": personal},
                    }
                },
            }
        )
        relay = Relay(gate, connect_timeout=1.0, idle_timeout=5.0)
        await relay.start("127.0.0.1", (Listener("pop3", "pop3", port),))
        try:
            lines = await pop_login(port)
            await asyncio.sleep(0.1)
        finally:
            await relay.stop()
            site.close()
        assert lines[1].startswith(b"-ERR [SYS/PERM]") and seen == []

    run(body())
