"""The whole appliance end to end, real clients only, on one lab site.

`appliance.lab.site.start` runs everything for real (the appliance's roles under the
supervisor with its nftables ruleset, dnsmasq, postfix, squid, dovecot, nginx, the
personal agent); this module adds a second household (bob's agent and his own dovecot
at home) and walks four guests through it: dhclient for addresses, HTTP form logins
through personal agents (issue 8), the refusals a visitor can meet, an nmap scan
before and after login with the real DHCP server (issue 4), and Chromium following
the captive redirect back to the origin's page (issue 5).  One site serves the whole
module; each test uses its own guests.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import requests
from _guestside import nmap_open
from conftest import _live

from appliance.lab import demo, servers, site
from appliance.lab.topology import NetnsSwitch, Node, Topology

pytestmark = pytest.mark.netns

GW = "192.168.1.1"
PORTAL = f"http://{GW}"
BOB_AGENT = "203.0.113.2"
BOB_POP = "203.0.113.4"
DAVE_AGENT = "203.0.113.5"  # a household that has not yet allowed this appliance
DAVE = ("dave", "dave-pass", ["role=staff"])
BOB = ("bob", "bob-pass", ["department=Research", "role=manager"])
BOB_MAIL = (
    b"From: home@bob.example\r\nTo: bob@bob.example\r\nSubject: for bob only\r\n"
    b"\r\nThis one waits on bob's own POP server.\r\n"
)
APPLIANCE_PORTS = "22,25,53,80,110,443,1110,2525,3128,8000,8081"
SEGMENT_PORTS = "22,25,53,80,110,443,3128"


@dataclass
class Lab:
    topo: Topology
    directory: Path
    info: site.SiteInfo
    bob_fingerprint: str
    dave_fingerprint: str

    def appliance(self, *args: str) -> str:
        argv = [sys.executable, "-m", "appliance", *args, "--config", self.info.config]
        return subprocess.run(argv, capture_output=True, text=True, check=True).stdout

    def sessions(self) -> list[dict[str, object]]:
        out: list[dict[str, object]] = json.loads(self.appliance("sessions", "list", "--json"))
        return out

    def address(self, node: Node) -> str:
        got = demo.dhcp(node, self.directory)
        assert got.ok, got.detail
        m = re.search(r"address (192\.168\.1\.\d+)", got.detail)
        assert m, got.detail
        return m.group(1)


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    tmp = tmp_path_factory.mktemp("fullstack")
    topo = Topology.build(guests=4, workdir=tmp / "topo")
    _live.append(topo)  # removed even if the run is interrupted
    try:
        home = topo["home"]
        for addr in (BOB_AGENT, BOB_POP, DAVE_AGENT):
            home.run("ip", "addr", "add", f"{addr}/24", "dev", "eth0")
        directory = tmp / "site"
        info = site.start(topo, directory)
        pop = servers.start_pop3(home, {BOB[0]: BOB[1]}, host=BOB_POP)
        servers.add_pop_message(pop, BOB[0], BOB_MAIL)
        fp = site.add_agent(
            topo,
            directory,
            Path(info.config),
            addr=BOB_AGENT,
            user=BOB,
            pop=BOB_POP,
            name="agent-bob",
            trusted_as=None,  # bob's own household: the site does not take its word
        )
        dave_fp = site.add_agent(
            topo,
            directory,
            Path(info.config),
            addr=DAVE_AGENT,
            user=DAVE,
            pop=BOB_POP,
            name="agent-dave",
            trusted_as=None,
            allow=False,
        )
        yield Lab(topo, directory, info, fp, dave_fp)
        pop.stop()
    finally:
        topo.destroy()
        if topo in _live:
            _live.remove(topo)
        for d in site.load_info(tmp / "site").server_dirs if (tmp / "site").exists() else []:
            shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(autouse=True)
def _process_logs(request: pytest.FixtureRequest, lab: Lab) -> None:
    """A failing test's report shows every server's output (see conftest)."""
    request.node._topologies = [lab.topo]


def portal_login(node: Node, user: str, password: str, agent: str = "") -> tuple[int, str, float]:
    """The login form as a browser posts it: status, the page shown, seconds taken."""
    with NetnsSwitch(node.netns):
        s = requests.Session()
        page = s.get(f"{PORTAL}/login", timeout=10)
        token = re.search(r'name="csrf" value="([^"]+)"', page.text)
        assert token, page.text
        t0 = time.monotonic()
        r = s.post(
            f"{PORTAL}/login",
            data={"user": user, "password": password, "agent": agent, "csrf": token.group(1)},
            headers={"Accept-Language": "en"},
            timeout=20,
        )
        took = time.monotonic() - t0
        if r.history:  # a login: the page it led to
            r = s.get(f"{PORTAL}/status", timeout=10)
    return r.status_code if not r.history else 200, r.text, took


def status_page(node: Node) -> str:
    with NetnsSwitch(node.netns):
        return requests.get(f"{PORTAL}/status", timeout=10).text


def pop_subjects(node: Node, host: str, user: str, password: str) -> list[str]:
    """The mail client's home settings (host:110) from inside the guest; its subjects."""
    out = node.run(sys.executable, "-c", demo.POP_CLIENT, host, user, password, timeout=60).stdout
    return [ln for ln in out.splitlines() if ln.lower().startswith("subject:")]


