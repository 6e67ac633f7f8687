"""The lab's TLS servers, checked by real clients from another node with the lab CA only.

nginx (HTTPS 443) and dovecot (IMAP 143 STARTTLS, IMAPS 993, POP3S 995, POP3 110 STLS)
run in `home`, postfix (submission 587, smtps 465) in `seg`; the clients run in the other
namespace, so every connection crosses gw's routing as a guest's relayed one would.
"""

from __future__ import annotations

import hashlib
import imaplib
import poplib
import ssl
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from appliance.lab import servers
from appliance.lab.tls import LabCA, fingerprint
from appliance.lab.topology import NetnsSwitch, Node, Topology

pytestmark = pytest.mark.netns

MAIL_HOST = "mail.home.example"
ALICE = ("alice", "alice-pw")
SEEDED = b"From: home@home.example\r\nSubject: seeded\r\n\r\nfor alice over TLS\r\n"


@dataclass
class Lab:
    topo: Topology
    ca: LabCA
    web: servers.Server
    store: servers.Server
    smtp: servers.Server


@pytest.fixture
def lab(make_topology: Callable[..., Topology], tmp_path: Path) -> Iterator[Lab]:
    topo = make_topology(guests=0)
    ca = LabCA.create(tmp_path / "ca")
    started: list[servers.Server] = []
    try:
        started.append(servers.start_web(topo["home"], tls=ca))
        started.append(servers.start_mail_store(topo["home"], dict([ALICE]), tls=ca))
        started.append(servers.start_smtp(topo["seg"], tls=ca))
        servers.add_pop_message(started[1], ALICE[0], SEEDED)
        yield Lab(topo, ca, *started)
    finally:
        for s in started:
            s.stop()


def s_client(node: Node, ca: LabCA, *args: str, send: str) -> str:
    """openssl s_client that fails unless the chain and the name verify; returns the dialogue."""
    out = node.run(
        "openssl",
        "s_client",
        "-CAfile",
        str(ca.cert),
        "-verify_return_error",
        "-verify_hostname",
        MAIL_HOST,
        "-servername",
        MAIL_HOST,
        "-crlf",
        "-quiet",
        *args,
        input=send,
        check=False,
        timeout=15,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    return out.stdout


def client_context(ca: LabCA) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(ca.cert))


