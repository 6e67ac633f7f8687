"""The DHCP state machine, exchange by exchange, as RFC 2131 section 4.3 describes it."""

from __future__ import annotations

import socket
import struct
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from appliance.core.config import load
from appliance.state import leases, schema, store
from dhcp import codec
from dhcp.codec import ACK, DECLINE, DISCOVER, INFORM, NAK, OFFER, RELEASE, REQUEST, Message
from dhcp.labconfig import write_config
from dhcp.pool import PERSISTED, LeaseIndex
from dhcp.server import Outcome, Settings, Source, destination, handle
from dhcp.service import load_index, to_lease

pytestmark = pytest.mark.unit
SERVER = "192.168.1.1"
OTHER_SERVER = "192.168.1.2"


def mac(n: int) -> bytes:
    return bytes.fromhex(f"0247000000{n:02x}")


def make_settings(tmp_path: Path, **kw: object) -> Settings:
    kw.setdefault("pool_start", "192.168.1.100")
    kw.setdefault("pool_end", "192.168.1.109")
    portal = bool(kw.pop("portal", True))
    return Settings.from_config(load(write_config(tmp_path / "cfg", portal=portal, **kw)))


class Sim:
    """The server with its index and a clock; applies changes like the service does."""

    def __init__(self, s: Settings, now: float = 1000.0):
        self.s = s
        self.index: LeaseIndex = s.new_index()
        self.now = now
        self.persisted: list[tuple[str, str, str]] = []

    def send(self, m: Message, src: Source | None = None) -> Outcome:
        """Deliver m as if from its own chaddr (and ciaddr, or the relay), unless src says."""
        if src is None:
            ip = m.giaddr if m.giaddr != "0.0.0.0" else m.ciaddr
            src = Source(m.chaddr[:6], ip)
        out = handle(m, src, self.index, self.now, self.s)
        for ch in out.changes:
            if ch.kind in ("granted", "renewed"):  # the invariant: never two holders
                assert self.index.is_free(ch.binding.ip, ch.binding.client, self.now)
            self.index.apply(ch)
            if ch.kind in PERSISTED:
                self.persisted.append((ch.kind, ch.binding.ip, ch.binding.mac))
        return out


def msg(
    mtype: int,
    n: int = 1,
    *,
    requested: str | None = None,
    server: str | None = None,
    ciaddr: str = "0.0.0.0",
    giaddr: str = "0.0.0.0",
    prl: bytes | None = None,
    flags: int = 0,
    **extra: bytes,
) -> Message:
    opts: dict[int, bytes] = {codec.OPT_MESSAGE_TYPE: bytes([mtype])}
    if requested:
        opts[codec.OPT_REQUESTED_IP] = socket.inet_aton(requested)
    if server:
        opts[codec.OPT_SERVER_ID] = socket.inet_aton(server)
    if prl is not None:
        opts[codec.OPT_PARAM_REQUEST] = prl
    for k, v in extra.items():
        opts[int(k.removeprefix("o"))] = v
    return Message(
        xid=n, flags=flags, ciaddr=ciaddr, giaddr=giaddr, chaddr=mac(n) + bytes(10), options=opts
    )


def get_lease(sim: Sim, n: int = 1) -> str:
    offer = sim.send(msg(DISCOVER, n))
    assert offer.reply is not None and offer.reply.message_type == OFFER
    ip = offer.reply.yiaddr
    ack = sim.send(msg(REQUEST, n, requested=ip, server=SERVER))
    assert ack.reply is not None and ack.reply.message_type == ACK, ack
    return ip


@pytest.fixture
def sim(tmp_path: Path) -> Sim:
    return Sim(make_settings(tmp_path, lease_time=600, renewal_time=300, rebinding_time=500))


