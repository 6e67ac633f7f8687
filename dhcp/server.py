"""The DHCP server as a pure function: (message, source, lease index, time, settings) -> Outcome.

No sockets, no clock, no database: the service feeds messages in, commits the
persisted changes of the Outcome, applies them to the index, then sends the reply.
That order is what makes an ACK durable before the client sees it.  RFC 2131
section 4.3 is followed state by state; every silent path names a reason so the
service can count it.

A guest chooses every byte of its message, so nothing in it is trusted on its own
word: chaddr must be the frame's Ethernet source (`Source`, read by the service
from the link layer), relayed messages are taken only from configured relays, a
RELEASE only from the lease's own (IP, MAC), and a client identifier never lets
another hardware address take over a lease (the client key holds chaddr).  One
hardware address holds at most `leases_per_mac` leases (and as many quarantined
addresses it declined): a new client identity on it retires its oldest lease
instead of taking another address from the pool.
"""

from __future__ import annotations

import socket
import struct
from dataclasses import dataclass, field
from typing import NamedTuple

from appliance.config import Config
from dhcp import codec
from dhcp.codec import (
    ACK,
    BOOTREPLY,
    BOOTREQUEST,
    BROADCAST_FLAG,
    DECLINE,
    DISCOVER,
    INFORM,
    NAK,
    OFFER,
    RELEASE,
    REQUEST,
    ZERO_IP,
    Message,
)
from dhcp.pool import OFFER_HOLD, Binding, Change, LeaseIndex

BROADCAST_IP = "255.255.255.255"
_SNAME, _FILE = bytes(64), bytes(128)
CLIENT_PORT = 68
SERVER_PORT = 67


class Source(NamedTuple):
    """Where a message came from, as the link layer says (not the message itself)."""

    mac: bytes  # Ethernet source address, 6 bytes
    ip: str  # IP source address


@dataclass(frozen=True)
class Settings:
    """What the server needs from the config, precomputed into wire bytes once."""

    server_ip: str
    network: int
    netmask: int
    pool_start: str
    pool_end: str
    lease_time: int
    renewal_time: int
    rebinding_time: int
    quarantine: int
    reservations: dict[str, str]
    params: dict[int, bytes]  # options sent when asked for (or when no list is sent)
    relays: frozenset[str] = frozenset()  # giaddr values whose relayed messages we answer
    leases_per_mac: int = 2
    always: tuple[int, ...] = (codec.OPT_SUBNET_MASK, codec.OPT_ROUTER, codec.OPT_DNS)
    server_id: bytes = field(init=False)
    # reply options by (type, lease, parameter request list); replies share these dicts
    cache: dict[tuple[int, bool, bytes | None], tuple[dict[int, bytes], bytes]] = field(
        init=False, default_factory=dict, compare=False
    )
    lease_opts: dict[int, bytes] = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "server_id", socket.inet_aton(self.server_ip))
        object.__setattr__(
            self,
            "lease_opts",
            {
                codec.OPT_LEASE_TIME: struct.pack("!I", self.lease_time),
                codec.OPT_RENEWAL: struct.pack("!I", self.renewal_time),
                codec.OPT_REBINDING: struct.pack("!I", self.rebinding_time),
            },
        )

    @classmethod
    def from_config(cls, config: Config) -> Settings:
        iface = config.interfaces.guest_address
        gw = socket.inet_aton(str(iface.ip))
        params = {
            codec.OPT_SUBNET_MASK: iface.network.netmask.packed,
            codec.OPT_ROUTER: gw,
            codec.OPT_DNS: gw,
            codec.OPT_DOMAIN: config.dhcp.domain.encode(),
        }
        if config.portal.enabled:
            url = config.portal.captive_api_url(iface.ip)
            params[codec.OPT_CAPTIVE_PORTAL] = url.encode()
        d = config.dhcp
        return cls(
            server_ip=str(iface.ip),
            network=int(iface.network.network_address),
            netmask=int(iface.network.netmask),
            pool_start=str(d.pool_start),
            pool_end=str(d.pool_end),
            lease_time=d.lease_time,
            renewal_time=d.renewal_time,
            rebinding_time=d.rebinding_time,
            quarantine=d.decline_quarantine,
            reservations={r.mac: str(r.address) for r in d.reservations},
            params=params,
            relays=frozenset(str(r) for r in d.relays),
            leases_per_mac=d.leases_per_mac,
        )

    def in_subnet(self, ip: str) -> bool:
        try:
            n = struct.unpack("!I", socket.inet_aton(ip))[0]
        except OSError:
            return False
        broadcast = self.network | (~self.netmask & 0xFFFFFFFF)
        return bool(n & self.netmask == self.network and n != broadcast)

    def new_index(self) -> LeaseIndex:
        return LeaseIndex(self.pool_start, self.pool_end, self.reservations)