def test_https_page_verifies_with_the_lab_ca(lab: Lab) -> None:
    seg, ca = lab.topo["seg"], lab.ca
    resolve = "www.example.com:443:203.0.113.80"
    out = seg.run(
        "curl", "-sS", "-m", "10", "-D", "-", "--cacert", str(ca.cert),
        "--resolve", resolve, "https://www.example.com/",
        check=False,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert "the internet" in out.stdout
    assert 'alt-svc: h3=":443"; ma=86400' in out.stdout.lower()
    # plain HTTP on 80 is as before, and has no Alt-Svc
    plain = seg.run("curl", "-sS", "-m", "10", "-D", "-", "http://203.0.113.80/").stdout
    assert "the internet" in plain and "alt-svc" not in plain.lower()
    # a name the certificate does not carry is refused by the client
    bad = seg.run(
        "curl", "-sS", "-m", "10", "--cacert", str(ca.cert),
        "--resolve", "other.example.com:443:203.0.113.80", "https://other.example.com/",
        check=False,
    )  # fmt: skip
    assert bad.returncode == 60, bad.stderr  # CURLE_PEER_FAILED_VERIFICATION
    # without the lab CA (the machine's trust store only) the chain is refused
    untrusted = seg.run(
        "curl", "-sS", "-m", "10", "--resolve", resolve, "https://www.example.com/", check=False
    )
    assert untrusted.returncode == 60, untrusted.stderr
    # the certificate served is the one whose fingerprint the relay would pin
    raw = seg.connect("203.0.113.80", 443)
    with client_context(ca).wrap_socket(raw, server_hostname="www.example.com") as tls:
        der = tls.getpeercert(binary_form=True)
    assert der is not None
    assert fingerprint(lab.web.extra["cert"]) == "sha256:" + hashlib.sha256(der).hexdigest()
    assert lab.web.extra["ca"] == ca.cert


def test_imap_and_pop3_over_tls_see_the_seeded_message(lab: Lab) -> None:
    seg, ca = lab.topo["seg"], lab.ca
    user, pw = ALICE
    # openssl: STARTTLS on 143, implicit TLS on 993 and 995, each verified and logged in
    imap_cmds = f"a LOGIN {user} {pw}\nb SELECT INBOX\nc FETCH 1 BODY[TEXT]\nd LOGOUT\n"
    for args in (
        ("-starttls", "imap", "-connect", "203.0.113.3:143"),
        ("-connect", "203.0.113.3:993"),
    ):
        out = s_client(seg, ca, *args, send=imap_cmds)
        assert "a OK" in out and "1 EXISTS" in out and "for alice over TLS" in out, out
    out = s_client(
        seg, ca, "-connect", "203.0.113.3:995", send=f"USER {user}\nPASS {pw}\nRETR 1\nQUIT\n"
    )
    assert "+OK Logged in" in out and "for alice over TLS" in out, out
    # python clients, trusting the lab CA only, checking the name mail.home.example
    ctx = client_context(ca)
    with NetnsSwitch(seg.netns):
        imap = imaplib.IMAP4_SSL("203.0.113.3", 993, ssl_context=ctx, timeout=10)
        plain_imap = imaplib.IMAP4("203.0.113.3", 143, timeout=10)
        pop = poplib.POP3_SSL("203.0.113.3", 995, context=ctx, timeout=10)
        pop_stls = poplib.POP3("203.0.113.3", 110, timeout=10)
    assert imap.sock.getpeercert()["subjectAltName"] == (  # type: ignore[attr-defined]
        ("DNS", MAIL_HOST),
        ("IP Address", "203.0.113.3"),
    )
    imap.login(user, pw)
    assert imap.select("INBOX") == ("OK", [b"1"])
    imap.logout()
    assert "STARTTLS" in plain_imap.capabilities
    plain_imap.starttls(ctx)
    plain_imap.login(user, pw)
    assert plain_imap.select("INBOX")[1] == [b"1"]
    plain_imap.logout()
    pop.user(user)
    pop.pass_(pw)
    assert pop.stat()[0] == 1
    assert b"for alice over TLS" in b"\n".join(pop.retr(1)[1])
    pop.quit()
    assert "STLS" in pop_stls.capa()
    pop_stls.stls(ctx)
    pop_stls.user(user)
    pop_stls.pass_(pw)
    assert pop_stls.stat()[0] == 1
    pop_stls.quit()
    # a wrong password is still refused over TLS
    with NetnsSwitch(seg.netns):
        imap = imaplib.IMAP4_SSL("203.0.113.3", 993, ssl_context=ctx, timeout=10)
    with pytest.raises(imaplib.IMAP4.error):
        imap.login(user, "wrong")
    imap.shutdown()


def test_start_pop3_serves_pop3s_without_imap(
    make_topology: Callable[..., Topology], tmp_path: Path
) -> None:
    topo = make_topology(guests=0)
    ca = LabCA.create(tmp_path / "ca")
    pop = servers.start_pop3(topo["home"], dict([ALICE]), host="203.0.113.1", tls=ca)
    try:
        servers.add_pop_message(pop, ALICE[0], SEEDED)
        with NetnsSwitch(topo["seg"].netns):
            p = poplib.POP3_SSL("203.0.113.1", 995, context=client_context(ca), timeout=10)
        p.user(ALICE[0])
        p.pass_(ALICE[1])
        assert b"for alice over TLS" in b"\n".join(p.retr(1)[1])
        p.quit()
        listening = topo["home"].run("ss", "-Htln").stdout
        assert ":995 " in listening and ":143 " not in listening and ":993 " not in listening
    finally:
        pop.stop()


def swaks(node: Node, ca: LabCA, *args: str) -> str:
    out = node.run(
        "swaks", "--to", "x@example.net", "--from", "alice@home.example",
        "--tls-verify", "--tls-ca-path", str(ca.cert), *args,
        check=False, timeout=30,
    )  # fmt: skip
    assert out.returncode == 0, out.stdout + out.stderr
    return out.stdout


def test_submission_and_smtps_deliver_over_verified_tls(lab: Lab) -> None:
    home, ca, maildir = lab.topo["home"], lab.ca, lab.smtp.extra["maildir"]
    out = swaks(home, ca, "--server", "198.51.100.3:587", "--tls", "--header", "Subject: via 587")
    assert "TLS started" in out, out
    out = swaks(home, ca, "--server", "198.51.100.3:465", "--tlsc", "--header", "Subject: via 465")
    assert "TLS started" in out, out
    mails = servers.wait_mail(maildir, 2)
    assert any(b"Subject: via 587" in m for m in mails)
    assert any(b"Subject: via 465" in m for m in mails)
    assert all(b"with ESMTPS" in m for m in mails)  # postfix's Received: says TLS was on
    # port 25 is as without TLS: no STARTTLS offered, mail still accepted in the clear
    out = home.run(
        "swaks", "--server", "198.51.100.3:25", "--to", "x@example.net", "--quit-after", "EHLO"
    ).stdout
    assert "250-PIPELINING" in out and "STARTTLS" not in out, out
    # a client that does not trust the lab CA gives up on 465
    bad = home.run(
        "swaks", "--server", "198.51.100.3:465", "--tlsc", "--tls-verify", "--to",
        "x@example.net", check=False, timeout=30,
    )  # fmt: skip
    assert bad.returncode != 0 and len(servers.maildir_messages(maildir)) == 2
    assert lab.smtp.extra["ca"] == ca.cert
