"""The server-info table (`policies/servers.toml`): where each intercepted service goes.

Seed 001's table 22 maps a service to a server address; here each service also
names the local proxy port it is served on, the guest ports redirected to it,
fallback servers tried in order, and whether a visitor's personal agent may
name its own server for it (POP, IMAP, NNTP by default; never SMTP relay unless
the admin says so, because that would turn the site into an open relay).
"""

from __future__ import annotations

import ipaddress
import re
import ssl
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType

from appliance.core.agent_protocol import RELAYED_PREFIX
from appliance.core.tomlfile import ConfigError, Reader, TomlFile

PROTOCOLS = ("smtp", "pop3", "imap", "http", "tls", "tcp")
# where a tls service's connections go: its servers as for any service ("server"), the
# site's web proxy asked for a tunnel to the name in the ClientHello ("proxy"), or the
# address the guest connected to ("direct"; checked as every guest-chosen address is)
ROUTES = ("server", "proxy", "direct")
# services named by protocol when the table says nothing
DEFAULT_PROTOCOL = {
    "https": "tls",
    "smtps": "tls",
    "imaps": "tls",
    "pop3s": "tls",
    "submission": "smtp",
}
PERSONAL_BY_DEFAULT = frozenset({"pop3", "pop3s", "imap", "imaps", "nntp"})
_SERVICE_NAME = re.compile(r"^[a-z][a-z0-9_-]{0,31}$")
_HOSTNAME = re.compile(
    r"^(?=.{1,253}$)([A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)(\.[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*\.?$"
)
_LABEL = re.compile(r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$")


@dataclass(frozen=True)
class Endpoint:
    host: str
    port: int

    def __str__(self) -> str:
        return f"{self.host}:{self.port}"


@dataclass(frozen=True)
class Service:
    name: str
    protocol: str
    listen_port: int
    intercept_ports: tuple[int, ...]
    upstreams: tuple[Endpoint, ...]  # the site's server first, then its fallbacks in order
    personal_allowed: bool
    guest_names: tuple[str, ...]
    tls: bool = False  # the relay speaks TLS to the upstream (the guest's side is plain)
    route: str = "server"  # ROUTES; only a tls service has another
    tls_name: str = ""  # the name the upstream's certificate must carry (default: its host)
    tls_ca: str = ""  # a CA file to verify it by, instead of the system's CAs
    tls_fingerprint: str = ""  # or a pin: hex SHA-256 of its certificate (DER)


def parse_endpoint(text: str) -> Endpoint:
    """`host:port` -> Endpoint; ValueError with a reason an admin understands."""
    host, sep, port_text = text.strip().rpartition(":")
    if not sep or not host:
        raise ValueError(f"{text!r} is not host:port")
    if not port_text.isdigit():
        raise ValueError(f"{text!r}: port {port_text!r} is not a number")
    port = int(port_text)
    if not 1 <= port <= 65535:
        raise ValueError(f"{text!r}: port {port} is out of range 1..65535")
    try:
        ipaddress.IPv4Address(host)
    except ValueError:
        if not _HOSTNAME.match(host) or host.replace(".", "").isdigit():
            raise ValueError(
                f"{text!r}: {host!r} is neither an IPv4 address nor a host name"
            ) from None
    return Endpoint(host, port)


def _guest_side(host: str, guest_subnet: ipaddress.IPv4Network | None) -> bool:
    if guest_subnet is None:
        return False
    try:
        return ipaddress.IPv4Address(host) in guest_subnet
    except ValueError:
        return False


@dataclass(frozen=True)
class ServerTable:
    """The validated table; lookups by service name and by local listen port."""

    services: Mapping[str, Service]
    path: Path | None = None
    guest_subnet: ipaddress.IPv4Network | None = None
    hidden_networks: tuple[ipaddress.IPv4Network, ...] = ()
    _by_port: Mapping[int, Service] = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "services", MappingProxyType(dict(self.services)))
        by_port = {s.listen_port: s for s in self.services.values()}
        object.__setattr__(self, "_by_port", MappingProxyType(by_port))

    def by_listen_port(self, port: int) -> Service | None:
        return self._by_port.get(port)

    def upstreams_for(self, service: str, personal: Mapping[str, str]) -> tuple[Endpoint, ...]:
        """Where to connect, in order.

        A personal server (from the visitor's agent) wins only for a service marked
        personal_allowed, and then it is the only choice: falling back to the site's
        server would hand the visitor's home credentials to it.  A personal entry that
        is not host:port, or points into the guest subnet or a hidden network, is ignored.
        """
        svc = self.services.get(service)
        if svc is None:
            return ()
        if svc.personal_allowed and service in personal:
            if personal[service].startswith(RELAYED_PREFIX):
                return ()  # reached through the visitor's agent (the proxy's gate), no address
            ep = self.personal_endpoint(personal[service])
            if ep is not None:
                return (ep,)
        return svc.upstreams

    def personal_endpoint(self, text: str) -> Endpoint | None:
        """A personal server's endpoint; the certificate pin after '#' (the agent's
        `host:port#sha256:...`) is the relay's business, not where it goes.  None for
        one reached through the visitor's agent ("agent:USER@HOUSEHOLD.RELAY#PIN")."""
        if text.startswith(RELAYED_PREFIX):
            return None
        try:
            ep = parse_endpoint(text.partition("#")[0])
        except ValueError:
            return None
        try:
            addr = ipaddress.IPv4Address(ep.host)
        except ValueError:
            return ep
        if self.guest_subnet is not None and addr in self.guest_subnet:
            return None
        if any(addr in net for net in self.hidden_networks):
            return None
        return ep


