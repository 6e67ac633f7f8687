"""The agent's HTTP API as a pure function: a parsed request in, a status and JSON out.

Order of checks, cheapest first, so bad input never reaches argon2id: route and
method, the source's rate limit (before anything is parsed or verified, so a
flood of forged or unlisted requests is refused cheaply), size, media type, JSON
shape (exactly `user` and `password`, strings), then the appliance's signature
(fresh, not replayed, bound to our certificate), its trust status, the key's
rate limit, the user's lockout, and only then the password.
Every refusal is a 4xx with `{"error": code, "message": text}`.

A key that is not allowed yet is noted as pending for the household to see.  That
table is bounded per source and in all, and written at most once a second.

`POST /v1/connect` passes the same checks up to the signature and the key's rate
limit, then asks for a login this agent accepted for that key and user within
LOGIN_TTL; its answer is a `Tunnel` (the server does the socket work), not a body.
"""

from __future__ import annotations

import json
import logging
import re
import threading
import time
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from appliance.agent.guard import Lockout, NonceCache, RateLimiter, source_of
from appliance.agent.settings import AgentSettings
from appliance.agent.tables import ApplianceTable, UserTable
from appliance.core import agent_protocol as wire
from appliance.core import passwords
from appliance.core.attributes import as_json

log = logging.getLogger("appliance.agent")

MAX_PENDING = 100
MAX_PENDING_PER_SOURCE = 4  # a source with this many replaces its own, never others'
PENDING_SAVE_INTERVAL = 1.0  # seconds between writes of the pending file, at least
LOGIN_TTL = 24 * 3600  # a login opens server streams for this long (docs/home-relay.md)
MAX_LOGINS = 10000  # remembered logins; the oldest goes first
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


@dataclass(frozen=True)
class Tunnel:
    """The answer to an admitted /v1/connect: open TCP to host:port and splice."""

    host: str
    port: int
    user: str
    service: str
    key: str  # the appliance key id, for the log

    def describe(self) -> str:
        return f"{self.service} for {self.user} (appliance {self.key[:12]})"


