"""A personal server behind a home relay ("agent:USER@HOUSEHOLD.RELAY#PIN"): the gate's
decision, the server table's reading of it, and the pump that joins the agent's stream."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from test_proxy_gate import OFF, FakePolicy, FakeSessions, config, session

from appliance.agent import client
from appliance.core import agent_protocol as wire
from appliance.core.config import HomeRelayConfig
from appliance.policy.server_info import Endpoint, ServerTable, Service
from appliance.proxy.agent_stream import AgentPump, AgentStreamFailed, AgentStreams
from appliance.proxy.gate import Admission, PolicyGate, Refusal, StaticGate, personal_problem

pytestmark = pytest.mark.unit
PIN = "sha256:" + "A" * 43
ON = HomeRelayConfig(
    {"relay.example": "wss://relay.example/v1/appliance"}, None, Path("/x.sock"), "", 5.0
)
NEIGHBOURS = {"192.168.1.11": "02:47:00:00:00:01"}
NOT_USED = "your personal pop3 server is behind a relay this appliance does not use"


def decide(personal: str, home_relay: HomeRelayConfig, service: str = "pop3") -> Any:
    policy = FakePolicy({"Sales 1": {"smtp", "pop3", "http"}})
    store = FakeSessions({"192.168.1.11": session("alice", "Sales 1", {service: personal})})
    gate = PolicyGate(config(home_relay=home_relay), policy, store, neighbour=NEIGHBOURS.get)
    return gate, gate.admit("192.168.1.11", service)


def test_a_relayed_server_goes_through_its_agent_when_the_relay_is_listed() -> None:
    agent = f"bob@bob-home.relay.example#{PIN}"
    gate, a = decide(wire.relayed_server_text(agent), ON)
    assert isinstance(a, Admission)
    assert [(u.name, u.agent, u.tls) for u in a.upstreams] == [("pop3/personal", agent, None)]
    assert gate.agent_streams is not None and gate.agent_streams.home_relay == ON


@pytest.mark.parametrize(
    ("agent", "home_relay", "reason"),
    [
        (f"bob@bob-home.relay.example#{PIN}", OFF, NOT_USED),  # no [home_relay] here
        (f"bob@bob-home.other.example#{PIN}", ON, NOT_USED),  # a relay the site does not list
        (f"bob@relay.example#{PIN}", ON, NOT_USED),  # the relay itself, no household
        ("bob@bob-home.relay.example", ON, "without its certificate fingerprint"),
        ("bob@bob-home.relay.example#sha256:short", ON, "cannot read"),
        ("not a spec", ON, "cannot read"),
    ],
)
def test_a_relayed_server_this_appliance_cannot_use_is_refused_never_the_sites(
    agent: str, home_relay: HomeRelayConfig, reason: str
) -> None:
    gate, r = decide(wire.relayed_server_text(agent), home_relay)
    assert isinstance(r, Refusal) and r.kind == "denied" and r.user == "alice"
    assert reason in r.reason and "bob-home" not in r.reason
    a = gate.admit("192.168.1.11", "smtp")  # another service: the site's, as always
    assert isinstance(a, Admission) and a.upstreams[0].host == "198.51.100.3"


def test_only_a_personal_allowed_service_uses_it() -> None:
    """smtp is not personal_allowed in the fake table: the session's relayed smtp entry
    is ignored and the site's servers are used, as for an ordinary personal server."""
    _gate, a = decide(wire.relayed_server_text(f"bob@bob-home.relay.example#{PIN}"), ON, "smtp")
    assert isinstance(a, Admission) and all(not u.agent for u in a.upstreams)
    assert [u.name for u in a.upstreams] == ["smtp/site", "smtp/site#2"]


def test_the_static_gate_needs_agent_streams_for_it() -> None:
    agent = f"bob@bob-home.relay.example#{PIN}"
    table = {
        "listeners": [{"service": "pop3", "protocol": "pop3", "port": 1110}],
        "servers": {"pop3": ["127.0.0.1:9"]},
        "personal_allowed": ["pop3"],
        "users": {
            "10.0.0.2": {
                "user": "bob",
                "allow": ["pop3"],
                "personal": {"pop3": wire.relayed_server_text(agent)},
            }
        },
    }
    r = StaticGate(table).admit("10.0.0.2", "pop3")
    assert isinstance(r, Refusal) and r.reason == NOT_USED
    streams = AgentStreams(ON, 1.0, key=Ed25519PrivateKey.generate())
    a = StaticGate(table, agent_streams=streams).admit("10.0.0.2", "pop3")
    assert isinstance(a, Admission) and [u.agent for u in a.upstreams] == [agent]


