"""The agent's API logic (sans-IO): signatures, trust, refusals, rate limits and lockout."""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any

import pytest
from agent_helpers import make_agent_dir, signed
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from appliance.agent import api, tables
from appliance.agent.api import AgentApp, Request, Response
from appliance.agent.guard import Lockout, NonceCache, RateLimiter
from appliance.core import agent_protocol as wire
from appliance.core import passwords

pytestmark = pytest.mark.unit
FP = "sha256:" + "A" * 43


@functools.lru_cache(maxsize=64)
def cached_verify(stored: str | None, password: str) -> bool:
    return passwords.verify_password(stored, password)


class Clock:
    def __init__(self) -> None:
        self.now = 1_800_000_000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture(scope="module")
def agent_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("agent")
    make_agent_dir(
        d,
        users={
            "alice": (
                "alice-pw",
                {"department": "Sales 1", "groups": ("a", "b")},
                {"pop3": "203.0.113.3:110"},
            ),
        },
        extra="[limits]\nmax_failures = 3\nlockout = 60\nrate = 60\nburst = 8\n",
    )
    return d


def make_app(
    agent_dir: Path, clock: Clock, allowed: set[str], denied: frozenset[str] = frozenset()
) -> tuple[AgentApp, list[dict[str, Any]]]:
    from appliance.agent.settings import load

    s = load(agent_dir / "agent.toml")
    entries = {k: tables.ApplianceEntry(k, "allowed") for k in allowed}
    entries |= {k: tables.ApplianceEntry(k, "denied") for k in denied}
    saved: list[dict[str, Any]] = []
    users = tables.load_users(s.users_file)
    app = AgentApp(  # argon2id is slow on purpose: remember each (hash, password) verdict
        s,
        FP,
        lambda: users,
        lambda: tables.ApplianceTable(entries),
        persist_pending=saved.append,
        clock=clock,
        verify=cached_verify,
    )
    return app, saved


def call(
    app: AgentApp,
    key: Ed25519PrivateKey,
    body: Any,
    clock: Clock,
    peer: str = "192.0.2.9",
    fp: str = FP,
    tamper: dict[str, str] | None = None,
) -> Response:
    raw, headers = signed(key, body, fp, clock.now)
    headers.update(tamper or {})
    return app.handle(Request("POST", wire.AUTHENTICATE_PATH, headers, raw, peer))


def kid(key: Ed25519PrivateKey) -> str:
    return wire.public_key_id(key.public_key())


def test_alice_gets_her_attributes_and_servers(agent_dir: Path) -> None:
    clock, key = Clock(), Ed25519PrivateKey.generate()
    app, _ = make_app(agent_dir, clock, {kid(key)})
    r = call(app, key, {"user": "alice", "password": "alice-pw"}, clock)
    assert r.status == 200
    assert json.loads(r.encode()) == {
        "user": "alice",
        "attributes": {"department": "Sales 1", "groups": ["a", "b"]},
        "servers": {"pop3": "203.0.113.3:110"},
    }


def test_refusal_codes(agent_dir: Path) -> None:
    clock, key = Clock(), Ed25519PrivateKey.generate()
    app, _ = make_app(agent_dir, clock, {kid(key)})
    r = call(app, key, {"user": "alice", "password": "nope"}, clock)
    assert (r.status, r.body["error"]) == (401, "bad_password")
    r = call(app, key, {"user": "bob", "password": "x"}, clock)
    assert (r.status, r.body["error"]) == (401, "unknown_user")


def test_lockout_after_wrong_passwords_then_expiry(agent_dir: Path) -> None:
    clock, key = Clock(), Ed25519PrivateKey.generate()
    app, _ = make_app(agent_dir, clock, {kid(key)})
    for _ in range(3):
        assert call(app, key, {"user": "alice", "password": "x"}, clock).body["error"] == (
            "bad_password"
        )
    # locked: even the right password is refused, without being checked
    r = call(app, key, {"user": "alice", "password": "alice-pw"}, clock)
    assert (r.status, r.body["error"]) == (423, "locked")
    clock.now += 61
    assert call(app, key, {"user": "alice", "password": "alice-pw"}, clock).status == 200


