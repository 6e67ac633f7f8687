"""Before login the resolver is no tunnel: few names, few types, a per-client rate."""

from __future__ import annotations

import asyncio
import socket
from pathlib import Path
from typing import Any

import pytest
from dnslib import QTYPE, RCODE, RR, A, DNSRecord
from test_config import variant
from test_dns_core import ask, resolver, upstream

from appliance.core.config import ConfigError, load
from appliance.dns.core import STAND_IN, Forward, Reply
from appliance.dns.logins import Logins
from appliance.dns.ratelimit import RateLimit
from appliance.dns.service import GuestUdp, Server
from appliance.state.sessions import SessionEvent

pytestmark = pytest.mark.unit


def rcode(action: object) -> int:
    assert isinstance(action, Reply), action
    return int(DNSRecord.parse(action.data).header.rcode)


@pytest.mark.parametrize("qtype", ["TXT", "NULL", "ANY", "A", "AAAA", "MX", "CNAME", "SRV", "PTR"])
def test_an_outside_name_is_refused_before_login(qtype: str) -> None:
    r = resolver()  # the default mode: "refuse"
    out = r.query(ask("abcd1234.tunnel.example", qtype), now=0, logged_in=False)
    assert rcode(out) == RCODE.REFUSED
    # with the question, so a stub resolver takes it as the answer to its query
    assert isinstance(out, Reply)
    assert str(DNSRecord.parse(out.data).q.qname) == "abcd1234.tunnel.example."
    assert r.stats.refused == 1 and r.stats.forwarded == 0


@pytest.mark.parametrize("qtype", ["TXT", "NULL", "ANY", "MX", "CNAME", "SRV", "PTR"])
def test_portal_mode_refuses_the_other_types_of_an_outside_name(qtype: str) -> None:
    r = resolver(before_login="portal")
    out = r.query(ask("abcd1234.tunnel.example", qtype), now=0, logged_in=False)
    assert rcode(out) == RCODE.REFUSED and r.stats.forwarded == 0


def test_portal_mode_answers_an_outside_name_with_the_stand_in_never_upstream() -> None:
    r = resolver(before_login="portal")
    q = ask("abcd1234.tunnel.example")
    out = r.query(q, now=0, logged_in=False)
    assert isinstance(out, Reply)
    rec = DNSRecord.parse(out.data)
    assert rec.header.rcode == RCODE.NOERROR and rec.header.id == 0x1234
    assert [(str(rr.rdata), rr.ttl) for rr in rec.rr] == [(str(STAND_IN), 0)]
    for qtype in ("AAAA", "HTTPS", "SVCB"):
        out = r.query(ask("abcd1234.tunnel.example", qtype), now=0, logged_in=False)
        assert rcode(out) == RCODE.NOERROR and not DNSRecord.parse(out.data).rr  # type: ignore[union-attr]
    assert r.stats.forwarded == 0 and r.stats.stand_in == 4
    assert not r.cache.entries  # a member asking next gets the real answer
    assert isinstance(r.query(q, now=0, logged_in=True), Forward)


@pytest.mark.parametrize("qtype", ["TXT", "NULL", "ANY", "MX", "SRV"])
def test_tunnel_types_are_refused_before_login_even_for_allowed_names(qtype: str) -> None:
    r = resolver()
    for mode in ("portal", "refuse"):
        r = resolver(before_login=mode)
        for name in ("portal.guest.example", "captive.apple.com", "mail.guest.example"):
            assert rcode(r.query(ask(name, qtype), now=0, logged_in=False)) == RCODE.REFUSED


def test_the_portal_local_and_probe_names_work_before_login() -> None:
    r = resolver()
    out = r.query(ask("portal.guest.example"), now=0, logged_in=False)
    assert isinstance(out, Reply)
    assert [str(rr.rdata) for rr in DNSRecord.parse(out.data).rr] == ["192.168.1.1"]
    out = r.query(ask("mail.guest.example", "AAAA"), now=0, logged_in=False)
    assert rcode(out) == RCODE.NOERROR
    assert rcode(r.query(ask("nosuch.guest.example"), now=0, logged_in=False)) == RCODE.NXDOMAIN
    for qtype in ("A", "AAAA", "HTTPS"):
        assert isinstance(r.query(ask("captive.apple.com", qtype), now=0), Forward)


