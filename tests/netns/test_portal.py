"""The portal for real: `appliance run portal` in the gw namespace, curl and Chromium in a guest.

The guest gets its address by hand plus a lease row (the DHCP server is another
part); the portal finds its MAC in the kernel's neighbour table and checks it
against that lease.  Until the nftables redirect lands, "any http URL" is sent
to the appliance with curl's --connect-to (Chromium: --host-resolver-rules), so
the portal sees the original Host exactly as it will behind the redirect.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from portal_conf import add_user, apply_ruleset, load, write_config

from appliance import store
from appliance.config import CAPTIVE_API_PATH, Config
from appliance.lab.topology import Node, Topology, guest_mac
from appliance.portal import gates
from appliance.sessions import SessionStore
from dhcp import leases
from dhcp.leases import Lease

pytestmark = pytest.mark.netns
ROOT = Path(__file__).resolve().parents[2]
GUEST_IP = "192.168.1.100"
PORTAL = "http://192.168.1.1"


@dataclass
class Site:
    topo: Topology
    cfg: Config
    cfg_path: Path
    guest: Node
    tmp: Path

    def curl(self, *args: str, jar: bool = True) -> tuple[int, dict[str, str], str]:
        """curl from the guest; returns status, headers (lower-case names), body."""
        extra = ["-b", str(self.tmp / "jar"), "-c", str(self.tmp / "jar")] if jar else []
        out = self.guest.run("curl", "-sS", "-m", "10", "-D", "-", *extra, *args, check=True).stdout
        head, _, body = out.partition("\n\n")
        lines = head.split("\n")
        status = int(lines[0].split()[1])
        headers = {}
        for line in lines[1:]:
            k, _, v = line.partition(":")
            headers[k.strip().lower()] = v.strip()
        return status, headers, body

    def sessions(self) -> SessionStore:
        return SessionStore(store.connect(self.cfg.state.database))

    def login(self, user: str, password: str, url: str = "") -> tuple[int, dict[str, str], str]:
        _, _, page = self.curl(f"{PORTAL}/login")
        token = re.search(r'name="csrf" value="([0-9a-f]+)"', page)
        assert token, page
        return self.curl(
            f"{PORTAL}/login",
            "--data-urlencode",
            f"csrf={token.group(1)}",
            "--data-urlencode",
            f"user={user}",
            "--data-urlencode",
            f"password={password}",
            "--data-urlencode",
            f"url={url}",
            "--data-urlencode",
            "agent=",
        )


def start_site(topo: Topology, tmp_path: Path, extra: str = "", wait: int = 80) -> Site:
    cfg_path = write_config(tmp_path / "etc", extra=extra)
    cfg = load(cfg_path)
    add_user(cfg, "alice", "correct horse", department="Sales 1")
    guest = topo["guest1"]
    guest.run("ip", "addr", "add", f"{GUEST_IP}/24", "dev", "eth0")
    conn = store.connect(cfg.state.database)
    leases.create_schema(conn)
    leases.record(conn, "granted", Lease(GUEST_IP, guest_mac(1), time.time() + 600), time.time())
    gw = topo["gw"]
    if gates.firewall_available():
        apply_ruleset(gw, cfg_path)
    gw.start(
        sys.executable,
        "-m",
        "appliance",
        "--log-level",
        "debug",
        "run",
        "--config",
        str(cfg_path),
        "portal",
        name="portal",
    )
    for port in {wait, 80}:  # the HTTPS listener starts first; port 80 too must be up
        gw.wait_port(port, "192.168.1.1")
    return Site(topo, cfg, cfg_path, guest, tmp_path)


@pytest.fixture
def site(make_topology: Callable[..., Topology], tmp_path: Path) -> Iterator[Site]:
    yield start_site(make_topology(guests=1), tmp_path)


def firewall_members(site: Site) -> set[tuple[str, str]]:
    out = site.topo["gw"].run("nft", "-j", "list", "set", "inet", "appliance", "authenticated")
    return {(str(e[0]), str(e[1])) for e in re.findall(r'"([\d.]+)", "([0-9a-f:]+)"', out.stdout)}


def test_captive_redirect_login_status_logout_and_lease_release(site: Site) -> None:
    # the portal listens on the guest address only
    out = site.topo["gw"].run("ss", "-Htln").stdout
    assert [line.split()[3] for line in out.splitlines()] == ["192.168.1.1:80"]
    any_host = ["--connect-to", "www.example.com:80:192.168.1.1:80"]
    # a browser is sent to the portal with its URL kept; other clients get 511
    status, headers, _ = site.curl(
        *any_host, "-H", "Accept: text/html", "http://www.example.com/news?id=7"
    )
    assert status == 302 and "location" in headers, headers
    assert headers["location"] == (
        f"{PORTAL}/login?url=http%3A%2F%2Fwww.example.com%2Fnews%3Fid%3D7"
    )
    status, headers, body = site.curl(*any_host, "http://www.example.com/api/v1")
    assert status == 511 and "login" in body.lower()
    status, _, _ = site.curl(
        "--connect-to",
        "connectivitycheck.gstatic.com:80:192.168.1.1:80",
        "http://connectivitycheck.gstatic.com/generate_204",
    )
    assert status == 302  # Android's probe sees the portal
    _, headers, body = site.curl(f"{PORTAL}{CAPTIVE_API_PATH}")
    assert headers["content-type"] == "application/captive+json"
    assert '"captive": true' in body

    # a wrong password: refused with a message, no session
    status, _, body = site.login("alice", "not the password")
    assert status == 401 and "Wrong user ID or password." in body
    assert site.sessions().list() == []

    status, headers, _ = site.login("alice", "correct horse", url="http://www.example.com/news")
    assert status == 303 and headers["location"] == "http://www.example.com/news"
    sess = site.sessions().lookup_ip(GUEST_IP)
    assert sess is not None and sess.user == "alice" and sess.mac == guest_mac(1)
    status, _, body = site.curl(f"{PORTAL}/status")
    assert status == 200 and 'id="who">alice<' in body
    # the OS probe now gets its normal answer, and the API says "not captive"
    status, _, _ = site.curl(
        "--connect-to",
        "connectivitycheck.gstatic.com:80:192.168.1.1:80",
        "http://connectivitycheck.gstatic.com/generate_204",
    )
    assert status == 204
    _, _, body = site.curl(f"{PORTAL}{CAPTIVE_API_PATH}")
    assert '"captive": false' in body and '"seconds-remaining": 1' in body
    # the admin sees it
    out = subprocess.run(
        [sys.executable, "-m", "appliance", "sessions", "list", "--config", str(site.cfg_path)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "alice" in out and GUEST_IP in out

    token = re.search(r'name="csrf" value="([0-9a-f]+)"', body) or re.search(
        r'name="csrf" value="([0-9a-f]+)"', site.curl(f"{PORTAL}/status")[2]
    )
    assert token
    status, _, body = site.curl(f"{PORTAL}/logout", "--data-urlencode", f"csrf={token.group(1)}")
    assert status == 200 and "logged out" in body
    assert site.sessions().lookup_ip(GUEST_IP) is None
    assert site.curl(f"{PORTAL}/status")[0] == 302

    # log in again; then the lease is released: the follower ends the session
    status, _, _ = site.login("alice", "correct horse")
    assert status == 303
    st = site.sessions()
    sess = st.lookup_ip(GUEST_IP)
    assert sess is not None
    leases.record(st.conn, "released", Lease(GUEST_IP, guest_mac(1), 0), time.time())
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        s = st.get(sess.id)
        if s is not None and not s.active:
            break
        time.sleep(0.2)
    ended = st.get(sess.id)
    assert ended is not None and ended.end_reason == "lease released"


@pytest.mark.skipif(
    not gates.firewall_available(),
    reason="appliance.net.firewall is built in parallel (issue: net); not in this build yet",
)
def test_login_adds_ip_and_mac_to_the_nftables_set_and_logout_removes_it(site: Site) -> None:
    # start_site applied the ruleset in gw
    site.guest.run("ip", "route", "add", "default", "via", "192.168.1.1")
    assert (GUEST_IP, guest_mac(1)) not in firewall_members(site)
    # through the real redirect this time: any host on port 80 reaches the portal
    status, headers, _ = site.curl("-H", "Accept: text/html", "http://203.0.113.80/")
    assert status == 302 and "/login?url=" in headers["location"]
    assert site.login("alice", "correct horse")[0] == 303
    assert (GUEST_IP, guest_mac(1)) in firewall_members(site)
    token = re.search(r'name="csrf" value="([0-9a-f]+)"', site.curl(f"{PORTAL}/status")[2])
    assert token
    site.curl(f"{PORTAL}/logout", "--data-urlencode", f"csrf={token.group(1)}")
    assert (GUEST_IP, guest_mac(1)) not in firewall_members(site)


def test_a_session_leaves_the_firewall_when_its_time_runs_out(site: Site) -> None:
    if not gates.firewall_available():
        pytest.skip("needs nft")
    status, _, _ = site.login("alice", "correct horse")
    assert status == 303
    assert (GUEST_IP, guest_mac(1)) in firewall_members(site)
    # the clock of this session runs out 3 s from now (as session_idle would, but the
    # shortest allowed is a minute): the portal ends it then, not at its next round
    due = time.time() + 3.0
    site.sessions().conn.execute(
        "UPDATE sessions SET idle_expiry = ? WHERE ended IS NULL AND ip = ?", (due, GUEST_IP)
    )
    while (GUEST_IP, guest_mac(1)) in firewall_members(site) and time.time() < due + 5:
        time.sleep(0.02)
    gone = time.time()
    assert due <= gone < due + 0.5, gone - due
    assert site.sessions().lookup_ip(GUEST_IP) is None
    status, headers, _ = site.curl(f"{PORTAL}/status")
    assert status == 302 and headers["location"].endswith("/login")


@pytest.mark.skipif(
    not (shutil.which("chromium") and shutil.which("chromedriver")),
    reason="needs Debian chromium and chromium-driver",
)
def test_a_real_browser_logs_in_and_lands_on_the_original_url(site: Site, artifacts: Path) -> None:
    from chromium import chromium
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    from appliance.lab.topology import NetnsSwitch

    original = "http://www.example.test/welcome?from=browser"
    # chromedriver and Chromium are started from inside the guest's namespace, so every
    # packet the browser sends comes from the guest (and its MAC).
    with NetnsSwitch(site.guest.netns):
        driver = chromium(
            str(site.tmp / "chromium"),
            "480,900",
            "--host-resolver-rules=MAP www.example.test 192.168.1.1",
            "--lang=en-US",
        )
        try:
            driver.set_page_load_timeout(20)
            driver.get(original)
            assert driver.current_url.startswith(f"{PORTAL}/login?url=")
            driver.find_element(By.ID, "user").send_keys("alice")
            driver.find_element(By.ID, "password").send_keys("correct horse")
            driver.save_screenshot(str(artifacts / "portal-login.png"))
            driver.find_element(By.ID, "login").click()
            WebDriverWait(driver, 20).until(lambda d: d.current_url == original)
            driver.get(f"{PORTAL}/status")
            assert driver.find_element(By.ID, "who").text == "alice"
            driver.save_screenshot(str(artifacts / "portal-status.png"))
            driver.find_element(By.ID, "logout").click()
            # click() returns once the event is dispatched, not when the POST's answer is shown.
            WebDriverWait(driver, 20).until(lambda d: "logged out" in d.page_source)
            assert (GUEST_IP, guest_mac(1)) not in firewall_members(site)
        finally:
            driver.quit()
    shots = ROOT / "docs" / "screenshots"
    shots.mkdir(parents=True, exist_ok=True)
    for name in ("portal-login.png", "portal-status.png"):
        assert (artifacts / name).stat().st_size > 5000
        shutil.copyfile(artifacts / name, shots / name)


def self_signed(directory: Path, name: str) -> tuple[Path, Path]:
    """The portal's certificate for `name` and 192.168.1.1, made as the agent makes its own."""
    from appliance.agent.tlscert import ensure_certificate

    directory.mkdir(parents=True, exist_ok=True)
    cert_path, key_path = directory / "portal.crt", directory / "portal.key"
    ensure_certificate(cert_path, key_path, (name, "192.168.1.1"))
    return cert_path, key_path


