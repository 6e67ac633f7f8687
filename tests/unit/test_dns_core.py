"""The resolver's decisions without sockets: filtering, local names, cache, errors."""

from __future__ import annotations

import ipaddress

import pytest
from dnslib import AAAA, QTYPE, RCODE, RR, SOA, A, DNSRecord
from hypothesis import given, settings
from hypothesis import strategies as st

from appliance.dns.core import Drop, Forward, Reply, Resolver, Settings, error_reply

pytestmark = pytest.mark.unit


def resolver(cache_size: int = 100, before_login: str = "refuse") -> Resolver:
    return Resolver(
        Settings.build(
            guest_ip=ipaddress.IPv4Address("192.168.1.1"),
            guest_subnet=ipaddress.IPv4Network("192.168.1.0/24"),
            domain="Guest.Example.",
            guest_names=["mail", "pop"],
            hidden=[ipaddress.IPv4Network("198.51.100.0/24"), ipaddress.IPv4Network("10.0.0.0/8")],
            extra_names=["portal.guest.example"],
            cache_size=cache_size,
            before_login=before_login,
        )
    )


def ask(name: str, qtype: str = "A", qid: int = 0x1234) -> bytes:
    q = DNSRecord.question(name, qtype)
    q.header.id = qid
    return bytes(q.pack())


def upstream(query: bytes, *records: RR, rcode: int = RCODE.NOERROR) -> bytes:
    reply = DNSRecord.parse(query).reply()
    reply.header.id = 0x7777  # the ID upstream saw is not the guest's
    reply.header.rcode = rcode
    for rr in records:
        reply.add_answer(rr)
    return bytes(reply.pack())


def test_hidden_address_turns_the_name_into_nxdomain() -> None:
    r = resolver()
    q = ask("intranet.site.example")
    fwd = r.query(q, now=0, logged_in=True)
    assert isinstance(fwd, Forward)
    up = upstream(
        q,
        RR("intranet.site.example", QTYPE.CNAME, rdata=__import__("dnslib").CNAME("srv.x")),
        RR("srv.x", QTYPE.A, rdata=A("198.51.100.3"), ttl=300),
    )
    out = DNSRecord.parse(r.answer(fwd, up, now=0))
    assert out.header.id == 0x1234 and out.header.rcode == RCODE.NXDOMAIN and not out.rr
    assert r.stats.hidden == 1


def test_public_answer_passes_and_is_served_from_cache_with_the_new_id() -> None:
    r = resolver()
    q = ask("www.public.example")
    fwd = r.query(q, now=0, logged_in=True)
    assert isinstance(fwd, Forward)
    up = upstream(
        q,
        RR("www.public.example", QTYPE.A, rdata=A("203.0.113.80"), ttl=100),
        RR("www.public.example", QTYPE.AAAA, rdata=AAAA("2001:db8::1"), ttl=100),
    )
    out = DNSRecord.parse(r.answer(fwd, up, now=0))
    assert [str(rr.rdata) for rr in out.rr] == ["203.0.113.80"]  # AAAA removed
    again = r.query(ask("www.public.example", qid=0x4242), now=50, logged_in=True)
    assert isinstance(again, Reply)
    hit = DNSRecord.parse(again.data)
    assert hit.header.id == 0x4242 and str(hit.rr[0].rdata) == "203.0.113.80"
    # expired after the smallest TTL
    assert isinstance(r.query(ask("www.public.example"), now=101, logged_in=True), Forward)


def test_local_names_reverse_zones_and_the_guest_domain() -> None:
    r = resolver()
    for name in ("mail.guest.example", "POP.Guest.Example", "portal.guest.example"):
        out = r.query(ask(name), now=0, logged_in=True)
        assert isinstance(out, Reply)
        assert [str(rr.rdata) for rr in DNSRecord.parse(out.data).rr] == ["192.168.1.1"]
    out = r.query(ask("mail.guest.example", "AAAA"), now=0, logged_in=True)
    assert isinstance(out, Reply)
    rec = DNSRecord.parse(out.data)
    assert rec.header.rcode == RCODE.NOERROR and not rec.rr
    for name, qtype in (
        ("other.guest.example", "A"),
        ("3.100.51.198.in-addr.arpa", "PTR"),
        ("7.1.168.192.in-addr.arpa", "PTR"),
    ):
        out = r.query(ask(name, qtype), now=0, logged_in=True)
        assert isinstance(out, Reply)
        assert DNSRecord.parse(out.data).header.rcode == RCODE.NXDOMAIN
    assert isinstance(
        r.query(ask("80.113.0.203.in-addr.arpa", "PTR"), now=0, logged_in=True), Forward
    )