def test_rate_limit_per_source(agent_dir: Path) -> None:
    clock, key = Clock(), Ed25519PrivateKey.generate()
    app, _ = make_app(agent_dir, clock, {kid(key)})
    codes = [call(app, key, {"user": "bob", "password": "x"}, clock).status for _ in range(10)]
    assert codes[:8] == [401] * 8 and codes[8:] == [429, 429]
    clock.now += 2  # one token per second comes back
    assert call(app, key, {"user": "bob", "password": "x"}, clock).status == 401


def test_unknown_appliance_is_pending_denied_is_refused(agent_dir: Path) -> None:
    clock = Clock()
    stranger, banned = Ed25519PrivateKey.generate(), Ed25519PrivateKey.generate()
    app, saved = make_app(agent_dir, clock, set(), {kid(banned)})
    r = call(app, stranger, {"user": "alice", "password": "alice-pw"}, clock)
    assert (r.status, r.body["error"]) == (403, "appliance_not_allowed")
    assert kid(stranger) in r.body["message"]
    assert kid(stranger) in saved[-1]
    r = call(app, banned, {"user": "alice", "password": "alice-pw"}, clock)
    assert (r.status, r.body["error"]) == (403, "appliance_denied")


def test_a_flood_of_unlisted_keys_from_one_source_keeps_the_visitors_pending_key(
    agent_dir: Path,
) -> None:
    """The finding: 500 requests in 0.1 s, each with a new key, from one address."""
    clock, visitor = Clock(), Ed25519PrivateKey.generate()
    app, saved = make_app(agent_dir, clock, set())
    r = call(app, visitor, {"user": "alice", "password": "alice-pw"}, clock, peer="192.0.2.7")
    assert r.body["error"] == "appliance_not_allowed" and kid(visitor) in saved[-1]
    flood = [Ed25519PrivateKey.generate() for _ in range(500)]
    codes = []
    for key in flood:
        clock.now += 0.0002
        codes.append(call(app, key, {"user": "alice", "password": "x"}, clock, "198.51.100.66"))
    statuses = [c.status for c in codes]
    # the burst (8) is answered, the rest is refused before the signature check
    assert statuses.count(403) == 8 and statuses.count(429) == 492
    assert codes[-1].body["error"] == "rate_limited" and codes[-1].headers["Retry-After"]
    assert len(saved) <= 2  # not 501 rewrites of the pending file
    assert kid(visitor) in app.pending and kid(visitor) in saved[-1]
    # the flooding address holds a few pending slots, never the visitor's
    from_flood = [k for k, e in app.pending.items() if e["address"] == "198.51.100.66"]
    assert 1 <= len(from_flood) <= api.MAX_PENDING_PER_SOURCE
    # what was noted is written later, coalesced into one write
    clock.now += 2
    app.flush_pending()
    assert set(saved[-1]) == set(app.pending) and kid(visitor) in saved[-1]
    assert app.dropped["rate_limited"] == 492


def test_many_sources_evict_the_biggest_holder_first(agent_dir: Path) -> None:
    clock, visitor = Clock(), Ed25519PrivateKey.generate()
    app, _ = make_app(agent_dir, clock, set())
    call(app, visitor, {"user": "alice", "password": "x"}, clock, peer="192.0.2.7")
    # 60 addresses with 4 keys each overfill the table; the visitor's single entry stays
    for i in range(60):
        for _ in range(4):
            clock.now += 0.001
            key = Ed25519PrivateKey.generate()
            call(app, key, {"user": "a", "password": "x"}, clock, peer=f"198.51.100.{i}")
    assert len(app.pending) == api.MAX_PENDING and kid(visitor) in app.pending
    assert app.dropped["pending_evicted"] == 60 * 4 + 1 - api.MAX_PENDING


def test_the_source_limit_comes_before_the_signature_check(agent_dir: Path) -> None:
    """Forged requests cost a signature check each: they are counted and refused too."""
    clock, key = Clock(), Ed25519PrivateKey.generate()
    app, _ = make_app(agent_dir, clock, {kid(key)})
    bad = {"appliance-signature": wire.b64(b"x" * 64)}
    codes = [
        call(app, key, {"user": "alice", "password": "x"}, clock, tamper=bad).status
        for _ in range(10)
    ]
    assert codes == [401] * 8 + [429, 429]
    # another address is not affected
    r = call(app, key, {"user": "alice", "password": "alice-pw"}, clock, peer="192.0.2.10")
    assert r.status == 200


