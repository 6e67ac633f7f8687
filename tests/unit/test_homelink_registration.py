"""The relay's registration: signed answers to its challenge, and the table of names."""

from __future__ import annotations

import datetime
import json
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.oid import NameOID
from hypothesis import given, settings
from hypothesis import strategies as st

from appliance.core.agent_protocol import b64, fingerprint
from appliance.core.config import StateConfig
from appliance.homelink.frames import Reset
from appliance.homelink.registration import (
    Registration,
    RegistrationRefused,
    challenge,
    challenge_message,
    parse_challenge,
    sign_registration,
    verify_registration,
)
from appliance.homerelay.table import Registrations
from appliance.state.households import Households

pytestmark = pytest.mark.unit
HOST = "relay.example"


def make_cert(key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey) -> bytes:
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "agent")])
    start = datetime.datetime(2026, 1, 1, tzinfo=datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(start)
        .not_valid_after(start + datetime.timedelta(days=365))
        .sign(key, hashes.SHA256())
    )
    return cert.public_bytes(Encoding.DER)


KEY = ec.generate_private_key(ec.SECP256R1())
CERT = make_cert(KEY)
OTHER = ec.generate_private_key(ec.SECP256R1())


def good(nonce: bytes, household: str = "alice-home") -> dict[str, str]:
    return sign_registration(KEY, CERT, nonce, household, HOST)


def test_good_registration_gives_name_and_fingerprint_key() -> None:
    nonce = challenge()
    assert parse_challenge(json.dumps(challenge_message(nonce))) == nonce
    message = json.dumps(good(nonce))
    assert verify_registration(message, nonce, HOST) == Registration(
        "alice-home", fingerprint(CERT)
    )
    # the relay host compares like DNS names do
    assert isinstance(verify_registration(message, nonce, "Relay.Example."), Registration)


def refusal(message: object, nonce: bytes, host: str = HOST) -> int:
    result = verify_registration(message, nonce, host)
    assert isinstance(result, RegistrationRefused), result
    assert result.reason
    return result.code


def test_signature_bound_to_nonce_host_and_key() -> None:
    nonce = challenge()
    assert refusal(good(nonce), challenge()) == 4401
    assert refusal(good(nonce), nonce, "other-relay.example") == 4401
    forged = dict(good(nonce))
    forged["signature"] = sign_registration(OTHER, CERT, nonce, "alice-home", HOST)["signature"]
    assert refusal(forged, nonce) == 4401
    renamed = dict(good(nonce), household="bob-home")
    assert refusal(renamed, nonce) == 4401


def test_malformed_messages_are_4400() -> None:
    nonce = challenge()
    msg = good(nonce)
    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    p384 = ec.generate_private_key(ec.SECP384R1())
    cases: list[object] = [
        "not json",
        "[" * 5000,
        json.dumps(msg) + " " * 9000,
        [msg],
        None,
        dict(msg, type="challenge"),
        dict(msg, extra="x"),
        {k: v for k, v in msg.items() if k != "signature"},
        dict(msg, household="Alice"),
        dict(msg, household="alice-home\n"),
        dict(msg, household=7),
        dict(msg, certificate=msg["certificate"][:-20]),
        dict(msg, certificate="!!not base64!!"),
        dict(msg, certificate=""),
        dict(msg, certificate=b64(b"\x30\x82garbage")),
        dict(msg, certificate=b64(make_cert(rsa_key))),
        dict(msg, certificate=b64(make_cert(p384))),
        dict(msg, certificate="A" * 100_000),
        dict(msg, signature="A" * 1000),
        dict(msg, signature=["x"]),
        dict(msg, certificate=None),
    ]
    for case in cases:
        assert refusal(case, nonce) == 4400, case


