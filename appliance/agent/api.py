"""The agent's HTTP API as a pure function: a parsed request in, a status and JSON out.

Order of checks, cheapest first, so bad input never reaches argon2id: route and
method, size, media type, JSON shape (exactly `user` and `password`, strings),
then the appliance's signature (fresh, not replayed, bound to our certificate),
its trust status, rate limits, the user's lockout, and only then the password.
Every refusal is a 4xx with `{"error": code, "message": text}`.
"""

from __future__ import annotations

import json
import logging
import re
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from appliance import passwords
from appliance.agent import wire
from appliance.agent.guard import Lockout, NonceCache, RateLimiter
from appliance.agent.settings import AgentSettings
from appliance.agent.tables import ApplianceTable, UserTable

log = logging.getLogger("appliance.agent")

MAX_PENDING = 100
_STAMP = re.compile(r"[0-9]{1,12}")  # not str.isdigit: '²' is a digit to it, not to int()


@dataclass(frozen=True)
class Request:
    method: str
    path: str
    headers: Mapping[str, str]  # lower-case names
    body: bytes
    peer: str


@dataclass(frozen=True)
class Response:
    status: int
    body: Mapping[str, Any]
    headers: Mapping[str, str] = field(default_factory=dict)

    def encode(self) -> bytes:
        # ASCII escapes: an echoed field name may hold a lone surrogate, which UTF-8 cannot
        return json.dumps(self.body, ensure_ascii=True).encode("ascii")


def refuse(status: int, code: str, message: str, **headers: str) -> Response:
    return Response(status, {"error": code, "message": message}, headers)