def test_discover_gets_an_offer_with_every_option(sim: Sim) -> None:
    out = sim.send(msg(DISCOVER, prl=bytes([114, 1, 3, 6, 15, 58, 59, 51])))
    r = out.reply
    assert r is not None and r.message_type == OFFER and r.op == codec.BOOTREPLY
    assert r.yiaddr == "192.168.1.100" and r.xid == 1 and r.chaddr[:6] == mac(1)
    o = r.options
    assert o[1] == socket.inet_aton("255.255.255.0")
    assert o[3] == o[6] == socket.inet_aton(SERVER) == o[54]
    assert o[15] == b"guest.example"
    assert struct.unpack("!I", o[51])[0] == 600
    assert struct.unpack("!I", o[58])[0] == 300 and struct.unpack("!I", o[59])[0] == 500
    assert o[114] == b"http://192.168.1.1/api/captive"
    # the parameter request list's order is kept
    assert [c for c in o if c in (114, 1, 3, 6, 15)] == [114, 1, 3, 6, 15]
    assert [c.kind for c in out.changes] == ["offered"]  # an offer is not persisted
    assert sim.persisted == []


def test_no_captive_option_when_the_portal_is_disabled(tmp_path: Path) -> None:
    sim = Sim(make_settings(tmp_path, portal=False))
    r = sim.send(msg(DISCOVER, prl=bytes([1, 3, 6, 114]))).reply
    assert r is not None and 114 not in r.options and 1 in r.options


def test_unrequested_extras_are_not_sent(sim: Sim) -> None:
    r = sim.send(msg(DISCOVER, prl=bytes([1, 3]))).reply
    assert r is not None and 114 not in r.options and 15 not in r.options
    assert {1, 3, 6, 51, 53, 54} <= set(r.options)


def test_selecting_request_is_acked_and_persisted(sim: Sim) -> None:
    ip = get_lease(sim)
    assert sim.persisted == [("granted", ip, "02:47:00:00:00:01")]
    b = sim.index.current(b"\x01" + mac(1), sim.now)
    assert b is not None and b.ip == ip and b.expires == sim.now + 600


def test_request_for_another_server_gets_silence_and_frees_the_offer(sim: Sim) -> None:
    offered = sim.send(msg(DISCOVER, 1)).reply
    assert offered is not None
    out = sim.send(msg(REQUEST, 1, requested=offered.yiaddr, server=OTHER_SERVER))
    assert out.reply is None and out.drop == "other_server"
    assert offered.yiaddr not in sim.index.offers
    assert sim.persisted == []


def test_two_clients_get_distinct_addresses(sim: Sim) -> None:
    ips = {get_lease(sim, n) for n in range(1, 6)}
    assert len(ips) == 5


def test_init_reboot(sim: Sim) -> None:
    ip = get_lease(sim, 1)
    # known client, its own address: ACK
    r = sim.send(msg(REQUEST, 1, requested=ip)).reply
    assert r is not None and r.message_type == ACK and r.yiaddr == ip
    # wrong subnet (the client moved): NAK, broadcast
    out = sim.send(msg(REQUEST, 1, requested="10.9.9.9"))
    assert out.reply is not None and out.reply.message_type == NAK and out.nak == "wrong_subnet"
    assert destination(msg(REQUEST, 1), out.reply) == ("255.255.255.255", 68, False)
    # a client we never saw: silence (RFC 2131 4.3.2)
    assert sim.send(msg(REQUEST, 9, requested="192.168.1.105")).drop == "unknown_client"
    # another client's address: NAK
    get_lease(sim, 2)
    out = sim.send(msg(REQUEST, 2, requested=ip))
    assert out.reply is not None and out.reply.message_type == NAK


def test_renew_rebind_release_and_the_same_address_back(sim: Sim) -> None:
    ip = get_lease(sim, 1)
    sim.now += 300
    r = sim.send(msg(REQUEST, 1, ciaddr=ip)).reply
    assert r is not None and r.message_type == ACK and r.ciaddr == ip
    assert sim.persisted[-1] == ("renewed", ip, "02:47:00:00:00:01")
    assert destination(msg(REQUEST, 1, ciaddr=ip), r) == (ip, 68, False)
    assert sim.send(msg(RELEASE, 1, ciaddr=ip, server=SERVER)).reply is None
    assert sim.persisted[-1][0] == "released"
    assert sim.index.current(b"\x01" + mac(1), sim.now) is None
    for n in range(2, 5):  # others come and go; the released address is kept back
        get_lease(sim, n)
    assert get_lease(sim, 1) == ip