def mail_store(host: str, pin: str = "") -> dict[str, str]:
    """The personal servers a lab agent names: one home mail store, four services; with
    the store's pin, POP3 goes to its 995 over TLS."""
    pop3 = f"{host}:995#{pin}" if pin else f"{host}:110"
    return {"pop3": pop3, "pop3s": f"{host}:995", "imap": f"{host}:143",
            "imaps": f"{host}:993"}  # fmt: skip


def mail_pin(lab: Lab) -> str:
    from appliance.core.agent_protocol import parse_fingerprint
    from appliance.lab.tls import fingerprint

    return parse_fingerprint(fingerprint(Path(lab.info.mail_cert)))


STAFF_SERVICES = sorted(
    ["http", "https", "imap", "imaps", "pop3", "pop3s", "smtp", "smtps", "submission"]
)


def session_for(lab: Lab, ip: str) -> dict[str, object] | None:
    return next((s for s in lab.sessions() if s["ip"] == ip), None)


def test_two_households_log_in_through_their_agents_and_read_their_own_mail(lab: Lab) -> None:
    g1, g2, g3 = lab.topo["guest1"], lab.topo["guest2"], lab.topo["guest3"]
    alice, alice_pw, _ = site.HOME_USER
    bob, bob_pw, _ = BOB
    ip1, ip2 = lab.address(g1), lab.address(g2)

    status, page, _ = portal_login(g1, alice, alice_pw, lab.info.agent_spec)
    assert status == 200 and alice in page, page
    status, page, _ = portal_login(g2, bob, bob_pw, f"{BOB_AGENT}#{lab.bob_fingerprint}")
    assert status == 200 and bob in page, page

    # each one's personal server comes from their own agent; attributes only from the one
    # the site trusts (agents.toml: alice's, for department and role): bob's agent says
    # role = manager, and the site does not take its word for it (issue 14)
    s1, s2 = session_for(lab, ip1), session_for(lab, ip2)
    alice_id, bob_id = f"{alice}@home.example", f"{bob}@{BOB_AGENT}"
    assert s1 and s1["user"] == alice_id and s1["source"] == "agent:home.example"
    assert s1["attributes"] == {
        "department": "Sales 1",
        "role": "staff",
        "source": "agent",
        "agent": "home.example",
    }
    assert s1["personal_servers"] == mail_store(servers.POP_ADDR, mail_pin(lab))
    assert s2 and s2["user"] == bob_id and s2["source"] == f"agent:{BOB_AGENT}"
    assert s2["attributes"] == {"source": "agent", "agent": BOB_AGENT}
    assert s2["personal_servers"] == mail_store(BOB_POP)
    shown = lab.appliance("sessions", "show", str(s2["id"]))  # (bob's: no pin)
    assert bob_id in shown and f"{BOB_POP}:110" in shown
    # each one's status page: who, through which agent, and the services their
    # attributes allow (alice: the staff rule, mail and web; bob: the visitors rule, his
    # own mail only)
    for node, user, host, services in (
        (g1, alice_id, "home.example", STAFF_SERVICES),
        (g2, bob_id, BOB_AGENT, ["imap", "imaps", "pop3", "pop3s"]),
    ):
        page = status_page(node)
        assert f'id="who">{user}<' in page and f"personal agent {host}" in page, page
        allowed = re.findall(r'<strong>(\w+)</strong>:\s*<span class="ok">', page)
        assert sorted(allowed) == services, page

    # each mail client keeps its home settings; the appliance intercepts port 110 and
    # sends each to that user's own server: each sees only their own mailbox
    assert pop_subjects(g1, "mail.home.example", alice, alice_pw) == ["Subject: welcome home"]
    # alice's agent names her store with its pin: her client's plain POP3 on 110 went to
    # the store's 995 over TLS (dovecot logs the login as TLS)
    out = "\n".join(p.output() for p in lab.topo.processes if p.name == "dovecot")
    logins = [ln for ln in out.splitlines() if "pop3-login" in ln and "user=<alice>" in ln]
    assert logins and all("TLS" in ln for ln in logins), logins
    assert pop_subjects(g2, BOB_POP, bob, bob_pw) == ["Subject: for bob only"]
    # bob's client pointed at alice's server still reaches bob's own (the session decides)
    assert pop_subjects(g2, servers.POP_ADDR, bob, bob_pw) == ["Subject: for bob only"]
    # a guest cannot reach home directly: no route, no forwarding from the guest side
    assert g1.run("ping", "-c1", "-W1", BOB_POP, check=False).returncode != 0

    # a third guest meets each refusal, with its own message, and gets no session
    ip3 = lab.address(g3)
    cases = [
        (alice, "wrong", lab.info.agent_spec, "refused the password"),
        ("mallory", "x-pass", lab.info.agent_spec, "does not know this user"),
        # another agent's fingerprint: told like every address with no agent (issue #14)
        (alice, alice_pw, f"{site.AGENT_ADDR}#{lab.bob_fingerprint}", "No home agent answered"),
    ]
    for user, pw, agent, message in cases:
        status, page, took = portal_login(g3, user, pw, agent)
        assert status >= 400 and message in page, (user, agent, status, page)
        assert took < 5.5
    # a household that has not yet allowed this appliance: the visitor is told what to
    # run at home, with this appliance's key (the agent lists it as pending meanwhile)
    key = lab.appliance("agent-key").split()[0]
    status, page, _ = portal_login(g3, DAVE[0], DAVE[1], f"{DAVE_AGENT}#{lab.dave_fingerprint}")
    assert status == 403, (status, page)
    assert f"personal-agent appliances allow {'-- ' if key.startswith('-') else ''}{key}" in page
    agents = [p for p in lab.topo.processes if p.name == "personal-agent-bob"]
    assert agents and agents[0].alive()
    agents[0].stop()
    status, page, took = portal_login(g3, bob, bob_pw, f"{BOB_AGENT}#{lab.bob_fingerprint}")
    assert status >= 400 and "No home agent answered" in page, page
    assert took < 5.5  # the portal answers within 5 s when the agent is down
    assert session_for(lab, ip3) is None
    assert {s["user"] for s in lab.sessions()} == {alice_id, bob_id}