def test_the_relayed_form_is_no_address_to_the_server_table() -> None:
    text = wire.relayed_server_text(f"bob@bob-home.relay.example#{PIN}")
    svc = Service("pop3", "pop3", 1110, (Endpoint("198.51.100.3", 110),), (), True, ())
    table = ServerTable({"pop3": svc})
    assert table.personal_endpoint(text) is None
    assert table.upstreams_for("pop3", {"pop3": text}) == ()  # never the site's instead
    assert personal_problem(text) == "is reached through its agent, not at an address"


# -- the pump that reads the agent's answer, then joins the guest --------------------------


class FakeLink:
    client = None
    closed = False

    def __init__(self) -> None:
        self.got: list[bytes] = []
        self.events: list[str] = []

    def from_upstream(self, data: bytes) -> None:
        self.got.append(data)

    def upstream_eof(self) -> bool:
        self.events.append("eof")
        return True

    def upstream_lost(self) -> None:
        self.events.append("lost")


class FakeWriter:
    def close(self) -> None:
        pass


def pump_and_call() -> tuple[AgentPump, client.ConnectCall, FakeLink]:
    """(inside a running loop)"""
    link = FakeLink()
    pump = AgentPump(link, asyncio.get_running_loop(), FakeWriter())  # type: ignore[arg-type]
    spec = client.parse_spec(f"bob@bob-home.relay.example#{PIN}")
    call = client.ConnectCall(spec, Ed25519PrivateKey.generate(), PIN, "bob", "pop3")
    return pump, call, link


def test_the_servers_bytes_after_the_head_reach_the_guest_first() -> None:
    async def body() -> None:
        pump, call, link = pump_and_call()
        assert call.request.startswith(b"POST /v1/connect HTTP/1.1\r\n")
        assert call.request.endswith(b'{"user": "bob", "service": "pop3"}')
        waiting = asyncio.ensure_future(pump.answered(call))
        pump.data_received(b"HTTP/1.1 200 Connection est")
        await asyncio.sleep(0)
        assert not waiting.done()
        pump.data_received(b"ablished\r\n\r\n+OK home")
        pump.eof_received()  # the server said its greeting and hung up, before the join
        await waiting
        assert link.got == []
        pump.join()
        assert link.got == [b"+OK home"] and link.events == ["eof"]
        pump.data_received(b" POP\r\n")
        assert link.got[-1] == b" POP\r\n"

    asyncio.run(body())


@pytest.mark.parametrize("split", [5, 40, 80])
def test_a_refusal_is_read_whole_and_named_by_its_code(split: int) -> None:
    doc = json.dumps({"error": "no_login", "message": "log in first"}).encode()
    answer = (
        b"HTTP/1.1 403 Forbidden\r\nContent-Type: application/json\r\n"
        b"Content-Length: " + str(len(doc)).encode() + b"\r\n\r\n" + doc
    )

    async def body() -> None:
        pump, call, _link = pump_and_call()
        waiting = asyncio.ensure_future(pump.answered(call))
        pump.data_received(answer[:split])
        await asyncio.sleep(0)
        assert not waiting.done()
        pump.data_received(answer[split:])
        with pytest.raises(AgentStreamFailed) as err:
            await waiting
        assert err.value.code == "no_login"

    asyncio.run(body())


def test_an_agent_that_hangs_up_without_an_answer_fails_the_stream() -> None:
    async def body() -> None:
        pump, call, link = pump_and_call()
        waiting = asyncio.ensure_future(pump.answered(call))
        pump.data_received(b"HTTP/1.1 2")
        pump.connection_lost(None)
        with pytest.raises(AgentStreamFailed) as err:
            await waiting
        assert err.value.code == "bad_answer"
        assert link.events == []  # the guest is refused by the Link, not closed by the pump

    asyncio.run(body())
