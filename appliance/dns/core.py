"""The guest resolver's logic without sockets: what to answer, what to forward, what to hide.

A guest's query is either answered here (the appliance's own names, reverse lookups
of hidden or guest networks, errors) or forwarded to the site's resolver.  Upstream
answers are filtered before a guest sees them: an A record inside a hidden network
turns the whole answer into NXDOMAIN, and AAAA/SVCB/HTTPS records are removed
(guests have no IPv6 service, and a segment's IPv6 prefix must not leak either).

The cache keys on the query's bytes after the ID (question, flags and EDNS as the
client sent them) and stores the finished reply minus its ID, so a hit costs one dict
lookup and one bytes concatenation: no parse.  TTLs are not counted down in cached
replies; an entry lives for the smallest TTL it carries (capped), which is what a
guest would have seen at the time of the upstream answer.

Before login nothing a guest asks about an outside name leaves the appliance, so DNS
carries no tunnel: the appliance's own names (the portal's, those under the guest
domain) and the OS captive-portal probe names are answered as for a member, for the
types a browser asks when it opens a page (A, AAAA, SVCB, HTTPS) only.  Any other
type (TXT, NULL, ANY, MX, SRV, PTR...) is REFUSED.  Any other name gets, by
`Settings.before_login`:

- "portal" (the default): A is answered with STAND_IN (appliance.config), TTL 0,
  and AAAA/SVCB/HTTPS with no records, still without asking upstream.  Port 80 to
  STAND_IN goes to the portal like any address before login; the firewall resets
  every other connection to it at once (HTTPS upgrades fail fast, QUIC gets ICMP
  port unreachable), so a browser opening any page shows the login page.
- "refuse": REFUSED.  Devices whose OS runs a captive-portal probe (or reads the
  RFC 8908 API) find the portal; a browser opening any other page before that gets
  a DNS error instead of the login page.

REFUSED, not NXDOMAIN: NXDOMAIN says the name does not exist, and stub resolvers cache
that (RFC 2308), so names would stay broken for a while after login; REFUSED is a
refusal by policy, which nobody caches.  None of these answers goes into the cache.
The caller says whether the guest is logged in; unknown is not.
"""

from __future__ import annotations

import ipaddress
import struct
from collections.abc import Iterable
from dataclasses import dataclass, field

from dnslib import QTYPE, RCODE, RR, A, DNSRecord

from appliance.config import STAND_IN

MAX_QUERY = 512  # a guest's question never needs more; anything bigger is refused
MAX_TTL = 3600
NEGATIVE_TTL = 60
LOCAL_TTL = 60
PROBE_TTL = 30
_DROP_TYPES = {QTYPE.AAAA, 64, 65}  # AAAA, SVCB, HTTPS (address hints)
# what a browser or an OS probe asks for a name before login; TXT, NULL, ANY, MX, SRV,
# CNAME, PTR... carry more data per answer and a guest needs none of them yet
BEFORE_LOGIN_TYPES = frozenset({QTYPE.A, QTYPE.AAAA, 64, 65})
BEFORE_LOGIN_MODES = ("refuse", "portal")

# Hosts the common OSes fetch to detect a captive portal.  Before login the fetch is
# redirected to the portal, which is exactly what makes the OS show it; so these names
# must resolve even where the site's resolver knows nothing about the internet.
PROBE_NAMES = frozenset(
    {
        "captive.apple.com",
        "www.apple.com",
        "connectivitycheck.gstatic.com",
        "connectivitycheck.android.com",
        "clients3.google.com",
        "www.google.com",
        "www.msftconnecttest.com",
        "www.msftncsi.com",
        "detectportal.firefox.com",
        "nmcheck.gnome.org",
        "network-test.debian.org",
        "connectivity-check.ubuntu.com",
    }
)