def test_truncated_signature_is_refused() -> None:
    nonce = challenge()
    msg = good(nonce)
    assert refusal(dict(msg, signature=msg["signature"][:-8]), nonce) in (4400, 4401)
    assert refusal(dict(msg, signature=b64(b"\x30\x06garbage")), nonce) == 4401


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=30),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner),
    max_leaves=20,
)
fields = st.fixed_dictionaries(
    {
        "type": st.sampled_from(["register", "x"]) | json_values,
        "household": st.sampled_from(["alice-home", ""]) | json_values,
        "certificate": st.sampled_from([b64(CERT), b64(CERT)[:50]]) | json_values,
        "signature": st.text(alphabet="AB-_", max_size=100) | json_values,
    }
)


@settings(max_examples=300, deadline=None)
@given(st.one_of(json_values, fields, st.binary(max_size=200), st.text(max_size=200)))
def test_hostile_input_never_raises(message: object) -> None:
    result = verify_registration(message, b"\0" * 32, HOST)
    assert isinstance(result, RegistrationRefused)
    assert result.code in (4400, 4401)


# The table


def test_first_claim_wins_and_takeover_returns_old_link() -> None:
    table = Registrations()
    assert table.presence("alice-home") is None
    assert table.claim_or_check("alice-home", "key-a", 100.0) is None
    assert table.online("alice-home", "key-a", 1, 100.0) is None
    other = table.claim_or_check("alice-home", "key-b", 101.0)
    assert other is not None and other.code == 4403
    assert table.claim_or_check("alice-home", "key-a", 102.0) is None
    assert table.online("alice-home", "key-a", 2, 102.0) == 1
    assert table.offline("alice-home", 1, 103.0) is False  # the replaced link ends late
    assert table.presence("alice-home") == {
        "household": "alice-home",
        "state": "online",
        "last_seen": 102,
    }
    assert table.offline("alice-home", 2, 110.0) is True
    assert table.presence("alice-home") == {
        "household": "alice-home",
        "state": "offline",
        "last_seen": 110,
    }


def test_in_use_and_stream_limit() -> None:
    table = Registrations(max_streams=2)
    assert table.streams_opened("alice-home", 1.0) is Reset.OFFLINE
    table.claim_or_check("alice-home", "k", 1.0)
    assert table.streams_opened("alice-home", 1.0) is Reset.OFFLINE
    table.online("alice-home", "k", 1, 1.0)
    assert table.streams_opened("alice-home", 2.0) is None
    assert table.presence("alice-home", now=5.0) == {
        "household": "alice-home",
        "state": "in_use",
        "last_seen": 5,
    }
    assert table.streams_opened("alice-home", 2.0) is None
    assert table.streams_opened("alice-home", 2.0) is Reset.LIMIT
    table.streams_closed("alice-home", 3.0)
    table.streams_closed("alice-home", 3.0)
    presence = table.presence("alice-home")
    assert presence is not None and presence["state"] == "online"


def test_registration_rate_limit_counts_only_the_owner() -> None:
    table = Registrations()
    for i in range(4):
        assert table.claim_or_check("alice-home", "k", 100.0 + i) is None
    refused = table.claim_or_check("alice-home", "k", 104.0)
    assert refused is not None and refused.code == 4429
    assert table.claim_or_check("alice-home", "k", 110.5) is None  # window moved on
    # a squatter gets 4403 however often it tries, and does not use up the owner's budget
    for _ in range(10):
        squat = table.claim_or_check("alice-home", "evil", 111.0)
        assert squat is not None and squat.code == 4403
    assert table.claim_or_check("alice-home", "k", 121.0) is None


def test_global_claim_cap() -> None:
    table = Registrations(max_claims=2)
    assert table.claim_or_check("a", "k1", 1.0) is None
    assert table.claim_or_check("b", "k2", 1.0) is None
    refused = table.claim_or_check("c", "k3", 1.0)
    assert refused is not None and refused.code == 4429
    assert table.claim_or_check("a", "k1", 2.0) is None  # owners still get in


@pytest.fixture(params=["sqlite", "postgresql"])
def claims_store(request: pytest.FixtureRequest, tmp_path: Path) -> StateConfig:
    """The relay's claims in its SQLite file, or on a real PostgreSQL (issue #18)."""
    if request.param == "sqlite":
        return StateConfig(tmp_path, file="households.db")
    return StateConfig(tmp_path, "postgresql", request.getfixturevalue("pg_dsn"))