def test_renewing_a_foreign_address_is_naked(sim: Sim) -> None:
    get_lease(sim, 1)
    ip2 = get_lease(sim, 2)
    out = sim.send(msg(REQUEST, 1, ciaddr=ip2))
    assert out.reply is not None and out.nak == "taken"
    out = sim.send(msg(REQUEST, 1, ciaddr="192.168.1.20"))  # in the subnet, not the pool
    assert out.nak == "out_of_pool"


def test_decline_quarantines_the_address(sim: Sim) -> None:
    ip = get_lease(sim, 1)
    sim.send(msg(DECLINE, 1, requested=ip, server=SERVER))
    assert sim.persisted[-1] == ("declined", ip, "02:47:00:00:00:01")
    for n in (1, 2, 3):
        r = sim.send(msg(DISCOVER, n, requested=ip)).reply
        assert r is not None and r.yiaddr != ip
    sim.now += 601  # decline_quarantine defaults to 600 s
    assert sim.index.is_free(ip, None, sim.now)


def test_reservations(tmp_path: Path) -> None:
    s = make_settings(
        tmp_path,
        extra_dhcp='[[dhcp.reservations]]\nmac = "02:47:00:00:00:07"\naddress = "192.168.1.100"',
    )
    sim = Sim(s)
    assert get_lease(sim, 1) == "192.168.1.101"  # the pool start is reserved for guest 7
    assert get_lease(sim, 7) == "192.168.1.100"
    out = sim.send(msg(REQUEST, 2, requested="192.168.1.100", server=SERVER))
    assert out.nak == "out_of_pool"


def test_exhausted_pool_and_lazy_reclaim(tmp_path: Path) -> None:
    sim = Sim(make_settings(tmp_path, pool_end="192.168.1.101", lease_time=60))
    a, b = get_lease(sim, 1), get_lease(sim, 2)
    out = sim.send(msg(DISCOVER, 3))
    assert out.reply is None and out.drop == "pool_exhausted"
    sim.now += 61
    c = get_lease(sim, 3)
    assert c in (a, b)
    # the old holder's lease is written as expired before the address changes hands
    assert ("expired", c, "02:47:00:00:00:01" if c == a else "02:47:00:00:00:02") in sim.persisted


def test_inform_and_drops(sim: Sim) -> None:
    r = sim.send(msg(INFORM, 1, ciaddr="192.168.1.50")).reply
    assert r is not None and r.message_type == ACK and r.yiaddr == "0.0.0.0"
    assert 51 not in r.options and 3 in r.options
    reply = msg(DISCOVER)
    reply.op = codec.BOOTREPLY
    assert sim.send(reply).drop == "bootreply"
    no_type = msg(DISCOVER)
    no_type.options = {}
    assert sim.send(no_type).drop == "not_dhcp"
    assert sim.send(msg(DISCOVER, giaddr="10.0.0.1")).drop == "foreign_relay"
    assert sim.send(msg(codec.OFFER)).drop == "unexpected_type"


def test_reply_addressing() -> None:
    d = msg(DISCOVER)
    offer = Message(op=2, yiaddr="192.168.1.100", options={53: bytes([OFFER])})
    assert destination(d, offer) == ("192.168.1.100", 68, True)  # unicast to chaddr
    assert destination(msg(DISCOVER, flags=0x8000), offer) == ("255.255.255.255", 68, False)
    assert destination(msg(DISCOVER, giaddr="192.168.1.9"), offer) == ("192.168.1.9", 67, False)


def test_relayed_nak_sets_the_broadcast_bit(tmp_path: Path) -> None:
    sim = Sim(make_settings(tmp_path, relays=["192.168.1.9"]))
    out = sim.send(msg(REQUEST, 1, requested="10.1.1.1", giaddr="192.168.1.9"))
    assert out.reply is not None and out.reply.broadcast and out.reply.giaddr == "192.168.1.9"