@dataclass(frozen=True)
class Settings:
    guest_ip: ipaddress.IPv4Address
    domain: str  # the guest domain, lower case, no trailing dot
    local_names: frozenset[str]  # full names (lower case, no dot) answered with guest_ip
    hidden: tuple[ipaddress.IPv4Network, ...]
    guest_subnet: ipaddress.IPv4Network
    cache_size: int = 10000
    probe_names: frozenset[str] = PROBE_NAMES
    before_login: str = "portal"  # or "refuse": see the module's docstring

    @classmethod
    def build(
        cls,
        guest_ip: ipaddress.IPv4Address,
        guest_subnet: ipaddress.IPv4Network,
        domain: str,
        guest_names: Iterable[str],
        hidden: Iterable[ipaddress.IPv4Network],
        extra_names: Iterable[str] = (),
        cache_size: int = 10000,
        before_login: str = "portal",
    ) -> Settings:
        domain = domain.lower().strip(".")
        names = {f"{n.lower().strip('.')}.{domain}" for n in guest_names}
        names |= {n.lower().strip(".") for n in extra_names}
        if before_login not in BEFORE_LOGIN_MODES:
            raise ValueError(f"before_login is one of {', '.join(BEFORE_LOGIN_MODES)}")
        return cls(
            guest_ip,
            domain,
            frozenset(names),
            tuple(hidden),
            guest_subnet,
            cache_size,
            before_login=before_login,
        )

    def is_hidden(self, addr: ipaddress.IPv4Address) -> bool:
        return any(addr in net for net in self.hidden)


@dataclass
class Reply:
    """Send these bytes back to the guest."""

    data: bytes


@dataclass
class Forward:
    """Ask upstream: `query` is the guest's query (its ID is replaced when sent)."""

    query: bytes
    key: bytes
    qname: str
    qtype: int
    udp_limit: int
    client_id: bytes


@dataclass
class Drop:
    reason: str


Action = Reply | Forward | Drop


@dataclass
class Stats:
    queries: int = 0
    hits: int = 0
    forwarded: int = 0
    formerr: int = 0
    hidden: int = 0
    local: int = 0
    servfail: int = 0
    overload: int = 0  # SERVFAIL at once: too many questions already waiting upstream
    refused: int = 0  # before login: a name or type a guest does not need yet
    stand_in: int = 0  # before login: an outside name answered with STAND_IN (or no records)


def error_reply(query: bytes, rcode: int) -> bytes | None:
    """A bare header answer (no records) for a query we cannot or will not parse."""
    if len(query) < 2:
        return None
    flags = 0x8000  # QR
    if len(query) >= 4:
        hi = query[2]
        flags |= (hi & 0x78) << 8  # keep the opcode
        flags |= (hi & 0x01) << 8  # keep RD
    flags |= 0x0080 | (rcode & 0x0F)  # RA, rcode
    return query[:2] + struct.pack("!HHHHH", flags, 0, 0, 0, 0)


def _udp_limit(rec: DNSRecord) -> int:
    for rr in rec.ar:
        if rr.rtype == QTYPE.OPT:
            return max(512, min(int(rr.rclass), 4096))
    return 512


def _ttl(rec: DNSRecord) -> int:
    if rec.header.rcode == RCODE.NOERROR and rec.rr:
        return min(MAX_TTL, min(int(rr.ttl) for rr in rec.rr))
    if rec.header.rcode in (RCODE.NOERROR, RCODE.NXDOMAIN):
        soa = [rr for rr in rec.auth if rr.rtype == QTYPE.SOA]
        if soa:
            return min(MAX_TTL, int(soa[0].ttl), int(soa[0].rdata.times[-1]))
        return NEGATIVE_TTL
    return 0  # SERVFAIL, REFUSED...: never cached