def test_ipv6_sources_are_counted_per_64(agent_dir: Path) -> None:
    """An IPv6 host has a whole /64 to pick addresses from: that is one source."""
    clock, key, other = Clock(), Ed25519PrivateKey.generate(), Ed25519PrivateKey.generate()
    app, _ = make_app(agent_dir, clock, {kid(key), kid(other)})
    body = {"user": "bob", "password": "x"}
    codes = [call(app, key, body, clock, peer=f"2001:db8:1:2::{i:x}").status for i in range(10)]
    assert codes == [401] * 8 + [429, 429]
    assert call(app, other, body, clock, peer="2001:db8:1:3::1").status == 401


def test_relayed_sources_are_counted_apart_and_ipv6_per_64(agent_dir: Path) -> None:
    """A relayed request's peer is `relay:<address the relay saw>`: counted per that
    address (an IPv6 one per /64), apart from the same address reaching the agent directly."""
    clock, key = Clock(), Ed25519PrivateKey.generate()
    app, _ = make_app(agent_dir, clock, {kid(key)})
    forged = {"appliance-signature": wire.b64(b"x" * 64)}
    body = {"user": "alice", "password": "x"}
    peers = [f"relay:[2001:db8:1:2::{i:x}]" for i in range(10)]
    codes = [call(app, key, body, clock, peer=p, tamper=forged).status for p in peers]
    assert codes == [401] * 8 + [429, 429]
    ok = {"user": "alice", "password": "alice-pw"}
    for other in ("relay:2001:db8:1:3::1", "relay:198.51.100.4", "2001:db8:1:2::1"):
        assert call(app, key, ok, clock, peer=other).status == 200, other


@pytest.mark.parametrize(
    ("tamper", "code"),
    [
        ({"appliance-signature": wire.b64(b"x" * 64)}, "bad_signature"),
        ({"appliance-time": "1000"}, "stale_request"),
        ({"appliance-key": "short"}, "bad_signature"),
        ({"appliance-nonce": "!"}, "bad_signature"),
        ({"appliance-time": "\u00b2"}, "bad_signature"),  # a "digit" int() refuses
    ],
)
def test_bad_signatures(agent_dir: Path, tamper: dict[str, str], code: str) -> None:
    clock, key = Clock(), Ed25519PrivateKey.generate()
    app, _ = make_app(agent_dir, clock, {kid(key)})
    r = call(app, key, {"user": "alice", "password": "alice-pw"}, clock, tamper=tamper)
    assert r.status in (400, 401) and r.body["error"] == code


def test_replay_and_other_agent_fingerprint_are_refused(agent_dir: Path) -> None:
    clock, key = Clock(), Ed25519PrivateKey.generate()
    app, _ = make_app(agent_dir, clock, {kid(key)})
    raw, headers = signed(key, {"user": "alice", "password": "alice-pw"}, FP, clock.now)
    req = Request("POST", wire.AUTHENTICATE_PATH, headers, raw, "192.0.2.9")
    assert app.handle(req).status == 200
    assert app.handle(req).body["error"] == "replayed"
    # signed for another agent's certificate: a rogue agent cannot relay it here
    other = "sha256:" + "B" * 43
    r = call(app, key, {"user": "alice", "password": "alice-pw"}, clock, fp=other)
    assert r.body["error"] == "bad_signature"


