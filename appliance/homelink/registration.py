"""Registration of an agent link: the challenge, the signed answer, and its check.

Sans-IO and shared by the agent and the relay (so it lives here, not in either role),
so the bytes the agent signs (`sign_registration`) are exactly the bytes the relay
checks (`verify_registration`).  The signature binds the
relay's fresh nonce (no replay), the household name and the relay's host name (a
signature made for one relay is worthless at another).  The household's key is the
fingerprint of the certificate it registered with, the string a visitor types after '#'.

A household that renews its certificate (a new key or the same one) keeps its name: its
register message then carries `previous`, the certificate it registered with before and
that certificate's key's signature over the new fingerprint (`REKEY_CONTEXT`), and the
relay moves the claim when the previous fingerprint is the name's owner.

`verify_registration` takes whatever arrived from the network and never raises: every
fault is a `RegistrationRefused` carrying the WebSocket close code the relay sends.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Final

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec

from appliance.core.agent_protocol import b64, fingerprint, unb64
from appliance.homelink.frames import HOUSEHOLD_RE

CONTEXT: Final = b"home-relay-register-v1\0"
REKEY_CONTEXT: Final = b"home-relay-rekey-v1\0"
NONCE_LEN: Final = 32

# WebSocket close codes of a refused registration (docs/home-relay.md "Registration").
CLOSE_MALFORMED: Final = 4400
CLOSE_BAD_SIGNATURE: Final = 4401
CLOSE_CLAIMED: Final = 4403
CLOSE_TOO_MANY: Final = 4429

# Bounds on what a relay reads before it knows who is talking.  An agent certificate is
# a few hundred bytes; a DER ECDSA P-256 signature is at most 72.
MAX_CERTIFICATE: Final = 4096
MAX_SIGNATURE: Final = 72
MAX_MESSAGE: Final = 8192  # characters of the register message's JSON text
MAX_RELAY_HOST: Final = 253

_REGISTER_KEYS: Final = frozenset({"type", "household", "certificate", "signature"})
_PREVIOUS_KEYS: Final = frozenset({"certificate", "signature"})


@dataclass(frozen=True, slots=True)
class Registration:
    """A registration whose signature held: the name asked for and the key that asked."""

    household: str
    key: str  # agent_protocol.fingerprint of the certificate: "sha256:" + 43 characters
    previous: str = ""  # the key it registered with before, proven by its signature


@dataclass(frozen=True, slots=True)
class RegistrationRefused:
    """Why a registration is refused: the close code to send and a reason for it and logs."""

    code: int
    reason: str


def _parsed(message: object) -> object:
    """A message as it arrived (JSON text) or already parsed; ValueError when its text
    is too long or not JSON."""
    if not isinstance(message, str | bytes):
        return message
    if len(message) > MAX_MESSAGE:
        raise ValueError("too long")
    try:
        return json.loads(message)
    except (ValueError, RecursionError):
        raise ValueError("is not JSON") from None


def challenge() -> bytes:
    """A fresh nonce for one agent link; a registration is valid only for it."""
    return os.urandom(NONCE_LEN)


def challenge_message(nonce: bytes) -> dict[str, str]:
    return {"type": "challenge", "nonce": b64(nonce)}


def parse_challenge(message: object) -> bytes:
    """The agent's side: the nonce of a challenge message; ValueError for anything else."""
    try:
        message = _parsed(message)
    except ValueError as exc:
        raise ValueError(f"challenge {exc}") from None
    if not isinstance(message, dict) or message.get("type") != "challenge":
        raise ValueError("not a challenge")
    text = message.get("nonce")
    if not isinstance(text, str) or len(text) > 64:
        raise ValueError("challenge without a nonce")
    nonce = unb64(text)
    if len(nonce) != NONCE_LEN:
        raise ValueError("a challenge nonce is 32 bytes")
    return nonce


def registered_message(household: str) -> dict[str, str]:
    return {"type": "registered", "household": household}


def signed_text(nonce: bytes, household: str, relay_host: str) -> bytes:
    """The bytes an agent signs to register `household` at `relay_host`.

    The host is compared as DNS does (case and a final dot do not matter), so the name
    the agent dialled and the name the relay is configured with agree."""
    host = relay_host.lower().rstrip(".")
    return b"\0".join(
        (
            CONTEXT + nonce,
            household.encode("utf-8", "replace"),
            host.encode("utf-8", "replace"),
        )
    )


def rekey_text(nonce: bytes, household: str, relay_host: str, new_key: str) -> bytes:
    """The bytes the previous key signs: this registration (nonce, name, relay) may move
    the name to `new_key` (the new certificate's fingerprint)."""
    return REKEY_CONTEXT + signed_text(nonce, household, relay_host) + b"\0" + new_key.encode()


Identity = tuple[ec.EllipticCurvePrivateKey, bytes]  # a key and its certificate's DER


