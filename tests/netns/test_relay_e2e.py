"""The relay end to end: real guests, real clients, real servers, nft interception in gw."""

from __future__ import annotations

import hashlib
import os
import poplib
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from appliance.lab import servers
from appliance.lab.servers import (
    EXPLICIT,
    PORTAL,
    guest_address,
    install_redirects,
    start_bulk,
    start_relay,
    write_table,
)
from appliance.lab.topology import NETNS_ETC, NetnsSwitch, Node, Topology

pytestmark = pytest.mark.netns

ALICE, BOB, CAROL = "192.168.1.11", "192.168.1.12", "192.168.1.13"
SEGMENT = "198.51.100."


def users() -> dict[str, object]:
    return {
        ALICE: {
            "user": "alice",
            "rule": "staff",
            "allow": ["smtp", "pop3", "http", "connect", "bulk"],
            "personal": {"pop3": "203.0.113.3:110"},
        },
        BOB: {
            "user": "bob",
            "rule": "visitors",
            "allow": ["pop3", "http"],
            "personal": {"pop3": "203.0.113.1:110"},
        },
    }


SITE = {
    "smtp": ["198.51.100.3:25"],
    "pop3": ["198.51.100.3:110"],
    "http": ["198.51.100.4:3128"],
    "bulk": ["198.51.100.3:9000"],
}


def site(make_topology: Callable[..., Topology], tmp_path: Path) -> Topology:
    topo = make_topology(guests=3)
    install_redirects(topo["gw"])
    for n, ip in ((1, ALICE), (2, BOB), (3, CAROL)):
        guest_address(topo[f"guest{n}"], ip)
    write_table(tmp_path / "table.json", users(), SITE)
    return topo


def pop_session(guest: Node, user: str, password: str, host: str = "10.20.30.40") -> poplib.POP3:
    with NetnsSwitch(guest.netns):
        return poplib.POP3(host, 110, timeout=10)


def curl(guest: Node, *args: str) -> str:
    return guest.run("curl", "-sS", "-m", "10", *args, check=False).stdout


