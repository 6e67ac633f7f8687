"""The agent's link to its home relay (`[relay]` in agent.toml, docs/home-relay.md).

A household's agent behind NAT dials out to the relay and keeps that WebSocket up
(`homelink.link.Link` does the keeping, the backoff and the resume); this module
supplies the agent's three parts of it:

- dial: TLS to the relay, checked against `pin` (the relay certificate's fingerprint)
  or `ca`, else the system CAs.  A pinned relay is checked right after the handshake
  and before the challenge is even read: a machine in the middle never gets a
  registration signature.
- register: the relay's challenge signed with the agent's own TLS key (P-256), so the
  household's key at the relay is the same fingerprint visitors pin.  The identity a
  registration succeeded with is kept (`relay_identity_file`); after a certificate
  renewal the next registration carries that one's signature, and the relay moves the
  name to the new key instead of refusing it as claimed.
- accept: each stream an appliance opens is joined to a plain TCP connection to the
  agent's own API listener on loopback; the TLS inside the stream is the appliance's,
  end to end, so a relayed request meets exactly the checks of a direct one.  Each
  bridge's local port is noted with the source the relay gave in the OPEN, so the
  API's per-source brakes count the appliance, not loopback (`relayed_source`).
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import secrets
import ssl
import time
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from websockets.exceptions import ConnectionClosed

from appliance.agent import guard
from appliance.agent.settings import AgentSettings, RelaySettings
from appliance.core import agent_protocol as wire
from appliance.core.atomic_file import write_atomically
from appliance.homelink import frames
from appliance.homelink.frames import Reset
from appliance.homelink.link import Link, LinkConnection, LinkDown, LinkStream
from appliance.homelink.poll_client import dial_link
from appliance.homelink.registration import (
    CLOSE_BAD_SIGNATURE,
    CLOSE_CLAIMED,
    CLOSE_MALFORMED,
    CLOSE_TOO_MANY,
    Identity,
    parse_challenge,
    sign_registration,
)

log = logging.getLogger("appliance.agent.relay")

REGISTER_TIMEOUT = 10.0  # for the challenge, and again for the answer to the register
API_CONNECT_TIMEOUT = 5.0
BRIDGE_GRACE = 2.0  # a bridge's source outlives it this long: the API may not have looked yet
_REFUSALS = {
    CLOSE_MALFORMED: "the relay found the registration malformed",
    CLOSE_BAD_SIGNATURE: "the relay says the signature does not verify (check [relay] url)",
    CLOSE_CLAIMED: "household name is claimed by another key",
    CLOSE_TOO_MANY: "too many registrations from here; the relay asks to slow down",
}


class RelayKeyError(ValueError):
    """The agent's TLS key cannot register at a relay (the relay takes P-256 only)."""


def load_identity(settings: AgentSettings) -> tuple[ec.EllipticCurvePrivateKey, bytes]:
    """The agent's TLS private key and its leaf certificate's DER; RelayKeyError unless P-256."""
    loaded = serialization.load_pem_private_key(settings.tls_key.read_bytes(), password=None)
    if not isinstance(loaded, ec.EllipticCurvePrivateKey) or not isinstance(
        loaded.curve, ec.SECP256R1
    ):
        raise RelayKeyError(
            f"{settings.tls_key} is not a P-256 (prime256v1) key; a home relay registers"
            " P-256 keys only, so the relay link stays off (the direct API still runs)"
        )
    cert = x509.load_pem_x509_certificate(settings.tls_certificate.read_bytes())
    spki = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    if cert.public_key().public_bytes(*spki) != loaded.public_key().public_bytes(*spki):
        raise RelayKeyError(f"{settings.tls_certificate} does not belong to {settings.tls_key}")
    return loaded, cert.public_bytes(serialization.Encoding.DER)


def relay_context(relay: RelaySettings) -> ssl.SSLContext:
    """TLS to the relay: its CA bundle, else the system CAs; with a pin no chain at all
    (the fingerprint, checked by `RelayLink._dial`, is the whole check)."""
    if relay.pin is not None:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    elif relay.ca is not None:
        ctx = ssl.create_default_context(cafile=str(relay.ca))
    else:
        ctx = ssl.create_default_context()
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    return ctx


