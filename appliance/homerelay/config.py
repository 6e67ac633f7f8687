"""The relay's own configuration, `relay.toml`: read once into a frozen object.

Every fault names the file, the line and the key (`appliance.core.tomlfile`), so the
relay refuses to start on a typo instead of running with a default nobody chose.
Relative paths are taken from the file's directory.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from pathlib import Path

from appliance.core.config import StateConfig, state_backend
from appliance.core.metrics import own_endpoint
from appliance.core.tomlfile import ConfigError, TomlFile
from appliance.homelink.registration import MAX_RELAY_HOST

DEFAULT_PATH = Path("/etc/home-relay/relay.toml")
DEFAULT_STATE_DIRECTORY = Path("/var/lib/home-relay")


@dataclass(frozen=True)
class RelayLimits:
    links_per_source: int  # concurrent links (agent or appliance) from one IP address
    streams_per_appliance_link: int  # open streams one appliance link may hold
    household_bytes_per_second: int  # DATA bytes per household per second; 0: unlimited
    link_queue_bytes: int  # frames waiting for one link beyond this: it is closed 1013


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
    )
    lim.finish()
    metrics_listen, metrics_port = own_endpoint(top.sub("metrics"), port, "relay")
    st = top.sub("state")
    state_backend_, state_dsn = state_backend(st)
    st.finish()
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
    )


def load(path: str | Path) -> RelayConfig:
    return parse(TomlFile.load(path))


__all__ = ["DEFAULT_PATH", "ConfigError", "RelayConfig", "RelayLimits", "load", "parse"]
