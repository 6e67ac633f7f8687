"""Federated relays (seed 003's second embodiment): what the relays of one federation
say to each other, and how each follows the others' registrations.

Relays of a federation share one host name (what agents sign and dial), one
PostgreSQL store and one secret.  The store holds the truth: which relay holds each
household's agent link, each change as an event (appliance/state/households.py), and
each relay's peer URL with its heartbeat.  A relay follows the events by id, woken by
NOTIFY (`Follower`), so a change made at one relay is known at the others within
milliseconds.  A stream an appliance opens at relay B to a household whose agent is
linked to relay A travels B -> A over a *peer link*: a WebSocket from B to A's
`/v1/peer`, on which B is an appliance link to A and A is the household's agent to B.
A peer link proves itself with an HMAC of A's challenge under the shared secret; A
proves itself with its certificate for the host name.  Docs: docs/home-relay.md
"Federation".
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import ssl
import threading
from collections.abc import Callable
from typing import Final

from appliance.core.agent_protocol import b64, unb64
from appliance.homelink.frames import HOUSEHOLD_RE
from appliance.homelink.registration import (
    CLOSE_BAD_SIGNATURE,
    CLOSE_MALFORMED,
    RegistrationRefused,
)
from appliance.homerelay.config import FederationConfig
from appliance.state.follow import Cursor
from appliance.state.households import Households, LinkEvent

log = logging.getLogger("appliance.homerelay")

CONTEXT: Final = b"home-relay-peer-v1\0"
HEARTBEAT: Final = 2.0  # seconds between a relay's heartbeats in the store
DEAD_AFTER: Final = 10.0  # a relay silent this long holds no household (its links died)
PEER_DIAL_TIMEOUT: Final = 5.0  # a peer link that is not up by then: the stream is refused
WAIT: Final = 1.0  # the follower's longest sleep between looks (and its stop latency)


def _proof(secret: bytes, nonce: bytes, relay: str) -> bytes:
    return hmac.new(secret, CONTEXT + nonce + b"\0" + relay.encode(), hashlib.sha256).digest()


def peer_message(secret: bytes, nonce: bytes, relay: str) -> dict[str, str]:
    """The dialling relay's answer to the challenge of the relay it links to."""
    return {"type": "peer", "relay": relay, "proof": b64(_proof(secret, nonce, relay))}


def verify_peer(message: object, nonce: bytes, secret: bytes) -> str | RegistrationRefused:
    """The name of the relay that answered `nonce` with the federation's secret, or why
    not (never raises: `message` is whatever arrived)."""
    if not isinstance(message, dict) or set(message) != {"type", "relay", "proof"}:
        return RegistrationRefused(CLOSE_MALFORMED, "not a peer message")
    relay, proof = message["relay"], message["proof"]
    if message["type"] != "peer" or not isinstance(relay, str) or not isinstance(proof, str):
        return RegistrationRefused(CLOSE_MALFORMED, "not a peer message")
    if not HOUSEHOLD_RE.fullmatch(relay):
        return RegistrationRefused(CLOSE_MALFORMED, "not a relay name")
    try:
        given = unb64(proof)
    except ValueError:
        return RegistrationRefused(CLOSE_MALFORMED, "the proof is not base64")
    if not hmac.compare_digest(given, _proof(secret, nonce, relay)):
        return RegistrationRefused(CLOSE_BAD_SIGNATURE, "not a relay of this federation")
    return relay


def peer_tls(config: FederationConfig) -> ssl.SSLContext:
    """How a relay checks the one it links to: its certificate for the shared host name,
    under the federation's CA (or the system's)."""
    ctx = ssl.create_default_context(cafile=str(config.ca) if config.ca else None)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    return ctx


class Follower:
    """A thread that follows the store's household events and hands each batch to
    `deliver` (called in that thread: the server passes them to its loop).

    It has a connection of its own (a LISTEN blocks it), starts after `after` (the
    newest event id before the server loaded its table, so nothing falls between) and
    keeps going through store errors, which it logs."""

    def __init__(
        self,
        open_store: Callable[[], Households],
        after: int,
        deliver: Callable[[list[LinkEvent]], None],
    ) -> None:
        self._open = open_store
        self._after = after
        self._deliver = deliver
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="relay-follower", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=WAIT * 3)

    def _run(self) -> None:
        store: Households | None = None
        cursor: Cursor[LinkEvent] | None = None
        while not self._stop.is_set():
            try:
                if store is None:
                    store = self._open()
                    cursor = Cursor(store.events_after, self._after)
                assert cursor is not None
                events = cursor.drain()
                self._after = cursor.last
                if events:
                    self._deliver(events)
                store.wait(WAIT)
            except Exception:
                log.exception("following the federation's registrations failed; again in 1 s")
                if store is not None:
                    store.close()
                store = None
                self._stop.wait(1.0)
        if store is not None:
            store.close()


__all__ = [
    "DEAD_AFTER",
    "HEARTBEAT",
    "PEER_DIAL_TIMEOUT",
    "Follower",
    "peer_message",
    "peer_tls",
    "verify_peer",
]
