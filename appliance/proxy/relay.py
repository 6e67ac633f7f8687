"""The relay core: one `Relay` serves every listener, on one event loop per process.

Per accepted connection: the gate decides (user, rule, upstreams) or refuses;
upstreams are tried in order with a connect timeout, by one rule on both paths
(fallback.py); then bytes move both ways until both sides are done, a
half-close passed on as such.  Two paths, one
bookkeeping (`Tracked`: counters, limits, the access log, revocation):

- raw sockets on the relay's own edge-triggered epoll (raw.py's `Spliced` and
  `Connector`, and splice.py) for plain tcp services, SMTP, POP3, IMAP and TLS:
  no transport objects, no task or timer per connection; small exchanges are
  copied through one buffer, bulk is spliced.  A refused guest gets the refusal
  in its protocol's words (refusals.py) on the raw socket;
- asyncio Protocols (`Link`, `Pump`) where asyncio's TLS transport speaks to
  an upstream (`tls = true`), and for the plain services when splicing is off
  (the benchmark's comparison): `data_received` writes into the peer
  transport, whose `pause_writing` and `resume_writing` pause and resume
  reading on this side.

Idle connections are swept by one periodic timer (not one timer per
connection: memory).  A policy change re-admits every open connection and
closes the ones no longer allowed.
"""

from __future__ import annotations

import asyncio
import logging
import select
import socket
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable
from typing import Any, cast

from appliance.proxy.access_log import AccessLog
from appliance.proxy.accounting import UsageRecorder
from appliance.proxy.agent_stream import AgentPump, AgentStreamFailed
from appliance.proxy.counts import Counts, LocalCounts
from appliance.proxy.fallback import Fallback
from appliance.proxy.follow import EndedFollower
from appliance.proxy.gate import (
    Admission,
    Gate,
    Listener,
    Refusal,
    Upstream,
)
from appliance.proxy.http_conn import HttpConn
from appliance.proxy.raw import Connector, Deadlines, Spliced, connect
from appliance.proxy.refusals import RefusalDialog
from appliance.proxy.smtp_messages import SmtpMessages
from appliance.proxy.splice import EdgePoll, PipePool, Sock
from appliance.proxy.tracked import (
    HIGH_WATER,
    LOW_WATER,
    UPSTREAM_FAILURES,
    Pump,
    Tracked,
    failure,
    original_dst,
)
from appliance.proxy.upstream_pool import UpstreamPool
from appliance.proxy.upstream_tls import Resuming
from appliance.state.sessions import SessionEvent

DIALOG_TIMEOUT = 30.0  # seconds a silent refusal dialog is kept

log = logging.getLogger("appliance.proxy")

# services relayed over raw sockets (splice.py) when splicing is on; HTTP (http_conn.py)
# and tls (its ClientHello is read, raw.py) are always on raw sockets
RAW_PROTOCOLS = frozenset({"tcp", "smtp", "pop3", "imap"})
HELLO_TIMEOUT = 10.0  # a ClientHello, and a web proxy's tunnel answer, come in this long
# a name and a port -> the addresses a connection to it would go to (OSError: none)
Resolver = Callable[[str, int], Awaitable[list[str]]]