def test_mail_and_web_for_logged_in_guests(
    make_topology: Callable[..., Topology], tmp_path: Path
) -> None:
    topo = site(make_topology, tmp_path)
    seg, home, gw = topo["seg"], topo["home"], topo["gw"]
    started: list[servers.Server] = []
    try:
        smtp = servers.start_smtp(seg)
        started.append(smtp)
        pop_a = servers.start_pop3(home, {"alice": "alicepw"}, host="203.0.113.3")
        started.append(pop_a)
        pop_b = servers.start_pop3(home, {"bob": "bobpw"}, host="203.0.113.1")
        started.append(pop_b)
        web = servers.start_web(home, files={"index.html": b"<h1>the internet</h1>\n"})
        started.append(web)
        proxy = servers.start_webproxy(seg)
        started.append(proxy)
        relay = start_relay(
            gw, tmp_path / "table.json", "192.168.1.1", "--connect-port", "80", "--workers", "2"
        )
        g1, g2, g3 = topo["guest1"], topo["guest2"], topo["guest3"]

        # SMTP: alice's mail to "any host" on port 25 arrives at the segment's postfix
        out = g1.run(
            "swaks",
            "--server",
            "10.9.8.7:25",
            "--to",
            "bob@example.net",
            "--from",
            "alice@home.example",
            "--header",
            "Subject: via relay",
            check=False,
        )
        assert out.returncode == 0, out.stdout + out.stderr
        mail = servers.wait_mail(smtp.extra["maildir"])[0]
        assert b"Subject: via relay" in mail
        assert b"198.51.100.1" in mail and ALICE.encode() not in mail  # postfix saw us

        # POP3: each user reaches the server from their own personal table
        servers.add_pop_message(pop_a, "alice", b"Subject: a\r\n\r\nfor alice only\r\n")
        servers.add_pop_message(pop_b, "bob", b"Subject: b\r\n\r\nfor bob only\r\n")
        p = pop_session(g1, "alice", "alicepw")
        p.user("alice")
        p.pass_("alicepw")
        assert b"for alice only" in b"\n".join(p.retr(1)[1])
        p.quit()
        p = pop_session(g2, "bob", "bobpw")
        p.user("bob")
        p.pass_("bobpw")
        assert b"for bob only" in b"\n".join(p.retr(1)[1])
        p.quit()
        assert "rip=203.0.113.254" in pop_a.log() and ALICE not in pop_a.log()

        # HTTP transparent (port 80 -> site web proxy), keep-alive for two requests
        page = curl(g1, "http://203.0.113.80/", "http://203.0.113.80/index.html")
        assert page.count("the internet") == 2
        # explicit proxy, plain and CONNECT (a tunnel to the origin's port 80)
        assert "the internet" in curl(
            g2, "-x", f"http://192.168.1.1:{EXPLICIT}", "http://203.0.113.80/"
        )
        assert "the internet" in curl(
            g1, "-p", "-x", f"http://192.168.1.1:{EXPLICIT}", "http://203.0.113.80/"
        )

        def tunnel(guest: Node, url: str) -> subprocess.CompletedProcess[str]:
            proxy_url = f"http://192.168.1.1:{EXPLICIT}"
            return guest.run("curl", "-sS", "-m", "10", "-p", "-x", proxy_url, url, check=False)

        # bob has no CONNECT right: 403 naming his rule
        out = tunnel(g2, "http://203.0.113.80/")
        assert out.returncode != 0 and "403" in out.stderr
        # a tunnel to a port that is not listed is refused by the appliance itself
        out = tunnel(g1, "http://203.0.113.80:25/")
        assert out.returncode != 0 and "403" in out.stderr
        squid_log = proxy.extra["access_log"].read_text()
        assert "198.51.100.1 " in squid_log and "192.168.1." not in squid_log
        assert "192.168.1." not in web.extra["access_log"].read_text()

        # denials in protocol words, never naming a segment address
        out = g2.run("swaks", "--server", "10.9.8.7:25", "--to", "x@example.net", check=False)
        assert "554 5.7.1 access denied by site policy" in out.stdout
        out = g3.run("swaks", "--server", "10.9.8.7:25", "--to", "x@example.net", check=False)
        assert "530 5.7.0" in out.stdout and PORTAL in out.stdout
        assert SEGMENT not in out.stdout
        p = pop_session(g3, "carol", "x")
        with pytest.raises(poplib.error_proto, match=r"\[AUTH\].*192\.168\.1\.1"):
            p.user("carol")
        page = g3.run(
            "curl",
            "-sS",
            "-m",
            "10",
            "-i",
            "-x",
            f"http://192.168.1.1:{EXPLICIT}",
            "http://203.0.113.80/",
            check=False,
        ).stdout
        assert page.startswith("HTTP/1.1 511") and SEGMENT not in page
        page = g3.run(
            "curl", "-sS", "-i", "-H", "Accept: text/html", "http://203.0.113.80/", check=False
        ).stdout
        assert page.startswith("HTTP/1.1 302") and f"Location: {PORTAL}" in page
        # a guest may not reach the hidden segment through the relay either
        page = curl(g1, "-i", "-x", f"http://192.168.1.1:{EXPLICIT}", "http://198.51.100.3/")
        assert page.startswith("HTTP/1.1 403")

        # live reload: alice loses pop3 while a POP session is open -> it is closed
        p = pop_session(g1, "alice", "alicepw")
        p.user("alice")
        p.pass_("alicepw")
        table = users()
        table[ALICE]["allow"] = ["smtp"]  # type: ignore[index]
        write_table(tmp_path / "table.json", table, SITE)
        relay.popen.send_signal(signal.SIGHUP)
        with pytest.raises((poplib.error_proto, OSError, EOFError)):
            deadline = time.monotonic() + 5
            while time.monotonic() < deadline:
                p.noop()
                time.sleep(0.1)
        # access log: one line per connection with user, service, rule, upstream name
        time.sleep(0.3)
        log = relay.output()
        assert re.search(
            r"user=alice ip=192\.168\.1\.11 service=smtp rule=staff upstream=smtp/site "
            r"bytes_up=\d+ bytes_down=\d+ duration=[\d.]+ result=ok",
            log,
        ), log
        assert "upstream=pop3/personal" in log and "result=revoked" in log
        assert "result=refused-denied" in log and "result=refused-login" in log
        assert SEGMENT not in "".join(
            line for line in log.splitlines() if "appliance.proxy.access" in line
        )
    finally:
        for srv in started:
            srv.stop()


def test_upstream_down_is_reported_in_protocol_words(
    make_topology: Callable[..., Topology], tmp_path: Path
) -> None:
    topo = site(make_topology, tmp_path)
    start_relay(topo["gw"], tmp_path / "table.json", "192.168.1.1", "--connect-timeout", "1")
    g1 = topo["guest1"]
    out = g1.run("swaks", "--server", "10.9.8.7:25", "--to", "x@example.net", check=False)
    assert "421 4.3.0" in out.stdout and SEGMENT not in out.stdout
    p = pop_session(g1, "alice", "x")
    with pytest.raises(poplib.error_proto, match=r"\[SYS/TEMP\]") as err:
        p.user("alice")
    assert SEGMENT not in str(err.value)
    page = curl(g1, "-i", "http://203.0.113.80/")
    assert page.startswith("HTTP/1.1 502") and SEGMENT not in page


GIB = 1024  # MiB


