"""The `dns` role: UDP and TCP on the guest address, in front of the site's resolver.

The hot path is a plain thread on the guests' UDP socket: a cache hit is one dict
lookup on the query's bytes and one `sendto` of the stored reply with the guest's
ID in front.  Misses go to the event loop and `core.Resolver`, which forwards each
question from a fresh socket (random source port, random ID) and retries over TCP
when the answer comes back truncated.  Identical questions in flight share one
upstream query.

Every question first takes a token from its guest address's bucket (`ratelimit`);
over the rate it is dropped and counted.  A cached answer is given on the fast path
only to an address known to be logged in (`logins`); any other question goes to the
loop, which asks the sessions store, and the resolver answers it as a member's or as
a guest's before login (few names, few types).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import signal
import socket
import struct
import threading
import time
from collections.abc import Iterable, Iterator
from typing import Any

from dnslib import RCODE
from prometheus_client.core import Metric

from appliance.core import metrics
from appliance.core.config import Config
from appliance.dns.core import Action, Drop, Forward, Reply, Resolver, Settings, error_reply
from appliance.dns.logins import Logins
from appliance.dns.ratelimit import BURST, RATE, RateLimit

log = logging.getLogger("appliance.dns")

UPSTREAM_TIMEOUT = 2.0
TCP_IDLE = 10.0
MAX_TCP_CLIENTS = 64
MAX_PENDING = 2048
"""Upstream questions in flight at once; each holds a UDP socket (the process may open
20,000 files), and a legitimate guest network has far fewer misses outstanding."""
SESSION_POLL = 0.5
"""Seconds between looks at the sessions ended (by the portal, the lease follower...)."""


class _OneQuery(asyncio.DatagramProtocol):
    """One upstream question on its own socket: a fresh random source port per query,
    plus a random ID and the question itself must match (spoofed answers are hard)."""

    def __init__(self, qid: int, question: bytes, fut: asyncio.Future[bytes]) -> None:
        self.qid = struct.pack("!H", qid)
        self.question = question
        self.fut = fut

    def datagram_received(self, data: bytes, addr: Any) -> None:
        if self.fut.done() or len(data) < 12 or data[:2] != self.qid:
            return
        if data[12 : 12 + len(self.question)] != self.question:
            return
        self.fut.set_result(data)

    def error_received(self, exc: Exception) -> None:
        if not self.fut.done():
            self.fut.set_exception(exc)


async def ask_udp(host: str, port: int, query: bytes, question: bytes, timeout: float) -> bytes:
    loop = asyncio.get_running_loop()
    qid = secrets.randbelow(65536)
    fut: asyncio.Future[bytes] = loop.create_future()
    transport, _ = await loop.create_datagram_endpoint(
        lambda: _OneQuery(qid, question, fut), remote_addr=(host, port)
    )
    try:
        transport.sendto(struct.pack("!H", qid) + query[2:])
        return await asyncio.wait_for(fut, timeout)
    finally:
        transport.close()


def _question_bytes(query: bytes) -> bytes:
    """The wire question (name, type, class) right after the header."""
    i = 12
    while i < len(query) and query[i] != 0:
        i += query[i] + 1
    return query[12 : i + 5]


async def ask_tcp(host: str, port: int, query: bytes, timeout: float) -> bytes:
    async def go() -> bytes:
        reader, writer = await asyncio.open_connection(host, port)
        try:
            writer.write(struct.pack("!H", len(query)) + query)
            await writer.drain()
            (n,) = struct.unpack("!H", await reader.readexactly(2))
            return await reader.readexactly(n)
        finally:
            writer.close()

    return await asyncio.wait_for(go(), timeout)


class Server:
    def __init__(
        self,
        resolver: Resolver,
        upstreams: list[tuple[str, int]],
        timeout: float,
        max_pending: int = MAX_PENDING,
        logins: Logins | None = None,
        limiter: RateLimit | None = None,
    ) -> None:
        self.resolver = resolver
        self.upstreams = upstreams
        self.timeout = timeout
        self.max_pending = max_pending
        self.logins = logins or Logins(None)  # none given: nobody is logged in
        self.limiter = limiter or RateLimit(RATE, BURST)
        self.inflight: dict[bytes, asyncio.Future[bytes | None]] = {}
        self.tasks: set[asyncio.Task[None]] = set()
        self._overload_logged = -60.0
        self._rate_logged = -60.0

    def allow(self, ip: str, now: float) -> bool:
        """A token from the guest's bucket; over the rate: dropped, counted, logged (1/min)."""
        if self.limiter.allow(ip, now):
            return True
        if now - self._rate_logged >= 60:
            self._rate_logged = now
            log.warning(
                "dns: %s asks over the rate (%g/s, bursts of %g); dropping (%d so far)",
                ip,
                self.limiter.rate,
                self.limiter.burst,
                self.limiter.dropped,
            )
        return False

    def decide(self, data: bytes, ip: str, tcp: bool) -> Action:
        """The resolver's decision for a question from `ip`, logged in or not."""
        now = time.monotonic()
        return safe_query(self.resolver, data, tcp, self.logins.check(ip, now))

    async def follow_sessions(self) -> None:
        """Ended sessions leave the logged-in set within SESSION_POLL seconds."""
        while True:
            try:
                self.logins.poll(time.monotonic())
            except Exception:  # a bug here must not stop the following
                log.exception("dns: following the sessions failed")
                self.logins.known.clear()  # unknown again: asked afresh, fail closed
            await asyncio.sleep(SESSION_POLL)

    def overloaded(self) -> bool:
        """Too many guest questions wait upstream: a flood of made-up names (each one a
        miss) would otherwise grow tasks and sockets without bound while upstream is slow."""
        if len(self.tasks) < self.max_pending:
            return False
        self.resolver.stats.overload += 1
        now = time.monotonic()
        if now - self._overload_logged >= 60:
            self._overload_logged = now
            log.warning(
                "dns: %d questions wait upstream; answering SERVFAIL to new misses (%d so far)",
                len(self.tasks),
                self.resolver.stats.overload,
            )
        return True

    async def resolve(self, fwd: Forward, tcp: bool) -> bytes:
        """Upstream bytes for a forward (shared between identical questions in flight)."""
        key = fwd.key
        shared = self.inflight.get(key)
        if shared is None:
            shared = asyncio.get_running_loop().create_future()
            self.inflight[key] = shared
            try:
                shared.set_result(await self._ask(fwd.query))
            except Exception as exc:  # never leave waiters hanging
                log.debug("upstream failed: %s", exc)
                shared.set_result(None)
            finally:
                del self.inflight[key]
        upstream = await shared
        try:
            out = self.resolver.answer(fwd, upstream, time.monotonic(), tcp)
        except Exception:  # an upstream answer we cannot handle: SERVFAIL, keep serving
            log.exception("dns: cannot use the upstream answer for %s", fwd.qname)
            out = error_reply(fwd.query, RCODE.SERVFAIL) or b""
        return fwd.client_id + out[2:]

    async def _ask(self, query: bytes) -> bytes | None:
        question = _question_bytes(query)
        for host, port in self.upstreams:
            try:
                data = await ask_udp(host, port, query, question, self.timeout)
            except (TimeoutError, OSError):
                continue
            if data[2] & 0x02:  # TC: the full answer only fits over TCP
                try:
                    return await ask_tcp(host, port, query, self.timeout)
                except (TimeoutError, OSError, asyncio.IncompleteReadError):
                    continue
            return data
        return None

    def spawn(self, coro: Any) -> None:
        task = asyncio.ensure_future(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)


