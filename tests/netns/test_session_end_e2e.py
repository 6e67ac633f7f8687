"""Ending a session closes its open relayed connections within 1 s, from another process.

Real processes: `appliance run proxy` in gw, postfix on the segment, two logged-in
guests (sessions and leases in the shared store) each holding an SMTP connection
through the relay.  `appliance sessions end ID` (a separate process, as an admin
would type it) ends dave's session: the proxy's follower sees it in the store and
closes dave's connection within 1 s with the access-log result `session-ended`;
erin's connection keeps working.
"""

from __future__ import annotations

import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from test_policy_live_e2e import closed_within, smtp_line

from appliance.core.config import load
from appliance.lab import servers
from appliance.lab.topology import Topology, guest_mac
from appliance.net.firewall import revoker
from appliance.state import leases, schema, sessions, store, usage

pytestmark = pytest.mark.netns
ROOT = Path(__file__).resolve().parents[2]
DAVE_IP, ERIN_IP = "192.168.1.100", "192.168.1.101"


def test_sessions_end_closes_that_guests_smtp_connection_within_1s(
    make_topology: Callable[..., Topology], tmp_path: Path
) -> None:
    site = tmp_path / "site"
    site.mkdir()
    for name in ("appliance.toml", "servers.toml", "access.toml"):
        shutil.copy(ROOT / "policies" / name, site / name)
    cfg_path = site / "appliance.toml"
    cfg_path.write_text(cfg_path.read_text().replace("/var/lib/appliance", str(site / "state")))
    config = load(cfg_path)

    topo = make_topology(guests=2)
    gw, seg = topo["gw"], topo["seg"]
    g_dave, g_erin = topo["guest1"], topo["guest2"]
    servers.guest_address(g_dave, DAVE_IP)
    servers.guest_address(g_erin, ERIN_IP)
    servers.install_redirects(gw, {25: 2525})

    conn = store.connect(config.state.database)
    schema.upgrade(conn)
    now = time.time()
    for n, ip in ((1, DAVE_IP), (2, ERIN_IP)):
        leases.record(conn, "granted", leases.Lease(ip, guest_mac(n), now + 3600), now)
    st = sessions.SessionStore.from_config(config, revoke=revoker(config))
    dave = st.create(
        user="dave", source="site", attributes={"role": "staff"}, ip=DAVE_IP, mac=guest_mac(1)
    )
    erin = st.create(
        user="erin", source="site", attributes={"role": "staff"}, ip=ERIN_IP, mac=guest_mac(2)
    )

    smtp = servers.start_smtp(seg)
    try:
        appliance = [sys.executable, "-m", "appliance"]
        proxy = gw.start(*appliance, "run", "--config", str(cfg_path), "proxy", name="proxy")
        gw.wait_port(2525, "192.168.1.1")

        d = g_dave.connect("10.9.8.7", 25)
        e = g_erin.connect("10.9.8.7", 25)
        assert smtp_line(d).startswith(b"220"), "dave's SMTP greeting"
        assert smtp_line(e).startswith(b"220"), "erin's SMTP greeting"
        d.sendall(b"NOOP\r\n")
        assert smtp_line(d).startswith(b"250")

        # the admin's command, its own process (in gw: it revokes dave's firewall entry)
        gw.run(*appliance, "sessions", "end", "--config", str(cfg_path), dave.id, timeout=30)
        assert closed_within(d, 5.0) is not None, "dave's connection stayed open"
        closed_at = time.time()
        ended = st.get(dave.id)
        assert ended is not None and ended.ended is not None
        took = closed_at - ended.ended  # from the store's end stamp to the guest seeing EOF
        assert took < 1.0, f"closed {took:.2f} s after the session ended"

        e.sendall(b"NOOP\r\n")
        assert smtp_line(e).startswith(b"250"), "erin's connection was closed too"
        for s in (d, e):
            s.close()
        deadline = time.monotonic() + 3
        while "result=session-ended" not in proxy.output() and time.monotonic() < deadline:
            time.sleep(0.05)
        ended = [ln for ln in proxy.output().splitlines() if "result=session-ended" in ln]
        assert len(ended) == 1 and "user=dave" in ended[0], proxy.output()[-2000:]
        assert proxy.alive()
        print(f"connection closed {took * 1000:.0f} ms after the session ended")
        # the stop flushes each worker's accounting: both sessions' SMTP bytes are in the store
        proxy.stop()
        for who in (dave, erin):
            (used,) = usage.of_session(conn, who.id)
            assert (used.user, used.service, used.connections) == (who.user, "smtp", 1)
            assert used.bytes_up == len(b"NOOP\r\n") and used.bytes_down > len(b"220 \r\n")
    finally:
        smtp.stop()
