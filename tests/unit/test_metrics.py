"""Issue 19: `[metrics]` stays on the management side, and each role's collector turns
its own counters into the metric families Prometheus expects (parsed back from the
exposition text as Prometheus would read it)."""

from __future__ import annotations

import ipaddress
import socket
import time
import urllib.request
from collections import Counter
from collections.abc import Iterable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from portal_conf import load as load_portal
from portal_conf import write_config as write_portal_config
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from appliance.core import metrics
from appliance.core.config import ConfigError, StateConfig, load
from appliance.dns import service as dns_service
from appliance.homelink import service as homelink_service
from appliance.portal import service as portal_service
from appliance.portal.app import Deps, LoginCounts, create_app
from appliance.proxy import metrics as proxy_metrics
from appliance.state import store
from appliance.state.sessions import SessionStore
from dhcp.pool import Binding
from dhcp.service import Service as DhcpService

pytestmark = pytest.mark.unit
ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "policies" / "appliance.toml"


def variant(tmp_path: Path, section: str) -> Path:
    """The example config with its [metrics] section replaced by `section`."""
    text = EXAMPLE.read_text()
    start = text.index("[metrics]")
    end = text.index("[agent]")
    for name in ("servers.toml", "access.toml"):
        (tmp_path / name).write_text((ROOT / "policies" / name).read_text())
    path = tmp_path / "appliance.toml"
    path.write_text(text[:start] + section + "\n" + text[end:])
    return path


def scrape(*families: metrics.Families) -> dict[str, dict[tuple[tuple[str, str], ...], float]]:
    """What Prometheus would read: family name -> {sorted labels: value} of its samples."""
    registry = metrics.registry_for(*families)
    text = generate_latest(registry).decode()
    out: dict[str, dict[tuple[tuple[str, str], ...], float]] = {}
    for fam in text_string_to_metric_families(text):
        for sample in fam.samples:
            out.setdefault(sample.name, {})[tuple(sorted(sample.labels.items()))] = sample.value
    return out


def labels(**kw: str) -> tuple[tuple[str, str], ...]:
    return tuple(sorted(kw.items()))


# -- configuration -------------------------------------------------------------------
def test_defaults_are_on_the_management_address(tmp_path: Path) -> None:
    cfg = load(variant(tmp_path, ""))
    assert cfg.metrics.enabled
    assert str(cfg.metrics.address) == "198.51.100.1" == str(cfg.interfaces.management_address)
    assert cfg.metrics.targets() == {
        "net": "198.51.100.1:9101",
        "dhcp": "198.51.100.1:9102",
        "dns": "198.51.100.1:9103",
        "portal": "198.51.100.1:9104",
        "proxy": "198.51.100.1:9105",
        "admin": "198.51.100.1:9106",
        "homelink": "198.51.100.1:9107",
    }


def test_loopback_and_another_base_port(tmp_path: Path) -> None:
    cfg = load(variant(tmp_path, '[metrics]\naddress = "127.0.0.1"\nbase_port = 19000\n'))
    assert cfg.metrics.targets()["proxy"] == "127.0.0.1:19005"


@pytest.mark.parametrize(
    ("section", "key", "words"),
    [
        ('[metrics]\naddress = "192.168.1.1"\n', "metrics.address", "guest side"),
        ('[metrics]\naddress = "192.168.1.77"\n', "metrics.address", "guest side"),
        ('[metrics]\naddress = "203.0.113.254"\n', "metrics.address", "neither"),
        ("[metrics]\nbase_port = 7994\n", "metrics.base_port", "admin pages"),
        ("[metrics]\nbase_port = 65530\n", "metrics.base_port", ""),
        ("[metrics]\nport = 9100\n", "metrics.port", "unknown key"),
    ],
)
def test_mistakes_name_file_line_and_key(
    tmp_path: Path, section: str, key: str, words: str
) -> None:
    path = variant(tmp_path, section)
    with pytest.raises(ConfigError) as err:
        load(path)
    text = str(err.value)
    assert str(path) in text and key in text and words in text
    line = path.read_text().splitlines().index(section.splitlines()[1]) + 1
    assert f":{line}" in text, text


def test_disabled_serves_nothing(tmp_path: Path) -> None:
    cfg = load(variant(tmp_path, "[metrics]\nenabled = false\n"))
    assert metrics.serve(cfg, "proxy") is None


def free_base_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
    return port - metrics.ROLE_OFFSETS["dns"]