class GuestUdp:
    """The guests' UDP socket: a plain thread answers cache hits, the event loop the rest.

    A blocking `recvfrom`/`sendto` loop costs far less per packet than an event-loop
    callback; the thread releases the GIL while it waits, and only a miss (a parse,
    maybe an upstream query) is handed to the loop.  Dict reads and writes are atomic
    under the GIL, so the loop can fill the cache while the thread reads it.
    """

    def __init__(self, server: Server, sock: socket.socket, loop: asyncio.AbstractEventLoop):
        self.server = server
        self.sock = sock
        self.loop = loop
        self.closing = False
        self.fast_hits = 0  # cache hits answered here (the resolver's Stats never sees them)
        self.thread = threading.Thread(target=self._serve, name="dns-udp", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def close(self) -> None:
        self.closing = True
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)  # wakes the blocked recvfrom
        self.thread.join(2)
        self.sock.close()

    def _serve(self) -> None:
        entries = self.server.resolver.cache.entries
        known = self.server.logins.known
        allow = self.server.allow
        recv, send, now = self.sock.recvfrom, self.sock.sendto, time.monotonic
        miss = self.loop.call_soon_threadsafe
        while not self.closing:
            try:
                data, addr = recv(4096)
            except OSError:
                if self.closing:
                    return
                continue
            if addr is None:  # shut down: woken with nothing
                continue
            t = now()
            if not allow(addr[0], t):
                continue
            # fast path: a cached reply for a logged-in guest, patched with this
            # query's ID; no parse at all
            hit = entries.get(data[2:])
            if hit is not None and hit[0] > t and known.get(addr[0], 0.0) > t:
                self.fast_hits += 1  # only this thread writes it
                try:  # noqa: SIM105 (no context manager per packet)
                    send(data[:2] + hit[2], addr)
                except OSError:
                    pass
                continue
            if data or not self.closing:
                miss(self._miss, data, addr)

    def _send(self, data: bytes, addr: Any) -> None:
        with contextlib.suppress(OSError):
            self.sock.sendto(data, addr)

    def _miss(self, data: bytes, addr: Any) -> None:
        action = self.server.decide(data, addr[0], tcp=False)
        if isinstance(action, Reply):
            self._send(action.data, addr)
        elif isinstance(action, Forward):
            if self.server.overloaded():
                # answered as if upstream were silent: SERVFAIL with the question
                out = self.server.resolver.answer(action, None, time.monotonic())
                self._send(action.client_id + out[2:], addr)
                return
            self.server.spawn(self._forward(action, addr))

    async def _forward(self, fwd: Forward, addr: Any) -> None:
        out = await self.server.resolve(fwd, tcp=False)
        if not self.closing:
            self._send(out, addr)


