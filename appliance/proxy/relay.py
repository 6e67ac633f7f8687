"""The relay core: one `Relay` serves every listener, on one event loop per process.

Per accepted connection: the gate decides (user, rule, upstreams) or refuses;
upstreams are tried in order with a connect timeout; then bytes move both ways
until both sides are done, a half-close passed on as such.  Two paths, one
bookkeeping (`Tracked`: counters, limits, the access log, revocation):

- raw sockets on the relay's own edge-triggered epoll (`Spliced`, `Connector`
  and splice.py) for plain tcp services, SMTP and POP3: no transport objects,
  no task or timer per connection; small exchanges are copied through one
  buffer, bulk is spliced.  A refused SMTP or POP3 guest gets the refusal
  dialog (refusals.py) spoken on the raw socket;
- asyncio Protocols (`Link`, `Pump`, and http.py's `HttpClient`) where the
  relay parses the bytes (HTTP), and for every service when splicing is off:
  `data_received` writes into the peer transport, whose `pause_writing` and
  `resume_writing` pause and resume reading on this side.

Idle connections are swept by one periodic timer (not one timer per
connection: memory).  A policy change re-admits every open connection and
closes the ones no longer allowed.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import select
import socket
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable
from typing import Any, cast

from appliance.core.config import STAND_IN_TEXT as STAND_IN
from appliance.proxy.access_log import AccessLog
from appliance.proxy.client_hello import BadHello, ClientHello, HelloReader
from appliance.proxy.counts import Counts, LocalCounts
from appliance.proxy.follow import Ended, EndedFollower
from appliance.proxy.gate import (
    HIDDEN,
    NO_SUCH_HOST,
    Admission,
    Gate,
    Listener,
    Refusal,
    Upstream,
    no_upstream,
    over_limit,
)
from appliance.proxy.http import HttpClient
from appliance.proxy.refusals import INTERNAL_ERROR, RefusalDialog, tls_alert, tls_refusal
from appliance.proxy.splice import READ, EdgePoll, PipePool, Sock, SpliceConn
from appliance.proxy.tracked import (
    HIGH_WATER,
    LOW_WATER,
    Pump,
    Tracked,
    failure,
    original_dst,
    upstream_failed,
)
from appliance.proxy.tunnel import AnswerReader, connect_request

log = logging.getLogger("appliance.proxy")

# services relayed over raw sockets (splice.py) when splicing is on; HTTP is parsed (http.py);
# tls is always relayed over raw sockets (its ClientHello is read there)
RAW_PROTOCOLS = frozenset({"tcp", "smtp", "pop3", "imap"})
HELLO_TIMEOUT = 10.0  # a ClientHello, and a web proxy's tunnel answer, come in this long
DECODE_ERROR = 50  # the TLS alert for a ClientHello that is not one
# a name and a port -> the addresses a connection to it would go to (OSError: none)
Resolver = Callable[[str, int], Awaitable[list[str]]]


class Link(Tracked, asyncio.Protocol):
    """The client side of a plain relayed connection (SMTP, POP3, any TCP service)."""

    __slots__ = ("dialog", "eofs", "pending", "pump")

    def __init__(self, relay: Relay, listener: Listener) -> None:
        super().__init__(relay, listener)
        self.pump: Pump | None = None
        self.dialog: RefusalDialog | None = None
        self.eofs = 0
        self.pending = b""

    def connecting(self) -> bool:
        return self.user is not None and self.pump is None and self.dialog is None

    # -- client side ---------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        self.client = transport
        transport.set_write_buffer_limits(HIGH_WATER, LOW_WATER)
        peer = transport.get_extra_info("peername")
        self.src = peer[0] if peer else "-"
        transport.pause_reading()
        self.relay.opened(self)
        verdict = self.relay.gate.admit(self.src, self.listener.service)
        if isinstance(verdict, Refusal):
            self._refuse(verdict)
            return
        if not self.admitted(verdict):
            self._refuse(over_limit(verdict))
            return
        self.relay.loop.create_task(self._connect(verdict))

    async def _connect(self, adm: Admission) -> None:
        for up in adm.upstreams:
            tls = up.tls
            try:
                async with asyncio.timeout(self.relay.connect_timeout):
                    if tls is None:
                        transport, pump = await self.relay.loop.create_connection(
                            lambda: Pump(self), up.host, up.port
                        )
                    else:  # TLS to the server: its certificate checked before a byte goes
                        transport, pump = await self.relay.loop.create_connection(
                            lambda: Pump(self),
                            up.host,
                            up.port,
                            ssl=tls.context(),
                            server_hostname=tls.server_hostname(),
                        )
            except (TimeoutError, OSError) as exc:  # (ssl.SSLError is an OSError)
                upstream_failed(self.listener.service, up, failure(exc))
                continue
            why = tls.problem(transport.get_extra_info("ssl_object")) if tls else None
            if why is not None:
                transport.abort()
                upstream_failed(self.listener.service, up, why)
                continue
            if self.closed or self.client is None or self.client.is_closing():
                pump.transport.close()  # type: ignore[union-attr]
                return
            self.pump = pump
            self.upstream_name = up.name
            if self.pending:
                self.bytes_up += len(self.pending)
                pump.transport.write(self.pending)  # type: ignore[union-attr]
                self.pending = b""
            if self.eofs and pump.transport is not None and pump.transport.can_write_eof():
                pump.transport.write_eof()
            self.client.resume_reading()
            return
        self._refuse(no_upstream(self.user, self.rule))

    def _refuse(self, r: Refusal) -> None:
        self.refused(r)
        assert self.client is not None
        self.dialog = RefusalDialog(self.listener.protocol, r)
        greeting = self.dialog.greeting()
        if greeting:
            self.client.write(greeting)
        if self.dialog.closed:
            self.client.close()
        else:
            self.client.resume_reading()

    def data_received(self, data: bytes) -> None:
        pump = self.pump
        if pump is not None:
            self.bytes_up += len(data)
            pump.transport.write(data)  # type: ignore[union-attr]
            return
        if self.dialog is not None and self.client is not None:
            self.client.write(self.dialog.feed(data))
            if self.dialog.closed:
                self.client.close()
            return
        # still connecting: uvloop starts reading after connection_made whatever we paused
        self.pending += data
        if self.client is not None:
            self.client.pause_reading()

    def eof_received(self) -> bool:
        if self.pump is None or self.pump.transport is None:
            if self.dialog is None and not self.closed:
                self.eofs += 1  # EOF before the upstream is there: pass it on once it is
                return True
            return False
        self.eofs += 1
        if self.pump.transport.can_write_eof():
            self.pump.transport.write_eof()
        if self.eofs >= 2:
            self.pump.transport.close()
            return False
        return True

    def upstream_eof(self) -> bool:
        self.eofs += 1
        if self.client is not None and not self.client.is_closing():
            self.client.write_eof()
        if self.eofs >= 2:
            if self.client is not None:
                self.client.close()
            return False
        return True

    def pause_writing(self) -> None:
        if self.pump is not None and self.pump.transport is not None:
            self.pump.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.pump is not None and self.pump.transport is not None and not self.closed:
            self.pump.transport.resume_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.pump is not None and self.pump.transport is not None:
            self.pump.transport.close()
        if exc is not None and self.result == "ok":
            self.result = "reset"
        self.finish()

    def upstream_lost(self) -> None:
        if self.client is not None:
            self.client.close()

    def abort(self, result: str) -> None:
        if self.result == "ok":
            self.result = result
        if self.pump is not None and self.pump.transport is not None:
            self.pump.transport.abort()
        if self.client is not None:
            self.client.abort()


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
        "sock",
        "tunnel",
        "tunnel_to",
        "upsock",
    )

    def __init__(self, relay: Relay, listener: Listener, sock: Sock, src: str) -> None:
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
        if self.result == "ok":
            self.result = result
        self.finish()

    def connected(self, up: Sock, events: int) -> None:
        """The upstream answered the connect (the Connector's socket, in the epoll)."""
        if self.tunnel_to is not None:
            self._ask_tunnel(up)
            return
        first = self.hello.raw if self.hello is not None else b""
        self.conn = SpliceConn(
            self.edges, self.owner.pool, self.sock, up, self.ended, events, first
        )

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
        try:
            async with asyncio.timeout(self.owner.connect_timeout):
                addresses = await self.owner.resolve(name, port)
        except (TimeoutError, OSError):
            addresses = []
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
        if _numeric(ups):
            Connector(self.owner, self, ups).next()
        else:
            self.owner.loop.create_task(self.owner.resolve_then_connect(self, ups))

    def _ask_tunnel(self, up: Sock) -> None:
        assert self.tunnel_to is not None
        self.upsock = up
        self.tunnel = AnswerReader()
        self.edges.rehandle(up.fileno(), self._tunnel_event)
        self.owner.waits.start(self)
        try:
            sent = up.send(connect_request(*self.tunnel_to))
        except OSError:
            sent = 0
        if not sent:
            self._tunnel_failed("unavailable")

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
            if not answer.ok:
                log.info("the site's proxy refused a tunnel (status %d)", answer.status)
                self._tunnel_failed("denied" if answer.status == 403 else "unavailable")
                return
            self.owner.waits.end(self)
            self.upsock, self.tunnel = None, None
            assert self.hello is not None
            self.conn = SpliceConn(
                self.edges,
                self.owner.pool,
                self.sock,
                up,
                self.ended,
                0,
                self.hello.raw,
                answer.rest,
            )
            return

    def _tunnel_failed(self, kind: str) -> None:
        adm = self.adm
        assert adm is not None
        if kind == "denied":
            why = "the site's web proxy refused the tunnel"
            self.refuse_now(Refusal("denied", why, "", adm.user, adm.rule), "proxy-refused")
        else:
            self.refuse_now(no_upstream(adm.user, adm.rule))


def _numeric(ups: tuple[Upstream, ...]) -> bool:
    """Every upstream an address: the connects can start at once, without the resolver."""
    for up in ups:  # noqa: SIM110 (a generator costs two calls per connection)
        if not up.numeric:
            return False
    return True


class Connector:
    """Non-blocking connects to the upstreams in order, watched in the relay's EdgePoll: no
    task, future or timer per connection (the connection rate of the splice path depends on
    it); the relay's one deadline timer calls `expired`."""

    __slots__ = ("conn", "i", "relay", "sock", "up", "ups")

    def __init__(self, relay: Relay, conn: Spliced, ups: tuple[Upstream, ...]) -> None:
        self.relay = relay
        self.conn = conn
        self.ups = ups
        self.i = 0
        self.sock: Sock | None = None
        self.up: Upstream | None = None
        conn.connector = self

    def next(self) -> None:
        relay = self.relay
        while self.i < len(self.ups) and not self.conn.closed:
            up = self.ups[self.i]
            self.i += 1
            s = socket.SocketType(socket.AF_INET, socket.SOCK_STREAM | socket.SOCK_NONBLOCK)
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            err = s.connect_ex((up.host, up.port))
            if err in (0, errno.EINPROGRESS):
                self.sock, self.up = s, up
                relay.edges.watch(s.fileno(), self.event)
                relay.connecting.start(self)
                return
            s.close()
            upstream_failed(self.conn.listener.service, up, os.strerror(err))
        self.conn.connector = None
        if not self.conn.closed:
            c = self.conn
            c.refuse_now(no_upstream(c.user, c.rule))

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
            upstream_failed(self.conn.listener.service, up, os.strerror(err) if err else "closed")
            self.next()
            return
        conn = self.conn
        conn.connector = None
        conn.upstream_name = up.name
        conn.connected(s, ev)

    def expired(self) -> None:
        self._drop()
        upstream_failed(self.conn.listener.service, self.up, "connect timed out")
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
            waiter.expired()
        if self.due:
            first = next(iter(self.due.values()))
            self.timer = self.loop.call_later(max(0.05, first - now), self._fire)

    def cancel(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None


class Relay:
    """All listeners, the open connections, counters and the idle sweeper."""

    def __init__(
        self,
        gate: Gate,
        connect_timeout: float = 5.0,
        idle_timeout: float = 600.0,
        identity_header: str | None = None,
        hidden: Callable[[str], bool] | None = None,
        splice: bool = False,
        follow_period: float = 0.25,
        connect_ports: Iterable[int] = (443,),
        counts: Counts | None = None,
        reuse_port: bool = False,
        resolve: Resolver | None = None,
        max_connections: int = 256,
        hello_timeout: float = HELLO_TIMEOUT,
    ) -> None:
        self.gate = gate
        self.counts: Counts = counts if counts is not None else LocalCounts()
        self.reuse_port = reuse_port  # several workers share each port (workers.py)
        self.connect_ports = frozenset(connect_ports)
        self.splice = splice
        self.pool = PipePool()
        self.loop = asyncio.get_running_loop()
        self.edges = EdgePoll(self.loop)
        self.connecting = Deadlines(self.loop, connect_timeout)  # connects in flight
        self.waits = Deadlines(self.loop, hello_timeout)  # ClientHellos, tunnel answers
        self.raw_listeners: list[socket.socket] = []
        self.connect_timeout = connect_timeout
        self.idle_timeout = idle_timeout
        self.identity_header = identity_header
        self.hidden = hidden or (lambda _ip: False)
        self.resolve: Resolver = resolve or self._getaddrinfo
        # where a redirected guest connection was going (tests replace it: no nft there)
        self.original: Callable[[Sock], tuple[str, int] | None] = original_dst
        self.max_connections = max_connections  # per user and service, where a rule sets none
        self.conns: set[Tracked] = set()
        self.counters: Counter[tuple[str, str]] = Counter()
        self.servers: list[asyncio.AbstractServer] = []
        self._sweeper: asyncio.Task[None] | None = None
        self._follower: asyncio.Task[None] | None = None
        self.follow_period = follow_period
        self.access = AccessLog(self.loop)
        gate.subscribe(self.recheck)

    async def _getaddrinfo(self, name: str, port: int) -> list[str]:
        """The site resolver's answers for `name`, IPv4 and IPv6 (OSError when none): the
        caller checks every one, since the site's web proxy may connect to any of them."""
        infos = await self.loop.getaddrinfo(
            name, port, family=socket.AF_UNSPEC, type=socket.SOCK_STREAM
        )
        return [str(info[4][0]) for info in infos]

    async def start(self, host: str, listeners: tuple[Listener, ...] | None = None) -> None:
        for ls in listeners if listeners is not None else self.gate.listeners():
            factory: Callable[[], asyncio.Protocol]
            if ls.protocol == "http":
                factory = _bind(HttpClient, self, ls)
            elif ls.protocol == "tls" or (
                ls.protocol in RAW_PROTOCOLS and self.splice and not ls.upstream_tls
            ):
                self._listen_raw(host, ls)
                log.info(
                    "listening on %s:%d for %s (%s, raw)", host, ls.port, ls.service, ls.protocol
                )
                continue
            else:
                factory = _bind(Link, self, ls)
            server = await self.loop.create_server(
                factory,
                host,
                ls.port,
                reuse_address=True,
                reuse_port=self.reuse_port or None,
                backlog=4096,
            )
            self.servers.append(server)
            log.info("listening on %s:%d for %s (%s)", host, ls.port, ls.service, ls.protocol)
        self._sweeper = self.loop.create_task(self._sweep())
        follower = EndedFollower(self.gate.ended_since, self.sessions_ended, self.follow_period)
        self._follower = self.loop.create_task(follower.run())

    def _listen_raw(self, host: str, ls: Listener) -> None:
        sock = socket.create_server((host, ls.port), backlog=4096, reuse_port=self.reuse_port)
        sock.setblocking(False)
        # accepted sockets inherit TCP_NODELAY from the listener: one syscall less each
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.edges.watch(sock.fileno(), lambda _ev: self._accept(sock, ls), select.EPOLLIN)
        self.raw_listeners.append(sock)

    def _accept(self, lsock: socket.socket, ls: Listener) -> None:
        for _ in range(64):
            try:
                # the raw accept: socket.accept() would ask the family and type back as
                # enums and wrap the socket in Python; the C socket type is all we need
                fd, addr = lsock._accept()  # type: ignore[attr-defined]
            except BlockingIOError:
                return
            except OSError as exc:
                # out of file descriptors, most likely: count it, stop accepting for a
                # moment instead of spinning on a listener that stays readable
                self.counters[(ls.service, "accept-failed")] += 1
                log.warning("accept on %s: %s; pausing the listener 0.1 s", ls.service, exc)
                self.edges.modify(lsock.fileno(), 0)
                self.loop.call_later(0.1, self._resume_accept, lsock)
                return
            csock = socket.SocketType(socket.AF_INET, socket.SOCK_STREAM, 0, fd)
            csock.setblocking(False)
            conn = Spliced(self, ls, csock, addr[0])
            self.opened(conn)
            verdict = self.gate.admit(conn.src, ls.service)
            if isinstance(verdict, Refusal):
                conn.refuse_now(verdict)
            elif not conn.admitted(verdict):
                conn.refuse_now(over_limit(verdict))
            elif ls.protocol == "tls":
                conn.read_hello(verdict)
            elif _numeric(verdict.upstreams):
                Connector(self, conn, verdict.upstreams).next()
            else:  # names need the resolver first
                self.loop.create_task(self.resolve_then_connect(conn, verdict.upstreams))

    def _resume_accept(self, lsock: socket.socket) -> None:
        if lsock.fileno() >= 0:
            self.edges.modify(lsock.fileno(), select.EPOLLIN)

    async def resolve_then_connect(self, conn: Spliced, upstreams: tuple[Upstream, ...]) -> None:
        ups: list[Upstream] = []
        for up in upstreams:
            if up.numeric:
                ups.append(up)
                continue
            try:
                async with asyncio.timeout(self.connect_timeout):
                    infos = await self.loop.getaddrinfo(
                        up.host, up.port, family=socket.AF_INET, type=socket.SOCK_STREAM
                    )
            except (TimeoutError, OSError) as exc:
                upstream_failed(conn.listener.service, up, failure(exc))
                continue
            ups.extend(Upstream(up.name, str(i[4][0]), up.port) for i in infos[:1])
        if not conn.closed:
            Connector(self, conn, tuple(ups)).next()

    async def stop(self) -> None:
        for sock in self.raw_listeners:
            self.edges.close(sock)
        for server in self.servers:
            server.close()
        for task in (self._sweeper, self._follower):
            if task is not None:
                task.cancel()
        self.connecting.cancel()
        self.waits.cancel()
        for conn in list(self.conns):
            conn.abort("shutdown")
        self.edges.shutdown()
        self.access.flush()
        await asyncio.sleep(0)

    # -- bookkeeping -------------------------------------------------------------
    def opened(self, conn: Tracked) -> None:
        self.conns.add(conn)

    def count_user(self, user: str, service: str, limit: int | None) -> bool:
        """The rule's max_connections is per user *per service*, across all workers; a rule
        without one gets the relay's default, so no guest holds connections without bound."""
        return self.counts.take(user, service, self.max_connections if limit is None else limit)

    def done(self, conn: Tracked) -> None:
        self.conns.discard(conn)
        if conn.counted and conn.counted_user is not None:
            self.counts.give(conn.counted_user, conn.listener.service)
        self.counters[(conn.listener.service, conn.result)] += 1
        self.access.connection(
            conn.started,
            conn.user,
            conn.src,
            conn.listener.service,
            conn.rule,
            conn.upstream_name,
            conn.bytes_up,
            conn.bytes_down,
            conn.result,
            conn.asked,
            conn.reason,
        )

    def recheck(self) -> None:
        """After a table change: close every open connection the new tables no longer allow."""
        closed = 0
        for conn in list(self.conns):
            if conn.user is None or (conn.upstream_name is None and not conn.connecting()):
                continue  # refused already (its dialog speaks for itself)
            verdict = self.gate.admit(conn.src, conn.right)
            if isinstance(verdict, Refusal):
                conn.abort("revoked")
                closed += 1
        log.info("policy change: %d open connection(s) closed", closed)

    def sessions_ended(self, rows: list[Ended]) -> int:
        """Close every open connection of these ended sessions (result `session-ended`)."""
        ids = {r[0] for r in rows}
        closed = 0
        for conn in list(self.conns):
            if conn.session is not None and conn.session in ids:
                conn.abort("session-ended")
                closed += 1
        if closed:
            log.info("%d session(s) ended: %d open connection(s) closed", len(ids), closed)
        return closed

    async def _sweep(self) -> None:
        """One timer for all connections: a connection whose byte counts did not move
        for idle_timeout is closed (granularity: a quarter of the timeout, at most 30 s)."""
        period = max(0.2, min(30.0, self.idle_timeout / 4))
        seen: dict[Tracked, tuple[int, float]] = {}
        while True:
            await asyncio.sleep(period)
            now = time.monotonic()
            fresh: dict[Tracked, tuple[int, float]] = {}
            for conn in list(self.conns):
                total = conn.activity()
                last = seen.get(conn)
                if last is not None and last[0] == total:
                    if now - last[1] >= self.idle_timeout:
                        conn.abort("idle-timeout")
                        continue
                    fresh[conn] = last
                else:
                    fresh[conn] = (total, now)
            seen = fresh

    def stats(self) -> dict[str, Any]:
        return {f"{s}/{r}": n for (s, r), n in sorted(self.counters.items())}


def _bind(cls: Any, relay: Relay, ls: Listener) -> Callable[[], asyncio.Protocol]:
    def make() -> asyncio.Protocol:
        proto: asyncio.Protocol = cls(relay, ls)
        return proto

    return make


__all__ = ["Link", "Pump", "Relay", "Tracked", "Upstream", "original_dst"]