class Link(Tracked, asyncio.Protocol):
    """The client side of a plain relayed connection (SMTP, POP3, any TCP service)."""

    __slots__ = ("dialog", "eofs", "pending", "pump", "resume", "smtp")

    def __init__(self, relay: Relay, listener: Listener) -> None:
        super().__init__(relay, listener)
        self.pump: Pump | None = None
        self.dialog: RefusalDialog | None = None
        self.eofs = 0
        self.pending = b""
        self.resume: Resuming | None = None  # TLS to the upstream: keep its session
        # smtp with accounting on: the messages the server accepts (smtp_messages.py)
        self.smtp = (
            SmtpMessages() if listener.protocol == "smtp" and relay.usage is not None else None
        )

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
            self._refuse(self.limit_refusal(verdict))
            return
        self.relay.loop.create_task(self._connect(verdict))

    async def _connect(self, adm: Admission) -> None:
        user, rule = self.user, self.rule
        tries = Fallback(self.listener.service, adm.upstreams)
        while (up := tries.next()) is not None:
            if up.agent:  # a household's own server, through its agent (agent_stream.py)
                joined = await self._through_agent(up, tries)
                if joined is not None:
                    self._join(up, joined)
                    return
                continue
            tls = up.tls
            try:
                async with asyncio.timeout(self.relay.connect_timeout):
                    if tls is None:
                        self.resume = None
                        transport, pump = await self.relay.loop.create_connection(
                            lambda: Pump(self), up.host, up.port
                        )
                    else:  # TLS to the server: its certificate checked before a byte goes
                        self.resume = tls.resuming(up.host, up.port)
                        transport, pump = await self.relay.loop.create_connection(
                            lambda: Pump(self),
                            up.host,
                            up.port,
                            ssl=self.resume,
                            server_hostname=tls.server_hostname(),
                        )
            except (TimeoutError, OSError) as exc:  # (ssl.SSLError is an OSError)
                tries.failed(up, failure(exc))
                continue
            why = tls.problem(transport.get_extra_info("ssl_object")) if tls else None
            if why is not None:
                transport.abort()
                tries.failed(up, why)
                continue
            self._join(up, pump)
            return
        self._refuse(tries.refusal(user, rule))

    def _join(self, up: Upstream, pump: Pump) -> bool:
        """The upstream is there: bytes flow from now on (False: the guest went away)."""
        if self.closed or self.client is None or self.client.is_closing():
            pump.transport.close()  # type: ignore[union-attr]
            return False
        self.pump = pump
        self.upstream_name = up.name
        if pump.lost:  # gone before the join: what it said reaches the guest, then its end
            pump.join()
            return True
        if self.pending:
            self.bytes_up += len(self.pending)
            pump.transport.write(self.pending)  # type: ignore[union-attr]
            self.pending = b""
        if self.eofs and pump.transport is not None:
            if pump.transport.can_write_eof():
                pump.transport.write_eof()
            else:
                pump.transport.close()
        self.client.resume_reading()
        pump.join()
        return True

    async def _through_agent(self, up: Upstream, tries: Fallback) -> AgentPump | None:
        """The stream to a household's server through its agent; None: there is none (the
        failure and the agent's code recorded in `tries`).  Bounded by the agent deadline
        (`AgentStreams.timeout`: the config's [agent] timeout)."""
        streams = self.relay.gate.agent_streams
        if streams is None:
            tries.failed(up, "no home relay on this appliance", agent="bad_address")
            return None
        try:
            async with asyncio.timeout(streams.timeout):
                return await streams.open(self, up.agent, self.listener.service)
        except AgentStreamFailed as exc:
            tries.failed(up, f"{exc.code}: {exc.reason}", agent=exc.code)
            return None
        except TimeoutError:
            why = f"timeout: no stream in {streams.timeout:g} s"
            tries.failed(up, why, agent="timeout")
            return None

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
        if self.smtp is not None and self.dialog is None:
            self.smtp.client(data)  # (bytes held while connecting go up first, in order)
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
        if not self.pump.transport.can_write_eof():
            # TLS to the upstream cannot half-close here: the guest is done, so is the
            # upstream connection (close() still sends what is buffered, then close_notify)
            self.pump.transport.close()
            return False
        self.pump.transport.write_eof()
        if self.eofs >= 2:
            self.pump.transport.close()
            return False
        return True

    def from_upstream(self, data: bytes) -> None:
        if self.resume is not None and self.pump is not None and self.pump.transport:
            # the server's first bytes: its session (a TLS 1.3 ticket is in by now) is
            # the next connection's to offer
            self.resume.remember(self.pump.transport.get_extra_info("ssl_object"))
            self.resume = None
        smtp = self.smtp
        if smtp is not None:
            smtp.server(data)
            self.messages = smtp.messages
        super().from_upstream(data)

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