def sign_registration(
    private_key: ec.EllipticCurvePrivateKey,
    certificate_der: bytes,
    nonce: bytes,
    household: str,
    relay_host: str,
    previous: Identity | None = None,
) -> dict[str, object]:
    """The agent's register message (to send as JSON text) for a challenge's nonce;
    `previous`: the identity it registered with before, when that was another."""
    if not HOUSEHOLD_RE.fullmatch(household):
        raise ValueError(f"not a household name: {household!r}")
    signature = private_key.sign(
        signed_text(nonce, household, relay_host), ec.ECDSA(hashes.SHA256())
    )
    message: dict[str, object] = {
        "type": "register",
        "household": household,
        "certificate": b64(certificate_der),
        "signature": b64(signature),
    }
    if previous is not None:
        old_key, old_der = previous
        proof = old_key.sign(
            rekey_text(nonce, household, relay_host, fingerprint(certificate_der)),
            ec.ECDSA(hashes.SHA256()),
        )
        message["previous"] = {"certificate": b64(old_der), "signature": b64(proof)}
    return message


def _malformed(reason: str) -> RegistrationRefused:
    return RegistrationRefused(CLOSE_MALFORMED, reason)


def _field_bytes(message: dict[object, object], name: str, limit: int) -> bytes | None:
    """A base64url field of at most `limit` decoded bytes, or None."""
    text = message.get(name)
    if not isinstance(text, str) or not text or len(text) > (limit * 4 + 2) // 3:
        return None
    try:
        raw = unb64(text)
    except ValueError:
        return None
    return raw if 0 < len(raw) <= limit else None


def _p256_key(certificate_der: bytes) -> ec.EllipticCurvePublicKey | None:
    try:
        certificate = x509.load_der_x509_certificate(certificate_der)
        key = certificate.public_key()
    # Hostile DER reaches a C parser here: whatever it raises is a malformed
    # certificate, never a crash of the relay.
    except Exception:
        return None
    if isinstance(key, ec.EllipticCurvePublicKey) and isinstance(key.curve, ec.SECP256R1):
        return key
    return None


def _signed(key: ec.EllipticCurvePublicKey, signature: bytes, text: bytes) -> bool:
    try:
        key.verify(signature, text, ec.ECDSA(hashes.SHA256()))
    except (InvalidSignature, ValueError):
        return False
    return True


def verify_registration(
    message: object, nonce: bytes, relay_host: str
) -> Registration | RegistrationRefused:
    """Check an agent's register message (its JSON text, or that text already parsed)
    against the nonce this link's challenge carried and this relay's host name."""
    try:
        message = _parsed(message)
    except ValueError as exc:
        return _malformed(f"register message {exc}")
    if not isinstance(message, dict):
        return _malformed("register message is not a JSON object")
    if set(message) - {"previous"} != _REGISTER_KEYS:
        return _malformed(
            "register message needs exactly type, household, certificate, signature"
            " (and may have previous)"
        )
    if message["type"] != "register":
        return _malformed("expected a register message")
    household = message["household"]
    if not isinstance(household, str) or not HOUSEHOLD_RE.fullmatch(household):
        return _malformed("household is not a name (one lower-case DNS label)")
    certificate_der = _field_bytes(message, "certificate", MAX_CERTIFICATE)
    if certificate_der is None:
        return _malformed("certificate is not base64url DER of at most 4096 bytes")
    signature = _field_bytes(message, "signature", MAX_SIGNATURE)
    if signature is None:
        return _malformed("signature is not base64url of at most 72 bytes")
    public_key = _p256_key(certificate_der)
    if public_key is None:
        return _malformed("certificate is not X.509 with a P-256 key")
    if not _signed(public_key, signature, signed_text(nonce, household, relay_host)):
        return RegistrationRefused(CLOSE_BAD_SIGNATURE, "signature does not verify")
    key = fingerprint(certificate_der)
    if "previous" not in message:
        return Registration(household, key)
    previous = _verify_previous(message["previous"], nonce, household, relay_host, key)
    if isinstance(previous, RegistrationRefused):
        return previous
    return Registration(household, key, previous)


def _verify_previous(
    previous: object, nonce: bytes, household: str, relay_host: str, key: str
) -> str | RegistrationRefused:
    """The previous key of a renewed certificate, if its signature holds."""
    if not isinstance(previous, dict) or set(previous) != _PREVIOUS_KEYS:
        return _malformed("previous needs exactly certificate and signature")
    old_der = _field_bytes(previous, "certificate", MAX_CERTIFICATE)
    proof = _field_bytes(previous, "signature", MAX_SIGNATURE)
    if old_der is None or proof is None:
        return _malformed("previous is not base64url certificate and signature")
    old_key = _p256_key(old_der)
    if old_key is None:
        return _malformed("previous certificate is not X.509 with a P-256 key")
    if not _signed(old_key, proof, rekey_text(nonce, household, relay_host, key)):
        return RegistrationRefused(CLOSE_BAD_SIGNATURE, "previous signature does not verify")
    return fingerprint(old_der)