def test_a_scan_after_dhcp_sees_only_the_appliance(lab: Lab) -> None:
    g4 = lab.topo["guest4"]
    ip = lab.address(g4)
    routes = g4.run("ip", "route").stdout
    assert "198.51.100" not in routes and "default via 192.168.1.1" in routes

    # before login: DHCP, DNS and the portal on the appliance, nothing else
    assert nmap_open(g4, GW, APPLIANCE_PORTS) == {(GW, 53), (GW, 80)}
    # UDP: DNS answers, and so does DHCP (nmap's dhcp-discover sends a DHCPINFORM; the
    # real server ACKs it); other UDP ports say nothing (dropped, not even unreachable)
    udp = g4.run(
        "nmap",
        "-n",
        "-Pn",
        "-sU",
        "-p",
        "53,67,123,161",
        "--script",
        "dhcp-discover",
        "--max-retries",
        "2",
        "-oG",
        "-",
        GW,
        timeout=90,
    ).stdout
    udp_open = set(re.findall(r"(\d+)/open/udp", udp))
    assert udp_open == {"53", "67"}, udp
    seg = nmap_open(g4, "198.51.100.2-4", SEGMENT_PORTS)
    assert {p for _, p in seg} <= {80}  # port 80 anywhere is the captive portal
    assert g4.run("ping", "-c1", "-W1", "198.51.100.3", check=False).returncode != 0

    status, page, _ = portal_login(g4, *site.SITE_USER[:2])
    assert status == 200 and site.SITE_USER[0] in page
    # after login: the service proxies too (intercepted 25/110/443, their listeners, the
    # explicit web proxy), still nothing else (admin 8000, ssh 22)
    after = nmap_open(g4, GW, APPLIANCE_PORTS)
    assert {p for _, p in after} == {25, 53, 80, 110, 443, 1110, 2525, 3128, 8081}
    # the segment: only the intercepted ports answer, and it is the appliance that does
    # (dnsmasq on .2:53, postfix's ssh-less host .3, squid on .4:3128 never show)
    seg = nmap_open(g4, "198.51.100.2-4", SEGMENT_PORTS)
    assert {p for _, p in seg} <= {25, 80, 110, 443}
    # carol (a contractor) may not send mail: the appliance greets to refuse; the segment's
    # postfix (smtp.segment.example) never shows
    banner = g4.run("nc", "-w", "5", "198.51.100.2", "25", check=False, timeout=20).stdout
    assert banner.startswith("220 guest gateway ESMTP (refusing)"), banner
    assert "198.51.100" not in g4.run("ip", "route").stdout
    assert session_for(lab, ip)