def test_https_portal_with_a_certificate(
    make_topology: Callable[..., Topology], tmp_path: Path
) -> None:
    cert, key = self_signed(tmp_path / "etc", "portal.guest.example")
    site = start_site(
        make_topology(guests=1),
        tmp_path,
        extra=f'https_port = 8443\ntls_certificate = "{cert}"\ntls_key = "{key}"',
        wait=8443,
    )
    base = "https://portal.guest.example:8443"
    tls = ["--cacert", str(cert), "--resolve", "portal.guest.example:8443:192.168.1.1"]
    # captive traffic and the plain listener point at the HTTPS portal
    status, headers, _ = site.curl(
        "--connect-to",
        "www.example.com:80:192.168.1.1:80",
        "-H",
        "Accept: text/html",
        "http://www.example.com/",
    )
    assert status == 302
    assert headers["location"] == f"{base}/login?url=http%3A%2F%2Fwww.example.com%2F"
    status, headers, _ = site.curl(f"{PORTAL}/login")
    assert status == 302 and headers["location"] == f"{base}/login"
    # the RFC 8908 API and the login over TLS (curl checks the certificate)
    status, headers, body = site.curl(*tls, f"{base}{CAPTIVE_API_PATH}")
    assert status == 200 and headers["content-type"] == "application/captive+json"
    assert '"captive": true' in body
    status, headers, page = site.curl(*tls, f"{base}/login")
    assert "Secure" in headers["set-cookie"] and "HttpOnly" in headers["set-cookie"]
    token = re.search(r'name="csrf" value="([0-9a-f]+)"', page)
    assert token
    status, headers, _ = site.curl(
        *tls,
        f"{base}/login",
        "--data-urlencode",
        f"csrf={token.group(1)}",
        "--data-urlencode",
        "user=alice",
        "--data-urlencode",
        "password=correct horse",
    )
    assert status == 303
    _, _, body = site.curl(*tls, f"{base}{CAPTIVE_API_PATH}")
    assert '"captive": false' in body
    out = site.topo["gw"].run("ss", "-Htln").stdout
    assert sorted(line.split()[3] for line in out.splitlines()) == [
        "192.168.1.1:80",
        "192.168.1.1:8443",
    ]