def test_one_gib_each_way_byte_identical_with_half_close(
    make_topology: Callable[..., Topology], tmp_path: Path
) -> None:
    topo = site(make_topology, tmp_path)
    seg = topo["seg"]
    start_relay(topo["gw"], tmp_path / "table.json")
    # upload: alice sends 1 GiB, half-closes, then still reads the sink's digest
    start_bulk(seg, "sink", "198.51.100.3", 9000, tmp_path)
    block = bytearray(os.urandom(1 << 20))
    h = hashlib.sha256()
    with NetnsSwitch(topo["guest1"].netns):
        sock = socket.create_connection(("10.1.1.1", 9), timeout=60)
    with sock:
        for i in range(GIB):
            block[:8] = i.to_bytes(8, "big")
            h.update(block)
            sock.sendall(block)
        sock.shutdown(socket.SHUT_WR)
        answer = b""
        while chunk := sock.recv(256):
            answer += chunk
    assert answer.decode() == h.hexdigest()
    topo.processes[-1].stop()
    # download: the segment sends 1 GiB, alice hashes what arrives
    start_bulk(seg, "source", "198.51.100.3", 9000, tmp_path)
    h = hashlib.sha256()
    total = 0
    buf = bytearray(1 << 20)
    with NetnsSwitch(topo["guest1"].netns):
        sock = socket.create_connection(("10.1.1.1", 9), timeout=60)
    with sock:
        sock.sendall(str(GIB).encode())
        while n := sock.recv_into(buf):
            h.update(memoryview(buf)[:n])
            total += n
    assert total == GIB << 20
    deadline = time.monotonic() + 10
    sha = tmp_path / "source.sha"
    while not sha.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert sha.read_text() == h.hexdigest()


SECRET = "segment secret"


def _secret_server(node: Node, host: str, port: int, workdir: Path) -> Path:
    """A web server in the hidden segment; returns its log (one line per request seen)."""
    d = workdir / f"secret-{host}-{port}"
    d.mkdir()
    (d / "index.html").write_text(f"<h1>{SECRET} at {host}:{port}</h1>\n")
    proc = node.start(
        sys.executable, "-m", "http.server", "-b", host, "-d", str(d), str(port), name="secret"
    )
    node.wait_port(port, host)
    return proc.log_path


def test_the_segment_stays_hidden_through_the_web_proxy(
    make_topology: Callable[..., Topology], tmp_path: Path
) -> None:
    """Issue #14, finding 1: every way a request could name a hidden host is refused by
    the appliance before the site's web proxy is asked, and a name that the proxy's own
    lookup turns into a hidden address (rebinding) is refused by the proxy's deny list."""
    topo = site(make_topology, tmp_path)
    seg, home, gw, g1 = topo["seg"], topo["home"], topo["gw"], topo["guest1"]
    # the appliance's resolver and the proxy's disagree about rebind.example
    servers.start_resolver(
        seg,
        {"www.example.com": "203.0.113.80", "intranet.site.example": "198.51.100.3"}
        # a public A beside an AAAA in a hidden IPv6 prefix of the site
        | {"rebind.example": "203.0.113.80", "dual.example": "203.0.113.80,2001:db8:51::3"},
        tmp_path,
    )
    servers.start_resolver(
        seg,
        {"www.example.com": "203.0.113.80", "rebind.example": "198.51.100.3"},
        tmp_path,
        host="198.51.100.3",
    )
    (NETNS_ETC / gw.netns / "resolv.conf").write_text("nameserver 198.51.100.2\n")
    servers.start_web(home, files={"index.html": b"<h1>the internet</h1>\n"})
    proxy = servers.start_webproxy(seg, resolver="198.51.100.3")
    logs = [
        _secret_server(gw, "198.51.100.1", 8000, tmp_path),  # the admin pages' address
        _secret_server(seg, "198.51.100.3", 80, tmp_path),
        _secret_server(seg, "198.51.100.3", 8000, tmp_path),
    ]
    start_relay(
        gw, tmp_path / "table.json", "192.168.1.1", "--connect-port", "80",
        "--hidden", "2001:db8:51::/48",
    )  # fmt: skip
    explicit = f"http://192.168.1.1:{EXPLICIT}"

    def get(*args: str) -> str:
        return g1.run("curl", "-sS", "-i", "-m", "10", *args, check=False).stdout

    # the control: the public page through the site's web proxy
    assert "the internet" in get("-H", "Host: www.example.com", "http://203.0.113.80/")
    by_appliance = {
        "absolute-form to the admin pages": (
            "--request-target",
            "http://198.51.100.1:8000/",
            "-H",
            "Host: www.example.com",
            "http://203.0.113.80/",
        ),
        "absolute-form to a segment host": (
            "--request-target",
            "http://198.51.100.3/",
            "-H",
            "Host: www.example.com",
            "http://203.0.113.80/",
        ),
        "Host with userinfo": ("-H", "Host: x@198.51.100.3", "http://203.0.113.80/"),
        "Host as a bracketed mapped literal": (
            "-H",
            "Host: [::ffff:198.51.100.3]",
            "http://203.0.113.80/",
        ),
        "absolute-form mapped literal": (
            "--request-target",
            "http://[::ffff:198.51.100.3]/",
            "http://203.0.113.80/",
        ),
        "Host with another port": ("-H", "Host: 198.51.100.3:8000", "http://203.0.113.80/"),
        "a segment name": ("-H", "Host: intranet.site.example", "http://203.0.113.80/"),
        "a name nobody resolves": ("-H", "Host: nosuch.example", "http://203.0.113.80/"),
        "a name with a hidden AAAA": ("-H", "Host: dual.example", "http://203.0.113.80/"),
        "explicit mapped literal": ("-x", explicit, "http://[::ffff:198.51.100.3]/"),
        "explicit userinfo": ("-x", explicit, "http://x@198.51.100.3/"),
        "CONNECT to a mapped literal": ("-p", "-x", explicit, "http://[::ffff:198.51.100.3]:80/"),
        "CONNECT to a segment name": ("-p", "-x", explicit, "http://intranet.site.example:80/"),
    }
    for case, args in by_appliance.items():
        page = get(*args)
        assert page.startswith(("HTTP/1.1 400", "HTTP/1.1 403", "HTTP/1.1 502")), (case, page)
        assert SECRET not in page, case
    asked = proxy.extra["access_log"].read_text()
    for hidden in ("198.51.100", "ffff", "intranet", "nosuch", "dual", "@"):
        assert hidden not in asked.replace("198.51.100.1 ", ""), (hidden, asked)
    # rebinding: the appliance's lookup says public, the proxy's says segment
    page = get("-H", "Host: rebind.example", "http://203.0.113.80/")
    assert page.startswith("HTTP/1.1 403") and SECRET not in page
    assert "TCP_DENIED/403" in proxy.extra["access_log"].read_text()
    for log_path in logs:
        assert "GET" not in log_path.read_text(), log_path.read_text()