def test_leases_survive_a_restart(tmp_path: Path) -> None:
    s = make_settings(tmp_path)
    sim = Sim(s)
    conn = store.connect(tmp_path / "state.sqlite")
    schema.upgrade(conn)
    for n in (1, 2, 3):
        ip = get_lease(sim, n)
    sim.send(msg(RELEASE, 3, ciaddr=ip, server=SERVER))
    pending = []
    for kind, ip_, _mac in sim.persisted:
        b = sim.index.by_ip[ip_]
        pending.append((kind, to_lease(b)))
    leases.record_many(conn, pending, sim.now)
    assert [e.kind for e in leases.events_since(conn, 0)] == [k for k, _, _ in sim.persisted]
    # a new server process: same bindings, same answers
    again = Sim(s)
    again.index = load_index(conn, s)
    for n in (1, 2):
        assert again.index.current(b"\x01" + mac(n), sim.now) == sim.index.current(
            b"\x01" + mac(n), sim.now
        )
    assert get_lease(again, 3) == ip  # released, still its own
    assert get_lease(again, 4) not in {get_lease(again, n) for n in (1, 2, 3)}


steps = st.lists(
    st.tuples(
        st.integers(1, 12),  # client
        st.sampled_from([DISCOVER, REQUEST, REQUEST, RELEASE, DECLINE, INFORM, 9, 2]),
        st.integers(95, 112),  # an address near or in the pool
        st.sampled_from([None, SERVER, OTHER_SERVER]),
        st.booleans(),  # ciaddr set
        st.integers(0, 400),  # seconds passing
    ),
    max_size=60,
)


@given(steps)
@settings(max_examples=300, deadline=None)
def test_random_exchanges_never_raise_or_double_allocate(
    tmp_path_factory: pytest.TempPathFactory, run: list[tuple[int, int, int, str | None, bool, int]]
) -> None:
    s = make_settings(tmp_path_factory.mktemp("c"), lease_time=300, decline_quarantine=100)
    sim = Sim(s)
    for client, mtype, last, server, with_ci, dt in run:
        sim.now += dt
        ip = f"192.168.1.{last}"
        m = msg(mtype, client, requested=ip, server=server, ciaddr=ip if with_ci else "0.0.0.0")
        out = sim.send(m)  # Sim.send asserts every grant goes to a free address
        if out.reply is not None:
            assert codec.decode(codec.encode(out.reply)) == out.reply
        holders: dict[str, bytes] = {}
        for b in sim.index.by_ip.values():
            if b.state == "bound" and b.expires > sim.now:
                assert holders.setdefault(b.ip, b.client) == b.client


odd_options = st.dictionaries(
    st.sampled_from([12, 50, 51, 53, 54, 55, 57, 61, 82, 114]),
    st.one_of(st.binary(max_size=8), st.sampled_from([b"\x01", b"\x03", socket.inet_aton(SERVER)])),
    max_size=7,
)


@given(odd_options, st.integers(0, 16), st.booleans(), st.booleans())
@settings(max_examples=400, deadline=None)
def test_odd_option_values_never_raise(
    tmp_path_factory: pytest.TempPathFactory,
    options: dict[int, bytes],
    hlen: int,
    ci: bool,
    gi: bool,
) -> None:
    sim = Sim(make_settings(tmp_path_factory.mktemp("o")))
    get_lease(sim, 1)
    m = Message(
        hlen=hlen,
        chaddr=mac(1) + bytes(10),
        ciaddr="192.168.1.100" if ci else "0.0.0.0",
        giaddr="192.168.1.9" if gi else "0.0.0.0",
        options=options,
    )
    out = sim.send(m)
    if out.reply is not None:
        codec.encode(out.reply, m.max_size)


@pytest.mark.parametrize("hlen", [0, 8, 16])
def test_non_ethernet_hardware_addresses_get_no_lease(sim: Sim, hlen: int) -> None:
    """Sessions and the firewall bind Ethernet MACs: an 8-byte chaddr must not get a lease."""
    m = msg(DISCOVER, 7)
    odd = Message(xid=m.xid, hlen=hlen, chaddr=m.chaddr, options=m.options)
    out = sim.send(odd)
    assert out.reply is None and out.drop == "not_ethernet"
    assert sim.persisted == []


