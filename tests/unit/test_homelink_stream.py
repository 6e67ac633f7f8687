"""Two stream ends wired through a simulated link that drops, duplicates and is cut."""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from appliance.homelink import frames
from appliance.homelink.frames import Kind, Reset
from appliance.homelink.stream import Stream

pytestmark = pytest.mark.unit

TOKEN = bytes(range(16))
HOUSEHOLD = "alice-home"


@dataclass
class End:
    """A stream and the local socket behind it: what it must send, what it got."""

    stream: Stream
    data: bytes
    written: int = 0  # of `data`, handed to the stream
    got: bytearray = field(default_factory=bytearray)

    def write(self, n: int) -> None:
        n = min(n, self.stream.send_room(), len(self.data) - self.written)
        if n > 0:
            self.stream.send(self.data[self.written : self.written + n])
            self.written += n
        if self.written == len(self.data) and not self.stream._fin_queued:
            self.stream.close_local()

    def read(self, n: int) -> None:
        chunk = self.stream.readable()[:n]
        self.got += chunk
        self.stream.delivered(len(chunk))


class Link:
    """Frames in flight both ways; a cut loses them and whatever is sent while down."""

    def __init__(self, a: End, b: End) -> None:
        self.ends = (a, b)
        self.queues: tuple[list[bytes], list[bytes]] = ([], [])  # towards a, towards b
        self.up = True
        self.lost: set[int] = set()
        self.now = 0.0
        self.sent: list[frames.Frame] = []

    def pump(self, side: int) -> None:
        for message in self.ends[side].stream.frames_to_send():
            self.sent.append(frames.decode(message))
            if self.up:
                self.queues[1 - side].append(message)

    def deliver(self, side: int, count: int, duplicate: bool) -> None:
        queue = self.queues[side]
        for i in range(min(count, len(queue))):
            message = queue.pop(0)
            for _ in range(2 if duplicate and i == 0 else 1):
                self.ends[side].stream.receive(frames.decode(message), self.now)

    def cut(self, noticed_by: set[int]) -> None:
        self.queues[0].clear()
        self.queues[1].clear()
        self.up = False
        for side in noticed_by:
            self.ends[side].stream.link_lost(self.now)
        self.lost |= noticed_by

    def restore(self) -> None:
        self.up = True
        for side in sorted(self.lost):
            self.ends[side].stream.link_restored()
        self.lost.clear()

    def check(self) -> None:
        for end in self.ends:
            assert end.stream.reset_code is None, end.stream.reset_reason
            assert end.stream.unacked() <= end.stream.window

    def settle(self) -> None:
        """No more faults: run both ends until the streams finish."""
        if not self.up:
            self.restore()
        for _ in range(10_000):
            if all(end.stream.done for end in self.ends):
                return
            for side, end in enumerate(self.ends):
                end.write(1 << 30)
                self.pump(side)
            for side, end in enumerate(self.ends):
                self.deliver(side, 1 << 30, duplicate=False)
                end.read(1 << 30)
                end.stream.ack_now()
            self.check()
        raise AssertionError("streams did not finish")


def pair(data_a: bytes, data_b: bytes, window: int) -> Link:
    return Link(
        End(Stream(TOKEN, HOUSEHOLD, window=window), data_a),
        End(Stream(TOKEN, HOUSEHOLD, window=window), data_b),
    )


side = st.integers(0, 1)
operation = st.one_of(
    st.tuples(st.just("flow"), st.integers(1, 50_000), st.integers(0, 3), st.booleans()),
    st.tuples(st.just("flow"), st.integers(1, 50_000), st.integers(0, 3), st.booleans()),
    st.tuples(st.just("write"), side, st.integers(1, 50_000)),
    st.tuples(st.just("pump"), side),
    st.tuples(st.just("deliver"), side, st.integers(1, 5), st.booleans()),
    st.tuples(st.just("read"), side, st.integers(0, 50_000)),
    st.tuples(st.just("idle"), side),
    st.tuples(st.just("cut"), st.sampled_from([{0}, {1}, {0, 1}])),
    st.tuples(st.just("restore")),
)


