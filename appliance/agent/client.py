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

`open_server_stream(config, spec, user, service)` asks the agent for a stream to
that user's own server (`POST /v1/connect`, after a login through the same key)
and returns the TLS socket positioned at the server's first byte.  Both take an
already-connected `sock` instead of dialling (a link through the home relay).
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import functools
import ipaddress
import json
import logging
import os
import secrets
import socket
import ssl
import threading
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h11
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

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
# open_server_stream's own refusals (besides bad_address, timeout, unreachable, ...)
STREAM_CODES = ("no_login", "no_server", "server_unreachable")


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


_LOCAL_ROUTES = frozenset((2, 3))  # RTN_LOCAL, RTN_BROADCAST: delivered to this host
# what the kernel answers for a destination it has no route to: not an address of this host
_NO_ROUTE = frozenset((errno.ENETUNREACH, errno.EHOSTUNREACH))


def _is_local(address: str) -> bool:
    """An address of this host (any interface, in this namespace), as the kernel's
    routing says: a test bind would not do, since a box of an active/standby pair binds
    any address (ip_nonlocal_bind).  An IPv6 address that carries an IPv4 one (mapped,
    NAT64, 6to4) is judged by that IPv4 address too, as appliance.core.reach judges it
    (an IPv4-mapped one only by it: that is where a connection to it goes).  Anything
    the kernel cannot answer, other than "no route", is judged local (fail closed)."""
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return True  # not an address: nothing to judge by (reach.forbidden refuses it first)
    targets: list[ipaddress.IPv4Address | ipaddress.IPv6Address] = []
    if isinstance(ip, ipaddress.IPv6Address):
        inner = reach.carried_ipv4(ip)
        if ip.ipv4_mapped is None:
            targets.append(ip)
        if inner is not None:
            targets.append(inner)
    else:
        targets.append(ip)
    return any(_routed_here(target) for target in targets)


