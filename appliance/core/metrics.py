"""Prometheus metrics for the roles, served on the management side only (`[metrics]`).

Each role keeps the counters it always kept (the relay's `stats`, the DHCP server's
counts and drops, the resolver's `Stats`, ...); a `Collector` here turns them into
metric families *when Prometheus scrapes*, so the hot paths do no extra work per
packet or connection for the metrics.  Each role serves its own registry on
`[metrics] address` and its own port (`base_port` + the role's offset below), in a
daemon thread of prometheus-client's HTTP server; the role's own process and GC
metrics come with it.

Label values are the roles' fixed vocabularies (packet types, drop reasons, service
names from servers.toml, results): never a user name, an address or a MAC.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from ipaddress import IPv4Address, ip_address
from typing import Any

from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.gc_collector import GCCollector
from prometheus_client.platform_collector import PlatformCollector
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.registry import Collector

from appliance.core.tomlfile import Reader

log = logging.getLogger("appliance.metrics")

DEFAULT_BASE_PORT = 9100
# each role's port is base_port + its offset (9101..9107 by default)
ROLE_OFFSETS: dict[str, int] = {
    "net": 1,
    "dhcp": 2,
    "dns": 3,
    "portal": 4,
    "proxy": 5,
    "admin": 6,
    "homelink": 7,
}
PREFIX = "appliance_"


@dataclass(frozen=True)
class MetricsConfig:
    enabled: bool
    address: IPv4Address
    base_port: int = DEFAULT_BASE_PORT

    def port(self, role: str) -> int:
        return self.base_port + ROLE_OFFSETS[role]

    def targets(self) -> dict[str, str]:
        """role -> HOST:PORT, what a Prometheus configuration scrapes."""
        return {role: f"{self.address}:{self.port(role)}" for role in ROLE_OFFSETS}


Families = Callable[[], Iterable[Metric]]


class RoleCollector(Collector):
    """Reads a role's own counters at scrape time (`families` is called per scrape)."""

    def __init__(self, families: Families) -> None:
        self.families = families

    def collect(self) -> Iterable[Metric]:
        return list(self.families())


def counter(
    name: str, doc: str, labels: Sequence[str], values: Mapping[tuple[str, ...], float]
) -> CounterMetricFamily:
    """A counter family `appliance_<name>_total` with one sample per label tuple."""
    fam = CounterMetricFamily(PREFIX + name, doc, labels=list(labels))
    for key, value in sorted(values.items()):
        fam.add_metric(list(key), value)
    return fam


def gauge(
    name: str, doc: str, labels: Sequence[str], values: Mapping[tuple[str, ...], float]
) -> GaugeMetricFamily:
    fam = GaugeMetricFamily(PREFIX + name, doc, labels=list(labels))
    for key, value in sorted(values.items()):
        fam.add_metric(list(key), value)
    return fam


def one_counter(name: str, doc: str, value: float) -> CounterMetricFamily:
    return CounterMetricFamily(PREFIX + name, doc, value=value)


def one_gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(PREFIX + name, doc, value=value)


def registry_for(*families: Families) -> CollectorRegistry:
    """A role's registry: its collectors plus its process, platform and GC metrics."""
    registry = CollectorRegistry(auto_describe=False)
    ProcessCollector(registry=registry)
    PlatformCollector(registry=registry)
    GCCollector(registry=registry)
    for f in families:
        registry.register(RoleCollector(f))
    return registry


def serve(config: Any, role: str, *families: Families) -> Any:
    """Start the role's metrics endpoint (a daemon thread); the server, or None when
    `[metrics] enabled = false`.  A port that cannot be bound is logged, not fatal:
    metrics must never take a role down."""
    mc: MetricsConfig = config.metrics
    if not mc.enabled:
        return None
    return serve_on(str(mc.address), mc.port(role), role, *families)


def own_endpoint(r: Reader, own_port: int, whose: str) -> tuple[str, int]:
    """A `[metrics]` section of a program that is no appliance role (the personal agent,
    the home relay): `listen` (an IP, default loopback) and `port` (0, the default: off)."""
    listen = r.text("listen", "127.0.0.1")
    try:
        ip_address(listen)
    except ValueError:
        raise r.error("listen", f"{listen!r} is not an IP address") from None
    port = r.integer("port", 0, 0, 65535)
    if port and port == own_port:
        raise r.error("port", f"port {port} is the {whose}'s own")
    r.finish()
    return listen, port


def serve_on(address: str, port: int, role: str, *families: Families) -> Any:
    """`serve` without a configuration (the relay's static mode: tests, benchmarks)."""
    registry = registry_for(*families)
    try:
        server, _thread = start_http_server(port, address, registry=registry)
    except OSError as exc:
        log.error("%s metrics on %s:%d: %s", role, address, port, exc)
        return None
    log.info("%s metrics on http://%s:%d/metrics", role, address, port)
    return server


__all__ = [
    "DEFAULT_BASE_PORT",
    "ROLE_OFFSETS",
    "MetricsConfig",
    "RoleCollector",
    "counter",
    "gauge",
    "one_counter",
    "one_gauge",
    "registry_for",
    "serve",
    "serve_on",
]