def test_plain_pop3_travels_encrypted_to_a_server_that_only_offers_pop3s(
    make_topology: Callable[..., Topology], tmp_path: Path
) -> None:
    """Issue 16, `tls = true`: the guest's unchanged client speaks POP3 on 110; the relay
    speaks TLS to the server's 995, verified by the site's CA file and the server's name.
    The server's plain port is closed, so a relay that did not encrypt would fail; a
    server whose name the certificate does not carry is not spoken to at all."""
    import json

    from appliance.lab.tls import LabCA

    topo = make_topology(guests=1)
    install_redirects(topo["gw"])
    guest_address(topo["guest1"], ALICE)
    ca = LabCA.create(tmp_path / "ca")
    store = servers.start_mail_store(
        topo["seg"], {"alice": "alicepw"}, host="198.51.100.3", tls=ca, pop3_port=1100,
        imap=False, names=("pop.site.example",),
    )  # fmt: skip
    servers.add_pop_message(store, "alice", b"Subject: sealed\r\n\r\nover TLS all the way\r\n")
    assert topo["gw"].run("nc", "-z", "-w", "2", "198.51.100.3", "110", check=False).returncode
    try:
        for name, readable in (("pop.site.example", True), ("other.site.example", False)):
            table = tmp_path / f"table-{name}.json"
            table.write_text(
                json.dumps(
                    {
                        "portal_url": PORTAL,
                        "listeners": [{"service": "pop3", "protocol": "pop3", "port": 1110}],
                        "servers": {"pop3": ["198.51.100.3:995"]},
                        "tls": {"pop3": {"name": name, "ca": str(ca.cert)}},
                        "users": {ALICE: {"user": "alice", "allow": ["pop3"], "rule": "staff"}},
                    }
                )
            )
            relay = topo["gw"].start(
                sys.executable, "-m", "appliance.proxy", str(table), "--host", "192.168.1.1",
                "--hidden", "198.51.100.0/24", name=f"relay-{name}",
            )  # fmt: skip
            topo["gw"].wait_port(1110, "192.168.1.1", timeout=20)
            with NetnsSwitch(topo["guest1"].netns):
                p = poplib.POP3("10.20.30.40", 110, timeout=10)
                if readable:
                    p.user("alice")
                    p.pass_("alicepw")
                    assert b"over TLS all the way" in b"\n".join(p.retr(1)[1])
                    p.quit()
                else:  # the certificate names another server: refused, in POP3's words
                    with pytest.raises(poplib.error_proto, match="temporarily unavailable"):
                        p.user("alice")
            relay.stop()
            if not readable:
                said = "TLS: certificate not accepted (Hostname mismatch"
                assert said in relay.output(), relay.output()
        assert "rip=198.51.100.1" in store.log() and "TLS" in store.log()
    finally:
        store.stop()