def _service(
    r: Reader, name: str, guest_subnet: ipaddress.IPv4Network | None
) -> tuple[Service, list[str]]:
    if not _SERVICE_NAME.match(name):
        raise r.error(None, f"service name {name!r} must be lower-case letters, digits, - or _")
    default_protocol = name if name in PROTOCOLS else DEFAULT_PROTOCOL.get(name, "tcp")
    protocol = r.text("protocol", default_protocol, choices=PROTOCOLS)
    route = r.text("route", "server", choices=ROUTES)
    if route != "server" and protocol != "tls":
        raise r.error("route", f"route {route!r} is for tls services (this one is {protocol})")
    listen_port = r.port("listen_port")
    intercept = r.array("intercept_ports", [])
    for p in intercept:
        if isinstance(p, bool) or not isinstance(p, int):
            raise r.error("intercept_ports", f"expected port numbers, found {p!r}")
        if not 1 <= p <= 65535:
            raise r.error("intercept_ports", f"port {p} is out of range 1..65535")
    if len(set(intercept)) != len(intercept):
        raise r.error("intercept_ports", "a port is listed twice")
    personal = r.boolean("personal_allowed", name in PERSONAL_BY_DEFAULT and route != "direct")
    upstreams: list[Endpoint] = []
    keys: list[str] = []
    if route == "direct":
        if r.has("upstream") or r.has("fallbacks"):
            key = "upstream" if r.has("upstream") else "fallbacks"
            raise r.error(key, "a direct route goes where the guest connected: no servers here")
        if personal:
            raise r.error("personal_allowed", "a direct route has no server to replace")
    elif r.has("upstream") or not personal:
        keys.append("upstream")
        upstreams.append(_endpoint(r, "upstream", r.text("upstream"), guest_subnet))
    for text in r.text_list("fallbacks", ()):
        upstreams.append(_endpoint(r, "fallbacks", text, guest_subnet))
    if len(set(upstreams)) != len(upstreams):
        raise r.error("fallbacks", "a server is listed twice")
    names = r.text_list("guest_names", ())
    for n in names:
        if not _LABEL.match(n):
            raise r.error("guest_names", f"{n!r} is not a DNS label (a-z, 0-9, -)")
    tls = r.boolean("tls", False)
    tls_name, tls_ca, pin = _upstream_tls(r, tls, protocol, personal)
    r.finish()
    svc = Service(
        name=name,
        protocol=protocol,
        listen_port=listen_port,
        intercept_ports=tuple(intercept),
        upstreams=tuple(upstreams),
        personal_allowed=personal,
        guest_names=tuple(names),
        tls=tls,
        route=route,
        tls_name=tls_name,
        tls_ca=tls_ca,
        tls_fingerprint=pin,
    )
    return svc, keys