LoginKey = tuple[str, str]  # (appliance key id, user)


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
        logins: Mapping[LoginKey, float] | None = None,
        persist_logins: Callable[[dict[LoginKey, float]], None] | None = None,
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
        self.dropped: Counter[str] = Counter()  # rate_limited, pending_evicted, no_login, ...
        self.accepted: Counter[str] = Counter()  # logins, streams (for the metrics)
        self.persist_logins = persist_logins
        self.logins: dict[LoginKey, float] = {}
        for login, at in sorted((logins or {}).items(), key=lambda kv: kv[1]):
            self._remember(login, at)
        self._lock = threading.Lock()
        self._save_lock = threading.Lock()  # one writer at a time, in order
        self._pending_dirty = False
        self._last_save = float("-inf")
        self._save_error = ""

    # -- routing ----------------------------------------------------------------
    def handle(self, req: Request) -> Response | Tunnel:
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
        if path == wire.CONNECT_PATH:
            if req.method != "POST":
                return refuse(405, "method_not_allowed", "use POST", Allow="POST")
            return self.connect(req)
        return refuse(404, "not_found", "no such path; the API is POST /v1/authenticate")

    # -- the checks every signed POST passes --------------------------------------
    def _admit(self, req: Request, now: float) -> Response | None:
        """Before the body is parsed: the source's rate limit, size, media type."""
        with self._lock:
            admitted = self.by_source.allow(source_of(req.peer), now)
            if not admitted:
                self.dropped["rate_limited"] += 1
        if not admitted:
            return _rate_limited()
        if len(req.body) > self.settings.limits.max_body:
            return refuse(413, "too_large", f"at most {self.settings.limits.max_body} bytes")
        ctype = req.headers.get("content-type", "").split(";", 1)[0].strip().lower()
        if ctype != "application/json":
            return refuse(415, "unsupported_media_type", "send application/json")
        return None

    def _check_signed(self, req: Request, now: float) -> tuple[str, Response | None]:
        """After the body's shape: the signature, the key's trust and its rate limit."""
        key = req.headers.get(wire.HEADER_KEY, "")
        verdict = self._check_appliance(req, key, now)
        if verdict is not None:
            return key, verdict
        with self._lock:
            if not self.by_key.allow(key, now):
                self.dropped["rate_limited"] += 1
                return key, _rate_limited()
        return key, None

    # -- POST /v1/authenticate ----------------------------------------------------
    def _signed_request(
        self, req: Request, now: float, parse: Callable[[bytes], tuple[str, str] | Response]
    ) -> tuple[str, str, str] | Response:
        """What both endpoints do first, in this order (cheap checks before the
        signature): admission, the body's two fields, the appliance's signature.
        -> (appliance key, user, the second field), or the refusal."""
        early = self._admit(req, now)
        if early is not None:
            return early
        parsed = parse(req.body)
        if isinstance(parsed, Response):
            return parsed
        key, verdict = self._check_signed(req, now)
        if verdict is not None:
            return verdict
        return key, parsed[0], parsed[1]

    def authenticate(self, req: Request) -> Response:
        now = self.clock()
        checked = self._signed_request(req, now, parse_credentials)
        if isinstance(checked, Response):
            return checked
        key, user_name, password = checked
        with self._lock:
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
            self._remember((key, user.name), self.clock())
        self._save_logins()
        with self._lock:
            self.accepted["logins"] += 1
        log.info("login for %s accepted (appliance %s from %s)", user_name, key[:12], req.peer)
        return Response(
            200,
            {
                "user": user.name,
                "attributes": as_json(user.attributes),
                "servers": dict(user.servers),
            },
        )

    # -- POST /v1/connect ---------------------------------------------------------
    def connect(self, req: Request) -> Response | Tunnel:
        now = self.clock()
        checked = self._signed_request(req, now, parse_connect)
        if isinstance(checked, Response):
            return checked
        key, user_name, service = checked
        with self._lock:
            at = self.logins.get((key, user_name))
            fresh = at is not None and 0 <= now - at <= LOGIN_TTL
            if not fresh:
                self.dropped["no_login"] += 1
        if not fresh:
            log.info(
                "stream to %s for %s refused: no login (appliance %s)", service, user_name, key[:12]
            )
            return refuse(
                403, "no_login", "this appliance has not logged this user in within 24 hours"
            )
        user = self.users().get(user_name)
        if user is None or user.locked:  # removed or locked by the household since the login
            with self._lock:
                self.dropped["no_login"] += 1
            return refuse(403, "no_login", "this user can no longer log in here")
        target = user.servers.get(service)
        if target is None:
            return refuse(404, "no_server", f"this user has no {service} server at this agent")
        try:
            host, port, _pin = wire.parse_server(target)  # a pin is the appliance's business
        except ValueError:  # the table reader checked it; a hand edit may not have
            return refuse(404, "no_server", f"this user's {service} server is not host:port")
        with self._lock:
            self.accepted["streams"] += 1
        log.info(
            "stream to %s for %s accepted (appliance %s from %s)",
            service,
            user_name,
            key[:12],
            req.peer,
        )
        return Tunnel(host, port, user_name, service, key)

    # -- the login record ---------------------------------------------------------
    def note_drop(self, what: str) -> None:
        """Count a refusal the server made (the counter is shared with worker threads)."""
        with self._lock:
            self.dropped[what] += 1

    def _remember(self, login: LoginKey, at: float) -> None:
        """Note a login (caller holds the lock, or is __init__); the oldest past MAX_LOGINS goes."""
        self.logins.pop(login, None)
        self.logins[login] = at  # insertion order is age order
        while len(self.logins) > MAX_LOGINS:
            del self.logins[next(iter(self.logins))]
            self.dropped["login_evicted"] += 1
        while self.logins:  # expired ones from the front, so the record stays small
            oldest = next(iter(self.logins))
            if at - self.logins[oldest] <= LOGIN_TTL:
                break
            del self.logins[oldest]

    def _save_logins(self) -> None:
        """Write the record (a snapshot taken under the write lock, so writes stay in order)."""
        if self.persist_logins is None:
            return
        with self._save_lock:
            with self._lock:
                now = self.clock()
                current = {k: t for k, t in self.logins.items() if now - t <= LOGIN_TTL}
            try:
                self.persist_logins(current)
            except OSError as exc:  # the login stands; only a restart forgets it
                log.warning("cannot save the login record: %s", exc)

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
            if entry is None:
                victim = self._pending_victim(source_of(peer))
                if victim is not None:
                    del self.pending[victim]
                    self.dropped["pending_evicted"] += 1
                entry = {"first_seen": now, "last_seen": now, "address": peer, "count": 0}
                self.pending[key] = entry
                self._pending_dirty = True
            elif now - entry["last_seen"] > 10:
                self._pending_dirty = True  # a fresh "last seen" is worth a write now and then
            entry["count"] += 1
            entry["last_seen"] = now
            entry["address"] = peer
        self.flush_pending(now)

    def _pending_victim(self, source: str) -> str | None:
        """The entry a new key from `source` replaces, if any (caller holds the lock).

        A source at its share gives up its own stalest entry; when the table is full,
        the source holding the most entries gives up its stalest.  So a flood from one
        address churns only its own slots, and a visitor's single entry goes last."""
        held: dict[str, list[str]] = {}
        for k, e in self.pending.items():
            held.setdefault(source_of(str(e["address"])), []).append(k)
        mine = held.get(source, [])
        if len(mine) >= MAX_PENDING_PER_SOURCE:
            candidates = mine
        elif len(self.pending) >= MAX_PENDING:
            most = max(len(keys) for keys in held.values())
            candidates = [k for keys in held.values() if len(keys) == most for k in keys]
        else:
            return None
        return min(candidates, key=lambda k: float(self.pending[k]["last_seen"]))

    def flush_pending(self, now: float | None = None, force: bool = False) -> None:
        """Write the pending table if it changed, at most once per PENDING_SAVE_INTERVAL.

        A flood of new keys so costs one write a second, not one per request; the
        server calls this every interval, so a held-back change is written soon after."""
        if self.persist_pending is None:
            return
        if not self._save_lock.acquire(blocking=force):
            return  # another thread is writing; the next call writes what is left
        try:
            with self._lock:
                now = self.clock() if now is None else now
                since = now - self._last_save
                if not self._pending_dirty or (not force and 0 <= since < PENDING_SAVE_INTERVAL):
                    return
                snapshot = {k: dict(v) for k, v in self.pending.items()}
                self._pending_dirty = False
                self._last_save = now
            try:
                self.persist_pending(snapshot)
                self._save_error = ""
            except OSError as exc:
                with self._lock:
                    self._pending_dirty = True
                if str(exc) != self._save_error:  # once per cause, not once a second
                    log.warning("cannot save pending appliances: %s", exc)
                self._save_error = str(exc)
        finally:
            self._save_lock.release()


