"""A real browser on an admin's machine (the segment) drives the admin pages of the appliance.

The admin role runs in `gw` (`appliance run admin`, waitress on 198.51.100.1:8000, the
management address); Chromium runs in `seg`.  Log in, toggle a cell, save, see the
audit entry; the screenshot lands in tests/artifacts/ and docs/screenshots/admin.png.
Then the usage page: the demo's users (carol on the site, alice and bob through their
agents) moved bytes through a real relay on loopback, whose accounting wrote them to
the site's store; the browser must show each one's bytes per service.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import socket
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from appliance.core.config import load
from appliance.core.passwords import hash_password
from appliance.lab.topology import Topology
from appliance.policy import Policy
from appliance.proxy.accounting import UsageRecorder
from appliance.proxy.gate import StaticGate
from appliance.proxy.relay import Relay

pytestmark = pytest.mark.netns
ROOT = Path(__file__).resolve().parents[2]
PASSWORD = "a browser admin password"


def test_admin_edits_a_cell_in_a_real_browser(
    make_topology: Callable[..., Topology], tmp_path: Path, artifacts: Path
) -> None:
    if not (shutil.which("chromium") and shutil.which("chromedriver")):
        pytest.skip("chromium and chromedriver are not installed")
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
    assert Policy.load(config).decide({"department": "Sales 1"}, "smtp").allowed

    relayed = relay_the_demo_users(config.state.database)

    topo = make_topology(guests=1)
    gw, seg = topo["gw"], topo["seg"]
    admin = gw.start(
        sys.executable, "-m", "appliance", "run", "--config", str(cfg_path), "admin", name="admin"
    )
    gw.wait_port(8000, "198.51.100.1")
    # listening on the management address only: nothing on the guest side
    listening = gw.run("ss", "-Htln").stdout
    assert "198.51.100.1:8000" in listening and "0.0.0.0:8000" not in listening
    assert guest_cannot_reach(topo)

    shot = artifacts / "admin-audit.png"
    profile = tmp_path / "chromium-profile"
    result = seg.run(
        sys.executable,
        str(Path(__file__).with_name("admin_browser.py")),
        "http://198.51.100.1:8000",
        "alice",
        "-",
        str(shot),
        str(profile),
        input=PASSWORD + "\n",
        timeout=120,
    )
    seen = json.loads(result.stdout.strip().splitlines()[-1])
    assert seen["redirected_to_login"], seen
    assert seen["after_login"].endswith("/access"), seen
    assert seen["cell_before"] == "allow" and seen["cell_after"] == "deny", seen
    assert seen["saved_banner"], seen
    assert "alice" in seen["audit"] and "edit access rights" in seen["audit"], seen
    assert '+deny = ["smtp"]' in seen["audit"], seen
    shown = {(u["user"], u["service"]): (u["up"], u["down"]) for u in seen["usage"]}
    assert shown == relayed, seen["usage"]
    assert seen["plots"].keys() == {user for user, _ in relayed}, seen["plots"]
    assert all(max(bars) > 40 for bars in seen["plots"].values()), seen["plots"]  # today's bar

    # the file on disk is what the browser saved
    d = Policy.load(config).decide({"department": "Sales 1"}, "smtp")
    assert not d.allowed and d.rule == "sales"
    assert (site / "access.toml.bak").exists()
    assert admin.alive()
    assert "admin: alice logged in" in admin.output()
    # `appliance reload` finds the running role by its pid file; the admin role survives it
    r = gw.run(sys.executable, "-m", "appliance", "reload", "--config", str(cfg_path))
    assert "sent SIGHUP to admin" in r.stdout
    assert admin.alive()
    assert PASSWORD not in admin.output()
    docs = ROOT / "docs" / "screenshots"
    docs.mkdir(parents=True, exist_ok=True)
    shutil.copy(shot.with_name("admin-audit-grid.png"), docs / "admin.png")
    shutil.copy(shot, docs / "admin-audit.png")
    shutil.copy(shot.with_name("admin-audit-usage.png"), docs / "admin-usage.png")


# the demo's users (appliance/lab/site.py), each from a loopback address of its own
DEMO_USERS = {
    "127.0.0.1": "carol",
    "127.0.0.2": "alice@home.example",
    "127.0.0.3": "bob@home.example",
}
SENT = {"carol": (3, 2000), "alice@home.example": (2, 70_000), "bob@home.example": (1, 500)}


def relay_the_demo_users(database: Path) -> dict[tuple[str, str], tuple[int, int]]:
    """Connections of the demo's users through a relay with accounting on (loopback only);
    what each (user, service) moved up and down, as the relay counted it."""

    class Upper(asyncio.Protocol):
        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            self.t = transport
            transport.write(b"+OK ready\r\n")  # type: ignore[attr-defined]

        def data_received(self, data: bytes) -> None:
            self.t.write(data.upper())  # type: ignore[attr-defined]

        def eof_received(self) -> bool:
            self.t.close()
            return False

    def port() -> int:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            return int(s.getsockname()[1])

    up_port, pop_port, smtp_port = port(), port(), port()
    table = {
        "portal_url": "http://192.168.1.1/",
        "listeners": [
            {"service": "pop3", "protocol": "pop3", "port": pop_port},
            {"service": "smtp", "protocol": "smtp", "port": smtp_port},
        ],
        "servers": {"pop3": [f"127.0.0.1:{up_port}"], "smtp": [f"127.0.0.1:{up_port}"]},
        "users": {ip: {"user": u, "allow": ["pop3", "smtp"]} for ip, u in DEMO_USERS.items()},
    }
    moved: dict[tuple[str, str], tuple[int, int]] = {}

    async def body() -> None:
        loop = asyncio.get_running_loop()
        upstream = await loop.create_server(Upper, "127.0.0.1", up_port)
        relay = Relay(StaticGate(table), usage=UsageRecorder.at(database))
        await relay.start("127.0.0.1", StaticGate(table).listeners())
        for ip, user in DEMO_USERS.items():
            count, size = SENT[user]
            for service, where in (("pop3", pop_port), ("smtp", smtp_port)):
                if user.startswith("bob") and service == "smtp":
                    continue  # bob only fetches
                for _ in range(count):
                    r, w = await asyncio.open_connection("127.0.0.1", where, local_addr=(ip, 0))
                    w.write(b"x" * size)
                    w.write_eof()
                    got = await asyncio.wait_for(r.read(), 10)
                    w.close()
                    up, down = moved.get((user, service), (0, 0))
                    moved[(user, service)] = (up + size, down + len(got))
        await asyncio.sleep(0.2)
        await relay.stop()  # flushes the accounting
        upstream.close()

    asyncio.run(body())
    return moved


def guest_cannot_reach(topo: Topology) -> bool:
    """A guest with an address set by hand still cannot open the admin pages."""
    g = topo["guest1"]
    g.run("ip", "addr", "add", "192.168.1.201/24", "dev", "eth0")
    for url in ("http://198.51.100.1:8000/login", "http://192.168.1.1:8000/login"):
        r = g.run("curl", "-sS", "-m", "2", "-o", "/dev/null", url, check=False)
        if r.returncode == 0:
            return False
    return True