# -- issue #14, finding 4: what a guest's message may claim ---------------------------------


def test_client_identifier_is_echoed_in_offer_ack_and_nak(sim: Sim) -> None:
    """RFC 6842 section 3 (updating RFC 2131's Table 3): option 61 back, unaltered."""
    cid = b"\x00odd\xffid"
    offer = sim.send(msg(DISCOVER, 1, o61=cid)).reply
    assert offer is not None and offer.options[61] == cid
    ack = sim.send(msg(REQUEST, 1, requested=offer.yiaddr, server=SERVER, o61=cid)).reply
    assert ack is not None and ack.message_type == ACK and ack.options[61] == cid
    nak = sim.send(msg(REQUEST, 1, requested="10.9.9.9", o61=cid)).reply
    assert nak is not None and nak.message_type == NAK and nak.options[61] == cid
    inform = sim.send(msg(INFORM, 1, ciaddr="192.168.1.50", o61=cid)).reply
    assert inform is not None and inform.options[61] == cid
    for r in (offer, ack, nak, inform):  # on the wire too (the cached option bytes)
        assert codec.decode(codec.encode(r)).options[61] == cid
    # the cache the replies share is not touched: a client without 61 gets none
    other = sim.send(msg(DISCOVER, 2)).reply
    assert other is not None and 61 not in other.options
    assert 61 not in codec.decode(codec.encode(other)).options
    long_cid = bytes(range(256)) + b"tail"  # over 255 bytes: split on the wire (RFC 3396)
    r = sim.send(msg(DISCOVER, 3, o61=long_cid)).reply
    assert r is not None and codec.decode(codec.encode(r)).options[61] == long_cid


def test_chaddr_must_be_the_ethernet_source(sim: Sim) -> None:
    for mtype in (DISCOVER, REQUEST, RELEASE, DECLINE, INFORM):
        out = sim.send(msg(mtype, 1, requested="192.168.1.100"), Source(mac(2), "0.0.0.0"))
        assert out.reply is None and out.drop == "chaddr_mismatch" and out.changes == ()
    assert sim.index.offers == {} and sim.persisted == []


def test_relayed_messages_only_from_a_configured_relay(tmp_path: Path) -> None:
    sim = Sim(make_settings(tmp_path / "a"))
    relayed = msg(DISCOVER, 1, giaddr="192.168.1.9")
    assert sim.send(relayed).drop == "untrusted_relay"  # relays are off by default
    sim = Sim(make_settings(tmp_path / "b", relays=["192.168.1.9"]))
    assert sim.send(relayed, Source(mac(5), "192.168.1.66")).drop == "untrusted_relay"
    out = sim.send(relayed, Source(mac(5), "192.168.1.9"))  # the relay's own frame
    assert out.reply is not None and out.reply.message_type == OFFER


def test_relays_outside_the_guest_subnet_are_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(Exception, match=r"relays.*10\.0\.0\.1 is outside the guest subnet"):
        make_settings(tmp_path, relays=["10.0.0.1"])


def test_release_only_from_the_holders_address_and_mac(sim: Sim) -> None:
    ip = get_lease(sim, 1)
    other = get_lease(sim, 2)
    # another guest names the victim's address from its own chaddr
    out = sim.send(msg(RELEASE, 2, ciaddr=ip, server=SERVER), Source(mac(2), other))
    assert out.drop == "release_not_owner"
    # the victim's chaddr (and Ethernet source) but sent from another address
    out = sim.send(msg(RELEASE, 1, ciaddr=ip, server=SERVER), Source(mac(1), other))
    assert out.drop == "release_not_owner" and out.changes == ()
    # a DECLINE of someone else's address is refused the same way
    assert sim.send(msg(DECLINE, 2, requested=ip, server=SERVER)).drop == "decline_unknown"
    b = sim.index.current(b"\x01" + mac(1), sim.now)
    assert b is not None and b.ip == ip
    assert [k for k, _, _ in sim.persisted] == ["granted", "granted"]
    assert sim.send(msg(RELEASE, 1, ciaddr=ip, server=SERVER)).changes[0].kind == "released"


