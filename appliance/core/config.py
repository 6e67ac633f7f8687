"""The appliance's configuration: one TOML file read once into frozen, validated objects.

Every role gets the same `Config`; nothing reads the file again behind its back.
The tables admins edit live (`servers.toml`, `access.toml`) are separate files named
here and loaded by their own modules, because they reload without a restart.
"""

from __future__ import annotations

import argparse
import ipaddress
import re
import urllib.parse
from collections.abc import Mapping
from dataclasses import dataclass
from ipaddress import IPv4Address
from pathlib import Path

from appliance.core.metrics import DEFAULT_BASE_PORT, ROLE_OFFSETS, MetricsConfig
from appliance.core.tomlfile import ConfigError, Reader, TomlFile

DEFAULT_PATH = Path("/etc/appliance/appliance.toml")
CAPTIVE_API_PATH = "/api/captive"
STAND_IN = ipaddress.IPv4Address("198.18.0.1")
"""Before login, the DNS answer for an outside name (dns.before_login = "portal"): port
80 to it reaches the portal like any address, and the firewall resets every other
connection to it at once, so a browser shows the login page instead of a DNS error and
waits for nothing.  From the benchmarking range (RFC 2544): no real destination."""
STAND_IN_TEXT = str(STAND_IN)
PORTAL_THREADS = 8
"""Worker threads of each portal server (waitress, cheroot): the agent-login caps stay
below it, so a page always has a thread left."""


@dataclass(frozen=True)
class Interfaces:
    guest: str
    guest_address: ipaddress.IPv4Interface
    uplink: str
    uplink_address: ipaddress.IPv4Interface | None
    management_address: ipaddress.IPv4Address
    hidden_networks: tuple[ipaddress.IPv4Network, ...]
    # the IPv6 ones of `hidden_networks` (guests have no IPv6, but the proxy and the
    # agent client do where the uplink has it: see appliance/core/reach.py)
    hidden_networks6: tuple[ipaddress.IPv6Network, ...] = ()

    @property
    def guest_subnet(self) -> ipaddress.IPv4Network:
        return self.guest_address.network

    @property
    def guest_ip(self) -> ipaddress.IPv4Address:
        return self.guest_address.ip


@dataclass(frozen=True)
class Reservation:
    mac: str
    address: ipaddress.IPv4Address


@dataclass(frozen=True)
class DhcpConfig:
    enabled: bool
    pool_start: ipaddress.IPv4Address
    pool_end: ipaddress.IPv4Address
    lease_time: int
    renewal_time: int
    rebinding_time: int
    domain: str
    decline_quarantine: int
    reservations: tuple[Reservation, ...]
    relays: tuple[ipaddress.IPv4Address, ...] = ()  # DHCP relays trusted to vouch for chaddr
    leases_per_mac: int = 2


@dataclass(frozen=True)
class DnsConfig:
    enabled: bool
    port: int
    upstream: tuple[ipaddress.IPv4Address, ...]
    cache_size: int
    rate_limit: int = 50  # questions a second per guest address (appliance.dns.ratelimit)
    rate_burst: int = 200  # ... and at once
    before_login: str = "portal"  # outside names before login: "portal" (STAND_IN) or "refuse"


@dataclass(frozen=True)
class PortalConfig:
    enabled: bool
    http_port: int
    https_port: int | None
    tls_certificate: Path | None
    tls_key: Path | None
    hostname: str
    session_idle: int
    session_max: int
    # nftables' cap on one guest address's open connections to the portal's ports
    connections_per_guest: int = 32
    # agent logins in progress at once: per guest address, and in all (each holds one of
    # the PORTAL_THREADS worker threads until the agent answers or its deadline passes)
    agent_logins_per_guest: int = 2
    agent_logins_total: int = 4

    def base_url(self, guest_ip: ipaddress.IPv4Address) -> str:
        if self.https_port and self.tls_certificate:
            port = "" if self.https_port == 443 else f":{self.https_port}"
            return f"https://{self.hostname}{port}"
        port = "" if self.http_port == 80 else f":{self.http_port}"
        return f"http://{guest_ip}{port}"

    def captive_api_url(self, guest_ip: ipaddress.IPv4Address) -> str:
        """The RFC 8908 API URI that DHCP option 114 announces."""
        return self.base_url(guest_ip) + CAPTIVE_API_PATH