@settings(max_examples=300, deadline=None)
@given(
    sizes=st.tuples(st.integers(0, 300_000), st.integers(0, 300_000)),
    seed=st.integers(0, 2**32),
    window=st.sampled_from([4096, 65536, 100_000, 1 << 20]),
    operations=st.lists(operation, max_size=100),
)
def test_bytes_arrive_whole_and_in_order_through_cuts_and_duplicates(
    sizes: tuple[int, int], seed: int, window: int, operations: list[tuple[object, ...]]
) -> None:
    rng = random.Random(seed)
    link = pair(rng.randbytes(sizes[0]), rng.randbytes(sizes[1]), window)
    for op in operations:
        link.now += 1.0
        match op:
            case ("write", int(s), int(n)):
                link.ends[s].write(n)
            case ("flow", int(n), int(k), bool(dup)):  # a little of everything, both ways
                for s in (0, 1):
                    link.ends[s].write(n)
                    link.pump(s)
                    link.deliver(1 - s, k, dup)
                    link.ends[1 - s].read(n)
            case ("pump", int(s)):
                link.pump(s)
            case ("deliver", int(s), int(n), bool(dup)):
                link.deliver(s, n, dup)
            case ("read", int(s), int(n)):
                link.ends[s].read(n)
            case ("idle", int(s)):
                link.ends[s].stream.ack_now()
            case ("cut", set() as noticed):
                link.cut({int(s) for s in noticed})
            case ("restore",):
                link.restore()
        link.check()
    link.settle()
    a, b = link.ends
    assert bytes(b.got) == a.data
    assert bytes(a.got) == b.data
    assert a.stream.eof_received and b.stream.eof_received
    # Nothing was sent beyond what the receiver's window allowed.
    assert not any(f.kind is Kind.RESET for f in link.sent)


def test_a_receiver_that_cannot_write_stalls_its_sender_at_the_window() -> None:
    link = pair(bytes(50_000), b"", window=8192)
    a, b = link.ends
    for _ in range(20):
        a.write(1 << 30)
        link.pump(0)
        link.deliver(1, 100, duplicate=False)
        b.stream.ack_now()
        link.pump(1)
        link.deliver(0, 100, duplicate=False)
    assert a.written == 8192 and a.stream.send_room() == 0
    assert len(b.stream.readable()) == 8192
    with pytest.raises(ValueError):
        a.stream.send(b"x")
    b.read(8192)  # the local socket took them: now they are acknowledged
    b.stream.ack_now()
    link.pump(1)
    link.deliver(0, 100, duplicate=False)
    assert a.stream.send_room() == 8192


def data_to(stream: Stream, offset: int, payload: bytes) -> None:
    stream.receive(frames.Frame(Kind.DATA, TOKEN, offset=offset, payload=payload), 0.0)


def sent_reset(stream: Stream) -> frames.Frame:
    (message,) = stream.frames_to_send()
    frame = frames.decode(message)
    assert frame.kind is Kind.RESET
    return frame


def test_an_ack_beyond_what_was_sent_resets_the_stream() -> None:
    stream = Stream(TOKEN, HOUSEHOLD)
    stream.send(b"hello")
    stream.frames_to_send()
    stream.receive(frames.Frame(Kind.ACK, TOKEN, offset=6), 0.0)
    assert stream.reset_code is Reset.PROTOCOL
    assert sent_reset(stream).code is Reset.PROTOCOL
    assert stream.done


def test_data_beyond_the_window_resets_the_stream() -> None:
    stream = Stream(TOKEN, HOUSEHOLD, window=1000)
    data_to(stream, 0, bytes(600))
    data_to(stream, 600, bytes(401))  # 1001 bytes with nothing acknowledged
    assert stream.reset_code is Reset.PROTOCOL
    assert sent_reset(stream).code is Reset.PROTOCOL
    assert stream.readable() == b""


def test_a_gap_resets_the_stream_and_duplicates_are_dropped() -> None:
    stream = Stream(TOKEN, HOUSEHOLD)
    data_to(stream, 0, b"abcd")
    data_to(stream, 2, b"cdef")
    assert stream.readable() == b"abcdef" and stream.duplicates_dropped == 2
    data_to(stream, 8, b"ij")
    assert stream.reset_code is Reset.PROTOCOL
    assert sent_reset(stream).code is Reset.PROTOCOL


