"""Issue 18 end to end: federated relays (docs/home-relay.md "Federation").

One lab site with a federation (`Topology.build(federation=True)`): relay
(203.0.113.10) and relay2 (203.0.113.11) both serve relay.example, on one PostgreSQL at
203.0.113.12.  bob's agent behind NAT resolves the name to .10 first and links there;
the appliance asks .11 first.  So bob's login and his mail go appliance -> relay2 ->
relay -> agent, over a peer link that relay2 opened to relay.  Then relay is killed
(kill -9) in the middle of a large POP fetch: bob's agent registers at relay2 and the
fetch comes out byte for byte.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import _live

from appliance.lab import demo, household, site
from appliance.lab.topology import Node, Topology

pytestmark = pytest.mark.netns


@dataclass
class Lab:
    topo: Topology
    directory: Path
    info: site.SiteInfo

    def state_at(self, relay: Node, addr: str) -> str:
        """What a relay says of bob's household (curl from its own namespace)."""
        got = relay.run(
            "curl", "-s", "--max-time", "5", "--cacert", self.info.ca,
            "--resolve", f"{household.RELAY_NAME}:443:{addr}",
            f"https://{household.RELAY_NAME}/v1/households/{household.HOUSEHOLD}",
            check=False,
        )  # fmt: skip
        return got.stdout


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    tmp = tmp_path_factory.mktemp("federation")
    topo = Topology.build(guests=1, workdir=tmp / "topo", federation=True)
    _live.append(topo)
    try:
        info = site.start(topo, tmp / "site")
        yield Lab(topo, tmp / "site", info)
    finally:
        topo.destroy()
        if topo in _live:
            _live.remove(topo)
        for d in site.load_info(tmp / "site").server_dirs if (tmp / "site").exists() else []:
            shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(autouse=True)
def _process_logs(request: pytest.FixtureRequest, lab: Lab) -> None:
    request.node._topologies = [lab.topo]


def _until(check: object, timeout: float) -> float:
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        if check():  # type: ignore[operator]
            return time.monotonic() - started
        time.sleep(0.1)
    raise AssertionError(f"not within {timeout} s")


def _peer_links(node: Node, to: str) -> int:
    """Established TCP connections from `node` to `to`:443 (a relay's peer link)."""
    out = node.run("ss", "-Htn", "state", "established", "dst", f"{to}:443").stdout
    return len(out.splitlines())


@pytest.fixture(scope="module")
def bob(lab: Lab) -> Node:
    """A guest logged in as bob, through relay2, relay and his agent behind NAT."""
    relay, relay2 = lab.topo["relay"], lab.topo["relay2"]
    _until(lambda: '"online"' in lab.state_at(relay, household.RELAY_ADDR), 30)
    # relay2 knows it from the shared store, though the agent never linked to it
    _until(lambda: '"online"' in lab.state_at(relay2, household.RELAY2_ADDR), 5)
    guest = lab.topo["guest1"]
    got = demo.dhcp(guest, lab.directory)
    assert got.ok, got.detail
    user, password = household.USER
    login = demo.login(guest, user, password, lab.info.bob_spec)
    assert login.ok, login.detail
    return guest


def test_bob_logs_in_and_reads_his_mail_through_the_second_relay(lab: Lab, bob: Node) -> None:
    user, password = household.USER
    got = demo.fetch_mail(bob, user, password)
    assert got.ok, got.detail
    assert "through the relay" in got.detail
    # the appliance's link is at relay2, the agent's at relay: relay2 linked to relay
    assert _peer_links(lab.topo["relay2"], household.RELAY_ADDR) == 1
    assert _peer_links(lab.topo["bobhome"], household.RELAY2_ADDR) == 0


def _kill_relay(lab: Lab) -> None:
    out = subprocess.run(
        ["ip", "netns", "pids", lab.topo["relay"].netns],
        capture_output=True,
        text=True,
        check=False,
    ).stdout
    for pid in out.split():
        with contextlib.suppress(ProcessLookupError):
            os.kill(int(pid), signal.SIGKILL)


def test_kill_9_of_the_relay_mid_fetch_loses_nothing_and_the_agent_moves(
    lab: Lab, bob: Node
) -> None:
    user, password = household.USER
    killed: list[float] = []

    def cut(down: bool) -> None:
        if down:
            _kill_relay(lab)
            killed.append(time.monotonic())

    got = demo.fetch_through_cut(bob, Path(lab.info.bob_maildir), user, password, cut, 3)
    assert killed
    assert got.ok, got.detail
    # the agent is at relay2 now, and a new login goes through
    assert _peer_links(lab.topo["bobhome"], household.RELAY2_ADDR) >= 1
    assert '"online"' in lab.state_at(lab.topo["relay2"], household.RELAY2_ADDR)
    again = demo.fetch_mail(bob, user, password)
    assert again.ok, again.detail
