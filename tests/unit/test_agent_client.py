"""The appliance's agent client without a network: addresses, answers, and what it refuses."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from agent_helpers import appliance_config

from appliance import config as config_mod
from appliance.agent import client, wire
from appliance.agent.client import AgentError, parse_spec
from appliance.config import Config

pytestmark = pytest.mark.unit
FP = "sha256:" + "A" * 43


@pytest.fixture(scope="module")
def config(tmp_path_factory: pytest.TempPathFactory) -> Config:
    return appliance_config(tmp_path_factory.mktemp("appliance"))


@pytest.mark.parametrize(
    ("spec", "want"),
    [
        ("alice@home.example", ("alice", "home.example", 8443, None)),
        ("alice@home.example:9443", ("alice", "home.example", 9443, None)),
        ("alice@203.0.113.1#" + FP, ("alice", "203.0.113.1", 8443, FP)),
        ("a.b+c@[2001:db8::1]:8000", ("a.b+c", "2001:db8::1", 8000, None)),
        # a hex fingerprint (as `openssl x509 -fingerprint -sha256` prints it) is the same pin
        ("alice@h#" + ":".join(["00"] * 32), ("alice", "h", 8443, "sha256:" + wire.b64(bytes(32)))),
    ],
)
def test_agent_addresses(spec: str, want: tuple[object, ...]) -> None:
    s = parse_spec(spec)
    assert (s.user, s.host, s.port, s.fingerprint) == want


@pytest.mark.parametrize(
    "spec",
    [
        "alice",
        "@home",
        "alice@",
        "al ice@home",
        "alice@home:0",
        "alice@home:99999",
        "alice@home#sha256:short",
        "alice@-bad-.example",
        "alice@2001:db8::1",
    ],
)
def test_bad_agent_addresses(spec: str) -> None:
    with pytest.raises(AgentError) as err:
        parse_spec(spec)
    assert err.value.code == "bad_address" and err.value.message


@pytest.mark.parametrize(
    ("address", "allowed"),
    [
        ("203.0.113.3", True),
        ("192.168.1.50", False),  # guest subnet
        ("192.168.1.1", False),  # the appliance's guest address
        ("198.51.100.3", False),  # hidden segment
        ("198.51.100.1", False),  # the appliance's uplink
        ("127.0.0.1", False),
        ("0.0.0.0", False),
        ("224.0.0.1", False),
        ("169.254.1.1", False),
        ("::ffff:198.51.100.3", False),
        ("2001:db8::5", True),
    ],
)
def test_forbidden_addresses(config: Config, address: str, allowed: bool) -> None:
    assert (client.forbidden_address(config, address) is None) == allowed


@pytest.fixture(scope="module")
def config6(tmp_path_factory: pytest.TempPathFactory) -> Config:
    """The example config with IPv6 hidden networks: a segment prefix and the ULA range."""
    d = tmp_path_factory.mktemp("appliance6")
    appliance_config(d)
    text = (d / "appliance.toml").read_text()
    old = 'hidden_networks = ["198.51.100.0/24"]'
    assert old in text
    new = 'hidden_networks = ["198.51.100.0/24", "2001:db8:5::/48", "fc00::/7"]'
    (d / "appliance.toml").write_text(text.replace(old, new))
    return config_mod.load(d / "appliance.toml")


@pytest.mark.parametrize(
    ("address", "allowed"),
    [
        ("2001:db8:113::3", True),  # a home server on the internet
        ("2001:db8:5::3", False),  # the segment's IPv6 prefix, listed as hidden
        ("2001:db8:5:ffff::1", False),
        ("fd12:3456::1", False),  # ULA, listed as hidden (fc00::/7)
        ("::1", False),
        ("::", False),
        ("fe80::1", False),
        ("fe80::1%lo", False),
        ("ff02::1", False),
        ("fec0::1", False),  # site-local (deprecated, still routed somewhere)
        ("::ffff:198.51.100.3", False),  # IPv4-mapped: the hidden segment
        ("::ffff:c633:6403", False),  # the same, written in hex
        ("::ffff:192.168.1.9", False),  # a guest
        ("::ffff:127.0.0.1", False),
        ("::ffff:203.0.113.3", True),
        ("::198.51.100.3", False),  # IPv4-compatible (deprecated)
        ("64:ff9b::198.51.100.3", False),  # NAT64 to the hidden segment
        ("64:ff9b::203.0.113.3", True),  # NAT64 to the internet
        ("64:ff9b:1::c633:6403", False),  # local-use NAT64: the IPv4 end is not readable
        ("2002:c633:6403::1", False),  # 6to4 of 198.51.100.3
        ("2001:0:4136:e378:8000:63bf:3fff:fdd2", False),  # Teredo
        ("not-an-address", False),
    ],
)
def test_forbidden_ipv6_addresses(config6: Config, address: str, allowed: bool) -> None:
    assert (client.forbidden_address(config6, address) is None) == allowed


@pytest.mark.parametrize(
    "target",
    [
        "[2001:db8:113::3]:110",  # IPv6 only: the relay could not use it
        "[2001:db8:5::3]:110",
        "[::ffff:198.51.100.3]:110",
        "[64:ff9b::198.51.100.3]:110",
    ],
)
def test_ipv6_personal_servers_are_refused_at_login(config6: Config, target: str) -> None:
    spec = parse_spec("alice@203.0.113.1")
    body = json.dumps({"user": "alice", "servers": {"pop3": target}}).encode()
    with pytest.raises(AgentError) as err:
        client._interpret(config6, spec, 200, body, "KEY", client._Deadline(2.0))
    assert err.value.code == "refused_servers" and "pop3" in err.value.message


def interpret(config: Config, status: int, body: object) -> client.AgentAnswer:
    spec = parse_spec("alice@203.0.113.1")
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    return client._interpret(config, spec, status, raw, "KEY", client._Deadline(2.0))


def test_good_answer(config: Config) -> None:
    a = interpret(
        config,
        200,
        {
            "user": "alice",
            "attributes": {"department": "Sales 1", "groups": ["a", "b"]},
            "servers": {"pop3": "203.0.113.3:110"},
        },
    )
    assert a.attributes == {"department": "Sales 1", "groups": ("a", "b")}
    assert a.servers == {"pop3": "203.0.113.3:110"} and a.agent == "203.0.113.1:8443"


@pytest.mark.parametrize(
    ("status", "body", "code"),
    [
        (401, {"error": "bad_password", "message": "x"}, "bad_password"),
        (401, {"error": "unknown_user", "message": "x"}, "unknown_user"),
        (423, {"error": "locked", "message": "x"}, "locked"),
        (403, {"error": "appliance_not_allowed", "message": "x"}, "appliance_not_allowed"),
        (429, {"error": "rate_limited", "message": "x"}, "rate_limited"),
        (500, {"error": "boom"}, "bad_answer"),
        (200, b"<html>", "bad_answer"),
        (200, b"\xff", "bad_answer"),
        (200, [1, 2], "bad_answer"),
        (200, {"user": "bob", "attributes": {}, "servers": {}}, "bad_answer"),
        (200, {"user": "alice", "attributes": {"x": 1}, "servers": {}}, "bad_answer"),
        (200, {"user": "alice", "attributes": {}, "servers": {"pop3": "nohost"}}, "bad_answer"),
        (200, {"user": "alice", "attributes": {}, "servers": {"POP 3": "h:1"}}, "bad_answer"),
        (200, {"user": "alice", "attributes": {}, "servers": {}, "extra": 1}, "bad_answer"),
        (200, {"user": "alice", "servers": {"pop3": "192.168.1.9:110"}}, "refused_servers"),
        (200, {"user": "alice", "servers": {"pop3": "198.51.100.3:110"}}, "refused_servers"),
        (200, {"user": "alice", "servers": {"smtp": "127.0.0.1:25"}}, "refused_servers"),
    ],
)
def test_answers_refused(config: Config, status: int, body: object, code: str) -> None:
    with pytest.raises(AgentError) as err:
        interpret(config, status, body)
    assert err.value.code == code


def test_appliance_key_is_made_once_and_private(config: Config) -> None:
    first = client.appliance_key_id(config)
    assert client.appliance_key_id(config) == first and wire.valid_key_id(first)
    path = Path(config.state.directory) / client.KEY_FILE
    assert path.stat().st_mode & 0o077 == 0


def test_deadline_covers_everything(config: Config) -> None:
    # a name that cannot resolve quickly still answers within the deadline
    import time

    start = time.monotonic()
    with pytest.raises(AgentError) as err:
        client._resolve("name.invalid", 1, client._Deadline(0.5))
    assert err.value.code in ("timeout", "unreachable")
    assert time.monotonic() - start < 1.0
