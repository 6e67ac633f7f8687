"""Rate limits and lockout against password guessing and floods; pure, the clock is passed in.

Three brakes: a token bucket per source (any request, before its signature is
checked), one per appliance key (signed requests), and per user a count of
consecutive wrong passwords that locks the user for `lockout` seconds once it
reaches `max_failures`.  While locked, the password is not even checked, so
guessing during a lockout learns nothing.  State is in memory and bounded; a
restart of the agent forgets it (an attacker cannot restart the agent).
"""

from __future__ import annotations

import ipaddress
from collections import OrderedDict
from dataclasses import dataclass

MAX_TRACKED = 10000
RELAYED = "relay:"  # the peer of a request that came through the home relay


def source_of(peer: str) -> str:
    """The unit a source brake counts: an IPv4 address, or an IPv6 /64.

    One IPv6 host is routinely given a whole /64, so counting single addresses
    would give it 2**64 fresh buckets.  A relayed request (`relay:<address>`, the
    address the relay saw) is counted the same way, apart from direct ones."""
    if peer.startswith(RELAYED):
        return RELAYED + source_of(peer[len(RELAYED) :].strip("[]"))
    try:
        addr = ipaddress.ip_address(peer)
    except ValueError:
        return peer
    if isinstance(addr, ipaddress.IPv6Address):
        if addr.ipv4_mapped is not None:
            return str(addr.ipv4_mapped)
        return str(ipaddress.IPv6Network((addr, 64), strict=False))
    return str(addr)


@dataclass
class _Bucket:
    tokens: float
    stamp: float


class RateLimiter:
    def __init__(self, per_minute: int, burst: int) -> None:
        self.rate = per_minute / 60.0
        self.burst = float(burst)
        self._buckets: OrderedDict[str, _Bucket] = OrderedDict()
        self.refused = 0  # a counted drop, for the operator's log

    def allow(self, key: str, now: float) -> bool:
        b = self._buckets.pop(key, None) or _Bucket(self.burst, now)
        b.tokens = min(self.burst, b.tokens + max(0.0, now - b.stamp) * self.rate)
        b.stamp = now
        self._buckets[key] = b
        while len(self._buckets) > MAX_TRACKED:
            self._buckets.popitem(last=False)
        if b.tokens < 1.0:
            self.refused += 1
            return False
        b.tokens -= 1.0
        return True


@dataclass
class _Failures:
    count: int
    locked_until: float


class Lockout:
    def __init__(self, max_failures: int, lockout: float) -> None:
        self.max_failures = max_failures
        self.lockout = lockout
        self._users: OrderedDict[str, _Failures] = OrderedDict()

    def locked(self, user: str, now: float) -> bool:
        f = self._users.get(user)
        return f is not None and f.locked_until > now

    def failure(self, user: str, now: float) -> bool:
        """Count a wrong password; True when this one locks the user."""
        f = self._users.pop(user, None) or _Failures(0, 0.0)
        if f.locked_until and f.locked_until <= now:
            f = _Failures(0, 0.0)
        f.count += 1
        just_locked = f.count >= self.max_failures and f.locked_until <= now
        if just_locked:
            f.locked_until = now + self.lockout
        self._users[user] = f
        while len(self._users) > MAX_TRACKED:
            self._users.popitem(last=False)
        return just_locked

    def success(self, user: str) -> None:
        self._users.pop(user, None)


class NonceCache:
    """Nonces seen within the clock-skew window: a captured request cannot be replayed."""

    def __init__(self, window: float, limit: int = 100000) -> None:
        self.window = window
        self.limit = limit
        self._seen: OrderedDict[str, float] = OrderedDict()

    def fresh(self, nonce: str, now: float) -> bool:
        while self._seen:
            oldest, stamp = next(iter(self._seen.items()))
            if stamp > now - 2 * self.window and len(self._seen) < self.limit:
                break
            del self._seen[oldest]
        if nonce in self._seen:
            return False
        self._seen[nonce] = now
        return True