def test_a_role_endpoint_answers_with_its_families_and_process_metrics() -> None:
    mc = metrics.MetricsConfig(True, ipaddress.IPv4Address("127.0.0.1"), free_base_port())
    fams = lambda: [metrics.one_counter("dns_queries", "Guest queries.", 3)]  # noqa: E731
    server = metrics.serve(SimpleNamespace(metrics=mc), "dns", fams)
    assert server is not None
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{mc.port('dns')}/metrics") as r:
            body = r.read().decode()
    finally:
        server.shutdown()
        server.server_close()
    assert "appliance_dns_queries_total 3.0" in body
    assert "process_cpu_seconds_total" in body


# -- the proxy: workers' snapshots summed ---------------------------------------------
WORKER = {
    "connections": [["smtp", "ok", 3], ["smtp", "refused-login", 2], ["pop3", "upstream-down", 1]],
    "bytes": [["smtp", "up", 1000], ["smtp", "down", 200], ["pop3", "down", 5]],
    "upstream_failures": {"pop3": 1},
    "messages": {"smtp": 3},
    "open": 4,
}


def test_proxy_sums_every_workers_snapshot(tmp_path: Path) -> None:
    d = tmp_path / "proxy-metrics"
    proxy_metrics.clear(d)
    proxy_metrics.write_snapshot(d / "worker-0.json", WORKER)
    proxy_metrics.write_snapshot(d / "worker-1.json", {**WORKER, "open": 1})
    got = scrape(proxy_metrics.collector(d))
    conns = got["appliance_proxy_connections_total"]
    assert conns[labels(service="smtp", result="ok")] == 6
    assert conns[labels(service="pop3", result="upstream-down")] == 2
    assert got["appliance_proxy_refusals_total"] == {labels(service="smtp", reason="login"): 4}
    moved = got["appliance_proxy_bytes_total"]
    assert moved[labels(service="smtp", direction="up")] == 2000
    assert moved[labels(service="smtp", direction="down")] == 400
    assert got["appliance_proxy_upstream_failures_total"] == {labels(service="pop3"): 2}
    assert got["appliance_proxy_smtp_messages_total"] == {labels(service="smtp"): 6}
    assert got["appliance_proxy_open_connections"] == {(): 5}
    assert got["appliance_proxy_workers"] == {(): 2}


def test_a_restart_forgets_the_last_runs_snapshots(tmp_path: Path) -> None:
    d = tmp_path / "proxy-metrics"
    proxy_metrics.clear(d)
    proxy_metrics.write_snapshot(d / "worker-0.json", WORKER)
    proxy_metrics.clear(d)
    got = scrape(proxy_metrics.collector(d))
    assert got["appliance_proxy_workers"] == {(): 0}
    assert "appliance_proxy_connections_total" not in got


# -- dhcp --------------------------------------------------------------------------
def binding(ip: str, state: str, expires: float) -> Binding:
    return Binding(ip, "02:47:00:00:00:01", b"k" + ip.encode(), state, expires, None, None)


def test_dhcp_packets_drops_leases_and_pool() -> None:
    far = 4e9
    fake: Any = SimpleNamespace(
        counts=Counter({"offer": 2, "ack": 1, "nak": 1, "nak:wrong_subnet": 1, "received": 5}),
        drops=Counter({"flood": 7, "not_for_us": 1}),
        requests=Counter({1: 2, 3: 2, None: 1}),
        index=SimpleNamespace(
            by_ip={
                "192.168.1.100": binding("192.168.1.100", "bound", far),
                "192.168.1.101": binding("192.168.1.101", "bound", 1.0),  # lapsed
                "192.168.1.102": binding("192.168.1.102", "declined", far),
            },
            offers={"192.168.1.103": binding("192.168.1.103", "offered", far)},
        ),
        settings=SimpleNamespace(pool_start="192.168.1.100", pool_end="192.168.1.149"),
    )
    got = scrape(lambda: DhcpService.metric_families(fake))
    packets = got["appliance_dhcp_packets_total"]
    assert packets[labels(direction="received", type="discover")] == 2
    assert packets[labels(direction="received", type="request")] == 2
    assert packets[labels(direction="received", type="other")] == 1
    assert packets[labels(direction="sent", type="offer")] == 2
    assert packets[labels(direction="sent", type="ack")] == 1
    assert got["appliance_dhcp_drops_total"][labels(reason="flood")] == 7
    assert got["appliance_dhcp_naks_total"] == {labels(reason="wrong_subnet"): 1}
    leases = got["appliance_dhcp_leases"]
    assert leases[labels(state="bound")] == 1
    assert leases[labels(state="expired")] == 1
    assert leases[labels(state="offered")] == 1
    assert got["appliance_dhcp_pool_addresses"] == {(): 50}
    assert got["appliance_dhcp_pool_used"] == {(): 2}