@pytest.mark.parametrize(
    ("body", "ctype", "status", "code"),
    [
        (b'{"user": "alice", "password": "x", "admin": true}', None, 400, "unknown_field"),
        (b'{"user": 1, "password": "x"}', None, 400, "bad_request"),
        (b'{"user": "alice"}', None, 400, "bad_request"),
        (b"[1, 2]", None, 400, "bad_request"),
        (b"\xff\xfe", None, 400, "bad_json"),
        (b"[" * 100000 + b"]" * 100000, None, 413, "too_large"),
        (b'{"user": "al ice", "password": "x"}', None, 400, "bad_request"),
        (b'{"user": "alice\\n", "password": "x"}', None, 400, "bad_request"),
        (b'{"user": "alice", "password": "x"}', "text/plain", 415, "unsupported_media_type"),
        (b'{"\\ud800": 1}', None, 400, "unknown_field"),  # a lone surrogate, echoed safely
    ],
)
def test_bad_bodies_are_4xx(
    agent_dir: Path, body: bytes, ctype: str | None, status: int, code: str
) -> None:
    clock, key = Clock(), Ed25519PrivateKey.generate()
    app, _ = make_app(agent_dir, clock, {kid(key)})
    raw, headers = signed(key, body, FP, clock.now)
    if ctype:
        headers["content-type"] = ctype
    r = app.handle(Request("POST", wire.AUTHENTICATE_PATH, headers, raw, "192.0.2.9"))
    assert (r.status, r.body["error"]) == (status, code)
    assert json.loads(r.encode())["error"] == code


def test_guards_are_bounded_and_exact() -> None:
    rl = RateLimiter(60, 2)
    assert [rl.allow("a", 0.0) for _ in range(3)] == [True, True, False]
    assert rl.allow("a", 1.0)
    lo = Lockout(2, 10)
    assert not lo.failure("u", 0) and lo.failure("u", 1) and lo.locked("u", 5)
    assert not lo.locked("u", 12)
    nc = NonceCache(300)
    assert nc.fresh("n1", 0) and not nc.fresh("n1", 10) and nc.fresh("n1", 700)


_FUZZ_KEY = Ed25519PrivateKey.generate()


@pytest.fixture(scope="module")
def fuzz_app(tmp_path_factory: pytest.TempPathFactory) -> AgentApp:
    s = make_agent_dir(
        tmp_path_factory.mktemp("fuzz"),
        extra=(
            f'[appliances]\ntrusted = ["{wire.public_key_id(_FUZZ_KEY.public_key())}"]\n'
            "[limits]\nrate = 100000\nburst = 100000\n"
        ),
    )
    users = tables.UserTable({"alice": tables.User("alice", "$argon2id$x", attributes={"a": "b"})})
    return AgentApp(
        s,
        FP,
        lambda: users,
        lambda: tables.ApplianceTable({}),
        clock=Clock(),
        verify=lambda stored, pw: stored is not None and pw == "alice-pw",
    )


_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3)
    ),
    max_leaves=8,
)
_header_text = st.text(st.characters(max_codepoint=255), max_size=50)


@given(
    body=st.one_of(
        st.binary(max_size=200),
        _json.map(lambda v: json.dumps(v).encode()),
        st.fixed_dictionaries(
            {"user": st.text(max_size=70), "password": st.text(max_size=30)},
            optional={"x": _json},
        ).map(lambda v: json.dumps(v).encode()),
    ),
    headers=st.dictionaries(
        st.sampled_from(
            [
                "content-type",
                "appliance-key",
                "appliance-time",
                "appliance-nonce",
                "appliance-signature",
            ]
        ),
        _header_text,
    ),
    method=st.sampled_from(["GET", "POST", "PUT", "HEAD"]),
    path=st.sampled_from(["/v1/authenticate", "/v1/info", "/v1/authenticate?x=1", "/", "/v2"]),
    sign=st.booleans(),
)
@settings(
    max_examples=300,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
def test_no_input_makes_a_5xx(
    fuzz_app: AgentApp, body: bytes, headers: dict[str, str], method: str, path: str, sign: bool
) -> None:
    """Sans-IO fuzz of every input the server hands to the app, signed or not."""
    app = fuzz_app
    if sign:
        _, signed_headers = signed(_FUZZ_KEY, body, FP, app.clock(), path=path)
        headers = {**headers, **{k: v for k, v in signed_headers.items() if k not in headers}}
    r = app.handle(Request(method, path, headers, body, "192.0.2.1"))
    assert 200 <= r.status < 500
    doc = json.loads(r.encode())
    assert r.status == 200 or doc["error"]