@pytest.mark.skipif(
    not (shutil.which("chromium") and shutil.which("chromedriver")),
    reason="needs Debian chromium and chromium-driver",
)
def test_a_browser_is_sent_to_the_portal_and_lands_on_the_origin(lab: Lab, artifacts: Path) -> None:
    g = lab.topo.add_guest()
    lab.address(g)
    user, pw, _ = site.SITE_USER
    profile = lab.directory / "chromium"
    out = g.run(
        sys.executable,
        str(Path(__file__).with_name("guest_browser.py")),
        "http://www.example.com/",
        user,
        "-",
        str(artifacts),
        str(profile),
        input=pw + "\n",
        timeout=120,
    ).stdout
    seen = json.loads(out.strip().splitlines()[-1])
    print(seen)
    assert str(seen["first_url"]).startswith(f"{PORTAL}/login?url=")
    assert seen["landed_url"] == "http://www.example.com/"
    assert seen["landed_h1"] == "www.example.com"
    assert "The internet, as seen through the site's web proxy." in str(seen["landed_body"])
    for name in ("e2e-browser-login.png", "e2e-browser-origin.png"):
        assert (artifacts / name).stat().st_size > 3000


def test_a_rules_session_max_logs_the_user_out_on_time(lab: Lab) -> None:
    """A rule's `session_max` (60 s here) ends the session, not only portal.session_max."""
    conf = Path(lab.info.config)
    access = conf.parent / "access.toml"
    access.write_text(
        access.read_text()
        + '\n[[rules]]\nname = "short visits"\nmatch = { title = "short-visit" }\n'
        'allow = ["http"]\nsession_max = 60\n'
    )
    subprocess.run(
        [sys.executable, "-m", "appliance", "users", "add", "erin", "--attr", "title=short-visit",
         "--password-stdin", "--config", str(conf)],
        input="erin-pass\n", text=True, check=True, capture_output=True,
    )  # fmt: skip
    lab.appliance("reload")
    g = lab.topo.add_guest()
    ip = lab.address(g)
    status, page, _ = portal_login(g, "erin", "erin-pass")
    assert status == 200 and "erin" in page, page
    s = session_for(lab, ip)
    assert s is not None and s["user"] == "erin"
    assert float(str(s["absolute_expiry"])) - float(str(s["created"])) == pytest.approx(60)
    web = "http://www.example.com/"
    assert "www.example.com" in g.run("curl", "-sS", "-m", "10", web, check=False).stdout
    time.sleep(max(0.0, float(str(s["absolute_expiry"])) - time.time()) + 2)
    assert session_for(lab, ip) is None  # ended on time, by the store's own clock
    out = g.run("curl", "-sS", "-i", "-m", "10", web, check=False).stdout
    assert out.startswith("HTTP/1.1 511"), out[:200]  # erin is sent to log in again


