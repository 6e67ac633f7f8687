"""PolicyGate against fakes shaped like the contract's Policy and SessionStore."""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from appliance.core.config import HomeRelayConfig
from appliance.policy.server_info import Endpoint, Service
from appliance.proxy.gate import Admission, PolicyGate, Refusal

pytestmark = pytest.mark.unit


@dataclass(frozen=True)
class Decision:
    allowed: bool
    rule: str | None
    reason: str
    max_connections: int | None = None
    quota_bytes_per_day: int | None = None


@dataclass
class FakePolicy:
    allow: dict[str, set[str]]  # department -> services
    subscribers: list[Callable[[Any], None]] = field(default_factory=list)

    @property
    def servers(self) -> Any:
        # the real Service type: a fake would drift from it as it grows keys
        svc = {
            name: Service(name, name, port, (), (), personal, ())
            for name, port, personal in (
                ("smtp", 2525, False), ("pop3", 1110, True), ("http", 8081, False)
            )
        }  # fmt: skip

        def upstreams_for(service: str, personal: Mapping[str, str]) -> tuple[Endpoint, ...]:
            if service == "pop3" and "pop3" in personal:
                host, port = personal["pop3"].split(":")
                return (Endpoint(host, int(port)),)
            return (Endpoint("198.51.100.3", 25), Endpoint("198.51.100.5", 25))

        return SimpleNamespace(services=svc, upstreams_for=upstreams_for)

    @property
    def access(self) -> Any:
        def decide(attributes: Mapping[str, Any], service: str) -> Decision:
            dept = str(attributes.get("department"))
            if service in self.allow.get(dept, set()):
                return Decision(True, dept, "allowed", 3, 10_000 if service == "smtp" else None)
            return Decision(False, None, f"no rule allows {service}")

        return SimpleNamespace(decide=decide)

    def subscribe(self, cb: Callable[[Any], None]) -> None:
        self.subscribers.append(cb)

    def reload(self) -> None:
        for cb in self.subscribers:
            cb(self)


@dataclass
class FakeSessions:
    sessions: dict[str, Any]
    touched: list[str] = field(default_factory=list)

    def lookup_ip(self, ip: str, now: float | None = None) -> Any:
        return self.sessions.get(ip)

    def touch(self, session_id: str) -> None:
        self.touched.append(session_id)


# the kernel's neighbour table as the gate reads it: alice's laptop at her address
NEIGHBOURS = {"192.168.1.11": "02:47:00:00:00:01"}


OFF = HomeRelayConfig({}, None, Path("/nonexistent/dialer.sock"), "", 5.0)


def config(identity: str | None = None, home_relay: HomeRelayConfig = OFF) -> Any:
    return SimpleNamespace(
        home_relay=home_relay,
        agent=SimpleNamespace(timeout=5.0),
        proxy=SimpleNamespace(explicit_http_port=3128, identity_header=identity),
        portal=SimpleNamespace(base_url=lambda ip: f"http://{ip}"),
        interfaces=SimpleNamespace(
            guest_ip=ipaddress.IPv4Address("192.168.1.1"),
            guest_subnet=ipaddress.IPv4Network("192.168.1.0/24"),
            management_address=ipaddress.IPv4Address("198.51.100.1"),
            uplink_address=ipaddress.IPv4Interface("198.51.100.1/24"),
            hidden_networks=(ipaddress.IPv4Network("198.51.100.0/24"),),
            hidden_networks6=(ipaddress.IPv6Network("2001:db8:5::/48"),),
        ),
    )


def session(user: str, dept: str, personal: dict[str, str] | None = None) -> Any:
    return SimpleNamespace(
        id=f"s-{user}",
        user=user,
        mac="02:47:00:00:00:01",
        attributes={"department": dept},
        personal_servers=personal or {},
        idle_expiry=float("inf"),
        absolute_expiry=float("inf"),
    )