@dataclass(frozen=True)
class AdminConfig:
    enabled: bool
    port: int
    secure_cookie: bool = False  # true when the pages are reached over HTTPS (a TLS proxy)


@dataclass(frozen=True)
class ProxyConfig:
    enabled: bool
    connect_timeout: float
    idle_timeout: float
    explicit_http_port: int | None
    identity_header: str | None
    connect_ports: tuple[int, ...] = (443,)
    workers: int = 0  # relay processes on the same ports; 0: one per core
    max_connections: int = 256  # per guest and service, where a rule sets no max_connections
    # nftables' cap on one guest address's open connections to the proxies' ports
    connections_per_guest: int = 256
    accounting: bool = True  # per-user usage by service and day, in the state store


@dataclass(frozen=True)
class AgentClientConfig:
    timeout: float
    default_port: int


@dataclass(frozen=True)
class HomeRelayConfig:
    """Relays through which visitors' agents behind NAT are reached (docs/home-relay.md).

    No relays (the default): off; a `USER@HOUSEHOLD.RELAY#PIN` login is then an
    ordinary agent name and fails as one."""

    # relay name (what visitors type) -> the wss:// URLs of its /v1/appliance: several
    # for a federation of relays under the name, tried in turn
    relays: Mapping[str, tuple[str, ...]]
    ca: Path | None  # the relays' CA (None: the system's)
    socket: Path  # the dialer role's stream socket
    proxy: str  # "" or http://HOST:PORT: reach the relays with CONNECT through the site's proxy
    open_timeout: float  # a stream's OPEN must be answered within this

    @property
    def enabled(self) -> bool:
        return bool(self.relays)


@dataclass(frozen=True)
class Policies:
    servers: Path
    access: Path
    users: Path
    admins: Path
    agents: Path  # trusted agents; a missing file trusts no agent
    # servers, access and agents kept in step with the shared store by the admin role,
    # so an edit on one appliance applies on all of them (appliance/admin/mirror.py)
    shared: bool = False


@dataclass(frozen=True)
class StateConfig:
    directory: Path  # the SQLite store, and the role's keys and files, either way
    backend: str = "sqlite"  # or "postgresql": the store on a PostgreSQL server (`dsn`)
    dsn: str = ""  # libpq connection string; keep passwords out (peer auth or a passfile)
    file: str = "state.sqlite"  # the SQLite store's name in `directory`

    @property
    def database(self) -> Path:
        return self.directory / self.file

    @property
    def made(self) -> bool:
        """Whether the store exists yet: root's CLI must not make it before the roles'
        first start (SQLite: the file; PostgreSQL: the server's, always)."""
        return self.backend == "postgresql" or self.database.exists()


METRICS_OFF = MetricsConfig(False, IPv4Address("127.0.0.1"))


@dataclass(frozen=True)
class HaConfig:
    """An active/standby pair on one guest segment (appliance/ha): keepalived (VRRP)
    holds the guest address on the active box; every role of both boxes runs, and only
    the holder of the guest address answers guests."""

    enabled: bool = False
    interface: str = ""  # where VRRP adverts go: the segment side, out of guests' reach
    router_id: int = 51
    priority: int = 100  # the higher one is active while both are up
    peers: tuple[IPv4Address, ...] = ()  # the other box's segment address (unicast VRRP)
    advert_interval: float = 1.0  # seconds; a silent active is taken over after ~3 of them


HA_OFF = HaConfig()


