"""`appliance lab demo`: one visitor's walk through the lab, each step checked and printed.

Everything happens from the guest namespaces with real clients: dhclient for the
address, curl for the captive page and the web (HTTP and HTTPS, the origin's
certificate checked against the lab CA), an HTTP login with the form's CSRF
token, swaks for mail out (port 25, and submission with STARTTLS), POP3 and IMAPS
for mail in, ping and curl against the hidden segment.  A step that does not do
what a visitor would expect fails the demo.
"""

from __future__ import annotations

import base64
import hashlib
import os
import re
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import requests

from appliance.lab import household, servers, site
from appliance.lab.tls import fingerprint
from appliance.lab.topology import LabError, NetnsSwitch, Node, Topology

PORTAL = "http://192.168.1.1"
PROMETHEUS = f"http://{servers.PROMETHEUS_ADDR}:{servers.PROMETHEUS_PORT}"


@dataclass
class Outcome:
    ok: bool
    detail: str


def dhcp(node: Node, workdir: Path) -> Outcome:
    files = ["-lf", str(workdir / f"{node.name}.leases")]
    files += ["-pf", str(workdir / f"{node.name}.dhclient.pid")]
    # a laptop from an earlier walk releases its lease first (which also ends its session)
    node.run("dhclient", "-r", *files, "eth0", check=False, timeout=30)
    node.run("ip", "-4", "addr", "flush", "dev", "eth0", check=False)
    proc = node.run("dhclient", "-v", "-1", *files, "eth0", check=False, timeout=60)
    addr = re.search(r"inet (192\.168\.1\.\d+)/24", node.run("ip", "-4", "addr").stdout)
    route = node.run("ip", "route").stdout
    if proc.returncode != 0 or not addr or "default via 192.168.1.1" not in route:
        return Outcome(False, f"no lease: {proc.stdout[-300:]}{proc.stderr[-300:]}")
    hidden = "198.51.100." in route
    return Outcome(
        not hidden,
        f"address {addr.group(1)}, router 192.168.1.1, "
        f"{'a segment route!' if hidden else 'no route to the segment'}",
    )


def captive(node: Node) -> Outcome:
    out = node.run(
        "curl",
        "-s",
        "-o",
        "/dev/null",
        "-m",
        "10",
        "-H",
        "Accept: text/html",
        "-w",
        "%{http_code} %{redirect_url}",
        "http://www.example.com/",
        check=False,
    ).stdout
    ok = out.startswith("302 ") and "192.168.1.1" in out
    return Outcome(ok, f"http://www.example.com/ -> {out or 'no answer'}")


def login(node: Node, user: str, password: str, agent: str = "") -> Outcome:
    with NetnsSwitch(node.netns):
        s = requests.Session()
        page = s.get(f"{PORTAL}/login", params={"url": "http://www.example.com/"}, timeout=10)
        token = re.search(r'name="csrf" value="([^"]+)"', page.text)
        if not token:
            return Outcome(False, f"no login form ({page.status_code})")
        r = s.post(
            f"{PORTAL}/login",
            timeout=15,
            allow_redirects=False,
            data={
                "user": user,
                "password": password,
                "agent": agent,
                "csrf": token.group(1),
                "url": "http://www.example.com/",
            },
        )
        status = s.get(f"{PORTAL}/status", timeout=10)
    who = f"{user}@{agent.split('#')[0]}" if agent else f"{user} (site account)"
    ok = r.status_code in (302, 303) and user in status.text
    return Outcome(
        ok,
        f"{who}: login {r.status_code}, status page "
        f"{'shows ' + user if user in status.text else 'does not show the user'}",
    )


def swaks(node: Node, sender: str, *extra: str) -> subprocess.CompletedProcess[str]:
    """A mail client with its home settings: any SMTP server name, port 25."""
    return node.run(
        "swaks",
        "--to",
        "bob@example.net",
        "--from",
        sender,
        "--server",
        "smtp.example.org",
        "--port",
        "25",
        "--timeout",
        "15",
        *extra,
        check=False,
        timeout=60,
    )


def send_mail(node: Node, maildir: Path, sender: str, subject: str) -> Outcome:
    before = len(servers.maildir_messages(maildir))
    proc = swaks(
        node,
        sender,
        "--header",
        f"Subject: {subject}",
        "--body",
        "sent from a guest laptop, unmodified",
    )
    if proc.returncode != 0:
        last = [ln for ln in proc.stdout.splitlines() if ln.startswith("<")][-1:]
        return Outcome(False, f"swaks failed: {' '.join(last)}")
    try:
        msgs = servers.wait_mail(maildir, before + 1)
    except LabError as exc:
        return Outcome(False, str(exc))
    arrived = msgs[-1]
    leaked = re.search(rb"192\.168\.1\.\d+", arrived) is not None
    return Outcome(
        subject.encode() in arrived and not leaked,
        "arrived at the site's SMTP relay (198.51.100.3), "
        f"{'the guest address leaked!' if leaked else 'relayed by the appliance'}",
    )


