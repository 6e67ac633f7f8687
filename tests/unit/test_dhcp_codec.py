"""The DHCP codec: what real packets look like on the wire, and what it refuses."""

from __future__ import annotations

import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dhcp import codec
from dhcp.codec import DecodeError, Message

pytestmark = pytest.mark.unit

MAC = bytes.fromhex("024700000001")


def scapy_discover(**opts: object) -> bytes:
    from scapy.layers.dhcp import BOOTP, DHCP

    options = [("message-type", "discover"), *opts.items(), "end"]
    pkt = BOOTP(chaddr=MAC + bytes(10), xid=0x1234, flags=0x8000) / DHCP(options=options)
    return bytes(pkt)


def test_decodes_a_scapy_discover() -> None:
    raw = scapy_discover(
        param_req_list=[1, 3, 6, 15, 114], hostname=b"laptop", requested_addr="192.168.1.150"
    )
    m = codec.decode(raw)
    assert m.op == codec.BOOTREQUEST and m.xid == 0x1234 and m.broadcast
    assert m.message_type == codec.DISCOVER
    assert m.mac == "02:47:00:00:00:01"
    assert m.options[codec.OPT_PARAM_REQUEST] == bytes([1, 3, 6, 15, 114])
    assert m.options[codec.OPT_HOSTNAME] == b"laptop"
    assert m.requested_ip == "192.168.1.150"
    assert m.client_key == b"\x01" + MAC


def test_scapy_reads_what_we_encode() -> None:
    from scapy.layers.dhcp import BOOTP, DHCP

    reply = Message(
        op=codec.BOOTREPLY,
        xid=99,
        yiaddr="192.168.1.100",
        chaddr=MAC + bytes(10),
        options={
            codec.OPT_MESSAGE_TYPE: bytes([codec.OFFER]),
            codec.OPT_SERVER_ID: bytes([192, 168, 1, 1]),
            codec.OPT_LEASE_TIME: struct.pack("!I", 3600),
            codec.OPT_CAPTIVE_PORTAL: b"http://192.168.1.1/api/captive",
        },
    )
    raw = codec.encode(reply)
    assert len(raw) >= 300
    pkt = BOOTP(raw)
    assert pkt.yiaddr == "192.168.1.100" and pkt.xid == 99
    opts = dict(o for o in pkt[DHCP].options if isinstance(o, tuple))
    assert opts["message-type"] == 2 and opts["server_id"] == "192.168.1.1"
    assert opts["lease_time"] == 3600
    assert codec.decode(raw) == reply


def _packet(options: bytes, sname: bytes = bytes(64), file: bytes = bytes(128)) -> bytes:
    head = codec.HEADER.pack(
        1, 1, 6, 0, 7, 0, 0, bytes(4), bytes(4), bytes(4), bytes(4), MAC, sname, file, codec.MAGIC
    )
    return head + options


def test_overload_moves_options_out_of_file_and_sname_in_rfc_3396_order() -> None:
    file = bytes([12, 3]) + b"abc" + bytes([250, 2]) + b"f1" + b"\xff"
    sname = bytes([250, 2]) + b"s1" + b"\xff"
    raw = _packet(bytes([53, 1, 1, 52, 1, 3, 250, 2]) + b"m1" + b"\xff", sname, file)
    m = codec.decode(raw)
    assert m.options[12] == b"abc"
    assert m.options[250] == b"m1f1s1"  # options, then file, then sname
    assert 52 not in m.options
    assert m.file == bytes(128) and m.sname == bytes(64)


def test_long_options_are_split_and_joined() -> None:
    value = bytes(range(256)) * 2 + b"tail"
    m = Message(options={53: b"\x02", 224: value})
    raw = codec.encode(m, max_size=1500)
    # three instances of option 224 on the wire (255 + 255 + 6 bytes)
    assert raw.count(bytes([224, 255])) == 2 and bytes([224, 6]) in raw
    assert codec.decode(raw).options[224] == value