@dataclass
class Cache:
    """Finished replies minus their ID, keyed by the query minus its ID."""

    size: int
    entries: dict[bytes, tuple[float, bytes, bytes]] = field(default_factory=dict)

    def get(self, key: bytes, now: float, tcp: bool = False) -> bytes | None:
        hit = self.entries.get(key)
        if hit is None:
            return None
        if hit[0] <= now:
            del self.entries[key]
            return None
        return hit[1] if tcp else hit[2]

    def put(self, key: bytes, expires: float, full: bytes, udp: bytes) -> None:
        if self.size <= 0:
            return
        if key not in self.entries and len(self.entries) >= self.size:
            # evict the oldest tenth in one go (dicts keep insertion order)
            for old in list(self.entries)[: max(1, self.size // 10)]:
                del self.entries[old]
        self.entries[key] = (expires, full, udp)


class Resolver:
    """Decide per query; filter and cache upstream answers."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.cache = Cache(settings.cache_size)
        self.stats = Stats()

    # -- guest query --------------------------------------------------------
    def query(self, data: bytes, now: float, tcp: bool = False, logged_in: bool = False) -> Action:
        """Decide for one guest query; `logged_in` False (the default) allows few names."""
        self.stats.queries += 1
        if len(data) < 12:
            return self._formerr(data)
        if data[2] & 0x80:
            return Drop("a response sent to the resolver")
        if logged_in:  # before login the name is checked first: no cached shortcut
            hit = self.cache.get(data[2:], now, tcp)
            if hit is not None:
                self.stats.hits += 1
                return Reply(data[:2] + hit)
        if len(data) > MAX_QUERY:
            return self._formerr(data)
        opcode = (data[2] >> 3) & 0x0F
        if opcode != 0:
            return self._error(data, RCODE.NOTIMP)
        try:
            rec = DNSRecord.parse(data)
        except Exception:  # dnslib raises several kinds on garbage
            return self._formerr(data)
        if len(rec.questions) != 1 or rec.rr or rec.auth:
            return self._formerr(data)
        qname = str(rec.q.qname).lower().rstrip(".")
        qtype = int(rec.q.qtype)
        if not logged_in:
            if not self.allowed_before_login(qname, qtype):
                return Reply(self._not_yet(rec, qtype))
            hit = self.cache.get(data[2:], now, tcp)
            if hit is not None:
                self.stats.hits += 1
                return Reply(data[:2] + hit)
        local = self._local(rec, qname, qtype)
        if local is not None:
            self.stats.local += 1
            return Reply(self._finish(data[2:], local, now, tcp, _udp_limit(rec)))
        self.stats.forwarded += 1
        return Forward(data, data[2:], qname, qtype, _udp_limit(rec), data[:2])

    def allowed_before_login(self, qname: str, qtype: int) -> bool:
        """The appliance's names and the captive-portal probes, for address types only."""
        if qtype not in BEFORE_LOGIN_TYPES:
            return False
        s = self.settings
        return (
            qname in s.local_names
            or qname in s.probe_names
            or qname == s.domain
            or qname.endswith("." + s.domain)
        )

    def _not_yet(self, rec: DNSRecord, qtype: int) -> bytes:
        """Before login, for a name or type not allowed yet: never asks upstream, never cached."""
        reply = rec.reply()  # with the question: stubs match it to their query
        if self.settings.before_login == "portal" and qtype in BEFORE_LOGIN_TYPES:
            self.stats.stand_in += 1
            if qtype == QTYPE.A:
                reply.add_answer(RR(rec.q.qname, QTYPE.A, rdata=A(str(STAND_IN)), ttl=0))
            return bytes(reply.pack())
        self.stats.refused += 1
        reply.header.rcode = RCODE.REFUSED
        return bytes(reply.pack())

    def _formerr(self, data: bytes) -> Action:
        self.stats.formerr += 1
        return self._error(data, RCODE.FORMERR)

    def _error(self, data: bytes, rcode: int) -> Action:
        out = error_reply(data, rcode)
        return Reply(out) if out is not None else Drop("too short to answer")

    def _local(self, rec: DNSRecord, qname: str, qtype: int) -> DNSRecord | None:
        s = self.settings
        if qname in s.local_names:
            reply = rec.reply()
            if qtype in (QTYPE.A, QTYPE.ANY):
                reply.add_answer(RR(rec.q.qname, QTYPE.A, rdata=A(str(s.guest_ip)), ttl=LOCAL_TTL))
            return reply
        if qname == s.domain or qname.endswith("." + s.domain):
            return _nxdomain(rec)
        if qname.endswith(".in-addr.arpa"):
            parts = qname[: -len(".in-addr.arpa")].split(".")
            if len(parts) == 4:
                try:
                    addr = ipaddress.IPv4Address(".".join(reversed(parts)))
                except ValueError:
                    return None
                if s.is_hidden(addr) or addr in s.guest_subnet:
                    return _nxdomain(rec)
        return None

    # -- upstream answer ----------------------------------------------------
    def answer(self, fwd: Forward, upstream: bytes | None, now: float, tcp: bool = False) -> bytes:
        """The reply for the guest, from upstream's bytes (None: no usable answer)."""
        rec = None
        if upstream is not None:
            try:
                rec = DNSRecord.parse(upstream)
            except Exception:
                rec = None
        query = DNSRecord.parse(fwd.query)
        if rec is None or rec.header.rcode not in (RCODE.NOERROR, RCODE.NXDOMAIN):
            if fwd.qname in self.settings.probe_names:
                return self._finish(fwd.key, self._probe(query), now, tcp, fwd.udp_limit)
            self.stats.servfail += 1
            # with the question: stub resolvers (glibc) ignore an answer whose question
            # section does not match theirs, and would wait out their timeout instead
            failed = query.reply()
            failed.header.rcode = RCODE.SERVFAIL
            return bytes(failed.pack())
        rec.header.id = query.header.id
        reply = self.filter(rec, query)
        if fwd.qname in self.settings.probe_names and not reply.rr:
            reply = self._probe(query)
        return self._finish(fwd.key, reply, now, tcp, fwd.udp_limit)

    def _probe(self, query: DNSRecord) -> DNSRecord:
        reply = query.reply()
        if query.q.qtype == QTYPE.A:
            ip = str(self.settings.guest_ip)
            reply.add_answer(RR(query.q.qname, QTYPE.A, rdata=A(ip), ttl=PROBE_TTL))
        return reply

    def filter(self, rec: DNSRecord, query: DNSRecord) -> DNSRecord:
        """Remove what a guest must not see; a hidden address makes the name NXDOMAIN."""
        for rr in rec.rr:
            if rr.rtype == QTYPE.A and self.settings.is_hidden(
                ipaddress.IPv4Address(str(rr.rdata))
            ):
                self.stats.hidden += 1
                return _nxdomain(query)
        rec.rr = [rr for rr in rec.rr if rr.rtype not in _DROP_TYPES]
        rec.auth = [rr for rr in rec.auth if self._keep(rr)]
        rec.ar = [rr for rr in rec.ar if self._keep(rr)]
        rec.header.aa = 0
        return rec

    def _keep(self, rr: RR) -> bool:
        if rr.rtype in _DROP_TYPES:
            return False
        return not (
            rr.rtype == QTYPE.A and self.settings.is_hidden(ipaddress.IPv4Address(str(rr.rdata)))
        )

    def _finish(self, key: bytes, reply: DNSRecord, now: float, tcp: bool, limit: int) -> bytes:
        full: bytes = reply.pack()
        udp: bytes = full if len(full) <= limit else reply.truncate().pack()
        ttl = _ttl(reply)
        if ttl > 0:
            self.cache.put(key, now + ttl, full[2:], udp[2:])
        return full if tcp else udp


def _nxdomain(query: DNSRecord) -> DNSRecord:
    reply = query.reply()
    reply.header.rcode = RCODE.NXDOMAIN
    return reply


__all__ = [
    "BEFORE_LOGIN_MODES",
    "BEFORE_LOGIN_TYPES",
    "PROBE_NAMES",
    "STAND_IN",
    "Drop",
    "Forward",
    "Reply",
    "Resolver",
    "Settings",
]