def test_after_login_any_name_and_type_is_forwarded_as_before() -> None:
    r = resolver()
    for qtype in ("TXT", "NULL", "A", "MX"):
        assert isinstance(r.query(ask("www.public.example", qtype), now=0, logged_in=True), Forward)


def test_the_default_is_not_logged_in() -> None:
    r = resolver()
    assert rcode(r.query(ask("www.public.example", "TXT"), now=0)) == RCODE.REFUSED
    assert r.stats.forwarded == 0


@pytest.mark.parametrize("mode", ["refuse", "portal"])
def test_an_answer_cached_for_a_member_is_not_given_before_login(mode: str) -> None:
    r = resolver(before_login=mode)
    q = ask("www.public.example")
    fwd = r.query(q, now=0, logged_in=True)
    assert isinstance(fwd, Forward)
    r.answer(
        fwd, upstream(q, RR("www.public.example", QTYPE.A, rdata=A("203.0.113.80"), ttl=300)), 0
    )
    assert isinstance(r.query(q, now=1, logged_in=True), Reply)
    assert rcode(r.query(ask("www.public.example", "TXT"), now=1)) == RCODE.REFUSED
    out = r.query(q, now=1, logged_in=False)
    assert isinstance(out, Reply) and "203.0.113.80" not in str(DNSRecord.parse(out.data))
    assert (rcode(out) == RCODE.REFUSED) == (mode == "refuse")


# -- the token bucket -------------------------------------------------------------
def test_a_client_gets_its_burst_then_its_rate() -> None:
    lim = RateLimit(rate=10, burst=5)
    assert [lim.allow("a", 0.0) for _ in range(7)] == [True] * 5 + [False] * 2
    assert lim.dropped == 2
    assert lim.allow("b", 0.0)  # another client has its own bucket
    assert lim.allow("a", 0.1) and not lim.allow("a", 0.1)  # one token per 1/rate s
    assert all(lim.allow("a", 10.0) for _ in range(5))  # refilled, never beyond the burst
    assert not lim.allow("a", 10.0)


def test_the_table_of_clients_is_bounded() -> None:
    lim = RateLimit(rate=1, burst=2, max_clients=3)
    for c in "abc":
        assert lim.allow(c, 0.0)
    assert not lim.allow("d", 0.0)  # all three still busy: the newcomer waits (counted)
    assert lim.dropped == 1
    assert lim.allow("d", 5.0)  # the idle ones (full buckets again) were forgotten
    assert len(lim.buckets) <= 3


# -- who is logged in -------------------------------------------------------------
class FakeSessions:
    def __init__(self) -> None:
        self.members: dict[str, float] = {}
        self.ended: list[tuple[str, str, float]] = []
        self.fail = False
        self.lookups = 0

    def lookup_ip(self, ip: str) -> Any:
        self.lookups += 1
        if self.fail:
            raise OSError("database is locked")
        expires = self.members.get(ip)
        if expires is None:
            return None
        return type("S", (), {"expires": lambda self: expires})()

    def ended_after(self, last_id: int, limit: int) -> list[SessionEvent]:
        """The n-th entry of `ended` is event n (the store's ids grow in commit order)."""
        events = [
            SessionEvent(n, t, "ended", sid, ip, "")
            for n, (sid, ip, t) in enumerate(self.ended, start=1)
        ]
        return events[last_id : last_id + limit]

    def last_event(self) -> int:
        return len(self.ended)


def test_an_end_committed_late_is_still_seen() -> None:
    """Another process's end may carry an earlier timestamp than one already seen: it is
    followed by its event's id, not by its time."""
    store = FakeSessions()
    logins = Logins(store, wall=lambda: 1000.0)
    store.members = {"192.168.1.101": 9999.0, "192.168.1.102": 9999.0}
    logins.poll(0.0)
    assert logins.check("192.168.1.101", 0.0) and logins.check("192.168.1.102", 0.0)
    store.ended.append(("s2", "192.168.1.102", 1003.0))
    del store.members["192.168.1.102"]
    logins.poll(1.0)
    store.ended.append(("s1", "192.168.1.101", 1002.0))  # its commit lands after s2's
    del store.members["192.168.1.101"]
    logins.poll(1.5)
    assert not logins.logged_in("192.168.1.101", 1.5)