# What a guest's own TLS client sees: the certificate's fingerprint and what it said.
TLS_CLIENT = r"""
import hashlib, imaplib, poplib, socket, ssl, sys
kind, host, port, ca = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
ctx = ssl.create_default_context(cafile=ca)
def fp(der): return "sha256:" + hashlib.sha256(der).hexdigest()
if kind == "tls":
    with ctx.wrap_socket(socket.create_connection((host, port), 10), server_hostname=host) as s:
        print(fp(s.getpeercert(binary_form=True)))
elif kind == "imaps":
    m = imaplib.IMAP4_SSL(host, port, ssl_context=ctx, timeout=15)
    print(fp(m.sock.getpeercert(binary_form=True)))
    m.login(sys.argv[5], sys.argv[6]); m.select("INBOX", readonly=True)
    print(m.fetch("1", "(BODY[HEADER.FIELDS (SUBJECT)])")[1][0][1].decode().strip())
elif kind == "imap-starttls":
    m = imaplib.IMAP4(host, port, timeout=15); m.starttls(ctx)
    m.login(sys.argv[5], sys.argv[6]); m.select("INBOX", readonly=True)
    print(m.fetch("1", "(BODY[HEADER.FIELDS (SUBJECT)])")[1][0][1].decode().strip())
elif kind == "pop3s":
    p = poplib.POP3_SSL(host, port, context=ctx, timeout=15)
    p.user(sys.argv[5]); p.pass_(sys.argv[6])
    print([ln.decode() for ln in p.retr(1)[1] if ln.lower().startswith(b"subject:")][0])
elif kind == "imap-greeting":
    with socket.create_connection((host, port), 10) as s:
        print(s.recv(4096).decode().strip())
"""


def tls_client(node: Node, *args: str) -> tuple[int, str]:
    r = node.run(sys.executable, "-c", TLS_CLIENT, *args, timeout=60, check=False)
    return r.returncode, (r.stdout + r.stderr).strip()


def test_https_and_mail_over_tls_pass_end_to_end_and_refusals_speak_tls(lab: Lab) -> None:
    """Issue 16: after login a guest's HTTPS, submission with STARTTLS, SMTPS, IMAP with
    STARTTLS, IMAPS and POP3S work with unchanged clients; each TLS client checks the
    server's certificate against the lab CA and sees the origin's own certificate (the
    appliance never decrypts).  A guest without the right gets a TLS alert, a refused
    IMAP a `* BYE [ALERT]`, and a name in a hidden network is never relayed."""
    from appliance.lab.tls import fingerprint

    ca = lab.info.ca
    g = lab.topo.add_guest()
    lab.address(g)
    alice, alice_pw, _ = site.HOME_USER
    status, page, _ = portal_login(g, alice, alice_pw, lab.info.agent_spec)
    assert status == 200, page
    # HTTPS through the site's web proxy (CONNECT www.example.com:443), the origin's page
    # and the origin's own certificate
    out = g.run("curl", "-sS", "-m", "15", "--cacert", ca, "https://www.example.com/").stdout
    assert "<h1>www.example.com</h1>" in out
    code, out = tls_client(g, "tls", "www.example.com", "443", ca)
    assert code == 0 and out == fingerprint(Path(lab.info.web_cert)), out
    squid_log = next(Path(d) for d in lab.info.server_dirs if "squid" in d) / "access.log"
    assert "CONNECT www.example.com:443" in squid_log.read_text()
    # mail: the client's own settings (smtp.example.org), intercepted to the site's relay
    for port, mode in (("587", "--tls"), ("465", "--tlsc")):
        r = g.run(
            "swaks", "--server", f"smtp.example.org:{port}", mode, "--tls-verify",
            "--tls-ca-path", ca, "--to", "someone@example.net", "--from", "alice@home.example",
            "--header", f"Subject: over {port}", timeout=60, check=False,
        )  # fmt: skip
        assert r.returncode == 0, r.stdout + r.stderr
    subjects = b"".join(servers.wait_mail(Path(lab.info.maildir), 2))
    assert b"Subject: over 587" in subjects and b"Subject: over 465" in subjects
    # alice's own mail store at home, named by her agent, over IMAPS, IMAP+STARTTLS, POP3S
    home = "mail.home.example"
    code, out = tls_client(g, "imaps", home, "993", ca, alice, alice_pw)
    assert code == 0 and "Subject: welcome home" in out, out
    assert out.splitlines()[0] == fingerprint(Path(lab.info.mail_cert))
    for kind, port in (("imap-starttls", "143"), ("pop3s", "995")):
        code, out = tls_client(g, kind, home, port, ca, alice, alice_pw)
        assert code == 0 and "welcome home" in out, (kind, out)
    # and the mail tools people use: openssl s_client on IMAPS, fetchmail on POP3S, both
    # checking the certificate against the lab CA and the name
    r = g.run(
        "openssl", "s_client", "-connect", f"{home}:993", "-servername", home, "-CAfile", ca,
        "-verify_return_error", "-verify_hostname", home, "-quiet",
        input="a LOGIN alice alice-pass\r\nb LOGOUT\r\n", timeout=30, check=False,
    )  # fmt: skip
    assert r.returncode == 0 and "a OK" in r.stdout, r.stdout + r.stderr
    rc = lab.directory / "fetchmailrc"
    rc.write_text(
        f'poll {home} protocol POP3 port 995 user "alice" password "{alice_pw}" '
        f"ssl sslcertck sslcertfile {ca} sslcommonname {home}\n"
    )
    rc.chmod(0o600)
    r = g.run("fetchmail", "-c", "-f", str(rc), timeout=60, check=False)
    assert "message" in r.stdout and "for alice at mail.home.example" in r.stdout, (
        r.stdout + r.stderr
    )

    # a guest whose rule allows the web on port 80 only
    conf = Path(lab.info.config)
    access = conf.parent / "access.toml"
    access.write_text(
        access.read_text()
        + '\n[[rules]]\nname = "kiosk"\nmatch = { title = "kiosk" }\nallow = ["http"]\n'
    )
    subprocess.run(
        [sys.executable, "-m", "appliance", "users", "add", "frank", "--attr", "title=kiosk",
         "--password-stdin", "--config", str(conf)],
        input="frank-pass\n", text=True, check=True, capture_output=True,
    )  # fmt: skip
    lab.appliance("reload")
    k = lab.topo.add_guest()
    lab.address(k)
    status, page, _ = portal_login(k, "frank", "frank-pass")
    assert status == 200, page
    r = k.run("curl", "-sS", "-m", "15", "--cacert", ca, "https://www.example.com/", check=False)
    assert r.returncode == 35 and "alert access denied" in r.stderr, r.stderr
    code, out = tls_client(k, "imap-greeting", home, "143", ca)
    assert out == "* BYE [ALERT] access denied by site policy", out  # no rule names imap
    code, out = tls_client(k, "imaps", home, "993", ca, alice, alice_pw)
    assert code != 0 and "ALERT_ACCESS_DENIED" in out, out
    # alice and a name of the hidden segment, at a public address: refused, not relayed
    r = g.run(
        "curl", "-sS", "-m", "15", "--cacert", ca, "--resolve",
        f"intranet.site.example:443:{servers.WEB_ADDR}", "https://intranet.site.example/",
        check=False,
    )  # fmt: skip
    assert r.returncode == 35 and "alert access denied" in r.stderr, r.stderr
    assert "intranet.site.example" not in squid_log.read_text()


