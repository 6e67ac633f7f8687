"""Login rate limits, caps on logins in progress, return URLs and CSRF tokens.

The rate limiter counts failed logins in a sliding window per key (a guest
address, a user id); after `limit` failures the key waits until the oldest
failure in the window is old enough, and the page says how long.  It lives in
memory: the portal is one process, and a restart forgetting failures only
hands an attacker one more window.

Logins through a personal agent wait on the network (up to the agent deadline)
while holding a portal worker thread, so `InFlight` caps how many are in progress
at once, per guest address and in all, below the number of threads.

Return URLs: after a login the browser goes back only to a URL this guest was
captured on (`ReturnUrls`), never to one a link put into the login form.

CSRF: each browser gets a random cookie (HttpOnly, SameSite=Strict); every form
carries HMAC(secret, cookie), compared in constant time.  A cross-site page can
neither read the cookie nor compute the token, and a planted cookie is useless
without the server's secret.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import threading
import time
from collections import deque


class RateLimiter:
    """At most `limit` failures per key within `window` seconds."""

    def __init__(self, limit: int = 5, window: float = 300.0, max_keys: int = 100_000):
        self.limit = limit
        self.window = window
        self.max_keys = max_keys
        self._failures: dict[str, deque[float]] = {}
        self._lock = threading.Lock()

    def _prune(self, key: str, now: float) -> deque[float] | None:
        q = self._failures.get(key)
        if q is None:
            return None
        while q and q[0] <= now - self.window:
            q.popleft()
        if not q:
            del self._failures[key]
            return None
        return q

    def retry_after(self, key: str, now: float | None = None) -> int:
        """Seconds until `key` may try again (0: now)."""
        now = time.monotonic() if now is None else now
        with self._lock:
            q = self._prune(key, now)
            if q is None or len(q) < self.limit:
                return 0
            # the failure that has to leave the window for the count to drop below limit
            oldest_relevant = q[len(q) - self.limit]
            return max(1, int(oldest_relevant + self.window - now + 0.999))

    def fail(self, key: str, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        with self._lock:
            if len(self._failures) >= self.max_keys:
                for k in list(self._failures)[: self.max_keys // 10]:
                    self._prune(k, now)
                while len(self._failures) >= self.max_keys:
                    self._failures.pop(next(iter(self._failures)))
            q = self._failures.setdefault(key, deque())
            q.append(now)
            while len(q) > self.limit * 2:
                q.popleft()

    def reset(self, key: str) -> None:
        with self._lock:
            self._failures.pop(key, None)


class InFlight:
    """At most `per_key` tasks in progress per key and `total` in all; `take` never waits."""

    def __init__(self, per_key: int, total: int):
        self.per_key = per_key
        self.total = total
        self._open: dict[str, int] = {}
        self._all = 0
        self._lock = threading.Lock()

    def take(self, key: str) -> bool:
        """One more in progress for `key`; False (nothing taken) when a cap is reached."""
        with self._lock:
            n = self._open.get(key, 0)
            if n >= self.per_key or self._all >= self.total:
                return False
            self._open[key] = n + 1
            self._all += 1
            return True

    def release(self, key: str) -> None:
        with self._lock:
            n = self._open.get(key, 0)
            if n <= 0:
                return
            self._all -= 1
            if n == 1:
                del self._open[key]
            else:
                self._open[key] = n - 1


class ReturnUrls:
    """The last `per_key` URLs each guest address was captured on, for `ttl` seconds."""

    def __init__(self, per_key: int = 8, ttl: float = 3600.0, max_keys: int = 4096):
        self.per_key = per_key
        self.ttl = ttl
        self.max_keys = max_keys
        self._urls: dict[str, dict[str, float]] = {}
        self._lock = threading.Lock()

    def remember(self, key: str, url: str, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        with self._lock:
            urls = self._urls.pop(key, None)
            if urls is None:
                while len(self._urls) >= self.max_keys:  # the least recently captured goes
                    self._urls.pop(next(iter(self._urls)))
                urls = {}
            urls.pop(url, None)
            urls[url] = now + self.ttl
            while len(urls) > self.per_key:
                urls.pop(next(iter(urls)))
            self._urls[key] = urls

    def allowed(self, key: str, url: str, now: float | None = None) -> bool:
        now = time.monotonic() if now is None else now
        with self._lock:
            until = self._urls.get(key, {}).get(url)
            return until is not None and until > now


class Csrf:
    """Tokens bound to a per-browser cookie with a per-process secret."""

    COOKIE = "gg_csrf"

    def __init__(self, secret: bytes | None = None):
        self.secret = secret or secrets.token_bytes(32)

    @staticmethod
    def new_cookie() -> str:
        return secrets.token_urlsafe(24)

    def token(self, cookie: str) -> str:
        return hmac.new(self.secret, cookie.encode(), hashlib.sha256).hexdigest()

    def check(self, cookie: str | None, token: str | None) -> bool:
        if not cookie or not token:
            return False
        return hmac.compare_digest(self.token(cookie).encode(), token.encode())
