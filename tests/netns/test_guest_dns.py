"""The guests' resolver in a real site: real dig, real dnsmasq as the site's resolver."""

from __future__ import annotations

import contextlib
import signal
import socket
import struct
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from _guestside import (
    BIG_COUNT,
    BIG_NAME,
    banner_of,
    banners,
    give_address,
    lab_resolver,
    udp_ask,
    write_config,
)

from appliance.lab.topology import NetnsSwitch, Node, Topology, guest_mac
from appliance.state import store
from appliance.state.sessions import SessionStore

pytestmark = pytest.mark.netns
GW = "192.168.1.1"


def dig(node: Node, *args: str) -> str:
    return node.run("dig", "+time=2", "+tries=1", f"@{GW}", *args, check=False).stdout


def status(out: str) -> str:
    return out.split("status: ", 1)[1].split(",", 1)[0] if "status: " in out else "no answer"


def log_in(tmp_path: Path, n: int, ip: str) -> None:
    """What the portal does after a good password: a session for the guest's lease."""
    conn = store.connect(tmp_path / "state" / "state.sqlite")
    SessionStore(conn).create(user="visitor", source="site", attributes={}, ip=ip, mac=guest_mac(n))
    conn.close()


def with_rate(cfg: Path, rate: int, burst: int) -> None:
    cfg.write_text(
        cfg.read_text().replace("[dns]\n", f"[dns]\nrate_limit = {rate}\nrate_burst = {burst}\n", 1)
    )


def test_guest_dns_hides_the_segment(
    make_topology: Callable[..., Topology], tmp_path: Path
) -> None:
    topo = make_topology(guests=1)
    gw = topo["gw"]
    cfg = write_config(tmp_path)
    lab_resolver(topo)
    banners(gw, f"{GW},80,PORTAL")
    run = gw.start(sys.executable, "-m", "appliance", "run", "--config", str(cfg), "net", "dns")
    gw.wait_port(53, GW, proto="udp")
    gw.wait_port(53, GW)
    g = give_address(topo, 1, "192.168.1.101")
    log_in(tmp_path, 1, "192.168.1.101")

    # the lab resolver knows it, and its real answer is a segment address: NXDOMAIN
    real = gw.run("dig", "+short", "@198.51.100.2", "intranet.site.example").stdout
    assert "198.51.100.3" in real
    for name in ("intranet.site.example", "files.site.example"):
        out = dig(g, name)
        assert status(out) == "NXDOMAIN" and "198.51.100" not in out
        assert status(dig(g, "+tcp", name)) == "NXDOMAIN"
    # reverse lookups of the segment are not forwarded either
    assert status(dig(g, "-x", "198.51.100.3")) == "NXDOMAIN"
    # a public-looking name resolves, twice (the second from the cache), over UDP and TCP
    for extra in ((), (), ("+tcp",)):
        assert dig(g, "+short", *extra, "www.public.example").strip() == "203.0.113.80"
    # the appliance's own names, from the server-info table, under the guest domain
    assert dig(g, "+short", "mail.guest.example").strip() == GW
    assert dig(g, "+short", "portal.guest.example").strip() == GW
    aaaa = dig(g, "mail.guest.example", "AAAA")
    assert status(aaaa) == "NOERROR" and "ANSWER: 0" in aaaa
    assert status(dig(g, "nosuch.guest.example")) == "NXDOMAIN"
    # an OS captive-portal probe resolves although the site's resolver refuses it
    assert dig(g, "+short", "captive.apple.com").strip() == GW
    # a big answer: the upstream truncates over UDP, we fetch it over TCP; the guest
    # (no EDNS) gets TC and retries over TCP by itself
    tc = dig(g, "+noedns", "+ignore", BIG_NAME)
    assert " tc" in tc.split("flags:", 1)[1].split(";", 1)[0]
    full = dig(g, "+noedns", "+short", BIG_NAME).split()
    assert len(full) == BIG_COUNT

    # malformed and oversized queries: errors, never a crash
    header = bytes.fromhex("abcd01000001000000000000")
    query = header + b"\x03www\x06public\x07example\x00\x00\x01\x00\x01"
    garbage = b"\xab\xcd\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00\x3fshort"
    out = udp_ask(g, garbage)
    assert out is not None and out[:2] == b"\xab\xcd" and out[3] & 0x0F == 1  # FORMERR
    out = udp_ask(g, query + b"\x00" * 700)
    assert out is not None and out[3] & 0x0F == 1
    two = query[:4] + b"\x00\x02" + query[6:] + query[12:]
    out = udp_ask(g, two)
    assert out is not None and out[3] & 0x0F == 1
    out = udp_ask(g, b"\x01")  # too short to answer at all: dropped
    assert out is None
    # TCP: a frame of garbage gets FORMERR too
    with NetnsSwitch(g.netns):
        sock = socket.create_connection((GW, 53), timeout=3)
    with sock:
        sock.sendall(struct.pack("!H", len(garbage)) + garbage)
        (n,) = struct.unpack("!H", sock.recv(2))
        assert sock.recv(n)[3] & 0x0F == 1
    # and the server goes on serving
    out = udp_ask(g, query)
    assert out is not None and out[:2] == b"\xab\xcd" and out[3] & 0x0F == 0
    assert dig(g, "+short", "www.public.example").strip() == "203.0.113.80"

    # SIGHUP (a table reload) keeps it serving; SIGTERM stops it promptly and cleanly
    run.popen.send_signal(signal.SIGHUP)
    time.sleep(0.5)
    assert dig(g, "+short", "mail.guest.example").strip() == GW
    t0 = time.monotonic()
    run.stop()
    assert time.monotonic() - t0 < 4
    assert "stopping:" in run.output()  # the dns role logged its counters on the way out
    # the guest side is left closed (drop everything), not open
    left = gw.run("nft", "list", "table", "inet", "appliance").stdout
    assert "guest_closed" in left and "authenticated" not in left