def safe_query(resolver: Resolver, data: bytes, tcp: bool, logged_in: bool = False) -> Action:
    """The resolver's decision; a bug there costs one SERVFAIL, never the service."""
    try:
        return resolver.query(data, time.monotonic(), tcp, logged_in)
    except Exception:
        log.exception("dns: query handling failed")
        out = error_reply(data, RCODE.SERVFAIL)
        return Reply(out) if out is not None else Drop("unanswerable")


async def handle_tcp(
    server: Server,
    sem: asyncio.Semaphore,
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
) -> None:
    if sem.locked():
        writer.close()
        return
    peer = writer.get_extra_info("peername")
    ip = str(peer[0]) if peer else ""
    async with sem:
        try:
            while True:
                head = await asyncio.wait_for(reader.readexactly(2), TCP_IDLE)
                (n,) = struct.unpack("!H", head)
                data = await asyncio.wait_for(reader.readexactly(n), TCP_IDLE)
                if not server.allow(ip, time.monotonic()):
                    break  # over the rate: the connection ends (the client may retry)
                action = server.decide(data, ip, tcp=True)
                if isinstance(action, Drop):
                    break
                out = (
                    action.data
                    if isinstance(action, Reply)
                    else await server.resolve(action, tcp=True)
                )
                writer.write(struct.pack("!H", len(out)) + out)
                await writer.drain()
        except (TimeoutError, asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()


def settings_for(config: Config, guest_names: Iterable[str]) -> Settings:
    return Settings.build(
        guest_ip=config.interfaces.guest_ip,
        guest_subnet=config.interfaces.guest_subnet,
        domain=config.dhcp.domain,
        guest_names=guest_names,
        hidden=config.interfaces.hidden_networks,
        extra_names=[config.portal.hostname],
        cache_size=config.dns.cache_size,
        before_login=config.dns.before_login,
    )


def sessions_for(config: Config) -> Any:
    """The shared sessions store; this role only reads sessions, never starts or ends one."""
    from appliance.state import store
    from appliance.state.sessions import SessionStore

    return SessionStore(store.open_store(config.state))


async def serve(
    config: Config,
    resolver: Resolver,
    stop: asyncio.Event,
    host: str | None = None,
    upstreams: list[tuple[str, int]] | None = None,
) -> None:
    ups = upstreams or [(str(ip), 53) for ip in config.dns.upstream]
    server = Server(
        resolver,
        ups,
        UPSTREAM_TIMEOUT,
        logins=Logins(sessions_for(config)),
        limiter=RateLimit(config.dns.rate_limit, config.dns.rate_burst),
    )
    loop = asyncio.get_running_loop()
    bind = host or str(config.interfaces.guest_ip)
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind((bind, config.dns.port))
    udp = GuestUdp(server, sock, loop)
    udp.start()
    metrics.serve(config, "dns", lambda: metric_families(server, udp))
    sem = asyncio.Semaphore(MAX_TCP_CLIENTS)
    tcp = await asyncio.start_server(
        lambda r, w: handle_tcp(server, sem, r, w), bind, config.dns.port, reuse_address=True
    )
    log.info(
        "dns on %s:%d, upstream %s, %d local names",
        bind,
        config.dns.port,
        ", ".join(f"{h}:{p}" for h, p in ups) or "none",
        len(resolver.settings.local_names),
    )
    follower = asyncio.ensure_future(server.follow_sessions())
    try:
        await stop.wait()
    finally:
        follower.cancel()
        udp.close()
        tcp.close()
        s = resolver.stats
        log.info(
            "dns stopping: %d queries, %d cache hits, %d forwarded, %d FORMERR, %d hidden, "
            "%d SERVFAIL for overload, %d refused and %d stand-in answers before login, "
            "%d dropped over the rate",
            s.queries,
            s.hits,
            s.forwarded,
            s.formerr,
            s.hidden,
            s.overload,
            s.refused,
            s.stand_in,
            server.limiter.dropped,
        )


def metric_families(server: Server, udp: GuestUdp) -> Iterator[Metric]:
    """The resolver's counters and the UDP thread's cache hits, at scrape time."""
    s, fast = server.resolver.stats, udp.fast_hits
    yield metrics.one_counter("dns_queries", "Guest queries (UDP and TCP).", s.queries + fast)
    yield metrics.one_counter("dns_cache_hits", "Queries answered from the cache.", s.hits + fast)
    yield metrics.counter(
        "dns_answers",
        "Queries answered other than from the cache, by how.",
        ("kind",),
        {
            ("forwarded",): s.forwarded,
            ("local",): s.local,
            ("formerr",): s.formerr,
        },
    )
    yield metrics.counter(
        "dns_filtered",
        "Answers filtered: hidden addresses removed, refused or a stand-in before login.",
        ("reason",),
        {("hidden",): s.hidden, ("refused",): s.refused, ("stand_in",): s.stand_in},
    )
    yield metrics.one_counter(
        "dns_servfails", "SERVFAIL answers, overload ones included.", s.servfail
    )
    yield metrics.one_counter(
        "dns_overloads", "SERVFAIL at once: too many questions already upstream.", s.overload
    )
    yield metrics.one_counter(
        "dns_rate_limited", "Queries dropped over a guest's rate.", server.limiter.dropped
    )
    yield metrics.one_gauge(
        "dns_cache_entries", "Replies in the cache.", len(server.resolver.cache.entries)
    )


def main(config: Config, guest_names: Iterable[str] | None = None) -> int:
    """Serve guests until SIGTERM; the names under the guest domain come from servers.toml."""
    if guest_names is None:
        from appliance.net import tables

        guest_names = tables.guest_names(config)
        fixed = False
    else:
        fixed = True
    resolver = Resolver(settings_for(config, guest_names))
    with contextlib.suppress(ImportError):
        import uvloop

        uvloop.install()

    def reload() -> None:
        """SIGHUP: the guest names may have changed in servers.toml; start a fresh cache."""
        if not fixed:
            from appliance.net import tables

            resolver.settings = settings_for(config, tables.guest_names(config))
        resolver.cache.entries.clear()
        log.info("dns reloaded: %d local names", len(resolver.settings.local_names))

    async def run() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        loop.add_signal_handler(signal.SIGHUP, reload)
        await serve(config, resolver, stop)

    asyncio.run(run())
    return 0
