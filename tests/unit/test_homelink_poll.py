"""The long-poll link's sans-IO part: the message codec, the outbox that keeps what was
sent until acknowledged, the inbox that orders what arrives (appliance/homelink/poll.py).

What matters to a household: across lost answers and retried requests every message
arrives once, in order, and a body that breaks the protocol is a PollError (a closed
session), never another exception."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from appliance.homelink import poll
from appliance.homelink.poll import Inbox, Message, MessageKind, Outbox, PollError

pytestmark = pytest.mark.unit


def msg(payload: bytes, kind: MessageKind = MessageKind.BINARY) -> Message:
    return Message(kind, payload)


def test_a_batch_round_trips_with_its_number() -> None:
    batch = [msg(b"frame"), msg(b'{"type": "register"}', MessageKind.TEXT), msg(b"")]
    assert poll.decode_batch(poll.encode_batch(7, batch)) == (7, batch)
    assert poll.decode_batch(poll.encode_batch(0, [])) == (0, [])
    code, reason = poll.parse_close(poll.close_message(4403, "claimed by another key"))
    assert (code, reason) == (4403, "claimed by another key")


@pytest.mark.parametrize(
    "body",
    [
        b"",  # no number
        b"\x00" * 7,
        poll.NUMBER.pack(0) + b"\x00\x00\x00",  # a truncated header
        poll.NUMBER.pack(0) + b"\x09\x00\x00\x00\x00",  # an unknown kind
        poll.NUMBER.pack(0) + b"\x00\x00\x00\x00\x09abc",  # longer than the body
        poll.NUMBER.pack(0) + b"\x01\x00\x00\x00\x02\xff\xfe",  # text that is not UTF-8
    ],
)
def test_malformed_bodies_are_poll_errors(body: bytes) -> None:
    with pytest.raises(PollError):
        poll.decode_batch(body)


@given(st.binary(max_size=200))
def test_any_bytes_decode_or_raise_poll_error(body: bytes) -> None:
    try:
        first, messages = poll.decode_batch(body)
    except PollError:
        return
    assert poll.encode_batch(first, messages) == body


def test_the_outbox_keeps_what_is_unacknowledged_and_sends_it_again_after_a_rewind() -> None:
    out = Outbox()
    for i in range(5):
        out.push(msg(bytes([i]) * 10))
    first, batch = out.batch()
    assert first == 0 and len(batch) == 5 and not out.unsent
    out.ack(2)  # the peer has 0 and 1; the answer about the rest was lost
    out.rewind()
    first, batch = out.batch()
    assert first == 2 and [m.payload[0] for m in batch] == [2, 3, 4]
    out.ack(5)
    assert out.kept_bytes == 0 and out.next == 5
    with pytest.raises(PollError):
        out.ack(6)  # more than was ever sent


def test_a_batch_is_bounded_but_always_carries_at_least_one_message() -> None:
    out = Outbox()
    out.push(msg(b"x" * 100))
    out.push(msg(b"y" * 100))
    first, batch = out.batch(limit=50)
    assert first == 0 and len(batch) == 1
    first, batch = out.batch(limit=50)
    assert first == 1 and len(batch) == 1


def test_nothing_follows_a_close_and_done_means_the_close_arrived() -> None:
    out = Outbox()
    out.push(msg(b"last"))
    out.push(poll.close_message(1000, ""))
    with pytest.raises(PollError):
        out.push(msg(b"after"))
    assert not out.done
    out.ack(2)
    assert out.done


def test_the_inbox_drops_repeats_and_refuses_a_gap() -> None:
    box = Inbox()
    a, b, c = msg(b"a"), msg(b"b"), msg(b"c")
    assert box.accept(0, [a, b]) == [a, b]
    assert box.accept(0, [a, b, c]) == [c]  # a retried request: only c is new
    assert box.accept(1, [b]) == []
    assert box.next == 3
    with pytest.raises(PollError):
        box.accept(5, [a])


@given(
    st.lists(st.binary(max_size=20), max_size=30),
    st.lists(st.tuples(st.booleans(), st.booleans()), max_size=60),
)
def test_every_message_arrives_once_in_order_whatever_answers_are_lost(
    payloads: list[bytes], losses: list[tuple[bool, bool]]
) -> None:
    """A sender and a receiver over requests whose delivery or answer may be lost."""
    out, box = Outbox(), Inbox()
    for p in payloads:
        out.push(msg(p))
    got: list[bytes] = []
    for request_lost, answer_lost in [*losses, *[(False, False)] * (len(payloads) + 1)]:
        first, batch = out.batch(limit=64)
        if not request_lost:
            got += [m.payload for m in box.accept(first, batch)]
        if request_lost or answer_lost:
            out.rewind()
            continue
        out.ack(box.next)
        out.rewind()
    assert got == payloads
    assert out.kept_bytes == 0