@dataclass(frozen=True)
class Config:
    path: Path
    interfaces: Interfaces
    dhcp: DhcpConfig
    dns: DnsConfig
    portal: PortalConfig
    admin: AdminConfig
    proxy: ProxyConfig
    agent: AgentClientConfig
    policies: Policies
    state: StateConfig
    home_relay: HomeRelayConfig
    metrics: MetricsConfig = METRICS_OFF  # what a Config built in code (tests) gets
    ha: HaConfig = HA_OFF

    def hidden(self, address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
        """True when the address is in a hidden network (the segment and the listed ones);
        appliance.core.reach.forbidden is the whole verdict (special ranges, IPv6 forms)."""
        if isinstance(address, ipaddress.IPv6Address):
            return any(address in net for net in self.interfaces.hidden_networks6)
        return any(address in net for net in self.interfaces.hidden_networks)


def _interfaces(r: Reader) -> Interfaces:
    uplink_address = r.interface("uplink_address", None)
    listed = r.any_network_list("hidden_networks", ())
    hidden = [n for n in listed if isinstance(n, ipaddress.IPv4Network)]
    hidden6 = tuple(n for n in listed if isinstance(n, ipaddress.IPv6Network))
    if uplink_address is not None and uplink_address.network not in hidden:
        hidden.insert(0, uplink_address.network)
    out = Interfaces(
        guest=r.text("guest"),
        guest_address=r.interface("guest_address"),
        uplink=r.text("uplink"),
        uplink_address=uplink_address,
        management_address=r.ip("management_address"),
        hidden_networks=tuple(hidden),
        hidden_networks6=hidden6,
    )
    for net in out.hidden_networks:
        if net.overlaps(out.guest_subnet):
            raise r.error(
                "hidden_networks" if r.has("hidden_networks") else "uplink_address",
                f"hidden network {net} overlaps the guest subnet {out.guest_subnet}",
            )
    if out.management_address in out.guest_subnet:
        raise r.error("management_address", "the management address must not be on the guest side")
    r.finish()
    return out


def _dhcp(r: Reader, subnet: ipaddress.IPv4Network, gw: ipaddress.IPv4Address) -> DhcpConfig:
    hosts = list(subnet.hosts())
    lease_time = r.integer("lease_time", 3600, 60, 7 * 86400)
    cfg = DhcpConfig(
        enabled=r.boolean("enabled", True),
        pool_start=r.ip("pool_start", hosts[min(99, len(hosts) - 1)]),
        pool_end=r.ip("pool_end", hosts[-1]),
        lease_time=lease_time,
        renewal_time=r.integer("renewal_time", lease_time // 2, 1, lease_time),
        rebinding_time=r.integer("rebinding_time", lease_time * 7 // 8, 1, lease_time),
        domain=r.text("domain", "guest.example"),
        decline_quarantine=r.integer("decline_quarantine", 600, 0, 86400),
        reservations=tuple(_reservation(t, subnet) for t in r.tables("reservations")),
        relays=tuple(_ips(r, "relays")),
        leases_per_mac=r.integer("leases_per_mac", 2, 1, 64),
    )
    for relay in cfg.relays:
        if relay not in subnet:
            raise r.error("relays", f"relay {relay} is outside the guest subnet {subnet}")
    for key in ("pool_start", "pool_end"):
        addr = getattr(cfg, key)
        if addr not in subnet or addr in (subnet.network_address, subnet.broadcast_address):
            raise r.error(key, f"{addr} is outside the guest subnet {subnet}")
        if addr == gw:
            raise r.error(key, f"{addr} is the appliance's own guest address")
    if int(cfg.pool_end) < int(cfg.pool_start):
        raise r.error("pool_end", f"pool_end {cfg.pool_end} is below pool_start {cfg.pool_start}")
    if gw in _pool_range(cfg):
        raise r.error("pool_start", f"the pool contains the appliance's own address {gw}")
    if cfg.rebinding_time < cfg.renewal_time:
        raise r.error("rebinding_time", "rebinding_time must not be below renewal_time")
    r.finish()
    return cfg


def _pool_range(cfg: DhcpConfig) -> range:
    return range(int(cfg.pool_start), int(cfg.pool_end) + 1)


def _reservation(r: Reader, subnet: ipaddress.IPv4Network) -> Reservation:
    mac = r.text("mac").lower()
    parts = mac.replace("-", ":").split(":")
    if len(parts) != 6 or not all(
        len(p) == 2 and all(c in "0123456789abcdef" for c in p) for p in parts
    ):
        raise r.error("mac", f"{mac!r} is not a MAC address like 02:00:00:00:00:01")
    address = r.ip("address")
    if address not in subnet:
        raise r.error("address", f"{address} is outside the guest subnet {subnet}")
    r.finish()
    return Reservation(":".join(parts), address)


def _dns(r: Reader) -> DnsConfig:
    cfg = DnsConfig(
        enabled=r.boolean("enabled", True),
        port=r.port("port", 53),
        upstream=tuple(_ips(r, "upstream")),
        cache_size=r.integer("cache_size", 10000, 0, 10_000_000),
        rate_limit=r.integer("rate_limit", 50, 1, 1_000_000),
        rate_burst=r.integer("rate_burst", 200, 1, 10_000_000),
        before_login=r.text("before_login", "portal", choices=("refuse", "portal")),
    )
    if cfg.rate_burst < cfg.rate_limit:
        raise r.error("rate_burst", "rate_burst must not be below rate_limit")
    r.finish()
    return cfg


def _ips(r: Reader, key: str) -> list[ipaddress.IPv4Address]:
    out = []
    for v in r.text_list(key, ()):
        try:
            out.append(ipaddress.IPv4Address(v))
        except ValueError:
            raise r.error(key, f"{v!r} is not an IPv4 address") from None
    return out


def _portal(r: Reader) -> PortalConfig:
    cert = r.filepath("tls_certificate", None)
    key = r.filepath("tls_key", None)
    cfg = PortalConfig(
        enabled=r.boolean("enabled", True),
        http_port=r.port("http_port", 80),
        https_port=r.port("https_port", None),
        tls_certificate=cert,
        tls_key=key,
        hostname=r.text("hostname", "portal.guest.example"),
        session_idle=r.integer("session_idle", 1800, 60, 30 * 86400),
        session_max=r.integer("session_max", 86400, 60, 365 * 86400),
        connections_per_guest=r.integer("connections_per_guest", 32, 4, 1000),
        agent_logins_per_guest=r.integer("agent_logins_per_guest", 2, 1, PORTAL_THREADS - 1),
        agent_logins_total=r.integer("agent_logins_total", 4, 1, PORTAL_THREADS - 1),
    )
    if cfg.agent_logins_per_guest > cfg.agent_logins_total:
        raise r.error("agent_logins_per_guest", "must not be more than agent_logins_total")
    if (cert is None) != (key is None):
        raise r.error(
            "tls_key" if key is None else "tls_certificate",
            "tls_certificate and tls_key go together",
        )
    for k, p in (("tls_certificate", cert), ("tls_key", key)):
        if p is not None and not p.is_file():
            raise r.error(k, f"file not found: {p}")
    r.finish()
    return cfg


def _admin(r: Reader) -> AdminConfig:
    cfg = AdminConfig(
        enabled=r.boolean("enabled", True),
        port=r.port("port", 8000),
        secure_cookie=r.boolean("secure_cookie", False),
    )
    r.finish()
    return cfg


def _proxy(r: Reader) -> ProxyConfig:
    cfg = ProxyConfig(
        enabled=r.boolean("enabled", True),
        connect_timeout=r.number("connect_timeout", 5.0, lo=0.1),
        idle_timeout=r.number("idle_timeout", 600.0, lo=1.0),
        explicit_http_port=r.port("explicit_http_port", None),
        identity_header=r.text("identity_header", None),
        connect_ports=_port_list(r, "connect_ports", (443,)),
        workers=r.integer("workers", 0, lo=0, hi=64),
        max_connections=r.integer("max_connections", 256, lo=1, hi=1_000_000),
        connections_per_guest=r.integer("connections_per_guest", 256, 4, 65535),
        accounting=r.boolean("accounting", True),
    )
    r.finish()
    return cfg


def _port_list(r: Reader, key: str, default: tuple[int, ...]) -> tuple[int, ...]:
    value = r.array(key, list(default))
    for item in value:
        if isinstance(item, bool) or not isinstance(item, int) or not 1 <= item <= 65535:
            raise r.error(key, f"expected an array of ports 1..65535, found {item!r}")
    return tuple(value)


def _agent(r: Reader) -> AgentClientConfig:
    cfg = AgentClientConfig(
        timeout=r.number("timeout", 4.0, lo=0.1), default_port=r.port("default_port", 8443)
    )
    r.finish()
    return cfg


_LABEL = r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?"
_RELAY_NAME = re.compile(rf"{_LABEL}(\.{_LABEL})+")
_RELAY_URL = re.compile(r"wss://[A-Za-z0-9.-]+(:[0-9]{1,5})?/[A-Za-z0-9/._-]*")


def _home_relay(r: Reader) -> HomeRelayConfig:
    relays = r.sub("relays")
    table: dict[str, tuple[str, ...]] = {}
    for name in list(relays.keys()):
        if not _RELAY_NAME.fullmatch(name):
            raise relays.error(name, "a relay's name is a lower-case DNS name with a dot")
        given = relays.raw(name)
        urls = relays.text_list(name) if isinstance(given, list) else [relays.text(name)]
        for url in urls:
            if not _RELAY_URL.fullmatch(url):
                raise relays.error(name, f"expected wss://HOST[:PORT]/PATH, found {url!r}")
        if not urls:
            raise relays.error(name, "at least one wss:// URL")
        table[name] = tuple(urls)
    relays.finish()
    proxy = r.text("proxy", "")
    if proxy and not re.fullmatch(r"http://[A-Za-z0-9.-]+:[0-9]{1,5}", proxy):
        raise r.error("proxy", f"expected http://HOST:PORT, found {proxy!r}")
    cfg = HomeRelayConfig(
        relays=table,
        ca=r.filepath("ca", None),
        socket=r.filepath("socket", "/run/appliance/homelink.sock"),
        proxy=proxy,
        open_timeout=r.number("open_timeout", 10.0, lo=0.5),
    )
    if cfg.ca is not None and not cfg.ca.is_file():
        raise r.error("ca", f"file not found: {cfg.ca}")
    r.finish()
    return cfg


def _metrics(r: Reader, ifs: Interfaces, admin_port: int) -> MetricsConfig:
    """The roles' Prometheus endpoints: on the management address or loopback only,
    never where a guest could reach them."""
    address = r.ip("address", ifs.management_address)
    if address in ifs.guest_subnet:
        raise r.error("address", f"{address} is on the guest side; metrics stay on management")
    if address != ifs.management_address and not address.is_loopback:
        raise r.error(
            "address",
            f"{address} is neither the management address {ifs.management_address} nor loopback",
        )
    top = 65535 - max(ROLE_OFFSETS.values())
    cfg = MetricsConfig(
        enabled=r.boolean("enabled", True),
        address=address,
        base_port=r.integer("base_port", DEFAULT_BASE_PORT, 1, top),
    )
    if admin_port in {cfg.port(role) for role in ROLE_OFFSETS}:
        raise r.error("base_port", f"a role's metrics port would be the admin pages' {admin_port}")
    r.finish()
    return cfg


def _policies(r: Reader, state: StateConfig) -> Policies:
    cfg = Policies(
        servers=r.filepath("servers", "servers.toml"),
        access=r.filepath("access", "access.toml"),
        users=r.filepath("users", "users.toml"),
        admins=r.filepath("admins", "admins.toml"),
        agents=r.filepath("agents", None) or r.file.path.parent.resolve() / "agents.toml",
        shared=r.boolean("shared", False),
    )
    if cfg.shared and state.backend != "postgresql":
        raise r.error(
            "shared", 'tables shared by several appliances live in [state] backend = "postgresql"'
        )
    for key in ("servers", "access"):
        p = getattr(cfg, key)
        if not p.is_file():
            raise r.error(key, f"table file not found: {p}")
    r.finish()
    return cfg


def state_backend(r: Reader) -> tuple[str, str]:
    """`backend` and `dsn` of a [state] section (the appliance's, the home relay's)."""
    backend = r.text("backend", "sqlite", choices=("sqlite", "postgresql"))
    dsn = r.text("dsn", "")
    if backend == "postgresql" and not dsn:
        raise r.error(
            "dsn",
            'backend = "postgresql" needs a dsn (e.g. "host=/run/postgresql dbname=appliance")',
        )
    if backend == "sqlite" and dsn:
        raise r.error("dsn", 'a dsn is only used with backend = "postgresql"')
    # as written and decoded: a URI may spell the keyword, or a / in a password, %-encoded
    if any(
        re.search(r"password\s*=", text, re.I) or re.search(r"://[^/@]*:[^/@]*@", text)
        for text in (dsn, urllib.parse.unquote(dsn))
    ):
        raise r.error(
            "dsn",
            "no password in the dsn (every role reads this file): "
            "use peer authentication or a passfile",
        )
    return backend, dsn


def _state(r: Reader) -> StateConfig:
    backend, dsn = state_backend(r)
    cfg = StateConfig(r.filepath("directory", "/var/lib/appliance"), backend, dsn)
    r.finish()
    return cfg


def _ha(r: Reader, ifs: Interfaces, state: StateConfig) -> HaConfig:
    enabled = r.boolean("enabled", False)
    cfg = HaConfig(
        enabled=enabled,
        interface=r.text("interface", ifs.uplink),
        router_id=r.integer("router_id", 51, 1, 255),
        priority=r.integer("priority", 100, 1, 254),
        peers=tuple(_ips(r, "peers")),
        advert_interval=r.number("advert_interval", 1.0, lo=0.1),
    )
    if enabled:
        if state.backend != "postgresql":
            raise r.error(
                "enabled",
                "an active/standby pair serves from one shared store: "
                '[state] backend = "postgresql"',
            )
        if ifs.uplink_address is None:
            raise r.error("enabled", "VRRP needs [interfaces] uplink_address (its source)")
        if not cfg.peers:
            raise r.error("peers", "name the other box's segment address (unicast VRRP)")
        if cfg.interface == ifs.guest:
            raise r.error("interface", "VRRP on the guest side would let a guest forge adverts")
        if cfg.interface != ifs.uplink:
            raise r.error(
                "interface",
                f"the adverts' source is uplink_address, on {ifs.uplink}: VRRP runs there",
            )
        if ifs.uplink_address.ip in cfg.peers:
            raise r.error("peers", "the other box's address, not this box's uplink_address")
        if cfg.advert_interval > 40.95:
            raise r.error("advert_interval", "VRRPv3 allows at most 40.95 seconds")
    r.finish()
    return cfg


def parse(doc: TomlFile) -> Config:
    """Validate a parsed file into a Config; raises ConfigError naming file, line and key."""
    top = doc.reader()
    interfaces = _interfaces(top.sub("interfaces"))
    admin = _admin(top.sub("admin"))
    state = _state(top.sub("state"))
    cfg = Config(
        path=doc.path,
        interfaces=interfaces,
        dhcp=_dhcp(top.sub("dhcp"), interfaces.guest_subnet, interfaces.guest_ip),
        dns=_dns(top.sub("dns")),
        portal=_portal(top.sub("portal")),
        admin=admin,
        proxy=_proxy(top.sub("proxy")),
        agent=_agent(top.sub("agent")),
        policies=_policies(top.sub("policies"), state),
        state=state,
        home_relay=_home_relay(top.sub("home_relay")),
        metrics=_metrics(top.sub("metrics"), interfaces, admin.port),
        ha=_ha(top.sub("ha"), interfaces, state),
    )
    ports = {"portal.http_port": cfg.portal.http_port, "admin.port": cfg.admin.port}
    if cfg.portal.https_port:
        ports["portal.https_port"] = cfg.portal.https_port
    if cfg.proxy.explicit_http_port:
        ports["proxy.explicit_http_port"] = cfg.proxy.explicit_http_port
    seen: dict[int, str] = {}
    for key, port in ports.items():
        if port in seen and not key.startswith("admin"):
            section, name = key.split(".")
            raise top.sub(section).error(name, f"port {port} is already used by {seen[port]}")
        seen[port] = key
    top.finish()
    return cfg


def load(path: str | Path) -> Config:
    return parse(TomlFile.load(path))


__all__ = ["DEFAULT_PATH", "Config", "ConfigError", "load", "parse"]


def add_config_arg(p: argparse.ArgumentParser) -> None:
    """Every command that reads the configuration takes -c/--config the same way."""
    p.add_argument(
        "--config",
        "-c",
        type=Path,
        default=DEFAULT_PATH,
        help=f"configuration file (default {DEFAULT_PATH})",
    )