def test_a_client_identifier_never_moves_a_lease_to_another_mac(sim: Sim) -> None:
    cid = b"\x01victim"
    offer = sim.send(msg(DISCOVER, 1, o61=cid)).reply
    assert offer is not None
    ip = offer.yiaddr
    assert sim.send(msg(REQUEST, 1, requested=ip, server=SERVER, o61=cid)).reply is not None
    # guest 2 sends the victim's client identifier from its own MAC
    r = sim.send(msg(DISCOVER, 2, o61=cid)).reply
    assert r is not None and r.yiaddr != ip
    assert sim.send(msg(REQUEST, 2, ciaddr=ip, o61=cid)).nak == "taken"
    assert sim.send(msg(REQUEST, 2, requested=ip, server=SERVER, o61=cid)).nak == "taken"
    assert sim.send(msg(REQUEST, 2, requested=ip, o61=cid)).nak == "not_yours"  # offered another
    assert sim.send(msg(RELEASE, 2, ciaddr=ip, o61=cid)).drop == "release_not_owner"
    assert sim.send(msg(DECLINE, 2, requested=ip, o61=cid)).drop == "decline_unknown"
    held = sim.index.by_ip[ip]
    assert (held.mac, held.state) == ("02:47:00:00:00:01", "bound")
    assert [(k, m) for k, i, m in sim.persisted if i == ip] == [("granted", "02:47:00:00:00:01")]
    # and the victim renews as before
    renewed = sim.send(msg(REQUEST, 1, ciaddr=ip, o61=cid))
    assert renewed.reply is not None and renewed.reply.message_type == ACK


@pytest.mark.parametrize("cap", [1, 2])
def test_one_mac_holds_at_most_leases_per_mac(tmp_path: Path, cap: int) -> None:
    sim = Sim(make_settings(tmp_path, leases_per_mac=cap))  # a pool of 10
    for i in range(40):  # forty client identities on one MAC
        cid = f"id-{i}".encode()
        offer = sim.send(msg(DISCOVER, 1, o61=cid)).reply
        assert offer is not None, i  # the pool never runs dry
        assert len(sim.index.offers_by_mac["02:47:00:00:00:01"]) == 1
        sim.send(msg(REQUEST, 1, requested=offer.yiaddr, server=SERVER, o61=cid))
        live = [b for b in sim.index.by_ip.values() if b.state == "bound"]
        assert len(live) == min(i + 1, cap)
    # the newest identities keep theirs; the older ones were released, not lost
    assert [b.client_id for b in live] == [f"id-{i}".encode() for i in range(40 - cap, 40)]
    assert sum(k == "released" for k, _, _ in sim.persisted) == 40 - cap
    assert len({get_lease(sim, n) for n in range(2, 10 - cap + 2)}) == 10 - cap


def test_one_mac_cannot_quarantine_the_pool_by_declining(sim: Sim) -> None:
    """DISCOVER, DECLINE, again: past leases_per_mac quarantines a DECLINE only frees."""
    for _ in range(10):  # the pool has 10 addresses
        offer = sim.send(msg(DISCOVER, 1)).reply
        assert offer is not None
        sim.send(msg(DECLINE, 1, requested=offer.yiaddr, server=SERVER))
    quarantined = [b for b in sim.index.by_ip.values() if b.state == "declined"]
    assert len(quarantined) == 2  # dhcp.leases_per_mac
    assert [k for k, _, _ in sim.persisted] == ["declined", "declined"]
    assert len({get_lease(sim, n) for n in range(2, 10)}) == 8  # the rest is still there
    sim.now += 601  # once the quarantine ends, the MAC may decline again
    offer = sim.send(msg(DISCOVER, 1)).reply
    assert offer is not None
    out = sim.send(msg(DECLINE, 1, requested=offer.yiaddr, server=SERVER))
    assert [c.kind for c in out.changes] == ["declined"]