class AgentApp:
    """Thread-safe: the server runs `handle` in worker threads (argon2id is slow on purpose)."""

    def __init__(
        self,
        settings: AgentSettings,
        fingerprint: str,
        users: Callable[[], UserTable],
        appliances: Callable[[], ApplianceTable],
        persist_pending: Callable[[dict[str, dict[str, Any]]], None] | None = None,
        clock: Callable[[], float] = time.time,
        verify: Callable[[str | None, str], bool] = passwords.verify_password,
    ) -> None:
        self.settings = settings
        self.fingerprint = fingerprint
        self.users = users
        self.appliances = appliances
        self.persist_pending = persist_pending
        self.clock = clock
        self.verify = verify
        lim = settings.limits
        self.by_source = RateLimiter(lim.rate, lim.burst)
        self.by_key = RateLimiter(lim.rate, lim.burst)
        self.lockout = Lockout(lim.max_failures, lim.lockout)
        self.nonces = NonceCache(wire.MAX_CLOCK_SKEW)
        self.pending: dict[str, dict[str, Any]] = {}
        self._lock = threading.Lock()

    # -- routing ----------------------------------------------------------------
    def handle(self, req: Request) -> Response:
        path = req.path.split("?", 1)[0]
        if path == wire.INFO_PATH:
            if req.method not in ("GET", "HEAD"):
                return refuse(405, "method_not_allowed", "use GET", Allow="GET")
            return Response(
                200,
                {"service": "personal-agent", "api": "v1", "fingerprint": self.fingerprint},
            )
        if path == wire.AUTHENTICATE_PATH:
            if req.method != "POST":
                return refuse(405, "method_not_allowed", "use POST", Allow="POST")
            return self.authenticate(req)
        return refuse(404, "not_found", "no such path; the API is POST /v1/authenticate")

    # -- POST /v1/authenticate ----------------------------------------------------
    def authenticate(self, req: Request) -> Response:
        if len(req.body) > self.settings.limits.max_body:
            return refuse(413, "too_large", f"at most {self.settings.limits.max_body} bytes")
        ctype = req.headers.get("content-type", "").split(";", 1)[0].strip().lower()
        if ctype != "application/json":
            return refuse(415, "unsupported_media_type", "send application/json")
        parsed = parse_credentials(req.body)
        if isinstance(parsed, Response):
            return parsed
        user_name, password = parsed
        now = self.clock()

        key = req.headers.get(wire.HEADER_KEY, "")
        verdict = self._check_appliance(req, key, now)
        if verdict is not None:
            return verdict
        with self._lock:
            if not self.by_source.allow(req.peer, now) or not self.by_key.allow(key, now):
                return refuse(
                    429,
                    "rate_limited",
                    "too many requests; try again in a minute",
                    **{"Retry-After": "60"},
                )
            if self.lockout.locked(user_name, now):
                log.info("login for %s refused: locked (appliance %s)", user_name, key[:12])
                return refuse(423, "locked", "too many wrong passwords; try again later")
        table = self.users()
        user = table.get(user_name)
        ok = self.verify(user.password_hash if user else None, password)
        if user is None:
            log.info("login refused: unknown user %r (appliance %s)", user_name, key[:12])
            return refuse(401, "unknown_user", "no such user at this agent")
        if user.locked:
            return refuse(423, "locked", "this user is locked by the household")
        if not ok:
            with self._lock:
                now_locked = self.lockout.failure(user_name, self.clock())
            log.info(
                "login for %s refused: bad password%s",
                user_name,
                " (now locked)" if now_locked else "",
            )
            return refuse(401, "bad_password", "wrong password")
        with self._lock:
            self.lockout.success(user_name)
        log.info("login for %s accepted (appliance %s from %s)", user_name, key[:12], req.peer)
        return Response(
            200,
            {
                "user": user.name,
                "attributes": {
                    k: list(v) if isinstance(v, tuple) else v for k, v in user.attributes.items()
                },
                "servers": dict(user.servers),
            },
        )

    def _check_appliance(self, req: Request, key: str, now: float) -> Response | None:
        h = req.headers
        stamp, nonce, sig = (
            h.get(wire.HEADER_TIME, ""),
            h.get(wire.HEADER_NONCE, ""),
            h.get(wire.HEADER_SIGNATURE, ""),
        )
        if not (key and stamp and nonce and sig):
            return refuse(401, "unsigned", "requests must be signed by an appliance key")
        if not wire.valid_key_id(key) or not _nonce_ok(nonce) or not _STAMP.fullmatch(stamp):
            return refuse(400, "bad_signature", "malformed signature headers")
        if abs(int(stamp) - now) > wire.MAX_CLOCK_SKEW:
            return refuse(401, "stale_request", "the appliance clock is off by more than 5 min")
        if not wire.verify_signature(
            key, sig, req.method, req.path, self.fingerprint, stamp, nonce, req.body
        ):
            return refuse(401, "bad_signature", "signature does not verify for this agent")
        with self._lock:
            if not self.nonces.fresh(nonce, now):
                return refuse(401, "replayed", "this request was already seen")
        status = self.appliances().status(key)
        if key in self.settings.trusted and status != "denied":
            status = "allowed"
        if status == "allowed" or (status is None and self.settings.accept == "any"):
            return None
        if status == "denied":
            return refuse(403, "appliance_denied", "the household has denied this appliance")
        self._note_pending(key, req.peer, now)
        return refuse(
            403,
            "appliance_not_allowed",
            f"this appliance is not allowed yet; at home run: {wire.allow_command(key)}",
        )

    def _note_pending(self, key: str, peer: str, now: float) -> None:
        with self._lock:
            entry = self.pending.get(key)
            new = entry is None
            if entry is None:
                if len(self.pending) >= MAX_PENDING:
                    oldest = min(self.pending, key=lambda k: self.pending[k]["last_seen"])
                    del self.pending[oldest]
                entry = {"first_seen": now, "last_seen": now, "address": peer, "count": 0}
                self.pending[key] = entry
            entry["count"] += 1
            save = new or now - entry["last_seen"] > 10
            entry["last_seen"] = now
            entry["address"] = peer
            snapshot = {k: dict(v) for k, v in self.pending.items()}
        if save and self.persist_pending is not None:
            try:
                self.persist_pending(snapshot)
            except OSError as exc:
                log.warning("cannot save pending appliances: %s", exc)


def _nonce_ok(nonce: str) -> bool:
    return bool(wire.NONCE_RE.fullmatch(nonce))


def parse_credentials(body: bytes) -> tuple[str, str] | Response:
    """Exactly {"user": str, "password": str}; anything else is a 400 naming the problem."""
    try:
        doc = json.loads(body.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        return refuse(400, "bad_json", "the body is not JSON")
    if not isinstance(doc, dict):
        return refuse(400, "bad_request", "the body must be a JSON object")
    unknown = sorted(set(doc) - {"user", "password"})
    if unknown:
        return refuse(400, "unknown_field", f"unknown field: {unknown[0][:64]}")
    user, password = doc.get("user"), doc.get("password")
    if not isinstance(user, str) or not isinstance(password, str):
        return refuse(400, "bad_request", "user and password are required strings")
    if not wire.USER_RE.fullmatch(user):
        return refuse(400, "bad_request", "user: letters, digits and . _ + - (at most 64)")
    if not 1 <= len(password) <= wire.MAX_PASSWORD_LEN:
        return refuse(400, "bad_request", f"password: 1 to {wire.MAX_PASSWORD_LEN} characters")
    return user, password