_PIN = re.compile(r"^sha256:((?:[0-9a-fA-F]{2}:?){31}[0-9a-fA-F]{2})$")


def _upstream_tls(r: Reader, tls: bool, protocol: str, personal: bool) -> tuple[str, str, str]:
    """tls_name, tls_ca and the pin (lower-case hex) of a service with `tls = true`."""
    keys = ("tls_name", "tls_ca", "tls_fingerprint")
    if not tls:
        for key in keys:
            if r.has(key):
                raise r.error(key, "only with tls = true")
        return "", "", ""
    if protocol in ("tls", "http"):
        why = "its TLS is the guest's own, end to end" if protocol == "tls" else "not for http"
        raise r.error("tls", f"TLS to the upstream is for plain services ({why})")
    if personal:
        # a home server has no name a CA vouches for, and the site holds no pin for it:
        # refused rather than spoken to with a certificate nobody checked
        raise r.error("tls", "a visitor's personal server cannot be verified: set "
                      "personal_allowed = false")  # fmt: skip
    name = r.text("tls_name", "")
    if name and not _HOSTNAME.match(name):
        raise r.error("tls_name", f"{name!r} is not a host name")
    ca = r.text("tls_ca", "")
    if ca:
        try:
            ssl.create_default_context(cafile=ca)
        except (OSError, ssl.SSLError) as exc:
            raise r.error("tls_ca", f"cannot load {ca}: {exc}") from None
    pin = r.text("tls_fingerprint", "")
    if pin:
        m = _PIN.match(pin)
        if m is None:
            raise r.error("tls_fingerprint", "expected sha256: and 64 hex digits")
        pin = m.group(1).replace(":", "").lower()
        if ca:
            raise r.error("tls_fingerprint", "a pin or a CA file, not both")
    return name, ca, pin


def _endpoint(
    r: Reader, key: str, text: str, guest_subnet: ipaddress.IPv4Network | None
) -> Endpoint:
    try:
        ep = parse_endpoint(text)
    except ValueError as exc:
        raise r.error(key, str(exc)) from None
    if _guest_side(ep.host, guest_subnet):
        raise r.error(key, f"{ep.host} is in the guest subnet {guest_subnet}: never a server")
    return ep


def parse_servers(
    doc: TomlFile,
    guest_subnet: ipaddress.IPv4Network | None = None,
    hidden_networks: Iterable[ipaddress.IPv4Network] = (),
) -> ServerTable:
    top = doc.reader()
    services_r = top.sub("services")
    services: dict[str, Service] = {}
    listen: dict[int, str] = {}
    intercepted: dict[int, str] = {}
    guest_names: dict[str, str] = {}
    for name in list(services_r.keys()):
        r = services_r.sub(name)
        svc, _ = _service(r, name, guest_subnet)
        if svc.listen_port in listen:
            raise r.error(
                "listen_port",
                f"port {svc.listen_port} is already used by {listen[svc.listen_port]}",
            )
        listen[svc.listen_port] = name
        for p in svc.intercept_ports:
            if p in intercepted:
                raise r.error(
                    "intercept_ports", f"port {p} is already intercepted for {intercepted[p]}"
                )
            intercepted[p] = name
        for n in svc.guest_names:
            if n in guest_names:
                raise r.error("guest_names", f"{n!r} already names {guest_names[n]}")
            guest_names[n] = name
        services[name] = svc
    if not services:
        raise top.error("services", "no services: add at least one [services.NAME] table")
    services_r.finish()
    top.finish()
    return ServerTable(services, doc.path, guest_subnet, tuple(hidden_networks))


def load_servers(
    path: str | Path,
    guest_subnet: ipaddress.IPv4Network | None = None,
    hidden_networks: Iterable[ipaddress.IPv4Network] = (),
) -> ServerTable:
    """Read and validate servers.toml; raises ConfigError naming file, line and key."""
    return parse_servers(TomlFile.load(path), guest_subnet, hidden_networks)


__all__ = [
    "ConfigError",
    "Endpoint",
    "ServerTable",
    "Service",
    "load_servers",
    "parse_endpoint",
    "parse_servers",
]