def api_address(settings: AgentSettings) -> str:
    """Where the agent's own listener is reached from this host.  asyncio binds "::"
    IPv6-only, so a wildcard is replaced by the loopback of its own family."""
    if settings.listen_address == "0.0.0.0":
        return "127.0.0.1"
    if settings.listen_address == "::":
        return "::1"
    return settings.listen_address


def describe_close(exc: ConnectionClosed) -> str:
    """A close during registration as a log line: the code, what it means, the reason."""
    close = exc.rcvd
    if close is None:
        return "the relay closed the link during registration without a close code"
    meaning = _REFUSALS.get(close.code, "closed during registration")
    reason = f": {close.reason}" if close.reason else ""
    return f"relay refused the registration ({close.code}, {meaning}){reason}"


class RelayLink:
    """The agent's `Link` to its relay and what its status reports."""

    def __init__(self, settings: AgentSettings, api_host: str, api_port: int) -> None:
        assert settings.relay is not None
        self.relay = settings.relay
        self.household = settings.relay.household
        self.api_host = api_host
        self.api_port = api_port
        self.key, self.certificate = load_identity(settings)
        self.fingerprint = wire.fingerprint(self.certificate)
        self.identity_file = settings.relay_identity_file
        self.ssl = relay_context(settings.relay)
        self.link = Link(
            self._dial,
            name=f"{self.relay.host}:{self.relay.port}",
            register=self._register,
            accept=self._accept,
        )
        self.ws: LinkConnection | None = None  # the current link (tests abort it)
        self.dials = 0
        self.dial_started = 0.0  # monotonic: when the latest dial began
        self.registered_at = 0.0  # monotonic: when the latest registration was answered
        self.registered = False
        self._logged_refusal: str | None = None  # a WARNING is logged once per change
        # the local end (address, port) of each bridge to the API -> (serial, "relay:<source>"):
        # every relayed request reaches the API from loopback, so its per-source brakes key
        # on this instead (one entry per open stream, and per one ended in BRIDGE_GRACE)
        self.bridges: dict[tuple[str, int], tuple[int, str]] = {}
        self._bridge_serials = itertools.count()

    @property
    def last_error(self) -> str:
        return self.link.last_error

    def status(self) -> dict[str, Any]:
        """What `personal-agent` can report: up or down, the last error, the counters."""
        return {
            "relay": self.relay.url,
            "household": self.household,
            "up": self.link.up.is_set(),
            "last_error": self.link.last_error,
            "streams": len(self.link.streams),
            **self.link.counters,
        }

    async def run(self) -> None:
        await self.link.run()

    # -- the Link's parts --------------------------------------------------------------

    async def _dial(self) -> LinkConnection:
        if self.registered:
            self.registered = False
            log.info(
                "relay link to %s down (%s); dialling again",
                self.relay.url,
                self.link.last_error or "closed",
            )
        self.dials += 1
        self.dial_started = time.monotonic()
        ws = await dial_link(
            self.relay.url,
            tls=self.ssl,
            server_hostname=self.relay.host,
            proxy=None,
            verify=self._check_pin,  # every TLS connection: a long-poll opens several
            compression=None,
            ping_interval=3,
            ping_timeout=5,
            close_timeout=2,
            max_size=frames.MAX_FRAME + 256,
        )
        self.ws = ws
        return ws

    def _check_pin(self, tls: ssl.SSLObject | None) -> None:
        if self.relay.pin is None:
            return
        der = tls.getpeercert(binary_form=True) if tls is not None else None
        seen = wire.fingerprint(der or b"")
        if not secrets.compare_digest(seen, self.relay.pin):
            message = f"relay certificate pin mismatch: {seen}, expected {self.relay.pin}"
            self._note_refusal(message)
            raise LinkDown(message)

    async def _register(self, ws: LinkConnection) -> None:
        try:
            try:
                async with asyncio.timeout(REGISTER_TIMEOUT):
                    nonce = parse_challenge(await ws.recv())
            except ValueError as exc:
                raise LinkDown(f"the relay's first message: {exc}") from None
            message = sign_registration(
                self.key,
                self.certificate,
                nonce,
                self.household,
                self.relay.host,
                previous=self._previous_identity(),
            )
            await ws.send(json.dumps(message))
            async with asyncio.timeout(REGISTER_TIMEOUT):
                answer = await ws.recv()
        except ConnectionClosed as exc:
            text = describe_close(exc)
            self._note_refusal(text)
            raise LinkDown(text) from None
        except TimeoutError:
            raise LinkDown("the relay did not answer the registration in time") from None
        try:
            doc = json.loads(answer)
        except (ValueError, TypeError, RecursionError):
            doc = None
        if not isinstance(doc, dict) or doc.get("type") != "registered":
            raise LinkDown("the relay answered the registration with something else")
        self.registered = True
        self.registered_at = time.monotonic()
        self._keep_identity()
        if self._logged_refusal is not None:
            self._logged_refusal = None
        log.info(
            "relay link up: household %s registered at %s with key %s (%.0f ms)",
            self.household,
            self.relay.url,
            self.fingerprint,
            (self.registered_at - self.dial_started) * 1000,
        )

    def _previous_identity(self) -> Identity | None:
        """The identity the name was registered with, when it is not today's."""
        try:
            pem = self.identity_file.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as exc:
            log.warning("%s: %s; registering without it", self.identity_file, exc)
            return None
        try:
            key = serialization.load_pem_private_key(pem, password=None)
            cert = x509.load_pem_x509_certificate(pem)
            spki = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
            usable = (
                isinstance(key, ec.EllipticCurvePrivateKey)
                and isinstance(key.curve, ec.SECP256R1)
                and cert.public_key().public_bytes(*spki) == key.public_key().public_bytes(*spki)
            )
        except Exception as exc:  # (an encrypted key is a TypeError)
            log.warning("%s is not a key and certificate (%s); ignored", self.identity_file, exc)
            return None
        if not usable or not isinstance(key, ec.EllipticCurvePrivateKey):
            log.warning("%s is not a P-256 key with its certificate; ignored", self.identity_file)
            return None
        der = cert.public_bytes(serialization.Encoding.DER)
        if wire.fingerprint(der) == self.fingerprint:
            return None
        return key, der

    def _keep_identity(self) -> None:
        """Remember what the name is registered with now (for the next renewal)."""
        key_pem = self.key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        cert = x509.load_der_x509_certificate(self.certificate)
        text = (key_pem + cert.public_bytes(serialization.Encoding.PEM)).decode("ascii")
        try:
            if self.identity_file.exists() and self.identity_file.read_text() == text:
                return
            write_atomically(self.identity_file, text, 0o600)
        except OSError as exc:  # the link works; only a later renewal would need it
            log.warning("could not keep %s: %s", self.identity_file, exc)

    def _note_refusal(self, text: str) -> None:
        """Refusals repeat at every retry: WARNING the first time, INFO (from Link) after."""
        if text != self._logged_refusal:
            self._logged_refusal = text
            log.warning("relay link to %s: %s", self.relay.url, text)

    async def _accept(self, ls: LinkStream) -> None:
        try:
            reader, writer = await asyncio.wait_for(
                asyncio.open_connection(self.api_host, self.api_port), API_CONNECT_TIMEOUT
            )
        except (OSError, TimeoutError) as exc:
            log.warning(
                "relayed stream: the agent's own API at %s:%d does not answer (%s)",
                self.api_host,
                self.api_port,
                exc,
            )
            ls.abort(Reset.REFUSED, "the agent's API does not answer")
            return
        local = writer.get_extra_info("sockname")
        bridge = (str(local[0]), int(local[1])) if local else None
        if bridge is not None:  # before any byte moves: the API looks once TLS is up
            entry = (next(self._bridge_serials), guard.RELAYED + (ls.source or "unknown"))
            self.bridges[bridge] = entry
        try:
            ls.hold()
            await ls.bridge(reader, writer)
        finally:
            if bridge is not None:  # a stream reset right after its handshake still counts
                asyncio.get_running_loop().call_later(
                    BRIDGE_GRACE, self._forget_bridge, bridge, entry
                )

    def _forget_bridge(self, bridge: tuple[str, int], entry: tuple[int, str]) -> None:
        if self.bridges.get(bridge) == entry:  # not a newer bridge that got the same port
            del self.bridges[bridge]

    def relayed_source(self, peer: tuple[str, int]) -> str | None:
        """Who opened the relayed stream a connection to the API came in on (as
        `relay:<address>`), or None if `peer` is not one of this link's bridges."""
        entry = self.bridges.get(peer)
        return None if entry is None else entry[1]


def make_link(settings: AgentSettings, api_host: str, api_port: int) -> RelayLink:
    """The relay link for `settings.relay`; RelayKeyError if the agent's key cannot register."""
    return RelayLink(settings, api_host, api_port)