class Relay:
    """All listeners, the open connections, counters and the idle sweeper."""

    def __init__(
        self,
        gate: Gate,
        connect_timeout: float = 5.0,
        idle_timeout: float = 600.0,
        identity_header: str | None = None,
        hidden: Callable[[str], bool] | None = None,
        splice: bool = True,
        follow_period: float = 0.25,
        connect_ports: Iterable[int] = (443,),
        counts: Counts | None = None,
        reuse_port: bool = False,
        resolve: Resolver | None = None,
        max_connections: int = 256,
        hello_timeout: float = HELLO_TIMEOUT,
        name_ttl: float = 5.0,
        usage: UsageRecorder | None = None,
        dialog_timeout: float = DIALOG_TIMEOUT,
    ) -> None:
        self.gate = gate
        # a refusal dialog (POP3 -ERR, SMTP 5xx...) idle this long is closed: it has
        # said all it can, and a silent client must not hold the slot idle_timeout long
        self.dialog_timeout = min(dialog_timeout, idle_timeout)
        self.usage = usage  # per-user accounting (None: off)
        self._quota_warned = False
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
        self.name_ttl = name_ttl
        self.names: dict[str, tuple[float, list[str] | None]] = {}  # check_name's answers
        self.upstreams = UpstreamPool(self.edges, self.loop)  # kept-alive HTTP upstreams
        self.generation = 0  # table changes seen
        # where a redirected guest connection was going (tests replace it: no nft there)
        self.original: Callable[[Sock], tuple[str, int] | None] = original_dst
        self.max_connections = max_connections  # per user and service, where a rule sets none
        self.conns: set[Tracked] = set()
        self.counters: Counter[tuple[str, str]] = Counter()  # (service, result)
        self.bytes: Counter[tuple[str, str]] = Counter()  # (service, "up" | "down")
        self.messages: Counter[str] = Counter()  # per service: mails the server accepted
        self.servers: list[asyncio.AbstractServer] = []
        self._sweeper: asyncio.Task[None] | None = None
        self._follower: asyncio.Task[None] | None = None
        self.follow_period = follow_period
        self.access = AccessLog(self.loop)
        gate.subscribe(self.recheck)

    async def check_name(self, name: str, port: int) -> list[str] | None:
        """Every answer of the site's resolver for a name a guest asked for (None: none, or
        none in time), kept `name_ttl` seconds: HTTP and HTTPS check each name before
        relaying to it, and a page asks for the same few names many times a second."""
        now = self.loop.time()
        hit = self.names.get(name)
        if hit is not None and hit[0] > now:
            return hit[1]
        try:
            async with asyncio.timeout(self.connect_timeout):
                addresses: list[str] | None = await self.resolve(name, port) or None
        except (TimeoutError, OSError):
            addresses = None
        if len(self.names) > 4096:
            self.names.clear()
        self.names[name] = (self.loop.time() + self.name_ttl, addresses)
        return addresses

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
            # (a connection whose upstream wants TLS from us leaves the raw core at
            # accept, whatever made it so: servers.toml `tls = true` or a household's pin)
            if ls.protocol in ("tls", "http") or (ls.protocol in RAW_PROTOCOLS and self.splice):
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
        follower = EndedFollower(
            self.gate.ended_after,
            self.gate.last_session_event(),
            self.sessions_ended,
            self.follow_period,
        )
        self._follower = self.loop.create_task(follower.run())
        if self.usage is not None:
            self.usage.start(self.loop)

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
            if ls.protocol == "http":
                http = HttpConn(self, ls, csock, addr[0])
                self.opened(http)
                http.start()
                continue
            verdict = self.gate.admit(addr[0], ls.service)
            if isinstance(verdict, Admission) and _speaks_tls(verdict, ls):
                self._to_protocol_path(csock, ls)
                continue
            conn = Spliced(self, ls, csock, addr[0])
            self.opened(conn)
            if isinstance(verdict, Refusal):
                conn.refuse_now(verdict)
            elif not conn.admitted(verdict):
                conn.refuse_now(conn.limit_refusal(verdict))
            elif ls.protocol == "tls":
                conn.read_hello(verdict)
            else:  # the upstreams in order (names: the resolver first)
                connect(self, conn, verdict.upstreams)

    def _to_protocol_path(self, csock: Sock, ls: Listener) -> None:
        """This guest's server wants TLS from us (servers.toml `tls = true`, or a
        household's own server with a pin): the connection goes to asyncio's TLS
        transport (Link), which admits it itself."""
        sock = socket.socket(fileno=csock.detach())
        self.loop.create_task(self._protocol_path(sock, ls))

    async def _protocol_path(self, sock: socket.socket, ls: Listener) -> None:
        try:
            await self.loop.connect_accepted_socket(_bind(Link, self, ls), sock)
        except OSError as exc:  # the guest went away meanwhile
            log.info("%s: guest gone before its TLS upstream: %s", ls.service, exc)
            sock.close()

    def _resume_accept(self, lsock: socket.socket) -> None:
        if lsock.fileno() >= 0:
            self.edges.modify(lsock.fileno(), select.EPOLLIN)

    async def resolve_then_connect(self, conn: Spliced, upstreams: tuple[Upstream, ...]) -> None:
        """Connect to the first of the upstreams that answers, those given by name resolved
        first (`resolve_upstreams`)."""
        tries = await self.resolve_upstreams(conn.listener.service, upstreams)
        if not conn.closed:
            Connector(self, conn, tries).next()

    async def resolve_upstreams(self, service: str, upstreams: tuple[Upstream, ...]) -> Fallback:
        """The upstreams in their order, those given by name resolved (one address each),
        all before the first connect; one that does not resolve is a failed candidate like
        one that does not answer.  Resolved on every call, nothing kept: an answer is used
        at once, never past its validity (the HTTP path then looks for a kept-alive
        connection to the address, keyed by it as for an upstream given by address)."""
        tries = Fallback(service)
        for up in upstreams:
            if up.numeric:
                tries.add(up)
                continue
            try:
                async with asyncio.timeout(self.connect_timeout):
                    infos = await self.loop.getaddrinfo(
                        up.host, up.port, family=socket.AF_INET, type=socket.SOCK_STREAM
                    )
            except (TimeoutError, OSError) as exc:
                tries.failed(up, failure(exc))
                continue
            for i in infos[:1]:
                tries.add(Upstream(up.name, str(i[4][0]), up.port))
        return tries

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
        self.upstreams.close()
        for conn in list(self.conns):
            conn.abort("shutdown")
        self.edges.shutdown()
        self.access.flush()
        if self.usage is not None:  # after the aborts: their bytes are counted too
            await self.usage.stop()
        await asyncio.sleep(0)

    # -- bookkeeping -------------------------------------------------------------
    def opened(self, conn: Tracked) -> None:
        self.conns.add(conn)

    def count_user(self, user: str, service: str, limit: int | None) -> bool:
        """The rule's max_connections is per user *per service*, across all workers; a rule
        without one gets the relay's default, so no guest holds connections without bound."""
        return self.counts.take(user, service, self.max_connections if limit is None else limit)

    def over_quota(self, user: str, service: str, quota: int) -> bool:
        """Today's bytes of this user and service reached the rule's quota (the store's
        count as of the last flush plus this worker's since; other workers' last few
        seconds are not in it).  Without accounting there is nothing to count: a quota
        is then not enforced (said once in the log)."""
        if self.usage is None:
            if not self._quota_warned:
                self._quota_warned = True
                log.warning("a rule sets quota_bytes_per_day, but accounting is off: ignored")
            return False
        return self.usage.used_today(user, service) >= quota

    def done(self, conn: Tracked) -> None:
        self.conns.discard(conn)
        if conn.counted and conn.counted_user is not None:
            self.counts.give(conn.counted_user, conn.listener.service)
        service = conn.listener.service
        self.counters[(service, conn.result)] += 1
        self.bytes[(service, "up")] += conn.bytes_up
        self.bytes[(service, "down")] += conn.bytes_down
        if conn.messages:
            self.messages[service] += conn.messages
        if self.usage is not None and conn.user is not None and conn.result[:8] != "refused-":
            self.usage.record(
                conn.user, service, conn.session, conn.bytes_up, conn.bytes_down, conn.messages
            )
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
        self.generation += 1  # an admission from before is not reused (HttpConn)
        closed = 0
        for conn in list(self.conns):
            if conn.user is None or (conn.upstream_name is None and not conn.connecting()):
                continue  # refused already (its dialog speaks for itself)
            verdict = self.gate.admit(conn.src, conn.right)
            if isinstance(verdict, Refusal):
                conn.abort("revoked")
                closed += 1
        log.info("policy change: %d open connection(s) closed", closed)

    def sessions_ended(self, events: list[SessionEvent]) -> int:
        """Close every open connection of these ended sessions (result `session-ended`)."""
        ids = {e.session_id for e in events}
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
        period = max(0.2, min(30.0, self.idle_timeout / 4, self.dialog_timeout / 2))
        seen: dict[Tracked, tuple[int, float]] = {}
        while True:
            await asyncio.sleep(period)
            now = time.monotonic()
            fresh: dict[Tracked, tuple[int, float]] = {}
            for conn in list(self.conns):
                total = conn.activity()
                last = seen.get(conn)
                if last is not None and last[0] == total:
                    dialog = getattr(conn, "dialog", None) is not None
                    if dialog and now - last[1] >= self.dialog_timeout:
                        conn.abort("dialog-timeout")
                        continue
                    if now - last[1] >= self.idle_timeout:
                        conn.abort("idle-timeout")
                        continue
                    fresh[conn] = last
                else:
                    fresh[conn] = (total, now)
            seen = fresh

    def stats(self) -> dict[str, Any]:
        return {f"{s}/{r}": n for (s, r), n in sorted(self.counters.items())}

    def snapshot(self) -> dict[str, Any]:
        """What the metrics need, as JSON (each worker writes its own: proxy/metrics.py)."""
        return {
            "connections": [[s, r, n] for (s, r), n in self.counters.items()],
            "bytes": [[s, d, n] for (s, d), n in self.bytes.items()],
            "upstream_failures": dict(UPSTREAM_FAILURES),
            "messages": dict(self.messages),
            "open": len(self.conns),
        }


def _speaks_tls(adm: Admission, ls: Listener) -> bool:
    """An upstream to speak TLS to, on a plain service (a tls service's TLS is the guest's):
    servers.toml `tls = true`, a household's pin, or its agent (agent_stream.py)."""
    return ls.protocol != "tls" and any(up.tls is not None or up.agent for up in adm.upstreams)


def _bind(cls: Any, relay: Relay, ls: Listener) -> Callable[[], asyncio.Protocol]:
    def make() -> asyncio.Protocol:
        proto: asyncio.Protocol = cls(relay, ls)
        return proto

    return make


__all__ = ["Link", "Pump", "Relay", "Tracked", "Upstream", "original_dst"]