def test_logins_follow_the_store_and_fail_closed() -> None:
    store = FakeSessions()
    logins = Logins(store, wall=lambda: 1000.0)
    logins.poll(0.0)
    assert not logins.check("192.168.1.101", 0.0)
    store.members["192.168.1.101"] = 2000.0
    assert logins.check("192.168.1.101", 0.0)  # not-logged-in is never remembered
    assert logins.logged_in("192.168.1.101", 1.0)
    store.ended.append(("s1", "192.168.1.101", 1001.0))
    del store.members["192.168.1.101"]
    store.members["192.168.1.104"] = 9999.0
    assert logins.check("192.168.1.104", 0.0)
    logins.poll(2.0)  # the portal (or the lease follower) ended it: gone at once
    assert not logins.logged_in("192.168.1.101", 2.0)
    logins.poll(4.5)  # about to lapse, still in the store: renewed, on the fast path
    assert logins.logged_in("192.168.1.104", 6.0)
    store.members["192.168.1.102"] = 1002.0  # two seconds left: trusted two seconds
    assert logins.check("192.168.1.102", 0.0) and not logins.logged_in("192.168.1.102", 2.5)
    store.fail = True  # a store that cannot answer: not logged in, never an exception
    assert not logins.check("192.168.1.103", 0.0)
    assert not Logins(None).check("192.168.1.101", 0.0)


# -- the service: a burst over the rate -------------------------------------------
def test_a_burst_over_the_rate_is_dropped_and_counted_then_the_client_is_served() -> None:
    async def go() -> None:
        res = resolver()
        store = FakeSessions()
        server = Server(
            res, [], timeout=1.0, logins=Logins(store), limiter=RateLimit(rate=20, burst=10)
        )
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.bind(("127.0.0.1", 0))
        udp = GuestUdp(server, sock, asyncio.get_running_loop())
        udp.start()
        guest = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        guest.setblocking(False)
        loop = asyncio.get_running_loop()
        got = 0
        try:
            for i in range(40):
                guest.sendto(ask("portal.guest.example", qid=i), sock.getsockname())
            while True:
                try:
                    await asyncio.wait_for(loop.sock_recv(guest, 4096), 0.3)
                except TimeoutError:
                    break
                got += 1
            assert 10 <= got < 20, got
            assert server.limiter.dropped == 40 - got
            await asyncio.sleep(0.5)  # the bucket refills
            guest.sendto(ask("portal.guest.example", qid=0x4242), sock.getsockname())
            data = await asyncio.wait_for(loop.sock_recv(guest, 4096), 1.0)
            reply = DNSRecord.parse(data)
            assert reply.header.id == 0x4242 and str(reply.rr[0].rdata) == "192.168.1.1"
        finally:
            udp.close()
            guest.close()

    asyncio.run(go())


# -- configuration ----------------------------------------------------------------
@pytest.mark.parametrize(
    ("new", "key", "words"),
    [
        ("[dns]\nrate_limit = 0\n", "dns.rate_limit", "out of range"),
        ('[dns]\nrate_limit = "fast"\n', "dns.rate_limit", "expected an integer"),
        ("[dns]\nrate_burst = 0\n", "dns.rate_burst", "out of range"),
        ("[dns]\nrate_limit = 100\nrate_burst = 50\n", "dns.rate_burst", "below rate_limit"),
        ('[dns]\nbefore_login = "forward"\n', "dns.before_login", "expected one of"),
    ],
)
def test_rate_keys_are_checked(tmp_path: Path, new: str, key: str, words: str) -> None:
    path = variant(tmp_path, "[dns]\n", new)
    with pytest.raises(ConfigError) as err:
        load(path)
    assert key in str(err.value) and words in str(err.value) and str(path) in str(err.value)
    assert err.value.line is not None


def test_rate_defaults(tmp_path: Path) -> None:
    cfg = load(variant(tmp_path, "[dns]\n", "[dns]\n"))
    assert cfg.dns.rate_limit == 50 and cfg.dns.rate_burst == 200
    assert cfg.dns.before_login == "portal"  # a browser opening any page finds the portal
