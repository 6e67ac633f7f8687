"""What the agent and the appliance agree on: fingerprints, request signatures, limits, names.

Sans-IO and shared by both sides, so the signature the client makes is exactly
the one the server checks.  A request signature binds the method, path, body,
a timestamp and nonce, and the fingerprint of the agent certificate the
appliance saw: a signed request cannot be replayed, nor relayed by a rogue
agent to the real one (its certificate has another fingerprint).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import re

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

API_PREFIX = "/v1"
AUTHENTICATE_PATH = "/v1/authenticate"
CONNECT_PATH = "/v1/connect"  # a stream to a logged-in user's own server (home-relay.md)
INFO_PATH = "/v1/info"
DEFAULT_PORT = 8443

HEADER_KEY = "appliance-key"
HEADER_TIME = "appliance-time"
HEADER_NONCE = "appliance-nonce"
HEADER_SIGNATURE = "appliance-signature"
SIGNATURE_CONTEXT = b"personal-agent-request-v1"
MAX_CLOCK_SKEW = 300  # seconds between appliance and agent clocks

MAX_REQUEST_BODY = 16384  # the longest valid request: 1024 escaped non-ASCII characters
MAX_ANSWER_BYTES = 65536
MAX_USER_LEN = 64
MAX_PASSWORD_LEN = 1024
MAX_SERVERS = 32

USER_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]{0,63}$")
SERVICE_RE = re.compile(r"^[a-z][a-z0-9_-]{0,31}$")
NONCE_RE = re.compile(r"^[A-Za-z0-9_-]{16,64}$")

# Refusal reasons the agent gives for a login, as the client reports them.
REASONS = ("unknown_user", "bad_password", "locked")


def allow_command(key: str) -> str:
    """The command a household runs to allow an appliance key.

    A key is base64url and one in 64 starts with "-", which argparse would read as an
    option: then `--` goes first."""
    return "personal-agent appliances allow " + ("-- " if key.startswith("-") else "") + key


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def unb64(text: str) -> bytes:
    """Decode unpadded base64url; raises ValueError on anything else."""
    if not re.fullmatch(r"[A-Za-z0-9_-]*", text):
        raise ValueError("not base64url")
    try:
        return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except (binascii.Error, ValueError) as exc:
        raise ValueError(str(exc)) from None


def fingerprint(der_certificate: bytes) -> str:
    """The form people type after '#': sha256: and 43 base64url characters."""
    return "sha256:" + b64(hashlib.sha256(der_certificate).digest())


def parse_fingerprint(text: str) -> str:
    """Normalise a typed fingerprint (base64url, or hex with or without colons)."""
    body = text.strip()
    if body.lower().startswith("sha256:"):
        body = body[7:]
    hexed = body.replace(":", "")
    if re.fullmatch(r"[0-9A-Fa-f]{64}", hexed):
        return "sha256:" + b64(bytes.fromhex(hexed))
    try:
        raw = unb64(body)
    except ValueError:
        raw = b""
    if len(raw) != 32:
        raise ValueError(f"{text!r} is not a sha256 fingerprint (sha256: and 43 characters)")
    return "sha256:" + b64(raw)


def public_key_id(key: Ed25519PublicKey) -> str:
    """An appliance is known by its raw Ed25519 public key, base64url (43 characters)."""
    from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

    return b64(key.public_bytes(Encoding.Raw, PublicFormat.Raw))


def signed_message(
    method: str, path: str, agent_fingerprint: str, timestamp: str, nonce: str, body: bytes
) -> bytes:
    return b"\n".join(
        [
            SIGNATURE_CONTEXT,
            method.upper().encode("ascii", "replace"),
            path.encode("utf-8", "replace"),
            agent_fingerprint.encode("ascii", "replace"),
            timestamp.encode("ascii", "replace"),
            nonce.encode("ascii", "replace"),
            hashlib.sha256(body).hexdigest().encode("ascii"),
        ]
    )


def sign_headers(
    key: Ed25519PrivateKey,
    method: str,
    path: str,
    agent_fingerprint: str,
    body: bytes,
    now: float,
    nonce: str,
) -> dict[str, str]:
    stamp = str(int(now))
    sig = key.sign(signed_message(method, path, agent_fingerprint, stamp, nonce, body))
    return {
        "Appliance-Key": public_key_id(key.public_key()),
        "Appliance-Time": stamp,
        "Appliance-Nonce": nonce,
        "Appliance-Signature": b64(sig),
    }


def verify_signature(
    key_id: str,
    signature: str,
    method: str,
    path: str,
    agent_fingerprint: str,
    timestamp: str,
    nonce: str,
    body: bytes,
) -> bool:
    try:
        raw_key = unb64(key_id)
        raw_sig = unb64(signature)
        if len(raw_key) != 32 or len(raw_sig) != 64:
            return False
        pub = Ed25519PublicKey.from_public_bytes(raw_key)
        pub.verify(raw_sig, signed_message(method, path, agent_fingerprint, timestamp, nonce, body))
    except (ValueError, InvalidSignature):
        return False
    return True


def valid_key_id(text: str) -> bool:
    try:
        return len(unb64(text)) == 32 and len(text) == 43
    except ValueError:
        return False


def parse_hostport(text: str, default_port: int | None = None) -> tuple[str, int]:
    """'host:port' or '[v6]:port' (or just host with a default) -> (host, port)."""
    if not isinstance(text, str) or not text or len(text) > 300 or text != text.strip():
        raise ValueError(f"{text!r} is not host:port")
    if text.startswith("["):
        host, sep, rest = text[1:].partition("]")
        port_text = rest[1:] if rest.startswith(":") else ""
        if not sep or (rest and not rest.startswith(":")):
            raise ValueError(f"{text!r} is not host:port")
    else:
        host, sep, port_text = text.rpartition(":")
        if not sep:
            host, port_text = text, ""
        if ":" in host:
            raise ValueError(f"{text!r}: put an IPv6 address in brackets, like [2001:db8::1]:110")
    if not port_text:
        if default_port is None:
            raise ValueError(f"{text!r} needs a port, like host:110")
        return _check_host(host, text), default_port
    if not port_text.isdigit() or not 1 <= int(port_text) <= 65535:
        raise ValueError(f"{text!r}: port must be 1..65535")
    return _check_host(host, text), int(port_text)


def parse_server(text: str) -> tuple[str, int, str]:
    """A household's own server as its agent names it: 'host:port' (plain, as the
    guest's client speaks), or 'host:port#sha256:...' (the appliance speaks TLS to it
    and accepts only the certificate with that fingerprint: a home server has no name
    a CA vouches for).  -> (host, port, fingerprint or "")."""
    if not isinstance(text, str):
        raise ValueError(f"{text!r} is not host:port")
    where, sep, pin = text.partition("#")
    host, port = parse_hostport(where)
    return host, port, parse_fingerprint(pin) if sep else ""


def server_text(host: str, port: int, pin: str = "") -> str:
    """The inverse of parse_server (the form stored in sessions)."""
    where = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    return f"{where}#{pin}" if pin else where


RELAYED_PREFIX = "agent:"


def relayed_server_text(agent_spec: str) -> str:
    """A session's personal server reached through the visitor's agent behind a relay:
    the proxy asks that agent (`/v1/connect`) instead of dialling an address."""
    return RELAYED_PREFIX + agent_spec


def relayed_server_spec(text: str) -> str | None:
    """The agent spec of a relayed personal server; None for an ordinary host:port."""
    return text[len(RELAYED_PREFIX) :] if text.startswith(RELAYED_PREFIX) else None


_HOST_RE = re.compile(
    r"^(?=.{1,253}$)([A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)(\.[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*\.?$"
)


def _check_host(host: str, text: str) -> str:
    import ipaddress

    try:
        return str(ipaddress.ip_address(host))
    except ValueError:
        pass
    if not _HOST_RE.match(host):
        raise ValueError(f"{text!r}: {host!r} is not a host name or address")
    return host.lower().rstrip(".")
