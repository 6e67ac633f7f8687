"""Issue 17 end to end: a household behind NAT, reached only through the home relay.

One lab site with its household (`Topology.build(nat_household=True)`): bob's agent
(192.0.2.1) and POP server (192.0.2.3) sit behind a router that masquerades and lets
nothing in; the agent links out to the relay (203.0.113.10, relay.example).  A guest
logs in as bob on the portal through the relay and reads his home mail over
intercepted POP3 with real clients (requests for the form, curl for POP3); then his
home link is cut for 30 s in the middle of a large fetch, and the copy must be the
message byte for byte.
"""

from __future__ import annotations

import json
import shutil
import ssl
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import _live

from appliance.lab import demo, household, site
from appliance.lab.topology import NetnsSwitch, Node, Topology

pytestmark = pytest.mark.netns


@dataclass
class Lab:
    topo: Topology
    directory: Path
    info: site.SiteInfo

    def presence(self) -> dict[str, object] | None:
        """What the relay says of bob's household (asked from the internet side)."""
        ctx = ssl.create_default_context(cafile=self.info.ca)
        ctx.check_hostname = False  # asked by address; the name is the relay's own business
        url = f"https://{household.RELAY_ADDR}/v1/households/{household.HOUSEHOLD}"
        with NetnsSwitch(self.topo["home"].netns):
            try:
                with urllib.request.urlopen(url, context=ctx, timeout=5) as r:
                    doc: dict[str, object] = json.loads(r.read())
                    return doc
            except OSError:
                return None


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    tmp = tmp_path_factory.mktemp("homerelay")
    topo = Topology.build(guests=2, workdir=tmp / "topo", nat_household=True)
    _live.append(topo)
    try:
        info = site.start(topo, tmp / "site")
        yield Lab(topo, tmp / "site", info)
    finally:
        topo.cut_household_link(False)
        topo.destroy()
        if topo in _live:
            _live.remove(topo)
        for d in site.load_info(tmp / "site").server_dirs if (tmp / "site").exists() else []:
            shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(autouse=True)
def _process_logs(request: pytest.FixtureRequest, lab: Lab) -> None:
    request.node._topologies = [lab.topo]


def _online(lab: Lab, timeout: float = 30.0) -> float:
    """Seconds until the relay says bob's household is online (fails after timeout)."""
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        doc = lab.presence()
        if doc is not None and doc.get("state") in ("online", "in_use"):
            return time.monotonic() - started
        time.sleep(0.1)
    raise AssertionError(f"household not online after {timeout} s: {lab.presence()}")


@pytest.fixture(scope="module")
def bob(lab: Lab) -> Node:
    """A guest logged in as bob, through his agent behind NAT."""
    _online(lab)
    guest = lab.topo["guest1"]
    got = demo.dhcp(guest, lab.directory)
    assert got.ok, got.detail
    user, password = household.USER
    login = demo.login(guest, user, password, lab.info.bob_spec)
    assert login.ok, login.detail
    return guest


def test_the_household_has_no_way_in_but_is_online_at_the_relay(lab: Lab) -> None:
    _online(lab)
    with NetnsSwitch(lab.topo["home"].netns), pytest.raises(OSError):
        urllib.request.urlopen(f"https://{household.AGENT_ADDR}:8443/", timeout=2)


def test_bob_logs_in_through_the_relay_and_reads_his_home_mail(lab: Lab, bob: Node) -> None:
    user, password = household.USER
    got = demo.fetch_mail(bob, user, password)
    assert got.ok, got.detail
    assert "through the relay" in got.detail  # the subject of the message at his home


def test_a_wrong_pin_for_a_relayed_household_is_refused(lab: Lab) -> None:
    guest = lab.topo["guest2"]
    assert demo.dhcp(guest, lab.directory).ok
    user, password = household.USER
    wrong = lab.info.bob_spec.partition("#")[0] + "#" + lab.info.agent_fingerprint
    got = demo.login(guest, user, password, wrong)
    assert not got.ok, got.detail


def test_a_fetch_survives_his_home_link_cut_for_30_seconds(lab: Lab, bob: Node) -> None:
    user, password = household.USER
    got = demo.fetch_through_cut(
        bob, Path(lab.info.bob_maildir), user, password, lab.topo.cut_household_link, 30
    )
    assert got.ok, got.detail
    _online(lab, timeout=5)


def test_prometheus_saw_bobs_login_and_his_mail(lab: Lab, bob: Node) -> None:
    """What `lab demo` ends with, here for the relayed visit: the lab's Prometheus
    has the login and the bytes of his fetch."""
    got = demo.metrics_show_the_walk(lab.topo["seg"], logins=1)
    assert got.ok, got.detail
