"""Issue 18: two appliances on one guest segment, active and standby (keepalived).

The lab's pair (`lab up --ha`): gw and gw2 share the segment's PostgreSQL, VRRP runs
between them on the segment, and the guest address 192.168.1.1 is on gw only.  A
visitor gets her lease from gw (gw2 hears her DISCOVER and answers nothing), logs in
through her personal agent and sends a mail.  Then gw dies at once: kill -9 of all
it runs, its links down.  gw2 takes the guest address over, a new visitor gets a
lease from it, the first visitor's renewal is answered from her lease in the store,
and she is still logged in: her mail goes out through gw2 without a new login.
"""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from appliance.lab import demo, pair, site
from appliance.lab.topology import NetnsSwitch, Topology
from appliance.state import leases, postgres
from appliance.state.connection import Connection
from appliance.state.sessions import SessionStore

pytestmark = pytest.mark.netns


def _stats(directory: Path, box: str) -> dict[str, dict[str, int]]:
    state = directory / ("state" if box == "gw" else "state-gw2")
    doc: dict[str, dict[str, int]] = json.loads((state / "dhcp-stats.json").read_text())
    return doc


def _bound(pg: Connection) -> dict[str, str]:
    now = time.time()
    return {x.ip: x.mac for x in leases.all_leases(pg) if x.state == "bound" and x.expires > now}


def test_the_standby_takes_over_with_no_lease_lost_and_guests_still_logged_in(
    lab_site: Callable[..., tuple[Topology, Path]],
) -> None:
    topo, directory = lab_site(guests=2, ha=True)
    info = site.start(topo, directory)
    gw, gw2 = topo["gw"], topo["gw2"]
    assert pair.holds_guest_address(gw) and not pair.holds_guest_address(gw2)
    g1, g2 = topo["guest1"], topo["guest2"]
    user, password, _ = site.HOME_USER
    for step in (
        lambda: demo.dhcp(g1, directory),
        lambda: demo.login(g1, user, password, info.agent_spec),
        lambda: demo.send_mail(g1, Path(info.maildir), "alice@home.example", "before"),
    ):
        got = step()
        assert got.ok, got.detail
    time.sleep(2.5)  # the roles write their stats every 2 s
    heard = _stats(directory, "gw2")
    assert heard["drops"].get("standby", 0) >= 1, heard  # it heard her DISCOVER ...
    assert not any(k in heard["counts"] for k in ("offer", "ack", "nak")), heard  # said nothing

    with NetnsSwitch(gw2.netns):
        pg = postgres.connect(info.state_dsn)
    try:
        before = _bound(pg)
        assert len(before) == 1, before
        ip = next(iter(before))
        session = SessionStore(pg).lookup_ip(ip, time.time())
        assert session is not None

        failed = time.monotonic()
        pair.fail(topo, "gw")
        took = pair.wait_active(gw2, timeout=15)
        answered = demo.dhcp(g2, directory)  # a new visitor, after the takeover
        first_lease = time.monotonic() - failed
        assert answered.ok, answered.detail
        print(f"\nfailover: gw2 held the guest address {took:.2f} s after gw died; "
              f"a new guest's lease {first_lease:.2f} s after")  # fmt: skip

        files = ["-lf", str(directory / "guest1.leases"), "-pf", str(directory / "g1.pid")]
        renewed = g1.run("dhclient", "-v", "-1", *files, "eth0", check=False, timeout=60)
        said = renewed.stdout + renewed.stderr
        assert f"DHCPACK of {ip} from 192.168.1.1" in said, said[-600:]
        after = _bound(pg)
        assert all(after.get(a) == m for a, m in before.items()), (before, after)  # 0 lost
        assert len(after) == 2, after
        kinds = [(e.kind, e.ip) for e in leases.events_since(pg, 0, 10000)]
        assert kinds[-1] == ("renewed", ip), kinds  # answered from her lease in the store
        again = SessionStore(pg).lookup_ip(ip, time.time())
        assert again is not None and again.id == session.id  # still logged in

        deadline = time.monotonic() + 20  # her ARP entry moves to gw2's MAC (GARP)
        while True:
            out = demo.send_mail(g1, Path(info.maildir), "alice@home.example", "after")
            if out.ok or time.monotonic() > deadline:
                break
            time.sleep(1)
        assert out.ok, out.detail
        time.sleep(2.5)
        served = _stats(directory, "gw2")["counts"]
        assert served.get("ack", 0) >= 2, served  # gw2 answered both
    finally:
        pg.close()


def test_a_box_whose_roles_died_gives_the_guest_address_up(
    lab_site: Callable[..., tuple[Topology, Path]],
) -> None:
    # kill -9 of gw's DHCP role alone: the supervisor stops gw's other roles, keepalived
    # lives on; its check of the roles fails, so it gives the address up to gw2
    topo, directory = lab_site(guests=1, ha=True)
    site.start(topo, directory)
    gw, gw2 = topo["gw"], topo["gw2"]
    assert pair.holds_guest_address(gw)
    # first, the pair's tables are shared ([policies] shared): an edit on gw is on gw2
    access = directory / "access.toml"
    access.write_text(
        access.read_text() + '\n[[rules]]\nname = "night-shift"\n'
        'match = { shift = "night" }\nallow = ["http"]\n'
    )
    theirs = directory / "tables-gw2" / "access.toml"
    deadline = time.monotonic() + 10
    while "night-shift" not in theirs.read_text():
        assert time.monotonic() < deadline, "gw2 did not take gw's edit of access.toml"
        time.sleep(0.2)
    pid = int((directory / "state" / "run" / "dhcp.pid").read_text())
    killed = time.monotonic()
    os.kill(pid, signal.SIGKILL)
    took = pair.wait_active(gw2, timeout=15)
    assert not pair.holds_guest_address(gw)
    got = demo.dhcp(topo["guest1"], directory)
    assert got.ok, got.detail
    print(f"\nroles died on gw: gw2 held the guest address {took:.2f} s later, "
          f"a lease {time.monotonic() - killed:.2f} s after the kill")  # fmt: skip
