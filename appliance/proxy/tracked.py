"""One relayed connection's bookkeeping and its upstream pump, shared by every path.

`Tracked` is what the relay counts, limits, logs and re-checks; `Pump` is the
upstream side of a Protocol-path connection (relay.py's `Link`).  Here, not in
relay.py, so that the connection modules (raw.py, http_conn.py) and relay.py
need not import each other.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import ssl
import struct
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from typing import Protocol, cast

from appliance.proxy.gate import (
    Admission,
    Gate,
    Listener,
    Refusal,
    Upstream,
    over_limit,
    quota_spent,
)

log = logging.getLogger("appliance.proxy")


class Relay(Protocol):
    """What a connection asks of the relay that serves it (relay.Relay is the one)."""

    gate: Gate
    loop: asyncio.AbstractEventLoop
    connect_ports: frozenset[int]
    connect_timeout: float
    identity_header: str | None
    hidden: Callable[[str], bool]
    resolve: Callable[[str, int], Awaitable[list[str]]]

    def opened(self, conn: Tracked) -> None: ...

    def done(self, conn: Tracked) -> None: ...

    def count_user(self, user: str, service: str, limit: int | None) -> bool: ...

    def over_quota(self, user: str, service: str, quota: int) -> bool: ...


SO_ORIGINAL_DST = 80
HIGH_WATER = 512 * 1024
LOW_WATER = 128 * 1024


def original_dst(sock: socket.socket | socket.SocketType | None) -> tuple[str, int] | None:
    """Where the guest meant to connect before nft redirected it (SOL_IP, SO_ORIGINAL_DST)."""
    if sock is None:
        return None
    try:
        raw = sock.getsockopt(socket.SOL_IP, SO_ORIGINAL_DST, 16)
    except OSError:
        return None
    port, packed = struct.unpack_from("!2xH4s", raw)
    return socket.inet_ntoa(packed), port


class Tracked:
    """Bookkeeping shared by every kind of relayed connection: log line, counters, limits."""

    __slots__ = (
        "asked",
        "bytes_down",
        "bytes_up",
        "client",
        "closed",
        "counted",
        "counted_user",
        "listener",
        "messages",
        "reason",
        "relay",
        "result",
        "right",
        "rule",
        "session",
        "spent",
        "src",
        "started",
        "upstream_name",
        "user",
    )

    def __init__(self, relay: Relay, listener: Listener) -> None:
        self.relay = relay
        self.listener = listener
        self.right = listener.service  # the service whose right a policy change re-checks
        self.client: asyncio.Transport | None = None
        self.src = "-"
        self.user: str | None = None
        self.rule: str | None = None
        self.session: str | None = None
        self.upstream_name: str | None = None
        self.bytes_up = 0
        self.bytes_down = 0
        self.messages = 0  # SMTP messages the server accepted, where the path reads them
        self.started = time.time()
        self.result = "ok"
        self.closed = False
        self.counted = False
        self.counted_user: str | None = None  # whose count this connection holds
        self.asked = ""  # the name (or address) a guest asked for, where the relay reads one
        self.reason = ""  # why it was refused or dropped, in words (the access log)
        self.spent = False  # refused because the user's quota for today is used up

    def admitted(self, adm: Admission) -> bool:
        """Record the user; False when the per-user connection limit is reached or the
        day's quota is used up (`limit_refusal` says which)."""
        self.user, self.rule, self.session = adm.user, adm.rule, adm.session
        if self.counted:  # one count per connection, whatever is re-admitted later
            return True
        quota = adm.quota_bytes_per_day
        if quota is not None and self.relay.over_quota(adm.user, self.listener.service, quota):
            self.spent = True
            return False
        self.counted = self.relay.count_user(adm.user, self.listener.service, adm.max_connections)
        if self.counted:
            self.counted_user = adm.user
        return self.counted

    def limit_refusal(self, adm: Admission) -> Refusal:
        """Why `admitted` said no: the quota, or the connection limit."""
        return quota_spent(adm) if self.spent else over_limit(adm)

    def refused(self, r: Refusal) -> None:
        self.user, self.rule, self.reason = r.user, r.rule, r.reason
        self.result = {"login": "refused-login", "denied": "refused-denied"}.get(
            r.kind, f"refused-{r.kind}" if r.kind in ("limit", "quota") else "upstream-down"
        )

    def finish(self) -> None:
        if self.closed:
            return
        self.closed = True
        self.relay.done(self)

    def activity(self) -> int:
        """Bytes moved so far (the idle sweeper compares it between sweeps)."""
        return self.bytes_up + self.bytes_down

    def connecting(self) -> bool:
        """Admitted, upstream not connected yet: a table change must still reach it."""
        return False

    def abort(self, result: str) -> None:
        """Close both sides now (idle timeout, policy revoked)."""
        raise NotImplementedError

    def from_upstream(self, data: bytes) -> None:
        """Bytes from the upstream: straight to the client."""
        self.bytes_down += len(data)
        assert self.client is not None
        self.client.write(data)

    def upstream_eof(self) -> bool:
        """The upstream half-closed: pass it on; True keeps the transport for writing."""
        raise NotImplementedError

    def upstream_lost(self) -> None:
        raise NotImplementedError