def refused_mail(node: Node, sender: str) -> Outcome:
    proc = swaks(node, sender)
    line = next((ln for ln in proc.stdout.splitlines() if re.match(r"<\*?\*+ 5\d\d ", ln)), "")
    ok = "554 5.7.1" in line and "198.51.100" not in proc.stdout
    return Outcome(ok, f"the appliance answered: {line.lstrip('<* ') or proc.stdout[-200:]}")


POP_CLIENT = """
import poplib, sys
pop = poplib.POP3(sys.argv[1], 110, timeout=15)
pop.user(sys.argv[2]); pop.pass_(sys.argv[3])
count, _ = pop.stat()
for i in range(1, count + 1):
    for line in pop.top(i, 0)[1]:
        if line.lower().startswith(b"subject:"):
            print(line.decode())
pop.quit()
print(count)
"""


def fetch_mail(node: Node, user: str, password: str) -> Outcome:
    # a process in the guest namespace, so the name is resolved by the guest's own DNS
    proc = node.run(
        sys.executable,
        "-c",
        POP_CLIENT,
        "mail.home.example",
        user,
        password,
        check=False,
        timeout=60,
    )
    lines = proc.stdout.split("\n")
    if proc.returncode != 0:
        return Outcome(False, (proc.stderr.strip().splitlines() or ["no answer"])[-1])
    count = int(lines[-2]) if len(lines) > 1 and lines[-2].isdigit() else 0
    return Outcome(
        count > 0, f"{count} message(s) on {user}'s home POP server: {'; '.join(lines[:-2])}"
    )


