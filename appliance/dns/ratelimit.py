"""Per-client token buckets for the guests' resolver (no sockets, no clock of its own).

Each guest address may ask `rate` questions a second on average and `burst` at once
(a browser opening a page asks for a few dozen names together).  A question over the
rate is dropped without an answer: an answer would cost what the flood is meant to
cost us, and a real stub resolver simply retries a little later.  Drops are counted.

The table is bounded: past `max_clients` addresses, the idle ones (whose bucket is
full again, which a fresh bucket would be too) are forgotten; if none is idle, the
newcomer is dropped until one is.  The UDP thread and the event loop may both call
`allow`: a race between them can only miscount a token, never raise.
"""

from __future__ import annotations

from dataclasses import dataclass, field

RATE = 50
"""Default questions a second per guest address, on average."""
BURST = 200
"""Default questions at once: a browser opening a busy page asks A, AAAA and HTTPS for
a few dozen names within a second."""


@dataclass
class RateLimit:
    rate: float  # tokens per second
    burst: float  # bucket size
    max_clients: int = 65536
    dropped: int = 0
    buckets: dict[str, list[float]] = field(default_factory=dict)  # client -> [tokens, at]

    def allow(self, client: str, now: float) -> bool:
        """Take one token from the client's bucket; False (counted) when it is empty."""
        b = self.buckets.get(client)
        if b is None:
            if len(self.buckets) >= self.max_clients and not self._forget_idle(now):
                self.dropped += 1
                return False
            self.buckets[client] = [self.burst - 1.0, now]
            return True
        tokens = b[0] + (now - b[1]) * self.rate
        if tokens > self.burst:
            tokens = self.burst
        b[1] = now
        if tokens < 1.0:
            b[0] = tokens
            self.dropped += 1
            return False
        b[0] = tokens - 1.0
        return True

    def _forget_idle(self, now: float) -> bool:
        """Drop the buckets that have refilled; True when room was made."""
        full = self.burst / self.rate
        # list(): one atomic copy under the GIL, however the other thread changes the dict
        idle = [
            c
            for c, (tokens, at) in list(self.buckets.items())
            if now - at >= full - tokens / self.rate
        ]
        for c in idle:
            self.buckets.pop(c, None)
        return bool(idle)


__all__ = ["BURST", "RATE", "RateLimit"]