def failure(exc: BaseException) -> str:
    """Why a connect failed, without the address the stock loop puts in its message."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        return f"TLS: certificate not accepted ({exc.verify_message})"
    if isinstance(exc, ssl.SSLError):
        return f"TLS: {exc.reason or 'handshake failed'}"
    if isinstance(exc, OSError) and exc.errno:  # strerror: the stock loop's carries the address
        return os.strerror(exc.errno)
    return (exc.strerror if isinstance(exc, OSError) else None) or "timed out"


# per service: upstreams that could not be reached (one process's; the metrics sum workers)
UPSTREAM_FAILURES: Counter[str] = Counter()


def upstream_failed(service: str, upstream: Upstream | None, why: str) -> None:
    """The log line of an upstream that could not be reached: its name, never its address."""
    UPSTREAM_FAILURES[service] += 1
    log.warning("%s upstream %s failed: %s", service, upstream.name if upstream else "-", why)


class Pump(asyncio.Protocol):
    """The upstream side of a relayed connection.

    Until the Link `join`s it, once the upstream passed its checks (a TLS server's pin
    is read after the handshake), it holds what the upstream sends and an end that
    comes meanwhile: no byte of an unchecked or abandoned upstream reaches the guest,
    and its loss does not close the guest's connection, which may go to the next
    upstream.  After the join, bytes go straight to the client transport."""

    __slots__ = ("ended", "held", "joined", "link", "lost", "paused", "transport")

    def __init__(self, link: Tracked) -> None:
        self.link = link
        self.transport: asyncio.Transport | None = None
        self.joined = False
        self.held = bytearray()  # what came before the join
        self.ended = False  # the upstream half-closed before the join
        self.lost = False  # the connection was lost before the join
        self.paused = False  # reading paused: HIGH_WATER bytes held

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        self.transport = transport
        transport.set_write_buffer_limits(HIGH_WATER, LOW_WATER)

    def join(self, skip: int = 0) -> None:
        """The Link owns this pump now: what was held (after its first `skip` bytes)
        goes to the guest, then an end that came meanwhile."""
        rest = bytes(self.held[skip:])
        self.held = bytearray()
        self.joined = True
        if rest:
            self.link.from_upstream(rest)
        if self.ended and not self.link.upstream_eof() and self.transport is not None:
            self.transport.close()  # (eof_received kept it open for the Link to decide)
        if self.lost:
            self.link.upstream_lost()
        elif self.paused and self.transport is not None:
            self.paused = False
            self.transport.resume_reading()

    def data_received(self, data: bytes) -> None:
        if self.joined:
            self.link.from_upstream(data)
            return
        self.held += data
        if len(self.held) >= HIGH_WATER and not self.paused and self.transport is not None:
            self.paused = True
            self.transport.pause_reading()

    def eof_received(self) -> bool:
        if self.joined:
            return self.link.upstream_eof()
        self.ended = True
        return True

    def pause_writing(self) -> None:
        if self.joined and self.link.client is not None:
            self.link.client.pause_reading()

    def resume_writing(self) -> None:
        if self.joined and self.link.client is not None and not self.link.closed:
            self.link.client.resume_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.joined:
            self.link.upstream_lost()
        else:
            self.lost = True
