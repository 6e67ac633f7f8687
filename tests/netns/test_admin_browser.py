"""A real browser on an admin's machine (the segment) drives the admin pages of the appliance.

The admin role runs in `gw` (`appliance run admin`, waitress on 198.51.100.1:8000, the
management address); Chromium runs in `seg`.  Log in, toggle a cell, save, see the
audit entry; the screenshot lands in tests/artifacts/ and docs/screenshots/admin.png.
"""

from __future__ import annotations

import json
import shutil
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from appliance.core.config import load
from appliance.core.passwords import hash_password
from appliance.lab.topology import Topology
from appliance.policy import Policy

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


def guest_cannot_reach(topo: Topology) -> bool:
    """A guest with an address set by hand still cannot open the admin pages."""
    g = topo["guest1"]
    g.run("ip", "addr", "add", "192.168.1.201/24", "dev", "eth0")
    for url in ("http://198.51.100.1:8000/login", "http://192.168.1.1:8000/login"):
        r = g.run("curl", "-sS", "-m", "2", "-o", "/dev/null", url, check=False)
        if r.returncode == 0:
            return False
    return True