def test_policy_gate_admits_refuses_and_names_upstreams() -> None:
    policy = FakePolicy({"Sales 1": {"smtp", "pop3"}})
    store = FakeSessions({"192.168.1.11": session("alice", "Sales 1", {"pop3": "203.0.113.3:110"})})
    gate = PolicyGate(config("X-Guest-User"), policy, store, neighbour=NEIGHBOURS.get)
    assert {(ls.service, ls.port, ls.explicit) for ls in gate.listeners()} >= {
        ("smtp", 2525, False),
        ("http", 3128, True),
    }
    a = gate.admit("192.168.1.11", "smtp")
    assert isinstance(a, Admission) and a.user == "alice" and a.rule == "Sales 1"
    assert [u.name for u in a.upstreams] == ["smtp/site", "smtp/site#2"]
    assert a.max_connections == 3 and a.identity == "alice"
    assert a.quota_bytes_per_day == 10_000  # the rule's quota reaches the relay
    p = gate.admit("192.168.1.11", "pop3")
    assert isinstance(p, Admission) and [u.name for u in p.upstreams] == ["pop3/personal"]
    r = gate.admit("192.168.1.11", "http")
    assert isinstance(r, Refusal) and r.kind == "denied" and r.user == "alice"
    r = gate.admit("192.168.1.99", "smtp")
    assert isinstance(r, Refusal) and r.kind == "login" and r.portal_url == "http://192.168.1.1/"
    assert store.touched == ["s-alice"]  # once, not per connection
    changed: list[int] = []
    gate.subscribe(lambda: changed.append(1))
    gate.reload()
    assert changed == [1]


@pytest.mark.parametrize(
    ("personal", "words"),
    [
        ("[2001:db8:113::3]:110", "IPv6 server"),
        ("198.51.100.3:110", "hidden from guests"),
        ("192.168.1.9:110", "guest subnet"),
        ("home.example:110", "not an IPv4 address"),
        ("203.0.113.3", "not address:port"),
    ],
)
def test_an_unusable_personal_server_is_a_refusal_with_its_reason(
    personal: str, words: str
) -> None:
    policy = FakePolicy({"Sales 1": {"smtp", "pop3"}})
    store = FakeSessions({"192.168.1.11": session("alice", "Sales 1", {"pop3": personal})})
    gate = PolicyGate(config(), policy, store, neighbour=NEIGHBOURS.get)
    r = gate.admit("192.168.1.11", "pop3")
    assert isinstance(r, Refusal) and r.kind == "denied" and r.user == "alice"
    assert words in r.reason and "198.51.100" not in r.reason and "2001:" not in r.reason
    a = gate.admit("192.168.1.11", "smtp")  # not a personal service: the site's server
    assert isinstance(a, Admission) and a.upstreams[0].host == "198.51.100.3"


def test_no_neighbour_entry_is_no_admission() -> None:
    """The session binds (IP, MAC): an address with no complete neighbour entry on the
    guest interface (a forged source, a guest gone) proves nothing and is refused, as is
    another MAC behind the address."""
    policy = FakePolicy({"Sales 1": {"smtp"}})
    store = FakeSessions({"192.168.1.11": session("alice", "Sales 1")})
    for table in ({}, {"192.168.1.11": "02:47:00:00:00:99"}):
        gate = PolicyGate(config(), policy, store, neighbour=table.get)
        r = gate.admit("192.168.1.11", "smtp")
        assert isinstance(r, Refusal) and r.kind == "login", table
    gate = PolicyGate(config(), policy, store, neighbour=NEIGHBOURS.get)
    assert isinstance(gate.admit("192.168.1.11", "smtp"), Admission)


def test_the_neighbour_table_counts_only_complete_entries_on_the_guest_interface(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from appliance.core import neighbours

    arp = tmp_path / "arp"
    arp.write_text(
        "IP address       HW type     Flags       HW address            Mask     Device\n"
        "192.168.1.11     0x1         0x2         02:47:00:00:00:01     *        guest0\n"
        "192.168.1.12     0x1         0x0         02:47:00:00:00:02     *        guest0\n"
        "192.168.1.13     0x1         0x2         02:47:00:00:00:03     *        uplink0\n"
    )
    real_open = open
    monkeypatch.setattr(
        "builtins.open",
        lambda f, *a, **k: real_open(arp if f == "/proc/net/arp" else f, *a, **k),
    )
    assert neighbours.neighbour_mac("guest0", "192.168.1.11") == "02:47:00:00:00:01"
    assert neighbours.neighbour_mac("guest0", "192.168.1.12") is None  # incomplete
    assert neighbours.neighbour_mac("guest0", "192.168.1.13") is None  # another interface