def big_message(size: int) -> bytes:
    """A message of about `size` bytes whose body is CRLF lines of base64 (no line starts
    with a dot), so what a POP client writes out is the message byte for byte."""
    body = base64.encodebytes(os.urandom(size * 3 // 4)).replace(b"\n", b"\r\n")
    return b"From: home@bob-home.example\r\nSubject: a large one\r\n\r\n" + body


def fetch_through_cut(
    node: Node, maildir: Path, user: str, password: str, cut: Callable[[bool], None], seconds: float
) -> Outcome:
    """curl (POP3, port 110) fetches a large message at a bounded rate while the home
    link is cut for `seconds`: the copy must be the message, byte for byte."""
    message = big_message(16 << 20)
    servers.deliver(maildir, message)
    listing = node.run(
        "curl", "-s", "--max-time", "30", "-u", f"{user}:{password}", "pop3://mail.home.example/",
        check=False, timeout=40,
    )  # fmt: skip
    numbers = [line.split()[0] for line in listing.stdout.splitlines() if line.strip()]
    if listing.returncode != 0 or not numbers:
        return Outcome(False, f"no message list (curl exit {listing.returncode})")
    out = Path(f"/tmp/lab-demo-{node.name}-fetch")
    fetch = node.start(
        "curl", "-s", "--limit-rate", "2M", "-u", f"{user}:{password}", "-o", str(out),
        f"pop3://mail.home.example/{numbers[-1]}", name=f"{node.name}-curl-pop3",
    )  # fmt: skip
    time.sleep(2)
    cut(True)
    time.sleep(seconds)
    cut(False)
    started = time.monotonic()
    while fetch.alive() and time.monotonic() - started < 120:
        time.sleep(0.2)
    code = fetch.stop(timeout=1)
    got = out.read_bytes() if out.exists() else b""
    out.unlink(missing_ok=True)
    same = hashlib.sha256(got).digest() == hashlib.sha256(message).digest()
    return Outcome(
        code == 0 and same,
        f"{len(got)} of {len(message)} bytes, curl exit {code}, "
        + ("SHA-256 identical" if same else "NOT identical"),
    )


def metrics_show_the_walk(seg: Node, logins: int) -> Outcome:
    """The lab's Prometheus (scraping every role every 2 s) has seen the walk: its
    logins, and bytes relayed each way."""
    queries = {
        "logins": 'sum(appliance_portal_logins_total{result="ok"})',
        "bytes down": 'sum(appliance_proxy_bytes_total{direction="down"})',
        "bytes up": 'sum(appliance_proxy_bytes_total{direction="up"})',
    }
    got: dict[str, float] = {}
    deadline = time.monotonic() + 20
    with NetnsSwitch(seg.netns):
        while time.monotonic() < deadline:
            for name, query in queries.items():
                try:
                    r = requests.get(f"{PROMETHEUS}/api/v1/query", {"query": query}, timeout=5)
                    result = r.json()["data"]["result"]
                    got[name] = float(result[0]["value"][1]) if result else 0.0
                except (requests.RequestException, ValueError, KeyError, IndexError):
                    got[name] = 0.0
            if got["logins"] >= logins and got["bytes down"] > 0 and got["bytes up"] > 0:
                break
            time.sleep(1)
    ok = got.get("logins", 0) >= logins and got.get("bytes down", 0) > 0
    return Outcome(ok, ", ".join(f"{k} {v:g}" for k, v in got.items()))


def browse(node: Node) -> Outcome:
    out = node.run("curl", "-s", "-m", "15", "http://www.example.com/", check=False).stdout
    return Outcome(
        "www.example.com" in out,
        "page through the site's web proxy: "
        f"{re.sub(r'<[^>]+>', ' ', out).strip()[:60] or 'nothing'}",
    )


# A guest's TLS client: the certificate it was shown (fingerprint) and, for IMAPS, the
# subjects in the mailbox.  Trusts the lab CA only: the server's own certificate or nothing.
TLS_CLIENT = """
import hashlib, imaplib, socket, ssl, sys
kind, host, port, ca = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
ctx = ssl.create_default_context(cafile=ca)
if kind == "imaps":
    m = imaplib.IMAP4_SSL(host, port, ssl_context=ctx, timeout=15)
    der = m.sock.getpeercert(binary_form=True)
    m.login(sys.argv[5], sys.argv[6])
    m.select("INBOX", readonly=True)
    for part in m.fetch("1:*", "(BODY[HEADER.FIELDS (SUBJECT)])")[1]:
        if isinstance(part, tuple):
            print(part[1].decode().strip())
else:
    with ctx.wrap_socket(socket.create_connection((host, port), 10), server_hostname=host) as s:
        der = s.getpeercert(binary_form=True)
print("sha256:" + hashlib.sha256(der).hexdigest())
"""


def tls_client(node: Node, *args: str) -> tuple[bool, list[str]]:
    proc = node.run(sys.executable, "-c", TLS_CLIENT, *args, check=False, timeout=60)
    lines = proc.stdout.strip().splitlines()
    return proc.returncode == 0, lines or (proc.stderr.strip().splitlines() or ["no answer"])[-1:]


def browse_https(node: Node, ca: str, cert: str) -> Outcome:
    out = node.run(
        "curl", "-s", "-m", "15", "--cacert", ca, "https://www.example.com/", check=False
    ).stdout
    ok, lines = tls_client(node, "tls", "www.example.com", "443", ca)
    own = ok and lines[-1] == fingerprint(Path(cert))
    return Outcome(
        "<h1>www.example.com</h1>" in out and own,
        "page over TLS, never decrypted: "
        + ("the origin's own certificate" if own else f"another certificate! {lines[-1]}"),
    )


def refused_https(node: Node, ca: str) -> Outcome:
    proc = node.run(
        "curl", "-sS", "-m", "15", "--cacert", ca, "https://www.example.com/", check=False
    )
    said = (proc.stderr.strip().splitlines() or [""])[-1]
    return Outcome("alert access denied" in said, f"the appliance answered: {said}")


def submit_mail(node: Node, maildir: Path, ca: str, subject: str) -> Outcome:
    before = len(servers.maildir_messages(maildir))
    proc = swaks(
        node, "alice@home.example", "--port", "587", "--tls", "--tls-verify",
        "--tls-ca-path", ca, "--header", f"Subject: {subject}",
    )  # fmt: skip
    if proc.returncode != 0:
        return Outcome(False, f"swaks failed: {proc.stdout[-200:]}")
    try:
        servers.wait_mail(maildir, before + 1)
    except LabError as exc:
        return Outcome(False, str(exc))
    return Outcome(True, "STARTTLS with the site's relay, its certificate checked; arrived")


def imaps_mail(node: Node, user: str, password: str, ca: str, cert: str) -> Outcome:
    ok, lines = tls_client(node, "imaps", "mail.home.example", "993", ca, user, password)
    own = ok and lines[-1] == fingerprint(Path(cert))
    subjects = [ln for ln in lines if ln.lower().startswith("subject:")]
    return Outcome(
        own and bool(subjects),
        f"{len(subjects)} message(s) over IMAPS on {user}'s home server "
        f"({'its own certificate' if own else lines[-1]}): {'; '.join(subjects)}",
    )


def segment_hidden(node: Node) -> Outcome:
    ping = node.run("ping", "-c1", "-W1", "198.51.100.3", check=False).returncode
    tcp = node.run("nc", "-z", "-w", "2", "198.51.100.3", "22", check=False).returncode
    dig = node.run(
        "dig", "+short", "+time=3", "+tries=1", "intranet.site.example", check=False
    ).stdout.strip()
    web = node.run(
        "curl",
        "-s",
        "-m",
        "10",
        "-o",
        "/dev/null",
        "-w",
        "%{http_code}",
        "http://198.51.100.3/",
        check=False,
    ).stdout
    ok = ping != 0 and tcp != 0 and dig == "" and web in ("403", "000")
    return Outcome(
        ok,
        f"ping {'fails' if ping else 'answers!'}, TCP "
        f"{'fails' if tcp else 'connects!'}, DNS for intranet.site.example "
        f"{'has no answer' if not dig else 'answers ' + dig}, "
        f"http://198.51.100.3/ -> {web}",
    )


def run(nodes: dict[str, Node], directory: Path, echo: Callable[[str], None] = print) -> int:
    info = site.load_info(directory)
    g1, g2 = nodes["guest1"], nodes["guest2"]
    home_user, home_pw, _ = site.HOME_USER
    site_user, site_pw, _ = site.SITE_USER
    maildir = Path(info.maildir)
    steps: list[tuple[str, Callable[[], Outcome]]] = [
        ("guest1 asks for an address (dhclient)", lambda: dhcp(g1, directory)),
        ("guest1 opens a web page before login", lambda: captive(g1)),
        (
            "guest1 logs in with home credentials, checked by her personal agent",
            lambda: login(g1, home_user, home_pw, info.agent_spec),
        ),
        (
            "guest1 sends mail to her usual SMTP host (port 25)",
            lambda: send_mail(g1, maildir, "alice@home.example", f"demo {int(time.time())}"),
        ),
        (
            "guest1 fetches mail from her usual POP host (port 110)",
            lambda: fetch_mail(g1, home_user, home_pw),
        ),
        ("guest1 browses the web (port 80)", lambda: browse(g1)),
        (
            "guest1 opens an HTTPS page (port 443)",
            lambda: browse_https(g1, info.ca, info.web_cert),
        ),
        (
            "guest1 sends mail over submission with STARTTLS (port 587)",
            lambda: submit_mail(g1, maildir, info.ca, f"demo tls {int(time.time())}"),
        ),
        (
            "guest1 reads her home mail over IMAPS (port 993)",
            lambda: imaps_mail(g1, home_user, home_pw, info.ca, info.mail_cert),
        ),
        ("guest1 tries to reach the hidden segment", lambda: segment_hidden(g1)),
        ("guest2 asks for an address (dhclient)", lambda: dhcp(g2, directory)),
        (
            "guest2 logs in with a site account (a contractor)",
            lambda: login(g2, site_user, site_pw),
        ),
        (
            "guest2 tries to send mail: not allowed for contractors",
            lambda: refused_mail(g2, "carol@example.org"),
        ),
        (
            "guest2 opens an HTTPS page: not allowed for contractors",
            lambda: refused_https(g2, info.ca),
        ),
    ]
    if info.bob_spec and "guest3" in nodes:
        g3, (bob, bob_pw) = nodes["guest3"], household.USER
        topo = Topology.attach(nodes["gw"].netns.rpartition("-")[0], directory)
        steps += [
            ("guest3 asks for an address (dhclient)", lambda: dhcp(g3, directory)),
            (
                "guest3 logs in through his agent at home behind NAT, via the relay",
                lambda: login(g3, bob, bob_pw, info.bob_spec),
            ),
            (
                "guest3 fetches mail from his POP server at home, via the relay",
                lambda: fetch_mail(g3, bob, bob_pw),
            ),
            (
                "guest3 fetches 16 MiB while his home link is cut for 5 s",
                lambda: fetch_through_cut(
                    g3, Path(info.bob_maildir), bob, bob_pw, topo.cut_household_link, 5
                ),
            ),
        ]
    logins = sum(1 for title, _ in steps if " logs in " in title)
    steps.append(
        (
            "Prometheus (in the segment) shows the walk's logins and traffic",
            lambda: metrics_show_the_walk(nodes["seg"], logins),
        )
    )
    failed = 0
    for n, (title, step) in enumerate(steps, 1):
        try:
            outcome = step()
        except Exception as exc:  # a demo step reports, never crashes the walk
            outcome = Outcome(False, f"{type(exc).__name__}: {exc}")
        failed += not outcome.ok
        echo(f"{n:2}. {title}\n    {'ok  ' if outcome.ok else 'FAIL'} {outcome.detail}")
    echo(f"\n{len(steps) - failed} passed, {failed} failed")
    return 1 if failed else 0