# -- dns ---------------------------------------------------------------------------
def test_dns_counts_the_fast_path_hits_too() -> None:
    stats = SimpleNamespace(
        queries=10, hits=2, forwarded=5, local=1, formerr=1, hidden=3, refused=4,
        stand_in=6, servfail=2, overload=1,
    )  # fmt: skip
    server: Any = SimpleNamespace(
        resolver=SimpleNamespace(stats=stats, cache=SimpleNamespace(entries={b"a": 1, b"b": 2})),
        limiter=SimpleNamespace(dropped=9),
    )
    udp: Any = SimpleNamespace(fast_hits=100)
    got = scrape(lambda: dns_service.metric_families(server, udp))
    assert got["appliance_dns_queries_total"] == {(): 110}
    assert got["appliance_dns_cache_hits_total"] == {(): 102}
    assert got["appliance_dns_filtered_total"][labels(reason="hidden")] == 3
    assert got["appliance_dns_filtered_total"][labels(reason="stand_in")] == 6
    assert got["appliance_dns_servfails_total"] == {(): 2}
    assert got["appliance_dns_overloads_total"] == {(): 1}
    assert got["appliance_dns_rate_limited_total"] == {(): 9}
    assert got["appliance_dns_cache_entries"] == {(): 2}


# -- portal ------------------------------------------------------------------------
def test_portal_logins_and_sessions_without_names(tmp_path: Path) -> None:
    db = tmp_path / "state.sqlite"
    st = SessionStore(store.connect(db))
    for n, (user, source) in enumerate(
        (
            ("carol", "site"),
            ("alice@home.example", "agent:home.example"),
            ("bob@b.example", "agent:b.example"),
        )
    ):
        st.create(user=user, source=source, attributes={}, ip=f"192.168.1.{100 + n}",
                  mac=f"02:47:00:00:00:0{n}", personal_servers={}, now=time.time())  # fmt: skip
    logins = LoginCounts()
    for source, result in (("site", "ok"), ("agent", "ok"), ("agent", "credentials")):
        logins.add(source, result)
    config: Any = SimpleNamespace(state=StateConfig(db.parent))
    portal: Any = SimpleNamespace(deps=SimpleNamespace(logins=logins))
    got = scrape(lambda: portal_service.metric_families(config, portal))
    assert got["appliance_portal_logins_total"] == {
        labels(source="site", result="ok"): 1,
        labels(source="agent", result="ok"): 1,
        labels(source="agent", result="credentials"): 1,
    }
    assert got["appliance_portal_sessions"] == {
        labels(source="site"): 1,
        labels(source="agent"): 2,
    }
    assert not [v for fam in got.values() for k in fam for _, v in k if "example" in v]


def test_portal_counts_a_login_the_app_refused(tmp_path: Path) -> None:
    """The form's own refusal (no CSRF token) is a login attempt with a result."""
    cfg = load_portal(write_portal_config(tmp_path))
    deps = Deps(mac_of=lambda ip: None, authorize=lambda ip, mac: None, revoke=lambda i, m: None)
    app = create_app(cfg, deps)
    client = app.test_client()
    client.environ_base["REMOTE_ADDR"] = "192.168.1.100"
    got = client.post(
        "/login", data={"user": "carol", "password": "x"}, base_url="http://192.168.1.1"
    )
    assert got.status_code == 400
    assert deps.logins.snapshot() == {("site", "csrf"): 1}


# -- homelink ----------------------------------------------------------------------
def test_homelink_dialer_and_links() -> None:
    stats = {
        "dialer": {"clients": 4, "streams_opened": 3, "busy": 0, "offline": 1, "errors": 0},
        "links": {"relay.example": {"links": 2, "link_failures": 1, "streams_expired": 0}},
    }
    got = scrape(lambda: homelink_service.metric_families(stats))
    assert got["appliance_homelink_streams_total"] == {(): 3}
    assert got["appliance_homelink_clients_total"] == {(): 4}
    assert got["appliance_homelink_stream_failures_total"][labels(reason="offline")] == 1
    events = got["appliance_homelink_link_events_total"]
    assert events[labels(relay="relay.example", event="links")] == 2
    assert events[labels(relay="relay.example", event="link_failures")] == 1


def test_names_follow_prometheus_conventions() -> None:
    """Counters end in _total, nothing else does; every name has the appliance_ prefix."""
    fams: list[Iterable[Any]] = []
    fams.append(proxy_metrics.families([WORKER]))
    fams.append(homelink_service.metric_families({"dialer": {"clients": 0, "streams_opened": 0},
                                                  "links": {}}))  # fmt: skip
    for fam in (f for group in fams for f in group):
        assert fam.name.startswith("appliance_")
        assert not fam.name.endswith("_total")  # the client adds it to counters' samples
        assert fam.type in ("counter", "gauge")
