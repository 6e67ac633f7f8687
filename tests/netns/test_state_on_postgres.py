"""Issue 18, first slice: the whole appliance with its shared store on a real PostgreSQL.

The lab site (every role under the supervisor) with `[state] backend = "postgresql"`
on the segment's PostgreSQL 15 at 198.51.100.6 (`lab up --state postgresql`): the
appliance logs in over TCP with scram-sha-256, its password in a passfile, and no
other host may.  A visitor gets an address from dhclient, logs in through her
personal agent, sends a mail and reads her home mail; the store the roles wrote is
PostgreSQL's (her lease, her session, its events, her usage by service).  Then the
appliance is stopped (every role) and started again: her address is renewed from the
lease in PostgreSQL, her session is still on and her mail still goes out.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import pytest

from appliance.lab import demo, site
from appliance.lab.commands import appliance_cmd
from appliance.lab.topology import NetnsSwitch, Topology
from appliance.state import leases, postgres, usage
from appliance.state.sessions import SessionStore

pytestmark = pytest.mark.netns


def test_a_visitor_is_served_from_postgresql_and_kept_across_a_restart(
    lab_site: Callable[..., tuple[Topology, Path]],
) -> None:
    topo, directory = lab_site()
    info = site.start(topo, directory, postgres=True)
    assert "password" not in info.state_dsn and "198.51.100.6" in info.state_dsn
    g1 = topo["guest1"]
    user, password, _ = site.HOME_USER
    for step in (
        lambda: demo.dhcp(g1, directory),
        lambda: demo.login(g1, user, password, info.agent_spec),
        lambda: demo.send_mail(g1, Path(info.maildir), "alice@home.example", "on postgres"),
        lambda: demo.fetch_mail(g1, user, password),
    ):
        got = step()
        assert got.ok, got.detail

    with NetnsSwitch(topo["seg"].netns), pytest.raises(postgres.Error, match="pg_hba"):
        postgres.connect(info.state_dsn)  # any other host of the segment, password and all
    with NetnsSwitch(topo["gw"].netns):  # as the appliance: only its address may log in
        pg = postgres.connect(info.state_dsn)
    try:
        now = time.time()
        bound = [x for x in leases.all_leases(pg) if x.state == "bound" and x.expires > now]
        assert len(bound) == 1, bound
        ip = bound[0].ip
        st = SessionStore(pg)
        session = st.lookup_ip(ip, now)
        assert session is not None and session.user.startswith(f"{user}@"), session
        assert [e.kind for e in st.events_after(0) if e.session_id == session.id] == ["started"]
        deadline = time.monotonic() + 20  # the proxy's workers flush usage every few seconds
        services: set[str] = set()
        while time.monotonic() < deadline and not {"smtp", "pop3"} <= services:
            today = usage.day_of()
            services = {u.service for u in usage.by_user_service(pg, today, today)}
            time.sleep(0.5)
        assert {"smtp", "pop3"} <= services, services

        # every role stops and starts again: nothing of the visitor was in their memory
        appliance = next(p for p in topo.processes if p.name == "appliance")
        assert appliance.stop(timeout=20) is not None
        topo["gw"].start(*appliance_cmd("run", "--config", info.config), name="appliance")
        topo["gw"].wait_port(67, "0.0.0.0", timeout=60, proto="udp")
        topo["gw"].wait_port(80, "192.168.1.1", timeout=60)
        files = [
            "-lf",
            str(directory / "guest1.leases"),
            "-pf",
            str(directory / "guest1.dhclient.pid"),
        ]
        renewed = g1.run("dhclient", "-v", "-1", *files, "eth0", check=False, timeout=60)
        assert renewed.returncode == 0, renewed.stderr[-500:]
        said = renewed.stdout + renewed.stderr
        assert f"DHCPACK of {ip} from 192.168.1.1" in said, said[-500:]  # answered, not kept
        last = leases.events_since(pg, 0, 10000)[-1]
        assert (last.kind, last.ip) == ("renewed", ip), last  # from the lease in PostgreSQL
        assert f"inet {ip}/24" in g1.run("ip", "-4", "addr").stdout  # the same address
        again = st.lookup_ip(ip, time.time())
        assert again is not None and again.id == session.id  # still logged in
        deadline = time.monotonic() + 30  # the net role rebuilds the firewall from the store
        while True:
            out = demo.send_mail(g1, Path(info.maildir), "alice@home.example", "after restart")
            if out.ok or time.monotonic() > deadline:
                break
            time.sleep(1)
        assert out.ok, out.detail
    finally:
        pg.close()
