"""The appliance's side: ask a visitor's personal agent who they are, within a deadline.

`authenticate(config, "alice@home.example#sha256:...", password)` returns an
`AgentAnswer` or raises `AgentError(code, message)`; it never takes longer than
`config.agent.timeout` (name resolution, connect, TLS, request and answer share
one deadline).  Trust: with a `#sha256:` fingerprint the agent's certificate must
have exactly that fingerprint (no CA involved); without one the certificate must
verify for the host name against the system's CAs.  Every request is signed with
the appliance's Ed25519 key (made under config.state.directory on first use).
Answers are checked strictly: servers in the guest subnet, on hidden networks
or on the appliance itself are refused (`refused_servers`), host names are
resolved once here and replaced by the address, so a later DNS change cannot
point the proxy into the hidden segment.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import json
import logging
import os
import secrets
import socket
import ssl
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h11
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from appliance.core import agent_protocol as wire
from appliance.core import reach
from appliance.core.attributes import Attributes, AttrValue, BadAttribute, check_attributes
from appliance.core.config import Config

log = logging.getLogger("appliance.agent.client")
KEY_FILE = "agent-client.key"
CODES = (
    "unknown_user",
    "bad_password",
    "locked",
    "unreachable",
    "timeout",
    "bad_certificate",
    "bad_answer",
    "refused_servers",
    # beyond the first contract: the visitor typed something that is not an agent address
    # (or one the appliance must never contact), the agent does not trust this appliance
    # (yet), or it asks us to slow down.
    "bad_address",
    "appliance_not_allowed",
    "rate_limited",
)


@dataclass(frozen=True)
class AgentAnswer:
    user: str
    attributes: Attributes
    servers: Mapping[str, str]
    agent: str = ""  # "host:port" the answer came from, for Session.source "agent:<host>"
    # what the appliance verified about the agent (the trusted-agents table matches on it):
    fingerprint: str = ""  # of the certificate it presented
    verified_name: str = ""  # the host its certificate verified for under the CAs; "" if pinned


class AgentError(Exception):
    """A login through a personal agent failed; `message` is meant for the visitor."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