def _rate_limited() -> Response:
    return refuse(
        429, "rate_limited", "too many requests; try again in a minute", **{"Retry-After": "60"}
    )


def _nonce_ok(nonce: str) -> bool:
    return bool(wire.NONCE_RE.fullmatch(nonce))


def _two_strings(body: bytes, first: str, second: str) -> tuple[str, str] | Response:
    """Exactly {first: str, second: str} (first is the user id); else a 400 naming it."""
    try:
        doc = json.loads(body.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        return refuse(400, "bad_json", "the body is not JSON")
    if not isinstance(doc, dict):
        return refuse(400, "bad_request", "the body must be a JSON object")
    unknown = sorted(set(doc) - {first, second})
    if unknown:
        return refuse(400, "unknown_field", f"unknown field: {unknown[0][:64]}")
    user, other = doc.get(first), doc.get(second)
    if not isinstance(user, str) or not isinstance(other, str):
        return refuse(400, "bad_request", f"{first} and {second} are required strings")
    if not wire.USER_RE.fullmatch(user):
        return refuse(400, "bad_request", "user: letters, digits and . _ + - (at most 64)")
    return user, other


def parse_credentials(body: bytes) -> tuple[str, str] | Response:
    """Exactly {"user": str, "password": str}; anything else is a 400 naming the problem."""
    got = _two_strings(body, "user", "password")
    if isinstance(got, tuple) and not 1 <= len(got[1]) <= wire.MAX_PASSWORD_LEN:
        return refuse(400, "bad_request", f"password: 1 to {wire.MAX_PASSWORD_LEN} characters")
    return got


def parse_connect(body: bytes) -> tuple[str, str] | Response:
    """Exactly {"user": str, "service": str}; anything else is a 400 naming the problem."""
    got = _two_strings(body, "user", "service")
    if isinstance(got, tuple) and not wire.SERVICE_RE.fullmatch(got[1]):
        return refuse(400, "bad_request", "service: like pop3 or imap (a-z, 0-9, _ -)")
    return got


def dump_logins(logins: Mapping[LoginKey, float]) -> str:
    """The login record as the agent keeps it in its state directory."""
    rows = [{"key": k, "user": u, "time": t} for (k, u), t in logins.items()]
    return json.dumps({"logins": rows}, indent=1)


def parse_logins(text: str, now: float) -> dict[LoginKey, float]:
    """The saved record without entries older than LOGIN_TTL (or from the future); a
    malformed row is skipped: the record is a convenience, never a reason not to start."""
    try:
        doc = json.loads(text)
    except (ValueError, RecursionError):
        return {}
    rows = doc.get("logins") if isinstance(doc, dict) else None
    out: dict[LoginKey, float] = {}
    for row in rows if isinstance(rows, list) else []:
        if not isinstance(row, dict):
            continue
        key, user, at = row.get("key"), row.get("user"), row.get("time")
        if not (isinstance(key, str) and wire.valid_key_id(key)):
            continue
        if not (isinstance(user, str) and wire.USER_RE.fullmatch(user)):
            continue
        if isinstance(at, bool) or not isinstance(at, (int, float)):
            continue
        if 0 <= now - at <= LOGIN_TTL:
            out[(key, user)] = float(at)
    return out
