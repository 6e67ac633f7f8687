"""Connections on raw sockets, in the relay's own edge-triggered epoll (splice.py).

`Spliced` is one guest connection relayed without transport objects: plain tcp
services, SMTP, POP3 and IMAP (whose bytes the relay only reads to refuse, in
the protocol's words), and TLS services, whose ClientHello it reads first to
route by the name in it.  `Connector` makes the non-blocking connects to the
upstreams in the order fallback.py's `Fallback` gives them; `Deadlines` is the
one timer for many waits of one length.
No task, future or timer per connection: the connection rate depends on it.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import select
import socket
from collections.abc import Callable
from typing import Any, Protocol

from appliance.core.config import STAND_IN_TEXT as STAND_IN
from appliance.proxy.accounting import UsageRecorder
from appliance.proxy.client_hello import BadHello, ClientHello, HelloReader
from appliance.proxy.fallback import Fallback
from appliance.proxy.gate import (
    HIDDEN,
    NO_SUCH_HOST,
    Admission,
    Listener,
    Refusal,
    Upstream,
    no_upstream,
)
from appliance.proxy.refusals import INTERNAL_ERROR, RefusalDialog, tls_alert, tls_refusal
from appliance.proxy.smtp_messages import SmtpMessages
from appliance.proxy.splice import READ, EdgePoll, PipePool, Seen, Sock, SpliceConn
from appliance.proxy.tracked import Relay as TrackedRelay
from appliance.proxy.tracked import Tracked
from appliance.proxy.tunnel import AnswerReader, TunnelAnswer, connect_request
from appliance.proxy.upstream_pool import UpstreamPool

log = logging.getLogger("appliance.proxy")

DECODE_ERROR = 50  # the TLS alert for a ClientHello that is not one


class RawRelay(TrackedRelay, Protocol):
    """What a raw connection asks of the relay that serves it (relay.Relay is the one)."""

    edges: EdgePoll
    pool: PipePool
    connecting: Deadlines
    waits: Deadlines
    original: Callable[[Sock], tuple[str, int] | None]
    upstreams: UpstreamPool
    generation: int
    usage: UsageRecorder | None

    async def check_name(self, name: str, port: int) -> list[str] | None: ...

    async def resolve_then_connect(
        self, conn: Spliced, upstreams: tuple[Upstream, ...]
    ) -> None: ...

    async def resolve_upstreams(
        self, service: str, upstreams: tuple[Upstream, ...]
    ) -> Fallback: ...


class Spliced(Tracked):
    """A connection relayed over raw sockets on the relay's own epoll (see splice.py):
    plain tcp services, SMTP, POP3 and IMAP, whose bytes the relay only needs to see
    when it refuses (then it speaks the refusal dialog itself, `_dialog_event`), and
    TLS services, whose ClientHello it reads first (`read_hello`): where it goes
    depends on the name in it, and what it says is forwarded unchanged."""

    __slots__ = (
        "adm",
        "conn",
        "connector",
        "dialog",
        "edges",
        "hello",
        "owner",
        "smtp",
        "sock",
        "tunnel",
        "tunnel_to",
        "upsock",
    )

    def __init__(self, relay: RawRelay, listener: Listener, sock: Sock, src: str) -> None:
        super().__init__(relay, listener)
        self.owner = relay  # (the Tracked relay is the protocol, this is the relay itself)
        self.edges = relay.edges
        self.sock = sock
        self.src = src
        self.conn: SpliceConn | None = None
        self.connector: Connector | None = None
        self.dialog: RefusalDialog | None = None
        self.adm: Admission | None = None
        self.hello: HelloReader | None = None  # tls: the guest's ClientHello, as it came
        self.tunnel_to: tuple[str, int] | None = None  # route proxy: what CONNECT asks for
        self.tunnel: AnswerReader | None = None  # the web proxy's answer, while awaited
        self.upsock: Sock | None = None  # the upstream while its tunnel answer is awaited
        self.smtp: SmtpMessages | None = None  # smtp with accounting on: the message count

    def activity(self) -> int:
        return self.conn.up.moved + self.conn.down.moved if self.conn else 0

    def connecting(self) -> bool:
        return self.connector is not None or (self.adm is not None and self.conn is None)

    def abort(self, result: str) -> None:
        if self.result == "ok":
            self.result = result
        if self.conn is not None:
            self.conn.close(result)
            return
        if self.connector is not None:
            self.connector.cancel()
            self.connector = None  # (it refers to us: no cycle left behind)
        self._stop_waiting()
        self.edges.close(self.sock)
        self.finish()

    def ended(self, conn: SpliceConn, result: str) -> None:
        self.bytes_up, self.bytes_down = conn.up.moved, conn.down.moved
        if self.smtp is not None:
            self.messages = self.smtp.messages
        if self.result == "ok":
            self.result = result
        self.finish()

    def connected(self, up: Sock, events: int, upstream: Upstream) -> None:
        """The upstream answered the connect (the Connector's socket, in the epoll)."""
        if self.tunnel_to is not None:
            self._ask_tunnel(up)
            return
        first = self.hello.raw if self.hello is not None else b""
        self.conn = SpliceConn(
            self.edges, self.owner.pool, self.sock, up, self.ended, events, first, seen=self._seen()
        )

    def _seen(self) -> tuple[Seen, Seen] | None:
        """SMTP with accounting on: the messages the server accepts are counted from the
        bytes (smtp_messages.py), so both directions are copied, never spliced.  SMTP is
        small (commands, replies, a message or two of some KiB): the copy path is what it
        mostly takes anyway.  After STARTTLS the observer reads nothing more, but the
        copying goes on (the connection carries a mail or two, not bulk).  Bound methods
        of the observer: no reference back to this connection, so no cycle."""
        if self.listener.protocol != "smtp" or self.owner.usage is None:
            return None
        smtp = self.smtp = SmtpMessages()
        return smtp.client, smtp.server

    def refuse_now(self, r: Refusal, result: str | None = None) -> None:
        """Refuse in the protocol's words (tcp has none: it is just closed)."""
        self.refused(r)
        if result is not None:
            self.result = result
        if self.hello is not None:  # the ClientHello is in: the alert answers it now
            self._say(tls_refusal(r))
            self._end_dialog()
            return
        dialog = self.dialog = RefusalDialog(self.listener.protocol, r)
        if self._say(dialog.greeting()) and not dialog.closed:
            self.edges.watch(self.sock.fileno(), self._dialog_event)
            return
        self._end_dialog()

    def _dialog_event(self, ev: int) -> None:
        if not ev & READ:
            return
        dialog = self.dialog
        assert dialog is not None
        while not dialog.closed:  # edge-triggered: read until the socket is empty
            try:
                data = self.sock.recv(4096)
            except BlockingIOError:
                return
            except OSError:
                data = b""
            if not data or not self._say(dialog.feed(data)):
                break
        self._end_dialog()

    def _say(self, data: bytes) -> bool:
        """Send a reply whole (a few hundred bytes at most); False: the guest is gone or
        not reading, and the dialog ends."""
        if not data:
            return True
        try:
            return self.sock.send(data) == len(data)
        except OSError:
            return False

    def _end_dialog(self) -> None:
        self._stop_waiting()
        self.edges.close(self.sock)
        self.finish()

    # -- tls: the ClientHello, then the route ------------------------------------------
    def read_hello(self, adm: Admission) -> None:
        self.adm = adm
        self.hello = HelloReader()
        self.edges.watch(self.sock.fileno(), self._hello_event)
        self.owner.waits.start(self)

    def _hello_event(self, ev: int) -> None:
        if not ev & READ:
            return
        hello = self.hello
        assert hello is not None
        while True:  # edge-triggered: read until the socket is empty or the hello is in
            try:
                data = self.sock.recv(65536)
            except BlockingIOError:
                return
            except OSError:
                data = b""
            if not data:
                self.result = "client-gone"
                self._end_dialog()
                return
            try:
                got = hello.feed(data)
            except BadHello as exc:
                self._bad_hello(str(exc))
                return
            if got is not None:
                self.owner.waits.end(self)
                self.edges.forget(self.sock.fileno())
                self._route(got)
                return

    def _bad_hello(self, why: str) -> None:
        """Counted (result bad-hello, the reason in the log), answered with an alert when
        the bytes were TLS at all, and closed: never relayed."""
        self.result = "bad-hello"
        self.reason = why
        if why != "not TLS":
            self._say(tls_alert(DECODE_ERROR))
        self._end_dialog()

    def expired(self) -> None:
        """No ClientHello, or no tunnel answer from the web proxy, in HELLO_TIMEOUT."""
        if self.result == "ok":
            self.result = "hello-timeout" if self.tunnel is None else "proxy-timeout"
        if self.tunnel is not None:
            self._say(tls_alert(INTERNAL_ERROR))
        self.abort(self.result)

    def _stop_waiting(self) -> None:
        self.owner.waits.end(self)
        if self.upsock is not None:
            self.edges.close(self.upsock)
            self.upsock = None
        self.tunnel = None

    def _refuse_hidden(self) -> None:
        adm = self.adm
        assert adm is not None
        self.refuse_now(Refusal("denied", HIDDEN, "", adm.user, adm.rule))

    def _route(self, hello: ClientHello) -> None:
        adm = self.adm
        assert adm is not None
        self.asked = hello.sni or ""
        if adm.route == "server":
            self._connect(adm.upstreams)
            return
        hidden = self.owner.hidden
        orig = self.owner.original(self.sock)
        if orig is not None:
            self.asked = self.asked or orig[0]
        # a guest-chosen address that is hidden is refused whatever the name says (the
        # DNS stand-in of before-login answers is no destination: the name is)
        if orig is None or (orig[0] != STAND_IN and hidden(orig[0])):
            self._refuse_hidden()
            return
        ip, port = orig
        if adm.route == "direct":
            if ip == STAND_IN:
                self._refuse_hidden()
                return
            self._connect((Upstream("direct", ip, port),))
            return
        if hello.sni is None:  # route proxy without a name: the address, checked above
            if ip == STAND_IN:
                self._refuse_hidden()
                return
            self.tunnel_to = (ip, port)
            self._connect(adm.upstreams)
            return
        self.tunnel_to = (hello.sni, port)
        self.owner.loop.create_task(self._check_name(hello.sni, port, adm.upstreams))

    async def _check_name(self, name: str, port: int, ups: tuple[Upstream, ...]) -> None:
        """The site resolver's answers for the name, every one of them: a name of a hidden
        host is refused even though the proxy would fetch it; a name that does not resolve
        is refused too (fail closed: the proxy's answer could differ from ours)."""
        addresses = await self.owner.check_name(name, port)
        if self.closed:
            return
        adm = self.adm
        assert adm is not None
        if not addresses:
            self.refuse_now(Refusal("unavailable", NO_SUCH_HOST, "", adm.user, adm.rule))
        elif any(self.owner.hidden(a) for a in addresses):
            self._refuse_hidden()
        else:
            self._connect(ups)

    def _connect(self, ups: tuple[Upstream, ...]) -> None:
        if self.closed:
            return
        connect(self.owner, self, ups)

    def _ask_tunnel(self, up: Sock) -> None:
        assert self.tunnel_to is not None
        self.upsock = up
        self.tunnel = AnswerReader()
        self.edges.rehandle(up.fileno(), self._tunnel_event)
        self.owner.waits.start(self)
        try:
            sent = up.send(self.tunnel_request())
        except OSError:
            sent = 0
        if not sent:
            self._tunnel_failed("unavailable")

    def tunnel_request(self) -> bytes:
        assert self.tunnel_to is not None
        return connect_request(*self.tunnel_to)

    def _tunnel_event(self, ev: int) -> None:
        up, tunnel = self.upsock, self.tunnel
        if not ev & READ or up is None or tunnel is None:
            return
        while True:
            try:
                data = up.recv(16384)
            except BlockingIOError:
                return
            except OSError:
                data = b""
            if not data:
                self._tunnel_failed("unavailable")
                return
            answer = tunnel.feed(data)
            if answer is None:
                continue
            self.owner.waits.end(self)
            if not answer.ok:
                log.info("the site's proxy refused a tunnel (status %d)", answer.status)
                self.tunnel_refused(answer)
                return
            self.upsock, self.tunnel = None, None
            first_up, first_down = self.tunnel_open(answer)
            self.conn = SpliceConn(
                self.edges, self.owner.pool, self.sock, up, self.ended, 0, first_up, first_down
            )
            return

    def tunnel_open(self, answer: TunnelAnswer) -> tuple[bytes, bytes]:
        """The proxy said 2xx: what goes first each way (here: the ClientHello up, and
        whatever the proxy sent after its answer down; the guest never sees the answer)."""
        assert self.hello is not None
        return self.hello.raw, answer.rest

    def tunnel_refused(self, answer: TunnelAnswer) -> None:
        self._tunnel_failed("denied" if answer.status == 403 else "unavailable")

    def _tunnel_failed(self, kind: str) -> None:
        adm = self.adm
        assert adm is not None
        if kind == "denied":
            why = "the site's web proxy refused the tunnel"
            self.refuse_now(Refusal("denied", why, "", adm.user, adm.rule), "proxy-refused")
        else:
            self.refuse_now(no_upstream(adm.user, adm.rule))


def connect(relay: RawRelay, conn: Spliced, ups: tuple[Upstream, ...]) -> None:
    """Connect to the first of these upstreams that answers (by name: resolved first)."""
    if numeric(ups):
        Connector(relay, conn, Fallback(conn.listener.service, ups)).next()
    else:
        relay.loop.create_task(relay.resolve_then_connect(conn, ups))


def numeric(ups: tuple[Upstream, ...]) -> bool:
    """Every upstream an address: the connects can start at once, without the resolver."""
    for up in ups:  # noqa: SIM110 (a generator costs two calls per connection)
        if not up.numeric:
            return False
    return True


class Connector:
    """Non-blocking connects to the upstreams in their fallback order (`Fallback`: which is
    next, each failure recorded, the refusal when none answered), watched in the relay's
    EdgePoll: no task, future or timer per connection (the connection rate of the splice
    path depends on it); the relay's one deadline timer calls `expired`."""

    __slots__ = ("conn", "relay", "sock", "tries", "up")

    def __init__(self, relay: RawRelay, conn: Spliced, tries: Fallback) -> None:
        self.relay = relay
        self.conn = conn
        self.tries = tries
        self.sock: Sock | None = None
        self.up: Upstream | None = None
        conn.connector = self

    def next(self) -> None:
        relay, tries = self.relay, self.tries
        while not self.conn.closed and (up := tries.next()) is not None:
            try:
                s = socket.SocketType(socket.AF_INET, socket.SOCK_STREAM | socket.SOCK_NONBLOCK)
            except OSError as exc:  # out of file descriptors: this upstream fails, counted
                tries.failed(up, exc.strerror or "no socket")
                continue
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            err = s.connect_ex((up.host, up.port))
            if err in (0, errno.EINPROGRESS):
                self.sock, self.up = s, up
                relay.edges.watch(s.fileno(), self.event)
                relay.connecting.start(self)
                return
            s.close()
            tries.failed(up, os.strerror(err))
        self.conn.connector = None
        if not self.conn.closed:
            c = self.conn
            c.refuse_now(tries.refusal(c.user, c.rule))

    def event(self, ev: int) -> None:
        s, up = self.sock, self.up
        assert s is not None and up is not None
        if not ev & (select.EPOLLOUT | select.EPOLLERR | select.EPOLLHUP):
            return
        self.relay.connecting.end(self)
        # a failed connect always reports ERR (or HUP): only then ask why (one syscall less)
        if ev & (select.EPOLLERR | select.EPOLLHUP):
            err = s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            self._drop()
            self.tries.failed(up, os.strerror(err) if err else "closed")
            self.next()
            return
        conn = self.conn
        conn.connector = None
        conn.upstream_name = up.name
        conn.connected(s, ev, up)

    def expired(self) -> None:
        assert self.up is not None  # (a connect in flight, since `next` started it)
        self._drop()
        self.tries.failed(self.up, "connect timed out")
        self.next()

    def cancel(self) -> None:
        self.relay.connecting.end(self)
        self._drop()

    def _drop(self) -> None:
        if self.sock is not None:
            self.relay.edges.close(self.sock)
            self.sock = None


class Deadlines:
    """One timer for many waits of one length (connects in flight; ClientHellos): they
    end in the order they began, so the first entry is always the next one due, and a
    connection costs no timer of its own.  An entry's `expired()` is called when due."""

    def __init__(self, loop: asyncio.AbstractEventLoop, timeout: float) -> None:
        self.loop = loop
        self.timeout = timeout
        self.due: dict[Any, float] = {}  # in deadline order
        self.timer: asyncio.TimerHandle | None = None

    def __len__(self) -> int:
        return len(self.due)

    def start(self, waiter: Any) -> None:
        self.due.pop(waiter, None)  # a retry goes to the back: deadlines stay in order
        self.due[waiter] = self.loop.time() + self.timeout
        if self.timer is None:
            self.timer = self.loop.call_later(self.timeout, self._fire)

    def end(self, waiter: Any) -> None:
        self.due.pop(waiter, None)

    def _fire(self) -> None:
        self.timer = None
        now = self.loop.time()
        expired = []
        for waiter, deadline in self.due.items():
            if deadline > now:
                break
            expired.append(waiter)
        for waiter in expired:
            del self.due[waiter]
            try:
                waiter.expired()  # (may start a wait again, and so arm the timer itself)
            except Exception:  # one connection's bug must not stop everyone's deadlines
                log.exception("deadline of %r", waiter)
        if self.due and self.timer is None:
            first = next(iter(self.due.values()))
            self.timer = self.loop.call_later(max(0.05, first - now), self._fire)

    def cancel(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