class Outcome(NamedTuple):
    reply: Message | None
    changes: tuple[Change, ...] = ()
    drop: str | None = None  # why nothing is sent, counted by the service
    nak: str | None = None  # why a NAK is sent


def _drop(reason: str, *changes: Change) -> Outcome:
    return Outcome(None, changes, drop=reason)


def _build_options(prl: bytes | None, s: Settings, mtype: int, lease: bool) -> dict[int, bytes]:
    opts = {codec.OPT_MESSAGE_TYPE: bytes((mtype,)), codec.OPT_SERVER_ID: s.server_id}
    if lease:
        opts.update(s.lease_opts)
    params = s.params
    if prl is None:
        opts.update(params)
        return opts
    for code in prl:  # the client's order first
        v = params.get(code)
        if v is not None:
            opts[code] = v
    for code in s.always:
        if code not in opts:
            opts[code] = params[code]
    return opts


def _options(req: Message, s: Settings, mtype: int, lease: bool) -> tuple[dict[int, bytes], bytes]:
    """Reply options and their wire form, cached per (type, parameter request list)."""
    prl = req.options.get(codec.OPT_PARAM_REQUEST)
    key = (mtype, lease, prl)
    hit = s.cache.get(key)
    if hit is None:
        opts = _build_options(prl, s, mtype, lease)
        hit = (opts, codec.options_wire(opts))
        if len(s.cache) < 4096:
            s.cache[key] = hit
    return hit


def _echo_client_id(
    req: Message, opts: dict[int, bytes], wire: bytes | None
) -> tuple[dict[int, bytes], bytes | None]:
    """RFC 6842 section 3: OFFER, ACK and NAK carry the client's option 61 unaltered."""
    cid = req.options.get(codec.OPT_CLIENT_ID)
    if cid is None:
        return opts, wire
    opts = {**opts, codec.OPT_CLIENT_ID: cid}
    if wire is not None and len(cid) <= 255:
        wire = wire[:-1] + bytes((codec.OPT_CLIENT_ID, len(cid))) + cid + b"\xff"
    else:
        wire = None
    return opts, wire


def _reply(req: Message, s: Settings, mtype: int, yiaddr: str, lease: bool = True) -> Message:
    opts, wire = _echo_client_id(req, *_options(req, s, mtype, lease))
    return Message(
        BOOTREPLY,
        req.htype,
        req.hlen,
        0,
        req.xid,
        0,
        req.flags,
        req.ciaddr if mtype == ACK else ZERO_IP,
        yiaddr,
        ZERO_IP,
        req.giaddr,
        req.chaddr,
        _SNAME,
        _FILE,
        opts,
        wire,
    )


def _nak(req: Message, s: Settings, why: str) -> Outcome:
    opts = {
        codec.OPT_MESSAGE_TYPE: bytes((NAK,)),
        codec.OPT_SERVER_ID: s.server_id,
        codec.OPT_MESSAGE: why.replace("_", " ").encode(),
    }
    opts, _ = _echo_client_id(req, opts, None)
    flags = req.flags | BROADCAST_FLAG if req.giaddr != ZERO_IP else req.flags
    reply = Message(
        BOOTREPLY,
        req.htype,
        req.hlen,
        0,
        req.xid,
        0,
        flags,
        ZERO_IP,
        ZERO_IP,
        ZERO_IP,
        req.giaddr,
        req.chaddr,
        options=opts,
    )
    return Outcome(reply, nak=why)


def _hostname(req: Message) -> str | None:
    v = req.options.get(codec.OPT_HOSTNAME)
    return v.decode("utf-8", "replace")[:255] if v else None


