"""The relay's own configuration, `relay.toml`: read once into a frozen object.

Every fault names the file, the line and the key (`appliance.core.tomlfile`), so the
relay refuses to start on a typo instead of running with a default nobody chose.
Relative paths are taken from the file's directory.
"""

from __future__ import annotations

import ipaddress
import re
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path

from appliance.core.config import StateConfig, state_backend
from appliance.core.metrics import own_endpoint
from appliance.core.tomlfile import ConfigError, Reader, TomlFile
from appliance.homelink.registration import MAX_RELAY_HOST

DEFAULT_PATH = Path("/etc/home-relay/relay.toml")
DEFAULT_STATE_DIRECTORY = Path("/var/lib/home-relay")
PEER_PATH = "/v1/peer"  # where the relays of a federation link to each other


@dataclass(frozen=True)
class RelayLimits:
    links_per_source: int  # concurrent links (agent or appliance) from one IP address
    streams_per_appliance_link: int  # open streams one appliance link may hold
    household_bytes_per_second: int  # DATA bytes per household per second; 0: unlimited
    link_queue_bytes: int  # frames waiting for one link beyond this: it is closed 1013
    # reverse proxies whose X-Forwarded-For names a link's source (sources.py)
    trusted_fronts: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = ()


@dataclass(frozen=True)
class FederationConfig:
    """`[federation]`: this relay among others that share one PostgreSQL store and one
    host name (docs/home-relay.md "Federation")."""

    name: str  # this relay's name among them (its rows in the store)
    url: str  # where the others reach it: wss://ADDRESS[:PORT]/v1/peer
    secret: bytes = field(repr=False)  # shared by the federation: a peer link's proof
    ca: Path | None = None  # the CA the others' certificates verify under (else system)


MIN_SECRET = 32  # bytes of the federation's shared secret file
_NAME = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?")


@dataclass(frozen=True)
class RelayConfig:
    path: Path
    host: str  # the DNS name agents dial: what their registration signature binds
    listen: str
    port: int  # 0 only in tests (any free port)
    certificate: Path
    key: Path
    state_directory: Path
    limits: RelayLimits
    state_backend: str = "sqlite"  # [state]: the claims in SQLite (households.db) or PostgreSQL
    state_dsn: str = ""
    metrics_listen: str = "127.0.0.1"  # Prometheus endpoint: address and port (0: off)
    metrics_port: int = 0
    federation: FederationConfig | None = None

    @property
    def households_db(self) -> Path:
        return self.state.database

    @property
    def state(self) -> StateConfig:
        """Where the claims live (relays sharing one PostgreSQL share their claims)."""
        return StateConfig(
            self.state_directory, self.state_backend, self.state_dsn, "households.db"
        )


def _valid_host(host: str) -> bool:
    name = host.lower().rstrip(".")
    if not name or len(name) > MAX_RELAY_HOST:
        return False
    labels = name.split(".")
    return all(
        0 < len(label) <= 63
        and label[0] != "-"
        and label[-1] != "-"
        and all(c.isascii() and (c.isalnum() or c == "-") for c in label)
        for label in labels
    )


def parse(doc: TomlFile) -> RelayConfig:
    top = doc.reader()
    relay = top.sub("relay")
    host = relay.text("host")
    if not _valid_host(host):
        raise relay.error("host", f"{host!r} is not a DNS name like relay.example")
    listen = relay.text("listen", "0.0.0.0")
    try:
        ipaddress.ip_address(listen)
    except ValueError:
        raise relay.error("listen", f"{listen!r} is not an IP address") from None
    port = relay.integer("port", 443, 0, 65535)
    certificate = relay.filepath("certificate")
    key = relay.filepath("key")
    state_directory = relay.filepath("state_directory", None) or DEFAULT_STATE_DIRECTORY
    relay.finish()

    lim = top.sub("limits")
    limits = RelayLimits(
        links_per_source=lim.integer("links_per_source", 32, 1, 100_000),
        streams_per_appliance_link=lim.integer("streams_per_appliance_link", 256, 1, 100_000),
        household_bytes_per_second=lim.integer("household_bytes_per_second", 0, 0, 2**40),
        # at least one stream's window (homelink.stream.WINDOW, 1 MiB)
        link_queue_bytes=lim.integer("link_queue_bytes", 16 << 20, 1 << 20, 2**40),
        trusted_fronts=lim.any_network_list("trusted_fronts", ()),
    )
    lim.finish()
    metrics_listen, metrics_port = own_endpoint(top.sub("metrics"), port, "relay")
    st = top.sub("state")
    state_backend_, state_dsn = state_backend(st)
    st.finish()
    federation = (
        _federation(top.sub("federation"), state_backend_) if top.has("federation") else None
    )
    top.finish()
    return RelayConfig(
        path=doc.path,
        host=host,
        listen=listen,
        port=port,
        certificate=certificate,
        key=key,
        state_directory=state_directory,
        limits=limits,
        metrics_listen=metrics_listen,
        metrics_port=metrics_port,
        state_backend=state_backend_,
        state_dsn=state_dsn,
        federation=federation,
    )


def _federation(r: Reader, backend: str) -> FederationConfig:
    name = r.text("name")
    if not _NAME.fullmatch(name):
        raise r.error("name", f"{name!r}: lower-case letters, digits and '-' (at most 63)")
    if backend != "postgresql":
        raise r.error("name", 'federated relays share their store: [state] backend = "postgresql"')
    url = r.text("url")
    parts = urllib.parse.urlsplit(url)
    if parts.scheme != "wss" or not parts.hostname or parts.path != PEER_PATH or parts.query:
        raise r.error(
            "url", f"{url!r}: the others reach this relay as wss://ADDRESS[:PORT]{PEER_PATH}"
        )
    path = r.filepath("secret")
    try:
        secret = path.read_bytes().strip()
    except OSError as exc:
        raise r.error("secret", f"{path}: {exc.strerror}") from None
    if len(secret) < MIN_SECRET:
        raise r.error(
            "secret", f"{path}: at least {MIN_SECRET} bytes (head -c 48 /dev/urandom | base64)"
        )
    ca = r.filepath("ca", None)
    if ca is not None and not ca.is_file():
        raise r.error("ca", f"{ca} is not a file")
    r.finish()
    return FederationConfig(name, url, secret, ca)


def load(path: str | Path) -> RelayConfig:
    return parse(TomlFile.load(path))


__all__ = [
    "DEFAULT_PATH",
    "PEER_PATH",
    "ConfigError",
    "FederationConfig",
    "RelayConfig",
    "RelayLimits",
    "load",
    "parse",
]