def test_probe_names_resolve_when_upstream_fails() -> None:
    r = resolver()
    q = ask("captive.apple.com")
    fwd = r.query(q, now=0, logged_in=True)
    assert isinstance(fwd, Forward)
    out = DNSRecord.parse(r.answer(fwd, None, now=0))
    assert [str(rr.rdata) for rr in out.rr] == ["192.168.1.1"]
    q = ask("other.example")
    fwd = r.query(q, now=0, logged_in=True)
    assert isinstance(fwd, Forward)
    failed = DNSRecord.parse(r.answer(fwd, None, now=0))
    assert failed.header.rcode == RCODE.SERVFAIL and failed.header.id == 0x1234
    # the question is echoed: glibc's stub ignores an answer to another question
    assert str(failed.q.qname) == "other.example."
    # SERVFAIL is not cached
    assert isinstance(r.query(q, now=1, logged_in=True), Forward)


def test_negative_answers_are_cached_for_the_soa_minimum() -> None:
    r = resolver()
    q = ask("nx.public.example")
    fwd = r.query(q, now=0, logged_in=True)
    assert isinstance(fwd, Forward)
    reply = DNSRecord.parse(q).reply()
    reply.header.rcode = RCODE.NXDOMAIN
    reply.add_auth(RR("public.example", QTYPE.SOA, ttl=900, rdata=SOA("ns", "h", (1, 2, 3, 4, 30))))
    r.answer(fwd, bytes(reply.pack()), now=0)
    assert isinstance(r.query(q, now=29, logged_in=True), Reply)
    assert isinstance(r.query(q, now=31, logged_in=True), Forward)


@pytest.mark.parametrize(
    "data",
    [
        b"\x12\x34",
        b"\x12\x34\x01\x00\x00\x01\x00\x00\x00\x00\x00\x00\x3fshort",
        ask("x.example") + b"\x00" * 600,
        b"\x12\x34\x01\x00\x00\x00\x00\x00\x00\x00\x00\x00",
        bytes(range(256)) * 2,
    ],
)
def test_malformed_queries_get_formerr(data: bytes) -> None:
    r = resolver()
    out = r.query(data, now=0, logged_in=True)
    assert isinstance(out, Reply)
    assert out.data[:2] == data[:2] and out.data[2] & 0x80 and out.data[3] & 0x0F == 1


def test_error_reply_keeps_id_and_rd() -> None:
    out = error_reply(b"\xaa\xbb\x01\x00", RCODE.SERVFAIL)
    assert out is not None and out[:2] == b"\xaa\xbb" and out[2] & 0x01 and out[3] & 0x0F == 2
    assert error_reply(b"\x01", RCODE.FORMERR) is None


def test_cache_is_bounded() -> None:
    r = resolver(cache_size=10)
    for i in range(50):
        q = ask(f"n{i}.public.example")
        fwd = r.query(q, now=0, logged_in=True)
        assert isinstance(fwd, Forward)
        r.answer(fwd, upstream(q, RR(f"n{i}.public.example", rdata=A("203.0.113.1"))), now=0)
    assert len(r.cache.entries) <= 10


@settings(max_examples=300, deadline=None)
@given(data=st.binary(min_size=0, max_size=600))
def test_any_bytes_get_an_answer_or_a_drop_never_an_exception(data: bytes) -> None:
    r = resolver()
    out = r.query(data, now=0, logged_in=True)
    if isinstance(out, Reply):
        assert out.data[:2] == data[:2]
    if isinstance(out, Forward):
        # whatever upstream sends back (garbage included) yields a reply for the guest
        reply = r.answer(out, data, now=0)
        assert reply[:2] == data[:2]


@settings(max_examples=200, deadline=None)
@given(flip=st.integers(min_value=12, max_value=40), value=st.integers(0, 255))
def test_corrupted_real_queries_never_raise(flip: int, value: int) -> None:
    q = bytearray(ask("www.public.example"))
    q[flip % len(q)] = value
    r = resolver()
    out = r.query(bytes(q), now=0, logged_in=True)
    assert isinstance(out, Reply | Forward | Drop)