def _choose(req: Message, client: bytes, mac: str, index: LeaseIndex, now: float) -> str | None:
    """The address to offer: reservation, current offer, last address, requested, new."""
    reserved = index.reserved.get(mac)
    if reserved is not None:
        return reserved if index.is_free(reserved, client, now) else None
    for ip in (
        index.offer_by_client.get(client),
        index.by_client.get(client),
        req.requested_ip,
    ):
        if ip is not None and index.in_pool(ip, mac) and index.is_free(ip, client, now):
            return ip
    return index.allocate(now)


def _discover(req: Message, index: LeaseIndex, now: float, s: Settings) -> Outcome:
    client, mac = req.client_key, req.mac
    ip = _choose(req, client, mac, index, now)
    if ip is None:
        return _drop("reserved_unavailable" if mac in index.reserved else "pool_exhausted")
    b = Binding(
        ip,
        mac,
        client,
        "offered",
        now + OFFER_HOLD,
        req.options.get(codec.OPT_CLIENT_ID),
        _hostname(req),
    )
    # one hardware address, one offer: a new client identity on it withdraws the others
    changes = [Change("unoffered", o) for o in index.offered_to_mac(mac, client)]
    changes.append(Change("offered", b))
    return Outcome(_reply(req, s, OFFER, ip), tuple(changes))


def _ack(req: Message, ip: str, index: LeaseIndex, now: float, s: Settings) -> Outcome:
    """Bind ip to the client if it may have it, else NAK saying why."""
    client, mac = req.client_key, req.mac
    reserved = index.reserved.get(mac)
    if reserved is not None and ip != reserved:
        return _nak(req, s, "not_yours")
    if not index.in_pool(ip, mac):
        return _nak(req, s, "out_of_pool")
    if not index.is_free(ip, client, now):
        return _nak(req, s, "taken")
    changes: list[Change] = []
    prev = index.by_ip.get(ip)
    kind = "granted"
    if prev is not None and prev.state == "bound":
        if prev.client == client and prev.expires > now:
            kind = "renewed"
        else:  # lapsed, not swept yet: say so before it changes hands
            changes.append(Change("expired", _ended(prev, "expired", prev.expires)))
    held = index.current(client, now)
    if held is not None and held.ip != ip:  # the client moves: its old lease ends
        changes.append(Change("released", _ended(held, "released", now)))
    # the cap per hardware address: its oldest leases under other client ids end
    others = index.held_by_mac(mac, client, now)
    for old in others[: max(0, len(others) - s.leases_per_mac + 1)]:
        if old.ip != ip:
            changes.append(Change("released", _ended(old, "released", now)))
    b = Binding(
        ip,
        mac,
        client,
        "bound",
        now + s.lease_time,
        req.options.get(codec.OPT_CLIENT_ID),
        _hostname(req) or (prev.hostname if prev is not None else None),
    )
    changes.append(Change(kind, b))
    return Outcome(_reply(req, s, ACK, ip), tuple(changes))


def _ended(b: Binding, state: str, when: float) -> Binding:
    return Binding(b.ip, b.mac, b.client, state, when, b.client_id, b.hostname)


def _request(req: Message, index: LeaseIndex, now: float, s: Settings) -> Outcome:
    client = req.client_key
    sid = req.server_id
    wanted = req.requested_ip
    if sid is not None:  # SELECTING: the client answers one server's offer
        if sid != s.server_ip:
            ip = index.offer_by_client.get(client)
            if ip is None:
                return _drop("other_server")
            gone = Binding(ip, req.mac, client, "offered", now)
            return _drop("other_server", Change("unoffered", gone))
        if wanted is None and req.ciaddr != ZERO_IP:
            wanted = req.ciaddr
        if wanted is None:
            return _drop("no_requested_ip")
        return _ack(req, wanted, index, now, s)
    if wanted is not None:  # INIT-REBOOT: the client checks an address it remembers
        if not s.in_subnet(wanted):
            return _nak(req, s, "wrong_subnet")
        known = (
            index.reserved.get(req.mac)
            or index.by_client.get(client)
            or index.offer_by_client.get(client)
        )
        if known is None:
            return _drop("unknown_client")  # RFC 2131 4.3.2: no record -> silent
        if known != wanted:
            return _nak(req, s, "not_yours")
        return _ack(req, wanted, index, now, s)
    # RENEWING (unicast) or REBINDING (broadcast): ciaddr is the address in use
    if req.ciaddr == ZERO_IP:
        return _drop("no_requested_ip")
    if not s.in_subnet(req.ciaddr):
        return _nak(req, s, "wrong_subnet")
    return _ack(req, req.ciaddr, index, now, s)


