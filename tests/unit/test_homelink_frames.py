"""The relay link's frame codec: every frame round-trips, hostile bytes are a FrameError."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from appliance.homelink import frames
from appliance.homelink.frames import FrameError, Kind, Reset

pytestmark = pytest.mark.unit

TOKEN = bytes(range(16))
households = st.from_regex(frames.HOUSEHOLD_RE, fullmatch=True)
offsets = st.integers(0, frames.MAX_OFFSET)


@given(households)
def test_open_round_trips(name: str) -> None:
    frame = frames.decode(frames.encode_open(TOKEN, name))
    assert (frame.kind, frame.token, frame.household) == (Kind.OPEN, TOKEN, name)


@given(offsets, st.binary(max_size=frames.MAX_PAYLOAD))
def test_data_round_trips(offset: int, payload: bytes) -> None:
    frame = frames.decode(frames.encode_data(TOKEN, offset, payload))
    assert (frame.kind, frame.offset, frame.payload) == (Kind.DATA, offset, payload)


def test_the_longest_data_frame_is_the_longest_valid_frame() -> None:
    wire = frames.encode_data(TOKEN, 7, b"x" * frames.MAX_PAYLOAD)
    assert len(wire) == frames.MAX_FRAME
    assert frames.decode(wire).payload == b"x" * frames.MAX_PAYLOAD
    with pytest.raises(ValueError):
        frames.encode_data(TOKEN, 7, b"x" * (frames.MAX_PAYLOAD + 1))
    with pytest.raises(FrameError):
        frames.decode(wire + b"x")


@given(offsets, st.sampled_from([Kind.ACK, Kind.FIN]))
def test_ack_and_fin_round_trip(offset: int, kind: Kind) -> None:
    encode = frames.encode_ack if kind is Kind.ACK else frames.encode_fin
    frame = frames.decode(encode(TOKEN, offset))
    assert (frame.kind, frame.offset) == (kind, offset)


@given(st.sampled_from(list(Reset)), st.text(max_size=300))
def test_reset_round_trips_with_its_reason_cut_to_200_bytes(code: Reset, reason: str) -> None:
    frame = frames.decode(frames.encode_reset(TOKEN, code, reason))
    assert frame.code is code
    assert len(frame.reason.encode()) <= frames.MAX_REASON
    assert reason.startswith(frame.reason)


@given(offsets, households, st.booleans())
def test_resume_round_trips(offset: int, name: str, answer: bool) -> None:
    frame = frames.decode(frames.encode_resume(TOKEN, offset, name, answer))
    assert (frame.kind, frame.offset, frame.household, frame.answer) == (
        Kind.RESUME,
        offset,
        name,
        answer,
    )


@pytest.mark.parametrize(
    "name", ["", "Alice", "a_b", "alice-home\n", "-a", "a-", "a.b", "x" * 64, "caf\u00e9", "a b"]
)
def test_a_household_is_one_lower_case_dns_label(name: str) -> None:
    with pytest.raises(ValueError):
        frames.encode_open(TOKEN, name)
    head = frames.HEADER.pack(Kind.OPEN, 0, TOKEN)
    with pytest.raises(FrameError):
        frames.decode(head + name.encode("utf-8"))


def test_a_token_is_sixteen_bytes() -> None:
    with pytest.raises(ValueError):
        frames.encode_ack(b"short", 0)


@pytest.mark.parametrize(
    ("wire", "why"),
    [
        (b"", "shorter than its header"),
        (bytes([2, 0]) + TOKEN[:10], "shorter than its header"),
        (bytes([9, 0]) + TOKEN, "unknown frame type"),
        (bytes([2, 0]) + TOKEN + b"\x00" * 7, "too short for its offset"),
        (bytes([3, 0]) + TOKEN + b"\x00" * 9, "offset only"),
        (bytes([3, 0]) + TOKEN + b"\xff" * 8, "out of range"),
        (bytes([5, 0]) + TOKEN, "without a code"),
        (bytes([5, 0]) + TOKEN + b"\x63", "unknown reset code"),
        (bytes([5, 0]) + TOKEN + b"\x01" + b"x" * 201, "too long"),
        (bytes([6, 1]) + TOKEN + b"\x00" * 8 + b"\xff", "not ASCII"),
    ],
)
def test_malformed_frames_say_why(wire: bytes, why: str) -> None:
    with pytest.raises(FrameError, match=why):
        frames.decode(wire)


def test_a_text_message_is_not_a_frame() -> None:
    with pytest.raises(FrameError):
        frames.decode("hello")


@given(st.binary(max_size=frames.MAX_FRAME + 10))
def test_arbitrary_bytes_decode_or_raise_frame_error_only(wire: bytes) -> None:
    try:
        frame = frames.decode(wire)
    except FrameError:
        return
    assert len(frame.token) == frames.TOKEN_LEN
    assert 0 <= frame.offset <= frames.MAX_OFFSET


@given(st.sampled_from(list(Kind)), st.integers(0, 255), st.binary(max_size=300))
def test_any_body_behind_a_valid_header_decodes_or_raises_frame_error(
    kind: Kind, flags: int, body: bytes
) -> None:
    try:
        frame = frames.decode(frames.HEADER.pack(kind, flags, TOKEN) + body)
    except FrameError:
        return
    assert frame.kind is kind


def test_an_open_passed_on_by_the_relay_carries_the_appliance_links_source() -> None:
    token = bytes(range(16))
    plain = frames.decode(frames.encode_open(token, "bob-home"))
    assert plain.household == "bob-home" and plain.source == ""
    marked = frames.decode(frames.encode_open(token, "bob-home", "203.0.113.254"))
    assert marked.household == "bob-home" and marked.source == "203.0.113.254"
    with pytest.raises(ValueError):
        frames.encode_open(token, "bob-home", "bad source\n")
    with pytest.raises(frames.FrameError):
        frames.decode(frames.encode_open(token, "bob-home") + b"\0evil source\xff")