@pytest.mark.parametrize("mode", ["portal", "refuse"])
def test_guest_dns_is_no_tunnel_before_login(
    make_topology: Callable[..., Topology], tmp_path: Path, mode: str
) -> None:
    topo = make_topology(guests=1)
    gw = topo["gw"]
    cfg = write_config(tmp_path)
    with_rate(cfg, 20, 40)
    cfg.write_text(cfg.read_text().replace("[dns]\n", f'[dns]\nbefore_login = "{mode}"\n', 1))
    seen = tmp_path / "upstream-queries.log"  # every query the site's resolver gets
    extra = [f"--log-facility={seen}", "--log-queries"]
    lab_resolver(topo, extra=["--txt-record=www.public.example,hello from upstream", *extra])
    banners(gw, f"{GW},80,PORTAL")
    run = gw.start(sys.executable, "-m", "appliance", "run", "--config", str(cfg), "net", "dns")
    gw.wait_port(53, GW, proto="udp")
    gw.wait_port(53, GW)
    g = give_address(topo, 1, "192.168.1.101")

    # before login: no tunnel type for any name, not even the appliance's own
    for args in (
        ("www.public.example", "TXT"),
        ("+tcp", "www.public.example", "TXT"),
        ("portal.guest.example", "TXT"),
        ("x1y2z3.public.example", "NULL"),
        ("x1y2z3.public.example", "ANY"),
        ("x1y2z3.public.example", "MX"),
    ):
        out = dig(g, *args)
        assert status(out) == "REFUSED" and "hello" not in out and "203.0.113" not in out, args
    # an outside name's address: refused, or the stand-in the portal answers behind
    for extra_args in ((), ("+tcp",)):
        out = dig(g, *extra_args, "www.public.example", "A")
        assert "203.0.113" not in out
        if mode == "refuse":
            assert status(out) == "REFUSED"
        else:
            assert status(out) == "NOERROR"
            assert dig(g, "+short", *extra_args, "x1y2z3.public.example").strip() == "198.18.0.1"
    if mode == "portal":  # and a browser opening that name lands on the portal
        assert banner_of(g, "198.18.0.1", 80) == "PORTAL"
    # the portal, the appliance's names and the captive-portal probes work
    assert dig(g, "+short", "portal.guest.example").strip() == GW
    assert dig(g, "+short", "mail.guest.example").strip() == GW
    assert dig(g, "+short", "captive.apple.com").strip() == GW
    # and no outside name reached the site's resolver (only the probe did)
    asked = seen.read_text() if seen.exists() else ""
    assert "public.example" not in asked and "captive.apple.com" in asked, asked

    # after login: as before
    log_in(tmp_path, 1, "192.168.1.101")
    assert '"hello from upstream"' in dig(g, "+short", "www.public.example", "TXT")
    assert dig(g, "+short", "www.public.example").strip() == "203.0.113.80"

    # a burst over the rate (20/s, bursts of 40): dropped and counted, and afterwards
    # the guest is served again
    query = (
        bytes.fromhex("abcd01000001000000000000")
        + b"\x06portal\x05guest\x07example\x00\x00\x01\x00\x01"
    )
    with NetnsSwitch(g.netns):
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    with sock:
        sock.settimeout(1.0)
        for _ in range(300):
            sock.sendto(query, (GW, 53))
        got = 0
        with contextlib.suppress(TimeoutError):
            while True:
                sock.recv(4096)
                got += 1
    assert 1 <= got <= 60, got  # at most the burst (40) and what refilled meanwhile
    time.sleep(1.0)
    assert dig(g, "+short", "www.public.example").strip() == "203.0.113.80"

    # logout (any role ends the session in the store): before-login answers again
    conn = store.connect(tmp_path / "state" / "state.sqlite")
    sessions = SessionStore(conn)
    session = sessions.lookup_ip("192.168.1.101")
    assert session is not None
    sessions.end(session.id, "logged out")
    conn.close()
    time.sleep(1.0)  # the DNS role looks at ended sessions twice a second
    assert status(dig(g, "www.public.example", "TXT")) == "REFUSED"
    run.stop()
    out = run.output()
    assert "over the rate" in out and "192.168.1.101" in out
    line = next(ln for ln in out.splitlines() if "stopping:" in ln)
    dropped = int(line.split(" dropped over the rate")[0].rsplit(" ", 1)[1])
    assert dropped >= 100, line