def spki_pin(cert_pem: Path) -> str:
    """Chromium's key pin: base64 of the SHA-256 of the certificate's public key info."""
    import base64
    import hashlib

    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    cert = x509.load_pem_x509_certificate(cert_pem.read_bytes())
    der = cert.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return base64.b64encode(hashlib.sha256(der).digest()).decode()


def quic_refused(lab: Lab) -> int:
    out = lab.topo["gw"].run("nft", "list", "counter", "inet", "appliance", "guest_quic").stdout
    m = re.search(r"packets (\d+)", out)
    assert m, out
    return int(m.group(1))


def test_a_browser_loads_https_with_the_origins_key_and_quic_falls_back_at_once(
    lab: Lab,
) -> None:
    """Issue 16: headless Chromium that trusts only www.example.com's own key loads the
    page through the appliance; with QUIC on (Alt-Svc h3 learnt on the first load) its
    QUIC attempt is refused with ICMP port unreachable and the page comes over TCP as
    fast as with QUIC off."""
    g = lab.topo.add_guest()
    lab.address(g)
    user, pw, _ = site.HOME_USER
    status, page, _ = portal_login(g, user, pw, lab.info.agent_spec)
    assert status == 200, page
    pin = spki_pin(Path(lab.info.web_cert))
    seen = {}
    before = quic_refused(lab)
    for mode in ("noquic", "quic"):
        out = g.run(
            sys.executable, str(Path(__file__).with_name("tls_browser.py")),
            "https://www.example.com/", pin, str(lab.directory / f"chromium-{mode}"), mode,
            timeout=120,
        ).stdout  # fmt: skip
        seen[mode] = json.loads(out.strip().splitlines()[-1])
        assert seen[mode]["h1"] == "www.example.com", seen
        if mode == "noquic":
            assert quic_refused(lab) == before  # no QUIC tried: nothing refused
    print(seen)
    assert quic_refused(lab) > before  # Chromium tried QUIC, and was told no at once
    assert seen["quic"]["protocol"] in ("h2", "http/1.1"), seen  # it came over TCP
    assert float(seen["quic"]["seconds"]) < float(seen["noquic"]["seconds"]) + 1.0, seen