def test_claims_and_last_seen_survive_reopening(claims_store: StateConfig) -> None:
    store = Households.open(claims_store)
    table = Registrations(store)
    table.claim_or_check("alice-home", "key-a", 100.0)
    table.online("alice-home", "key-a", 1, 100.0)
    table.offline("alice-home", 1, 150.0)
    store.close()
    store = Households.open(claims_store)
    again = Registrations(store)
    assert again.presence("alice-home") == {
        "household": "alice-home",
        "state": "offline",
        "last_seen": 150,
    }
    squat = again.claim_or_check("alice-home", "key-b", 200.0)
    assert squat is not None and squat.code == 4403
    assert again.claim_or_check("alice-home", "key-a", 200.0) is None
    if claims_store.backend == "sqlite":
        mode = store.conn.execute("PRAGMA journal_mode").fetchone()[0]
        assert str(mode).lower() == "wal"
    store.close()


def test_relays_on_one_store_share_their_claims(claims_store: StateConfig) -> None:
    """Two relays on one store (PostgreSQL: federated relays, issue #18): a name one of
    them handed out is refused to another key at the other, and its owner gets in."""
    one, two = Households.open(claims_store), Households.open(claims_store)
    try:
        first, second = Registrations(one), Registrations(two)  # both loaded empty
        assert first.claim_or_check("alice-home", "key-a", 100.0) is None
        squat = second.claim_or_check("alice-home", "key-b", 101.0)
        assert squat is not None and squat.code == 4403
        assert second.claim_or_check("alice-home", "key-a", 102.0) is None
    finally:
        one.close()
        two.close()


# -- a renewed certificate keeps its name ---------------------------------------------

NEW_KEY = ec.generate_private_key(ec.SECP256R1())
NEW_CERT = make_cert(NEW_KEY)


def renewed(nonce: bytes, previous: tuple[ec.EllipticCurvePrivateKey, bytes]) -> dict[str, object]:
    return sign_registration(NEW_KEY, NEW_CERT, nonce, "alice-home", HOST, previous=previous)


def test_a_renewal_carries_the_previous_keys_word_and_nothing_else_does() -> None:
    nonce = challenge()
    assert verify_registration(json.dumps(renewed(nonce, (KEY, CERT))), nonce, HOST) == (
        Registration("alice-home", fingerprint(NEW_CERT), fingerprint(CERT))
    )
    # the same key in a new certificate (a renewal that kept the key) works the same way
    same_key = make_cert(KEY)  # (ECDSA signs with a random k: another certificate)
    assert fingerprint(same_key) != fingerprint(CERT)
    message = sign_registration(KEY, same_key, nonce, "alice-home", HOST, previous=(KEY, CERT))
    assert isinstance(verify_registration(message, nonce, HOST), Registration)

    # a proof made by a key that is not the previous certificate's
    forged = renewed(nonce, (OTHER, CERT))
    assert refusal(forged, nonce) == 4401
    # a proof for another new key, or from another challenge, is worthless
    for_other = renewed(nonce, (KEY, CERT))
    for_other["certificate"] = b64(make_cert(OTHER))
    for_other["signature"] = sign_registration(OTHER, make_cert(OTHER), nonce, "alice-home", HOST)[
        "signature"
    ]
    assert refusal(for_other, nonce) == 4401
    assert refusal(renewed(challenge(), (KEY, CERT)), nonce) == 4401
    # the proof alone made for another challenge, household or relay (the main
    # signature right): each is refused
    for made_for in (
        sign_registration(NEW_KEY, NEW_CERT, challenge(), "alice-home", HOST, (KEY, CERT)),
        sign_registration(NEW_KEY, NEW_CERT, nonce, "bob-home", HOST, (KEY, CERT)),
        sign_registration(NEW_KEY, NEW_CERT, nonce, "alice-home", "relay.other", (KEY, CERT)),
    ):
        spliced = dict(renewed(nonce, (KEY, CERT)), previous=made_for["previous"])
        assert refusal(spliced, nonce) == 4401
    # malformed
    for bad in (
        "x",
        {"certificate": b64(CERT)},
        {"certificate": b64(CERT), "signature": "!!", "more": 1},
        {"certificate": b64(b"not der"), "signature": b64(b"s" * 64)},
    ):
        assert refusal(dict(renewed(nonce, (KEY, CERT)), previous=bad), nonce) == 4400