def test_unknown_options_stay_raw_bytes() -> None:
    raw = _packet(bytes([53, 1, 1, 199, 4, 0, 255, 1, 2, 0, 0, 0]) + b"\xff")
    m = codec.decode(raw)
    assert m.options[199] == bytes([0, 255, 1, 2])
    assert codec.decode(codec.encode(m)).options == m.options


def test_overload_used_when_the_client_takes_only_576_bytes() -> None:
    opts = {53: b"\x05", **{200 + i: bytes([i]) * 40 for i in range(8)}}  # 8 x 42 = 336 bytes
    m = Message(op=2, options=opts)
    raw = codec.encode(m, max_size=576)
    assert len(raw) <= 576 - 28
    assert raw[236 + 4 :].find(bytes([52, 1])) >= 0
    assert codec.decode(raw) == m


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        (b"\x01" * 100, "truncated"),
        (_packet(b"")[:-4] + b"\x00\x00\x00\x00", "bad_cookie"),
        (_packet(b"\xff").replace(b"\x01\x01\x06", b"\x01\x01\x11", 1), "bad_hlen"),
        (_packet(bytes([53, 1, 1, 12, 40]) + b"short"), "option_overrun"),
        (_packet(bytes([53, 1, 1, 12])), "option_overrun"),
        (_packet(bytes([53, 1, 1, 52, 1, 9, 255])), "bad_overload"),
        (_packet(bytes([52, 1, 1]), file=bytes([12, 200, 1])), "option_overrun"),
    ],
)
def test_malformed_packets_raise_decode_error_with_a_reason(raw: bytes, reason: str) -> None:
    with pytest.raises(DecodeError) as err:
        codec.decode(raw)
    assert err.value.reason == reason


# -- fuzzing -------------------------------------------------------------------------

ip = st.tuples(*[st.integers(0, 255)] * 4).map(lambda t: ".".join(map(str, t)))
codes = st.integers(1, 254).filter(lambda c: c != codec.OPT_OVERLOAD)
messages = st.builds(
    Message,
    op=st.integers(0, 255),
    htype=st.integers(0, 255),
    hlen=st.integers(0, 16),
    hops=st.integers(0, 255),
    xid=st.integers(0, 2**32 - 1),
    secs=st.integers(0, 2**16 - 1),
    flags=st.integers(0, 2**16 - 1),
    ciaddr=ip,
    yiaddr=ip,
    siaddr=ip,
    giaddr=ip,
    chaddr=st.binary(min_size=16, max_size=16),
    sname=st.one_of(st.just(bytes(64)), st.binary(min_size=64, max_size=64)),
    file=st.one_of(st.just(bytes(128)), st.binary(min_size=128, max_size=128)),
    options=st.dictionaries(codes, st.binary(max_size=600), max_size=12),
)


@given(messages, st.sampled_from([576, 1500]))
@settings(max_examples=400, deadline=None)
def test_encode_then_decode_is_identity(m: Message, max_size: int) -> None:
    raw = codec.encode(m, max_size)
    assert codec.decode(raw) == m
    assert codec.encode(codec.decode(raw), max_size) == raw


def _check_bytes(raw: bytes) -> None:
    try:
        m = codec.decode(raw)
    except DecodeError:
        return
    again = codec.decode(codec.encode(m))
    assert again == m


@given(st.binary(max_size=700))
@settings(max_examples=500, deadline=None)
def test_random_bytes_decode_or_raise_decode_error(raw: bytes) -> None:
    _check_bytes(raw)


@given(
    messages,
    st.lists(st.tuples(st.integers(0, 2000), st.integers(0, 255)), max_size=8),
    st.integers(0, 1000),
)
@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_mutated_packets_decode_or_raise_decode_error(
    m: Message, flips: list[tuple[int, int]], cut: int
) -> None:
    raw = bytearray(codec.encode(m))
    for pos, val in flips:
        if pos < len(raw):
            raw[pos] = val
    _check_bytes(bytes(raw[: len(raw) - cut]) if cut < len(raw) else bytes(raw))