def test_a_link_gone_longer_than_linger_resets_expired() -> None:
    stream = Stream(TOKEN, HOUSEHOLD, linger=120.0)
    stream.send(b"pending")
    stream.link_lost(1000.0)
    assert not stream.expired(1119.0)
    stream.link_restored()  # a new link, but the peer never answers
    assert stream.frames_to_send()[0] == frames.encode_resume(TOKEN, 0, HOUSEHOLD, True)
    assert stream.expired(1120.0)
    assert stream.reset_code is Reset.EXPIRED
    assert sent_reset(stream).code is Reset.EXPIRED
    assert stream.done


def test_a_peer_silent_while_bytes_wait_for_its_ack_expires_the_stream() -> None:
    stream = Stream(TOKEN, HOUSEHOLD, linger=120.0)
    stream.receive(frames.decode(frames.encode_ack(TOKEN, 0)), 1000.0)  # opened
    assert not stream.expired(5000.0)  # idle both ways: no clock runs
    stream.send(b"pending")
    stream.frames_to_send()
    assert not stream.expired(1119.0)
    assert stream.expired(1120.0)
    assert stream.reset_code is Reset.EXPIRED


def test_a_resume_with_answer_is_answered_once_and_the_answer_is_not() -> None:
    link = pair(bytes(10_000), bytes(3000), window=65536)
    a, b = link.ends
    a.write(1 << 30)
    b.write(1 << 30)
    link.pump(0)
    link.pump(1)
    link.cut({0})  # only a's link dropped; b saw nothing
    link.restore()
    for _ in range(5):
        link.pump(0)
        link.pump(1)
        link.deliver(0, 100, duplicate=False)
        link.deliver(1, 100, duplicate=False)
    resumes = [f for f in link.sent if f.kind is Kind.RESUME]
    assert [(f.offset, f.answer) for f in resumes] == [(0, True), (0, False)]
    link.settle()
    assert bytes(b.got) == a.data and bytes(a.got) == b.data
    assert a.stream.bytes_retransmitted == 10_000 and b.stream.bytes_retransmitted == 3000


def test_resume_retransmits_only_what_the_peers_local_side_lacks() -> None:
    link = pair(bytes(range(256)) * 100, b"", window=1 << 20)
    a, b = link.ends
    a.write(1 << 30)
    link.pump(0)
    link.deliver(1, 1, duplicate=False)  # all 25 600 bytes in one DATA; the FIN is lost
    b.read(10_000)  # b's local side took 10 000 of them before the link broke
    link.cut({0, 1})
    link.restore()
    link.settle()
    assert bytes(b.got) == a.data
    # what b held undelivered comes again (a RESUME says what was handed, so that
    # relinks never let a sender run ahead of a stuck receiver), and not a byte more
    assert a.stream.bytes_retransmitted == 25_600 - 10_000
    assert b.stream.duplicates_dropped == 25_600 - 10_000


def test_relinks_never_let_a_sender_run_past_a_stuck_receivers_window() -> None:
    link = pair(bytes(1 << 20) * 4, b"", window=65536 * 4)
    a, b = link.ends
    for _ in range(6):  # b's local side never reads; the link breaks again and again
        a.write(1 << 30)
        link.pump(0)
        link.deliver(1, 1 << 30, duplicate=False)
        link.cut({0, 1})
        link.restore()
        for side in (0, 1):
            link.pump(side)
            link.deliver(1 - side, 1 << 30, duplicate=False)
        assert len(b.stream.readable()) <= b.stream.window
    assert b.stream.reset_code is None


def test_a_receiver_holding_bytes_repeats_its_ack_so_the_sender_does_not_expire() -> None:
    link = pair(bytes(300_000), b"", window=1 << 20)
    a, b = link.ends
    a.write(1 << 30)
    link.pump(0)
    link.deliver(1, 1 << 30, duplicate=False)  # b holds it all; its local side is paused
    for t in range(0, 600, 5):  # ten minutes of a paused reader on a healthy link
        link.now = 1000.0 + t
        b.stream.keepalive(link.now)
        link.pump(1)
        link.deliver(0, 1 << 30, duplicate=False)
        assert not a.stream.expired(link.now)
    acks = [f for f in link.sent if f.kind is Kind.ACK]
    assert 2 * 600 / 120 <= len(acks) <= 600 / 30 + 2  # a quarter linger apart