def test_the_owner_moves_its_name_to_a_renewed_key_and_only_the_owner(
    claims_store: StateConfig,
) -> None:
    store = Households.open(claims_store)
    try:
        table = Registrations(store)
        assert table.claim_or_check("alice-home", "key-a", 100.0) is None
        # another key naming a previous key that is not the owner's
        squat = table.claim_or_check("alice-home", "key-m", 101.0, previous="key-x")
        assert squat is not None and squat.code == 4403
        assert table.claim_or_check("alice-home", "key-b", 102.0, previous="key-a") is None
        assert table.rekeyed == 1
        table.online("alice-home", "key-b", 1, 102.0)
        # the old key has lost the name; a later renewal moves it on again
        old = table.claim_or_check("alice-home", "key-a", 103.0)
        assert old is not None and old.code == 4403
        assert table.claim_or_check("alice-home", "key-c", 104.0, previous="key-a") is not None
        # what moved is stored: a relay that starts now knows the new owner
        fresh = Registrations(Households.open(claims_store))
        assert fresh.claim_or_check("alice-home", "key-b", 105.0) is None
        refused = fresh.claim_or_check("alice-home", "key-a", 105.0)
        assert refused is not None and refused.code == 4403
    finally:
        store.close()


def test_a_relay_on_the_same_store_follows_a_moved_name(claims_store: StateConfig) -> None:
    """Federated relays: B loaded alice's old key; A moves the name; B learns it from
    A's link event, and a renewal registering at B itself finds the store ahead of it."""
    one, two = Households.open(claims_store), Households.open(claims_store)
    try:
        a = Registrations(one, me="relay-a")
        assert a.claim_or_check("alice-home", "key-a", 100.0) is None
        b = Registrations(two, me="relay-b")
        assert a.claim_or_check("alice-home", "key-b", 101.0, previous="key-a") is None
        a.online("alice-home", "key-b", 1, 101.0)
        for event in two.events_after(0, 100):
            b.apply(event)
        assert b.where("alice-home") == "relay-a"
        assert b.claim_or_check("alice-home", "key-b", 102.0) is None  # its own key now

        # a relay that loaded the old key and heard nothing since refuses that key: it
        # asks the store, which knows the name moved
        stale_a = Registrations(two, me="relay-x")
        stale_a._households["alice-home"].key = "key-a"  # as loaded before the move
        refused = stale_a.claim_or_check("alice-home", "key-a", 102.5)
        assert refused is not None and refused.code == 4403

        c = Registrations(Households.open(claims_store), me="relay-c")  # knows key-b
        assert a.claim_or_check("alice-home", "key-c", 103.0, previous="key-b") is None
        # c has not heard yet; the renewal of key-b to key-c reaches it as well
        assert c.claim_or_check("alice-home", "key-c", 104.0, previous="key-b") is None
        # but a stale claim moving on from what the store no longer holds is refused
        stale = Registrations(Households.open(claims_store), me="relay-d")
        assert stale.claim_or_check("alice-home", "key-d", 105.0, previous="key-b") is not None
    finally:
        one.close()
        two.close()


def test_a_renewal_refused_for_its_rate_moves_nothing(claims_store: StateConfig) -> None:
    store = Households.open(claims_store)
    try:
        table = Registrations(store, max_attempts=1)
        assert table.claim_or_check("alice-home", "key-a", 100.0) is None
        limited = table.claim_or_check("alice-home", "key-b", 101.0, previous="key-a")
        assert limited is not None and limited.code == 4429
        assert store.owner("alice-home") == "key-a" and table.rekeyed == 0
        assert table.claim_or_check("alice-home", "key-b", 120.0, previous="key-a") is None
        assert store.owner("alice-home") == "key-b"
    finally:
        store.close()
