"""Issue 19: Prometheus in the segment scrapes every role of the lab's appliance.

The whole lab site (`appliance.lab.site.start`: the roles under the supervisor, with
the proxy's workers, and Debian's Prometheus at 198.51.100.5:9090 scraping each
role's endpoint on the management address every 2 s).  A visitor logs in through her
personal agent, sends a mail and fetches her home mail; then Prometheus's own HTTP API
must show every target up, her login, the mail connections and their bytes, and no
series may carry her name or an address.  From the guest side no metrics port
answers.
"""

from __future__ import annotations

import json
import shutil
import time
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from conftest import _live

from appliance.core.metrics import ROLE_OFFSETS
from appliance.lab import demo, servers, site
from appliance.lab.topology import Topology

pytestmark = pytest.mark.netns

PROMETHEUS = f"http://{servers.PROMETHEUS_ADDR}:{servers.PROMETHEUS_PORT}"
MANAGEMENT = "198.51.100.1"
BASE_PORT = 9100
WAIT = 10 * servers.SCRAPE_INTERVAL  # bounded: a few scrapes, and Prometheus's own start


@dataclass
class Lab:
    topo: Topology
    directory: Path
    info: site.SiteInfo

    def api(self, path: str, **params: str) -> Any:
        """Prometheus's HTTP API, asked from inside the segment (where it listens)."""
        url = f"{PROMETHEUS}/api/v1/{path}"
        if params:
            url += "?" + urllib.parse.urlencode(params)
        out = self.topo["seg"].run("curl", "-sf", "--max-time", "5", url, check=False)
        if out.returncode != 0:
            return None
        doc = json.loads(out.stdout)
        assert doc["status"] == "success", doc
        return doc["data"]

    def value(self, query: str) -> float | None:
        """The first sample's value of an instant query (None: no series)."""
        data = self.api("query", query=query)
        if not data or not data["result"]:
            return None
        return float(data["result"][0]["value"][1])

    def until(self, query: str, at_least: float = 1.0) -> float:
        deadline = time.monotonic() + WAIT
        while True:
            got = self.value(query)
            if got is not None and got >= at_least:
                return got
            if time.monotonic() > deadline:
                raise AssertionError(f"{query} is {got} after {WAIT} s (wanted >= {at_least})")
            time.sleep(0.5)


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    tmp = tmp_path_factory.mktemp("metrics")
    topo = Topology.build(guests=2, workdir=tmp / "topo")
    _live.append(topo)  # removed even if the run is interrupted
    try:
        directory = tmp / "site"
        info = site.start(topo, directory)
        yield Lab(topo, directory, info)
    finally:
        topo.destroy()
        if topo in _live:
            _live.remove(topo)
        for d in site.load_info(tmp / "site").server_dirs if (tmp / "site").exists() else []:
            shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(scope="module")
def visited(lab: Lab) -> Lab:
    """alice's walk: an address, a login through her agent, a mail out, her mail in."""
    g1 = lab.topo["guest1"]
    user, password, _ = site.HOME_USER
    for step in (
        lambda: demo.dhcp(g1, lab.directory),
        lambda: demo.login(g1, user, password, lab.info.agent_spec),
        lambda: demo.send_mail(g1, Path(lab.info.maildir), "alice@home.example", "metrics"),
        lambda: demo.fetch_mail(g1, user, password),
    ):
        got = step()
        assert got.ok, got.detail
    return lab


def test_prometheus_scrapes_every_role(lab: Lab) -> None:
    deadline = time.monotonic() + WAIT
    while True:
        data = lab.api("targets")
        health = {
            t["labels"]["job"]: (t["health"], t.get("lastError", ""))
            for t in (data or {}).get("activeTargets", [])
        }
        if set(health) == set(ROLE_OFFSETS) and all(h == "up" for h, _ in health.values()):
            break
        if time.monotonic() > deadline:
            raise AssertionError(f"targets after {WAIT} s: {health}")
        time.sleep(0.5)
    # every scrape target is the management address, one port per role
    assert {t["scrapeUrl"] for t in data["activeTargets"]} == {
        f"http://{MANAGEMENT}:{BASE_PORT + n}/metrics" for n in ROLE_OFFSETS.values()
    }
    # each role is its own process and says so
    assert lab.until('count(process_start_time_seconds{job=~".+"})') == len(ROLE_OFFSETS)


def test_the_visit_shows_in_the_series(visited: Lab) -> None:
    lab = visited
    assert lab.until('appliance_portal_logins_total{source="agent",result="ok"}') >= 1
    assert lab.until('appliance_portal_sessions{source="agent"}') >= 1
    assert lab.until('appliance_dhcp_packets_total{direction="sent",type="ack"}') >= 1
    assert lab.until('appliance_dhcp_leases{state="bound"}') >= 1
    assert lab.until("appliance_dns_queries_total") >= 1
    # the mail out and the mail in, each one relayed connection that ended well
    assert lab.until('sum(appliance_proxy_connections_total{service="smtp",result="ok"})') >= 1
    assert lab.until('sum(appliance_proxy_connections_total{service="pop3",result="ok"})') >= 1
    # her one mail, counted as the server accepted it
    assert lab.until('appliance_proxy_smtp_messages_total{service="smtp"}') == 1
    # bytes each way: the message went up to the relay, the mailbox came down
    assert lab.until('appliance_proxy_bytes_total{service="smtp",direction="up"}', 100) >= 100
    assert lab.until('appliance_proxy_bytes_total{service="pop3",direction="down"}', 100) >= 100
    assert lab.until("appliance_proxy_workers") >= 1


def test_no_series_names_a_user_or_an_address(visited: Lab) -> None:
    lab = visited
    lab.until('appliance_portal_logins_total{result="ok"}')
    data = lab.api("query", query='{__name__=~"appliance_.+"}')
    values = {
        v for series in data["result"] for k, v in series["metric"].items() if k != "instance"
    }
    assert values, "no appliance series at all"
    leaks = {v for v in values if "alice" in v or "192.168." in v or "02:47:" in v}
    assert not leaks, leaks


def test_a_guest_reaches_no_metrics_port(visited: Lab) -> None:
    """Logged in, even: the management address is behind the guest side's input drop,
    and nothing serves metrics on the guest address."""
    g1 = visited.topo["guest1"]
    for port in (BASE_PORT + n for n in ROLE_OFFSETS.values()):
        for host in (MANAGEMENT, "192.168.1.1"):
            got = g1.run(
                "curl", "-s", "--max-time", "2", f"http://{host}:{port}/metrics", check=False
            )
            assert got.returncode != 0 and "appliance_" not in got.stdout, (host, port)
    # while the segment does reach it (the same URL, from where Prometheus is)
    seg = visited.topo["seg"].run(
        "curl", "-sf", "--max-time", "5", f"http://{MANAGEMENT}:{BASE_PORT + 5}/metrics"
    )
    assert "appliance_proxy_connections_total" in seg.stdout
    # the guest's tries above were dropped by the ruleset, and its counter says so
    assert visited.until('appliance_net_guest_packets_total{counter="guest_dropped"}') >= 1