def _release(req: Message, src: Source, index: LeaseIndex, now: float, s: Settings) -> Outcome:
    sid = req.server_id
    if sid is not None and sid != s.server_ip:
        return _drop("other_server")
    b = index.by_ip.get(req.ciaddr)
    if b is None or b.state != "bound":
        return _drop("release_unknown")
    # only the holder, from the address itself (RFC 2131 4.4.6: the client unicasts it)
    if b.client != req.client_key or (req.giaddr == ZERO_IP and src.ip != req.ciaddr):
        return _drop("release_not_owner")
    return Outcome(None, (Change("released", _ended(b, "released", now)),))


def _decline(req: Message, index: LeaseIndex, now: float, s: Settings) -> Outcome:
    sid = req.server_id
    if sid is not None and sid != s.server_ip:
        return _drop("other_server")
    ip = req.requested_ip
    if ip is None:
        return _drop("decline_unknown")
    client = req.client_key
    b = index.by_ip.get(ip)
    o = index.offers.get(ip)
    ours = (b is not None and b.state == "bound" and b.client == client) or (
        o is not None and o.client == client
    )
    if not ours:
        return _drop("decline_unknown")
    mac = req.mac
    if index.quarantined_by_mac(mac, now) >= s.leases_per_mac:
        # DISCOVER, DECLINE, again: one MAC could quarantine the whole pool.  Past the
        # cap its DECLINE only gives the address back, unquarantined.
        if b is not None and b.state == "bound" and b.client == client:
            return _drop("decline_limit", Change("released", _ended(b, "released", now)))
        return _drop("decline_limit", Change("unoffered", Binding(ip, mac, client, "offered", now)))
    q = Binding(ip, mac, client, "declined", now + s.quarantine, req.options.get(61))
    return Outcome(None, (Change("declined", q),))


def _inform(req: Message, s: Settings) -> Outcome:
    if req.ciaddr == ZERO_IP:
        return _drop("inform_without_address")
    return Outcome(_reply(req, s, ACK, ZERO_IP, lease=False))


def handle(req: Message, src: Source, index: LeaseIndex, now: float, s: Settings) -> Outcome:
    """Answer one decoded message; the index is only read, the changes say what to write."""
    if req.op != BOOTREQUEST:
        return _drop("bootreply")
    if req.htype != 1 or req.hlen != 6:
        # the guest side is Ethernet, and a session is bound to an Ethernet MAC
        return _drop("not_ethernet")
    mtype = req.message_type
    if mtype is None:
        return _drop("not_dhcp")
    if req.giaddr != ZERO_IP:
        if not s.in_subnet(req.giaddr):
            return _drop("foreign_relay")
        # a relay vouches for chaddr, so only a configured one, from its own address
        if req.giaddr not in s.relays or src.ip != req.giaddr:
            return _drop("untrusted_relay")
    elif req.chaddr[:6] != src.mac:
        return _drop("chaddr_mismatch")
    if mtype == DISCOVER:
        return _discover(req, index, now, s)
    if mtype == REQUEST:
        return _request(req, index, now, s)
    if mtype == RELEASE:
        return _release(req, src, index, now, s)
    if mtype == DECLINE:
        return _decline(req, index, now, s)
    if mtype == INFORM:
        return _inform(req, s)
    return _drop("unexpected_type")


def destination(req: Message, reply: Message) -> tuple[str, int, bool]:
    """Where a reply goes (RFC 2131 4.1): (ip, port, needs a neighbour entry for ip)."""
    if req.giaddr != ZERO_IP:
        return req.giaddr, SERVER_PORT, False
    if reply.message_type == NAK:
        return BROADCAST_IP, CLIENT_PORT, False
    if req.ciaddr != ZERO_IP:
        return req.ciaddr, CLIENT_PORT, False
    if req.broadcast or req.htype != 1 or req.hlen != 6 or reply.yiaddr == ZERO_IP:
        return BROADCAST_IP, CLIENT_PORT, False
    return reply.yiaddr, CLIENT_PORT, True