def _routed_here(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    family = socket.AF_INET6 if ip.version == 6 else socket.AF_INET
    try:
        with IPRoute() as ipr:
            routes = ipr.route("get", dst=str(ip), family=family)
    except NetlinkError as exc:
        # no route at all (unreachable): every local address has one; any other answer
        # (prohibit, blackhole, a kernel that will not say) proves nothing: refused
        return exc.code not in _NO_ROUTE
    except OSError:
        return True  # no netlink to judge by: refused (fail closed)
    return any(r["type"] in _LOCAL_ROUTES for r in routes)


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


@functools.lru_cache(maxsize=2)
def _client_context(pinned: bool) -> ssl.SSLContext:
    """One context per kind of check, shared by every login and stream: making one
    costs 0.1 ms, and one with the system's CAs loaded some 17 ms."""
    if pinned:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE  # the pin is the whole check (`_tls`'s caller)
    else:
        ctx = ssl.create_default_context()
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    return ctx


def _tls(sock: socket.socket, spec: AgentSpec, deadline: _Deadline) -> ssl.SSLSocket:
    ctx = _client_context(bool(spec.fingerprint))
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


def _open(
    config: Config, spec: AgentSpec, deadline: _Deadline, sock: socket.socket | None
) -> ssl.SSLSocket:
    """TLS to the agent: dialled here (its addresses checked), or over the caller's socket."""
    if sock is None:
        return _connect(config, spec, deadline)[0]
    return _tls(sock, spec, deadline)


def _signed_request(
    spec: AgentSpec,
    key: Ed25519PrivateKey,
    peer_fingerprint: str,
    path: str,
    body: bytes,
    now: float | None = None,
    nonce: str | None = None,
) -> tuple[h11.Connection, bytes]:
    """A signed POST as bytes to send, and the h11 connection that will read its answer
    (sans-IO: the blocking client and the proxy's event loop send the same request).
    The signature binds the agent certificate's fingerprint the caller saw."""
    headers = wire.sign_headers(
        key,
        "POST",
        path,
        peer_fingerprint,
        body,
        time.time() if now is None else now,
        nonce or secrets.token_urlsafe(18),
    )
    conn = h11.Connection(h11.CLIENT, max_incomplete_event_size=wire.MAX_ANSWER_BYTES)
    req = h11.Request(
        method="POST",
        target=path,
        headers=[
            ("Host", spec.address),
            ("Content-Type", "application/json"),
            ("Content-Length", str(len(body))),
            ("Accept", "application/json"),
            ("Connection", "close"),
            *headers.items(),
        ],
    )
    out = (conn.send(req) or b"") + (conn.send(h11.Data(data=body)) or b"")
    out += conn.send(h11.EndOfMessage()) or b""
    return conn, out


def _send_signed(
    tls: ssl.SSLSocket,
    spec: AgentSpec,
    key: Ed25519PrivateKey,
    path: str,
    body: bytes,
    deadline: _Deadline,
) -> h11.Connection:
    """Send the signed POST; the h11 connection that now waits for the answer."""
    der = tls.getpeercert(binary_form=True) or b""
    conn, out = _signed_request(spec, key, wire.fingerprint(der), path, body)
    with _broken_connection(deadline):
        tls.settimeout(deadline.left())
        tls.sendall(out)
    return conn


class ConnectCall:
    """One `POST /v1/connect`, sans-IO: `request` to send once TLS to the agent is up,
    then `head(data)` on the bytes received so far until it gives the status; the
    bytes after the head (`head_length`) are the server's on a 200, else `refusal`
    reads the agent's JSON error.  Used by `open_server_stream` (blocking) and by the
    proxy (appliance/proxy/agent_stream.py, its event loop)."""

    def __init__(
        self,
        spec: AgentSpec,
        key: Ed25519PrivateKey,
        peer_fingerprint: str,
        user: str,
        service: str,
        now: float | None = None,
        nonce: str | None = None,
    ) -> None:
        if not wire.USER_RE.fullmatch(user) or not wire.SERVICE_RE.fullmatch(service):
            raise AgentError("bad_address", "not a user and service an agent accepts")
        body = json.dumps({"user": user, "service": service}).encode("utf-8")
        self.key_id = wire.public_key_id(key.public_key())
        self.conn, self.request = _signed_request(
            spec, key, peer_fingerprint, wire.CONNECT_PATH, body, now, nonce
        )
        self.head_length = 0
        self.status = 0
        self._body = bytearray()

    def head(self, data: bytes) -> int | None:
        """The answer's status once `data` (all received so far) holds its whole head;
        None: not yet.  AgentError bad_answer for a head that is not HTTP or too long."""
        if self.status:
            return self.status
        end = data.find(b"\r\n\r\n", 0, wire.MAX_ANSWER_BYTES)
        if end < 0:
            if len(data) >= wire.MAX_ANSWER_BYTES:
                raise AgentError("bad_answer", "the agent's answer head is far too long")
            return None
        try:
            self.conn.receive_data(data[: end + 4])
            event = self.conn.next_event()
        except h11.ProtocolError:
            raise AgentError("bad_answer", "the agent's answer is not HTTP") from None
        if not isinstance(event, h11.Response):
            raise AgentError("bad_answer", "the agent's answer is not HTTP")
        self.head_length = end + 4
        self.status = event.status_code
        return self.status

    def refusal(self, more: bytes, ended: bool) -> AgentError | None:
        """After a status other than 200: feed the bytes after the head as they come
        (`ended`: the agent closed); the AgentError once the body is whole, else None."""
        try:
            if more:
                self.conn.receive_data(more)
            if ended:
                self.conn.receive_data(b"")
            while True:
                event = self.conn.next_event()
                if event is h11.NEED_DATA:
                    if ended:
                        return AgentError("bad_answer", "the agent closed mid-answer")
                    return None
                if isinstance(event, h11.Data):
                    self._body += event.data
                    if len(self._body) > wire.MAX_ANSWER_BYTES:
                        return AgentError("bad_answer", "the agent's answer is far too long")
                elif isinstance(event, h11.EndOfMessage):
                    return connect_refusal(self.status, bytes(self._body), self.key_id)
                else:
                    return AgentError("bad_answer", "the agent closed the connection mid-answer")
        except h11.ProtocolError:
            return AgentError("bad_answer", "the agent's answer is not HTTP")


def signed_connect_request(
    spec: AgentSpec, key: Ed25519PrivateKey, peer_fingerprint: str, user: str, service: str
) -> bytes:
    """The bytes of a signed `POST /v1/connect` (ConnectCall reads its answer)."""
    return ConnectCall(spec, key, peer_fingerprint, user, service).request


@contextlib.contextmanager
def _broken_connection(deadline: _Deadline) -> Iterator[None]:
    """What a timeout, bad HTTP or a broken connection means to the visitor."""
    try:
        yield
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


def _read_answer(
    conn: h11.Connection, tls: ssl.SSLSocket, deadline: _Deadline
) -> tuple[int, bytes]:
    """The agent's whole answer (status, body) through h11."""
    with _broken_connection(deadline):
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


def _exchange(
    tls: ssl.SSLSocket, spec: AgentSpec, key: Ed25519PrivateKey, body: bytes, deadline: _Deadline
) -> tuple[int, bytes]:
    conn = _send_signed(tls, spec, key, wire.AUTHENTICATE_PATH, body, deadline)
    return _read_answer(conn, tls, deadline)


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
    "no_login": ("no_login", "log in through your home agent first (a login opens it for 24 h)"),
    "no_server": ("no_server", "your home agent names no such server for you"),
    "server_unreachable": (
        "server_unreachable",
        "your home agent cannot reach your server; try again later",
    ),
}


