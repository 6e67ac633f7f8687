"""One end of a resumable byte stream over relay links (sans-IO).

No sockets, no clock: the caller feeds received frames (`receive`), local bytes
(`send`, `close_local`), link events (`link_lost`, `link_restored`) and the time
(`now`), and sends whatever `frames_to_send` returns on the current link.

Outgoing, the stream keeps every byte the peer has not acknowledged, at most
`window` of them (that is the flow control end to end).  Incoming, it delivers
bytes in offset order and acknowledges only what the local side says it wrote
(`delivered`), so a receiver whose socket is stuck stalls its sender at the window.

Relink choice: after `link_restored` the stream sends its RESUME and holds DATA,
FIN and ACK until the peer's RESUME arrives, then retransmits from the peer's
offset (nothing the peer already has is sent twice).  Until then DATA beyond what
was received is dropped, not a protocol error: the peer may still be sending what
it sent before it learnt of the drop.  The linger clock runs from `link_lost`
until the peer's RESUME, so a peer that never comes back expires the stream.
"""

from __future__ import annotations

from appliance.homelink import frames
from appliance.homelink.frames import Frame, Kind, Reset

WINDOW = 1 << 20
LINGER = 120.0


class Stream:
    """One end of one stream, named by its token; both ends run the same code."""

    def __init__(
        self, token: bytes, household: str, window: int = WINDOW, linger: float = LINGER
    ) -> None:
        if len(token) != frames.TOKEN_LEN:
            raise ValueError("a stream token is 16 bytes")
        self.token = token
        self.household = household
        self.window = window
        self.linger = linger
        # Outgoing: _out holds bytes [_out_base, _queued); _next is the next to send.
        self._out = bytearray()
        self._out_base = 0  # the peer acknowledged every byte below this
        self._queued = 0
        self._next = 0
        self._sent_high = 0  # the highest offset ever sent (ACKs beyond it are lies)
        self._fin_queued = False
        self._fin_sent = False  # on this pass: a rewind sends it again
        self._fin_ever = False  # on any pass: an ACK of length+1 is then no lie
        self._fin_acked = False
        # Incoming: _in holds bytes [_handed, _received) for the local socket.
        self._in = bytearray()
        self._handed = 0  # the local side wrote every byte below this
        self._received = 0
        self._acked = 0  # the highest ACK or RESUME offset we sent the peer
        self._ack_due = False
        self._ack_ever = False
        self._ack_again = False  # a keepalive: the same ACK once more
        self._keepalive_at = 0.0
        self._peer_fin: int | None = None
        # Link, end of stream
        self._lost_at: float | None = None
        self._resume_due = False
        self._answer_due = False
        self._reset_out: bytes | None = None
        self.reset_code: Reset | None = None
        self.reset_reason = ""
        self.last_heard: float | None = None  # `now` of the last frame received
        # Counters
        self.bytes_sent = 0  # first transmissions only
        self.bytes_retransmitted = 0
        self.duplicates_dropped = 0  # bytes received that were already received

    # -- state -----------------------------------------------------------------

    @property
    def eof_received(self) -> bool:
        """The peer's FIN and every byte before it were handed to the local side."""
        return self._peer_fin is not None and self._handed == self._peer_fin

    @property
    def done(self) -> bool:
        """Reset, or both directions ended and acknowledged: the stream may be dropped."""
        if self.reset_code is not None:
            return self._reset_out is None
        in_done = self.eof_received and self._acked > self._handed
        return self._fin_acked and in_done

    def unacked(self) -> int:
        """Bytes queued but not yet acknowledged by the peer (never above the window)."""
        return self._queued - self._out_base

    def send_room(self) -> int:
        return 0 if self.reset_code is not None else self.window - self.unacked()

    # -- local side ------------------------------------------------------------

    def send(self, data: bytes | memoryview) -> None:
        """Queue local bytes; more than `send_room()` is the caller's bug."""
        if self._fin_queued or self.reset_code is not None:
            raise ValueError("send on a stream that is closed or reset")
        if len(data) > self.send_room():
            raise ValueError(f"send of {len(data)} bytes with room for {self.send_room()}")
        self._out += data
        self._queued += len(data)

    def close_local(self) -> None:
        """The local side ended: a FIN follows the queued bytes."""
        self._fin_queued = True

    def readable(self) -> bytes:
        """Bytes received in order and not yet written to the local socket."""
        return bytes(self._in)

    def delivered(self, n: int) -> None:
        """The local side wrote the first `n` readable bytes: only these get acknowledged."""
        if not 0 <= n <= len(self._in):
            raise ValueError("delivered more than was readable")
        del self._in[:n]
        self._handed += n
        if self._handed - self._acked >= self.window // 4 or self.eof_received:
            self._ack_due = True

    def ack_now(self) -> None:
        """The caller is idle: acknowledge what was delivered (or ACK 0 for an open)."""
        if self._handed > self._acked or not self._ack_ever:
            self._ack_due = True

    def keepalive(self, now: float) -> None:
        """While the peer waits on us (bytes we hold undelivered: our local side is slow
        or paused), repeat our ACK every quarter linger, so the peer hears from us and
        does not take the pause for a peer gone (`expired`)."""
        waiting = self._received > self._acked or (self._peer_fin is not None and not self.done)
        if not waiting or self.reset_code is not None or self._lost_at is not None:
            return
        if now - self._keepalive_at >= self.linger / 4:
            self._keepalive_at = now
            self._ack_due = self._ack_again = True

    def abort(self, code: Reset = Reset.CLOSED, reason: str = "") -> None:
        """End the stream at once and tell the peer."""
        self._reset(code, reason, tell_peer=True)

    # -- link ------------------------------------------------------------------

    def link_lost(self, now: float) -> None:
        if self._lost_at is None:
            self._lost_at = now
        self._resume_due = False

    def link_restored(self) -> None:
        """A new link: say where we are and wait for the peer's RESUME."""
        if self.reset_code is None:
            self._resume_due = True

    def expired(self, now: float) -> bool:
        """The peer did not come back within linger: the stream resets EXPIRED.

        Either our link was lost that long, or the peer's was: then our link is fine but
        the peer is silent while we wait for it to acknowledge bytes (or our FIN).  A
        stream idle both ways never expires; its next byte starts the clock."""
        if self.reset_code is Reset.EXPIRED:
            return True
        if self.reset_code is not None:
            return False
        lost_at = self._lost_at
        if lost_at is not None and now - lost_at >= self.linger:
            self._reset(Reset.EXPIRED, "link lost longer than linger", tell_peer=True)
            return True
        waiting = self.unacked() > 0 or (self._fin_sent and not self._fin_acked)
        heard = self.last_heard
        if waiting and heard is not None and now - heard >= self.linger:
            self._reset(Reset.EXPIRED, "peer silent longer than linger", tell_peer=True)
            return True
        return False

    # -- frames ----------------------------------------------------------------

    def receive(self, frame: Frame, now: float) -> None:
        """A frame of this stream from the peer; protocol errors reset, never raise."""
        if frame.token != self.token:
            raise ValueError("frame of another stream")
        self.last_heard = now
        if self.reset_code is not None:
            return
        if frame.kind is Kind.DATA:
            self._on_data(frame.offset, frame.payload)
        elif frame.kind is Kind.ACK:
            self._on_ack(frame.offset)
        elif frame.kind is Kind.FIN:
            self._on_fin(frame.offset)
        elif frame.kind is Kind.RESET:
            self._reset(frame.code or Reset.PROTOCOL, frame.reason, tell_peer=False)
        elif frame.kind is Kind.RESUME:
            self._on_resume(frame.offset, frame.answer)

    def _on_data(self, offset: int, payload: bytes) -> None:
        end = offset + len(payload)
        if end > self._acked + self.window:
            return self._protocol(f"DATA up to {end} beyond the window")
        if self._peer_fin is not None and end > self._peer_fin:
            return self._protocol("DATA beyond FIN")
        if offset > self._received:
            if self._lost_at is not None:
                return  # sent before the peer learnt of the drop; it rewinds on RESUME
            return self._protocol(f"DATA at {offset}, only {self._received} received")
        fresh = payload[self._received - offset :]
        self.duplicates_dropped += len(payload) - len(fresh)
        self._in += fresh
        self._received += len(fresh)

    def _on_ack(self, offset: int) -> None:
        if offset > self._sent_high + (1 if self._fin_ever else 0):
            return self._protocol(f"ACK {offset} beyond {self._sent_high} sent")
        self._drop_acked(offset)

    def _on_fin(self, length: int) -> None:
        if self._peer_fin is not None and self._peer_fin != length:
            return self._protocol("FIN moved")
        if length < self._received or length > self._acked + self.window:
            return self._protocol(f"FIN at {length}, {self._received} received")
        if self._peer_fin is not None and self.eof_received:
            self._acked = min(self._acked, length)  # a FIN again: our ACK of it was lost
        self._peer_fin = length
        if self.eof_received:
            self._ack_due = True

    def _on_resume(self, received: int, answer: bool) -> None:
        if received > self._sent_high:
            return self._protocol(f"RESUME at {received} beyond {self._sent_high} sent")
        self._drop_acked(received)
        self._next = self._out_base  # rewind: the peer has nothing beyond `received`
        if not self._fin_acked:
            self._fin_sent = False
        self._lost_at = None
        self._answer_due = self._answer_due or answer

    def _drop_acked(self, offset: int) -> None:
        if offset > self._queued:  # ACK length+1: the FIN too
            self._fin_acked = True
            offset = self._queued
        if offset > self._out_base:
            del self._out[: offset - self._out_base]
            self._out_base = offset
            self._next = max(self._next, offset)

    def _protocol(self, reason: str) -> None:
        self._reset(Reset.PROTOCOL, reason, tell_peer=True)

    def _reset(self, code: Reset, reason: str, tell_peer: bool) -> None:
        if self.reset_code is not None:
            return
        self.reset_code, self.reset_reason = code, reason
        self._reset_out = frames.encode_reset(self.token, code, reason) if tell_peer else None
        self._out.clear()
        self._in.clear()

    def frames_to_send(self, max_frames: int | None = None) -> list[bytes]:
        """The frames due, in order: RESET, or RESUME, ACK, DATA, FIN."""
        out: list[bytes] = []
        if self._reset_out is not None:
            out.append(self._reset_out)
            self._reset_out = None
            return out
        if self.reset_code is not None:
            return out
        if self._resume_due:
            self._resume_due = False
            out.append(self._resume(answer=True))
        if self._lost_at is not None:
            return out  # hold everything else until the peer's RESUME
        if self._answer_due:
            self._answer_due = False
            out.append(self._resume(answer=False))
        if self._ack_due:
            self._ack_due = False
            value = self._handed + (1 if self.eof_received else 0)
            if value > self._acked or not self._ack_ever or self._ack_again:
                self._acked, self._ack_ever = max(self._acked, value), True
                out.append(frames.encode_ack(self.token, value))
            self._ack_again = False
        while self._next < self._queued and (max_frames is None or len(out) < max_frames):
            start = self._next - self._out_base
            with memoryview(self._out) as view:  # one copy: into the frame (released
                chunk = view[start : start + frames.MAX_PAYLOAD]  # before _out resizes)
                size = len(chunk)
                out.append(frames.encode_data(self.token, self._next, chunk))
                chunk.release()
            first = max(0, self._next + size - self._sent_high)
            self.bytes_sent += first
            self.bytes_retransmitted += size - first
            self._next += size
            self._sent_high = max(self._sent_high, self._next)
        fin_due = self._fin_queued and not self._fin_sent and self._next == self._queued
        if fin_due and (max_frames is None or len(out) < max_frames):
            self._fin_sent = self._fin_ever = True
            out.append(frames.encode_fin(self.token, self._queued))
        return out

    def _resume(self, answer: bool) -> bytes:
        """A RESUME says what the local side was handed (not merely received: bytes still
        in our buffer come again and are dropped as duplicates), and counts as our ACK;
        so a relink never lets the peer send past what our local side took."""
        self._acked = max(self._acked, self._handed)
        return frames.encode_resume(self.token, self._handed, self.household, answer)
