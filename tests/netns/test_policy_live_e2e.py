"""An admin edit applies live: it closes an open SMTP connection it no longer allows.

Whole chain, real processes: `appliance run proxy` and `appliance run admin` in gw,
postfix on the segment, guests with sessions in the shared store; an admin on the
segment takes SMTP away from "Sales 1" in the admin pages.  The save signals the
proxy role (pid file), the proxy reloads the policy and closes Sales' open SMTP
connection within 1 s; the next one is refused in SMTP words (554 to MAIL); staff
keep theirs.
An invalid edit first: refused, and nothing changes.

It needs the relay (appliance.proxy), the session store (appliance.state.sessions) and the
lab's real servers (appliance.lab.servers): it skips in a build without them.
"""

from __future__ import annotations

import re
import select
import shutil
import socket
import sys
import time
from collections.abc import Callable
from html.parser import HTMLParser
from pathlib import Path

import pytest
import requests

from appliance.core.config import load
from appliance.core.passwords import hash_password
from appliance.lab import servers
from appliance.lab.topology import NetnsSwitch, Topology, guest_mac
from appliance.net.firewall import revoker
from appliance.state import leases, schema, sessions, store

pytestmark = pytest.mark.netns
ROOT = Path(__file__).resolve().parents[2]
PASSWORD = "an admin password"
SALES_IP, STAFF_IP = "192.168.1.100", "192.168.1.101"


class GridForm(HTMLParser):
    """The fields the grid form posts (inputs and selected options)."""

    def __init__(self) -> None:
        super().__init__()
        self.fields: dict[str, str] = {}
        self._select: str | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = {k: v or "" for k, v in attrs}
        if tag == "input" and "name" in a and a.get("type") != "checkbox":
            self.fields[a["name"]] = a.get("value", "")
        elif tag == "select":
            self._select = a["name"]
            self.fields[a["name"]] = ""
        elif tag == "option" and self._select and "selected" in a:
            self.fields[self._select] = a.get("value", "")

    def handle_endtag(self, tag: str) -> None:
        if tag == "select":
            self._select = None


def smtp_line(sock: socket.socket, timeout: float = 5.0) -> bytes:
    sock.settimeout(timeout)
    data = b""
    while not data.endswith(b"\r\n"):
        chunk = sock.recv(4096)
        if not chunk:
            break
        data += chunk
    return data


def closed_within(sock: socket.socket, seconds: float) -> float | None:
    """Seconds until the peer closed (EOF or reset), None if still open after `seconds`."""
    start = time.monotonic()
    while (left := seconds - (time.monotonic() - start)) > 0:
        ready, _, _ = select.select([sock], [], [], left)
        if ready:
            try:
                if sock.recv(4096) == b"":
                    return time.monotonic() - start
            except OSError:
                return time.monotonic() - start
    return None


def test_admin_edit_closes_a_denied_smtp_connection_within_1s(
    make_topology: Callable[..., Topology], tmp_path: Path
) -> None:
    site = tmp_path / "site"
    site.mkdir()
    for name in ("appliance.toml", "servers.toml", "access.toml"):
        shutil.copy(ROOT / "policies" / name, site / name)
    cfg_path = site / "appliance.toml"
    cfg_path.write_text(cfg_path.read_text().replace("/var/lib/appliance", str(site / "state")))
    (site / "admins.toml").write_text(
        f'[admins.alice]\npassword_hash = "{hash_password(PASSWORD)}"\n'
    )
    config = load(cfg_path)

    topo = make_topology(guests=2)
    gw, seg = topo["gw"], topo["seg"]
    g_sales, g_staff = topo["guest1"], topo["guest2"]
    servers.guest_address(g_sales, SALES_IP)
    servers.guest_address(g_staff, STAFF_IP)
    servers.install_redirects(gw, {25: 2525})

    # leases and sessions in the shared store, as DHCP and the portal would leave them
    conn = store.connect(config.state.database)
    schema.upgrade(conn)
    now = time.time()
    for n, ip in ((1, SALES_IP), (2, STAFF_IP)):
        leases.record(conn, "granted", leases.Lease(ip, guest_mac(n), now + 3600), now)
    st = sessions.SessionStore.from_config(config, revoke=revoker(config))
    st.create(
        user="dave",
        source="site",
        attributes={"department": "Sales 1"},
        ip=SALES_IP,
        mac=guest_mac(1),
    )
    st.create(
        user="erin", source="site", attributes={"role": "staff"}, ip=STAFF_IP, mac=guest_mac(2)
    )

    smtp = servers.start_smtp(seg)
    try:
        appliance = [sys.executable, "-m", "appliance", "run", "--config", str(cfg_path)]
        gw.start(*appliance, "proxy", name="proxy")
        admin = gw.start(*appliance, "admin", name="admin")
        gw.wait_port(2525, "192.168.1.1")
        gw.wait_port(8000, "198.51.100.1")

        sales = g_sales.connect("10.9.8.7", 25)
        staff = g_staff.connect("10.9.8.7", 25)
        assert smtp_line(sales).startswith(b"220"), "dave's SMTP greeting"
        assert smtp_line(staff).startswith(b"220"), "erin's SMTP greeting"

        base = "http://198.51.100.1:8000"
        with NetnsSwitch(seg.netns), requests.Session() as web:  # the admin's machine
            page = web.get(f"{base}/login", timeout=10).text
            csrf = re.search(r'name="csrf" value="([^"]+)"', page)
            assert csrf
            r = web.post(
                f"{base}/login",
                data={"csrf": csrf.group(1), "name": "alice", "password": PASSWORD},
                timeout=10,
            )
            assert r.url.endswith("/access"), r.text

            def grid() -> dict[str, str]:
                p = GridForm()
                p.feed(web.get(f"{base}/access", timeout=10).text)
                return p.fields

            # an invalid edit: refused, nothing changes, nobody is cut off
            fields = grid()
            assert fields["name-1"] == "sales" and fields["cell-1-smtp"] == "allow"
            bad = {**fields, "cell-1-smtp": "deny", "pattern-1": "department=Sales[1"}
            r = web.post(f"{base}/access", data=bad, timeout=10)
            assert r.status_code == 400 and "unparsable pattern" in r.text
            sales.sendall(b"NOOP\r\n")
            assert smtp_line(sales).startswith(b"250")

            # the real edit: Sales 1 loses SMTP
            fields = grid()
            fields["cell-1-smtp"] = "deny"
            t0 = time.monotonic()
            r = web.post(f"{base}/access", data=fields, timeout=10)
            saved = time.monotonic() - t0
            assert r.status_code == 200 and 'id="saved"' in r.text
            took = closed_within(sales, 1.0)
        assert took is not None, "dave's SMTP connection stayed open after the edit"

        # staff still have theirs; Sales' next connection is refused in SMTP words
        staff.sendall(b"NOOP\r\n")
        assert smtp_line(staff).startswith(b"250")
        again = g_sales.connect("10.9.8.7", 25)
        assert smtp_line(again).startswith(b"220")  # a refusing greeting, then:
        again.sendall(b"MAIL FROM:<dave@example.net>\r\n")
        refusal = smtp_line(again)
        assert refusal.startswith(b"554 5.7.1") and b"sales" in refusal, refusal
        assert b"198.51.100." not in refusal
        for s in (sales, staff, again):
            s.close()
        from appliance.admin import audit

        assert any(e.admin == "alice" and "access rights" in e.action for e in audit.tail(config))
        assert admin.alive()
        print(f"save took {saved * 1000:.0f} ms; SMTP closed {took * 1000:.0f} ms after it")
    finally:
        smtp.stop()