def _interpret(
    config: Config,
    spec: AgentSpec,
    status: int,
    body: bytes,
    key_id: str,
    deadline: _Deadline,
    relayed_spec: str = "",
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
    if relayed_spec:
        servers = _relayed_servers(doc.get("servers", {}), relayed_spec)
    else:
        servers = _servers(config, doc.get("servers", {}), deadline)
    return AgentAnswer(spec.user, attributes, servers, spec.address)


def _relayed_servers(raw: Any, agent_spec: str) -> dict[str, str]:
    """An agent behind a relay names servers on its own network, which the appliance
    never dials: each is reached through that agent (`/v1/connect`), so the session
    keeps the agent's name per service, not the address."""
    if not isinstance(raw, dict) or len(raw) > wire.MAX_SERVERS:
        raise AgentError("bad_answer", "the agent's server table is not a small object")
    out: dict[str, str] = {}
    for service, target in raw.items():
        if not wire.SERVICE_RE.fullmatch(service) or not isinstance(target, str):
            raise AgentError("bad_answer", "the agent's server table is malformed")
        out[service] = wire.relayed_server_text(agent_spec)
    return out


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


def authenticate(
    config: Config,
    agent_spec: str,
    password: str,
    sock: socket.socket | None = None,
    relayed: bool = False,
) -> AgentAnswer:
    """Ask the visitor's personal agent; AgentAnswer or AgentError within config.agent.timeout.

    With `sock` (already connected, e.g. through the home relay) nothing is dialled:
    the caller chose where it leads; TLS, pin and signature are as always.  The
    socket is closed when this returns.  `relayed`: the agent is behind a relay, so
    its servers are reached through it (the answer's servers name the agent)."""
    deadline = _Deadline(config.agent.timeout)
    try:
        spec = parse_spec(agent_spec, config.agent.default_port)
        if not 1 <= len(password) <= wire.MAX_PASSWORD_LEN:
            raise AgentError("bad_password", "wrong password")
        key = appliance_key(config)
        body = json.dumps({"user": spec.user, "password": password}).encode("utf-8")
        tls = _open(config, spec, deadline, sock)
    except BaseException:
        if sock is not None:  # (a relay stream held open would hold a relay slot)
            sock.close()
        raise
    with tls:
        seen = wire.fingerprint(tls.getpeercert(binary_form=True) or b"")
        status, answer = _exchange(tls, spec, key, body, deadline)
    key_id = wire.public_key_id(key.public_key())
    relayed_spec = agent_spec.strip() if relayed else ""
    ans = _interpret(config, spec, status, answer, key_id, deadline, relayed_spec)
    # without a pin the default context checked the certificate against the CAs for spec.host
    verified = "" if spec.fingerprint else spec.host
    return dataclasses.replace(ans, fingerprint=seen, verified_name=verified)


def connect_refusal(status: int, body: bytes, key_id: str) -> AgentError:
    """The AgentError for a non-200 answer (its JSON `error` code, mapped)."""
    try:
        doc: Any = json.loads(body.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        doc = None
    code = doc.get("error") if isinstance(doc, dict) else None
    if isinstance(code, str) and code in _REFUSALS:
        mapped, message = _REFUSALS[code]
        return AgentError(mapped, message.format(command=wire.allow_command(key_id)))
    return AgentError("bad_answer", f"the agent refused with HTTP {status}")


def open_server_stream(
    config: Config,
    agent_spec: str,
    user: str,
    service: str,
    sock: socket.socket | None = None,
) -> ssl.SSLSocket:
    """A stream to `user`'s own `service` server through their agent (`POST /v1/connect`).

    The agent allows it for a user this appliance key logged in within 24 hours.  The
    returned TLS socket (blocking, no timeout) reads the server's first byte next;
    the caller closes it.  The setup shares one config.agent.timeout deadline;
    refusals are AgentError: no_login, no_server, server_unreachable, or as
    authenticate's (appliance_not_allowed, rate_limited, timeout, bad_answer, ...)."""
    deadline = _Deadline(config.agent.timeout)
    spec = parse_spec(agent_spec, config.agent.default_port)
    if not wire.USER_RE.fullmatch(user) or not wire.SERVICE_RE.fullmatch(service):
        if sock is not None:
            sock.close()
        raise AgentError("bad_address", "not a user and service an agent accepts")
    key = appliance_key(config)
    tls = _open(config, spec, deadline, sock)
    try:
        seen = wire.fingerprint(tls.getpeercert(binary_form=True) or b"")
        call = ConnectCall(spec, key, seen, user, service)
        with _broken_connection(deadline):
            tls.settimeout(deadline.left())
            tls.sendall(call.request)
        status = call.head(_read_head(tls, deadline))
        if status != 200:
            _status, answer = _read_answer(call.conn, tls, deadline)
            raise connect_refusal(call.status, answer, call.key_id)
    except BaseException:
        tls.close()
        raise
    tls.settimeout(None)
    return tls


def _read_head(tls: ssl.SSLSocket, deadline: _Deadline) -> bytes:
    """The answer's head up to its blank line, and not a byte more: what follows is the
    server's.  A byte at a time (TLS buffers the record; the head is short)."""
    head = bytearray()
    with _broken_connection(deadline):
        while not head.endswith(b"\r\n\r\n"):
            if len(head) >= wire.MAX_ANSWER_BYTES:
                raise AgentError("bad_answer", "the agent's answer head is far too long")
            tls.settimeout(deadline.left())
            byte = tls.recv(1)
            if not byte:
                raise AgentError("bad_answer", "the agent closed the connection mid-answer")
            head += byte
    return bytes(head)


__all__ = [
    "CODES",
    "STREAM_CODES",
    "AgentAnswer",
    "AgentError",
    "AgentSpec",
    "ConnectCall",
    "appliance_key",
    "appliance_key_id",
    "authenticate",
    "connect_refusal",
    "forbidden_address",
    "open_server_stream",
    "parse_spec",
    "signed_connect_request",
]