@dataclass(frozen=True)
class AgentSpec:
    user: str
    host: str
    port: int
    fingerprint: str | None = None

    @property
    def address(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"


def parse_spec(spec: str, default_port: int = wire.DEFAULT_PORT) -> AgentSpec:
    """'alice@home.example[:port][#sha256:...]' -> AgentSpec, or AgentError('bad_address')."""
    text = spec.strip() if isinstance(spec, str) else ""
    where, _, pin = text.partition("#")
    user, at, hostport = where.rpartition("@")
    if not at or not user or not hostport:
        raise AgentError(
            "bad_address", "name your home agent as user@host, e.g. alice@home.example"
        )
    if not wire.USER_RE.fullmatch(user):
        raise AgentError("bad_address", "the user id has characters an agent does not accept")
    try:
        host, port = wire.parse_hostport(hostport, default_port)
    except ValueError as exc:
        raise AgentError("bad_address", f"not an agent address: {exc}") from None
    fingerprint = None
    if pin:
        try:
            fingerprint = wire.parse_fingerprint(pin)
        except ValueError as exc:
            raise AgentError("bad_address", str(exc)) from None
    return AgentSpec(user, host, port, fingerprint)


# -- addresses the appliance must never be sent to --------------------------------------


def forbidden_address(config: Config, address: str) -> str | None:
    """Why an agent or a personal server may not be at this address (None: it may):
    appliance.core.reach's verdict (IPv6 forms judged as the IPv4 address they carry),
    then any address of this host."""
    why = reach.forbidden(config.interfaces, address)
    if why is None and _is_local(address):
        why = "the appliance itself"
    return None if why is None else f"{address} is {why}"


def _is_local(address: str) -> bool:
    """An address of this host (any interface, in this namespace): binding to it works."""
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        try:
            s.bind((address, 0))
        except OSError:
            return False
    return True


# -- the appliance's key ---------------------------------------------------------------

_key_lock = threading.Lock()


def appliance_key(config: Config) -> Ed25519PrivateKey:
    """Load the appliance's Ed25519 key, making it (mode 0600) on first use."""
    path = Path(config.state.directory) / KEY_FILE
    with _key_lock:
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            key = Ed25519PrivateKey.generate()
            pem = key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
            path.parent.mkdir(parents=True, exist_ok=True)
            try:
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            except FileExistsError:  # another role made it just now
                data = path.read_bytes()
            else:
                with os.fdopen(fd, "wb") as f:
                    f.write(pem)
                return key
        loaded = serialization.load_pem_private_key(data, password=None)
    if not isinstance(loaded, Ed25519PrivateKey):
        raise ValueError(f"{path} is not an Ed25519 key")
    return loaded


def appliance_key_id(config: Config) -> str:
    """What a household allows: `personal-agent appliances allow <this>`."""
    return wire.public_key_id(appliance_key(config).public_key())


# -- the request -------------------------------------------------------------------------

# Name lookups run in their own short-lived thread, so a hung resolver cannot hold the
# login past its deadline; a fresh thread also inherits the caller's network namespace.
_lookups = threading.BoundedSemaphore(16)


class _Deadline:
    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.end = time.monotonic() + seconds

    def left(self) -> float:
        left = self.end - time.monotonic()
        if left <= 0:
            raise AgentError(
                "timeout", f"your home agent did not answer within {self.seconds:g} seconds"
            )
        return left


def _resolve(host: str, port: int, deadline: _Deadline) -> list[str]:
    try:
        return [str(ipaddress.ip_address(host))]
    except ValueError:
        pass
    if not _lookups.acquire(timeout=deadline.left()):
        raise AgentError("timeout", f"could not resolve {host} in time")
    result: list[Any] = []
    failed: list[BaseException] = []

    def lookup() -> None:
        try:
            result.extend(socket.getaddrinfo(host, port, 0, socket.SOCK_STREAM))
        except (OSError, UnicodeError) as exc:
            failed.append(exc)
        finally:
            _lookups.release()

    worker = threading.Thread(target=lookup, name="agent-resolve", daemon=True)
    worker.start()
    worker.join(deadline.left())
    if worker.is_alive():
        raise AgentError("timeout", f"could not resolve {host} in time")
    if failed or not result:
        raise AgentError("unreachable", f"the name {host} does not resolve")
    infos = result
    out: list[str] = []
    for info in infos:
        addr = str(info[4][0])
        if addr not in out:
            out.append(addr)
    return out


def _connect(config: Config, spec: AgentSpec, deadline: _Deadline) -> tuple[ssl.SSLSocket, str]:
    addrs = _resolve(spec.host, spec.port, deadline)
    allowed = [a for a in addrs if forbidden_address(config, a) is None]
    if not allowed:
        why = forbidden_address(config, addrs[0]) if addrs else "no address"
        raise AgentError("bad_address", f"a home agent cannot be at {spec.host}: {why}")
    last: AgentError | None = None
    for addr in allowed:
        try:
            sock = socket.create_connection((addr, spec.port), timeout=deadline.left())
        except TimeoutError:
            raise AgentError(
                "timeout", f"your home agent at {spec.address} did not answer in time"
            ) from None
        except OSError as exc:
            last = AgentError(
                "unreachable",
                f"your home agent at {spec.address} is not reachable ({exc.strerror or exc})",
            )
            continue
        return _tls(sock, spec, deadline), addr
    assert last is not None
    raise last


def _tls(sock: socket.socket, spec: AgentSpec, deadline: _Deadline) -> ssl.SSLSocket:
    if spec.fingerprint:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE  # the pin below is the whole check
    else:
        ctx = ssl.create_default_context()
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    server_name = None if _is_ip(spec.host) and spec.fingerprint else spec.host
    try:
        sock.settimeout(deadline.left())
        tls = ctx.wrap_socket(sock, server_hostname=server_name)
    except AgentError:
        sock.close()
        raise
    except ssl.SSLCertVerificationError as exc:
        sock.close()
        raise AgentError(
            "bad_certificate",
            f"the agent at {spec.address} has a certificate we cannot trust ({exc.verify_message});"
            " add its fingerprint: user@host#sha256:...",
        ) from None
    except TimeoutError:
        sock.close()
        raise AgentError(
            "timeout", f"your home agent at {spec.address} did not answer in time"
        ) from None
    except ConnectionError as exc:
        sock.close()
        raise AgentError(
            "unreachable", f"your home agent at {spec.address} hung up ({exc.strerror or exc})"
        ) from None
    except (ssl.SSLError, OSError) as exc:
        sock.close()
        raise AgentError(
            "bad_answer", f"the agent at {spec.address} does not speak TLS ({exc})"
        ) from None
    if spec.fingerprint:
        der = tls.getpeercert(binary_form=True) or b""
        seen = wire.fingerprint(der)
        if not secrets.compare_digest(seen, spec.fingerprint):
            tls.close()
            log.warning("agent %s presented certificate %s, not the pinned one", spec.address, seen)
            raise AgentError(
                "bad_certificate",
                f"the agent at {spec.address} is not the one you named (its certificate has"
                " another fingerprint): check the address and the fingerprint",
            )
    return tls


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def _exchange(
    tls: ssl.SSLSocket, spec: AgentSpec, key: Ed25519PrivateKey, body: bytes, deadline: _Deadline
) -> tuple[int, bytes]:
    der = tls.getpeercert(binary_form=True) or b""
    headers = wire.sign_headers(
        key,
        "POST",
        wire.AUTHENTICATE_PATH,
        wire.fingerprint(der),
        body,
        time.time(),
        secrets.token_urlsafe(18),
    )
    conn = h11.Connection(h11.CLIENT, max_incomplete_event_size=wire.MAX_ANSWER_BYTES)
    req = h11.Request(
        method="POST",
        target=wire.AUTHENTICATE_PATH,
        headers=[
            ("Host", spec.address),
            ("Content-Type", "application/json"),
            ("Content-Length", str(len(body))),
            ("Accept", "application/json"),
            ("Connection", "close"),
            *headers.items(),
        ],
    )
    try:
        out = (conn.send(req) or b"") + (conn.send(h11.Data(data=body)) or b"")
        out += conn.send(h11.EndOfMessage()) or b""
        tls.settimeout(deadline.left())
        tls.sendall(out)
        status = 0
        answer = bytearray()
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                tls.settimeout(deadline.left())
                conn.receive_data(tls.recv(16384))
            elif isinstance(event, h11.Response):
                status = event.status_code
            elif isinstance(event, h11.Data):
                answer += event.data
                if len(answer) > wire.MAX_ANSWER_BYTES:
                    raise AgentError("bad_answer", "the agent's answer is far too long")
            elif isinstance(event, h11.EndOfMessage):
                return status, bytes(answer)
            elif isinstance(event, h11.InformationalResponse):
                continue
            else:
                raise AgentError("bad_answer", "the agent closed the connection mid-answer")
    except TimeoutError:
        raise AgentError(
            "timeout", f"your home agent did not answer within {deadline.seconds:g} seconds"
        ) from None
    except h11.ProtocolError:
        raise AgentError("bad_answer", "the agent's answer is not HTTP") from None
    except (ssl.SSLError, OSError) as exc:
        raise AgentError(
            "unreachable", f"the connection to your home agent broke ({exc})"
        ) from None


_REFUSALS = {
    "unknown_user": ("unknown_user", "your home agent does not know this user"),
    "bad_password": ("bad_password", "wrong password"),
    "locked": ("locked", "your home agent has locked this user for now; try again later"),
    "appliance_not_allowed": (
        "appliance_not_allowed",
        "your home agent does not know this appliance yet; at home run `{command}`",
    ),
    "appliance_denied": ("appliance_not_allowed", "your household has denied this appliance"),
    "rate_limited": ("rate_limited", "too many attempts at your home agent; try again in a minute"),
}


def _interpret(
    config: Config, spec: AgentSpec, status: int, body: bytes, key_id: str, deadline: _Deadline
) -> AgentAnswer:
    try:
        doc: Any = json.loads(body.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise AgentError("bad_answer", f"the agent answered {status} without JSON") from None
    if status != 200:
        code = doc.get("error") if isinstance(doc, dict) else None
        if isinstance(code, str) and code in _REFUSALS:
            mapped, message = _REFUSALS[code]
            raise AgentError(mapped, message.format(command=wire.allow_command(key_id)))
        raise AgentError("bad_answer", f"the agent refused with HTTP {status}")
    if not isinstance(doc, dict) or set(doc) - {"user", "attributes", "servers"}:
        raise AgentError("bad_answer", "the agent's answer has an unexpected shape")
    if doc.get("user") != spec.user:
        raise AgentError("bad_answer", "the agent answered for another user")
    attributes = _attributes(doc.get("attributes", {}))
    servers = _servers(config, doc.get("servers", {}), deadline)
    return AgentAnswer(spec.user, attributes, servers, spec.address)


def _attributes(raw: Any) -> dict[str, AttrValue]:
    """The answer's attributes under the rules every other part holds them to."""
    try:
        return check_attributes(raw)
    except BadAttribute as exc:
        raise AgentError("bad_answer", f"the agent sent bad attributes: {exc}") from None


def _servers(config: Config, raw: Any, deadline: _Deadline) -> dict[str, str]:
    if not isinstance(raw, dict) or len(raw) > wire.MAX_SERVERS:
        raise AgentError("bad_answer", "the agent's server table is not a small object")
    out: dict[str, str] = {}
    for service, target in raw.items():
        if not wire.SERVICE_RE.fullmatch(service) or not isinstance(target, str):
            raise AgentError("bad_answer", "the agent's server table is malformed")
        try:
            host, port, pin = wire.parse_server(target)
        except ValueError:
            raise AgentError(
                "bad_answer", f"the agent's {service} server is not host:port[#pin]"
            ) from None
        addrs = _resolve(host, port, deadline)
        if not addrs:
            raise AgentError("bad_answer", f"the agent's {service} server does not resolve")
        for addr in addrs:
            why = forbidden_address(config, addr)
            if why is not None:
                raise AgentError(
                    "refused_servers", f"your agent's {service} server is not allowed here: {why}"
                )
        # the relay reaches servers over IPv4 only: a server it cannot use is refused
        # here, where the visitor reads why, not stored for the relay to refuse later
        ipv4 = [a for a in addrs if isinstance(ipaddress.ip_address(a), ipaddress.IPv4Address)]
        if not ipv4:
            raise AgentError(
                "refused_servers",
                f"your agent's {service} server has no IPv4 address, and this appliance"
                " relays to IPv4 servers only",
            )
        out[service] = wire.server_text(ipv4[0], port, pin)
    return out


def authenticate(config: Config, agent_spec: str, password: str) -> AgentAnswer:
    """Ask the visitor's personal agent; AgentAnswer or AgentError within config.agent.timeout."""
    deadline = _Deadline(config.agent.timeout)
    spec = parse_spec(agent_spec, config.agent.default_port)
    if not 1 <= len(password) <= wire.MAX_PASSWORD_LEN:
        raise AgentError("bad_password", "wrong password")
    key = appliance_key(config)
    body = json.dumps({"user": spec.user, "password": password}).encode("utf-8")
    tls, _addr = _connect(config, spec, deadline)
    with tls:
        seen = wire.fingerprint(tls.getpeercert(binary_form=True) or b"")
        status, answer = _exchange(tls, spec, key, body, deadline)
    ans = _interpret(config, spec, status, answer, wire.public_key_id(key.public_key()), deadline)
    # without a pin the default context checked the certificate against the CAs for spec.host
    verified = "" if spec.fingerprint else spec.host
    return dataclasses.replace(ans, fingerprint=seen, verified_name=verified)


__all__ = [
    "CODES",
    "AgentAnswer",
    "AgentError",
    "AgentSpec",
    "appliance_key",
    "appliance_key_id",
    "authenticate",
    "forbidden_address",
    "parse_spec",
]
