"""The home relay's server: WebSocket links over TLS, registration, and routing by token.

Agents link to `/v1/agent` and register a household (`homelink.registration`, the
`Registrations` table); appliances link to `/v1/appliance` and open streams to
households.  The relay never reads a stream: it holds no stream state beyond a route
per token (which household, which appliance link), the two FIN offsets it needs to
know when the stream is over, and the offsets each end acknowledged (the window).
The TLS inside the streams is end to end.

Forwarding never waits for the destination: each link has a bounded outbound queue
drained by its own sender task, so a destination that stops reading cannot stall the
reader of the link a frame came from (an appliance link carries many households).
What may wait in the queues is bounded twice: the relay enforces the ends' per-stream
WINDOW (DATA beyond the receiver's last ACK or RESUME offset plus WINDOW resets the
stream), and a link whose queue grows past `[limits] link_queue_bytes` is closed
1013 (its streams resume when it comes back).  A destination that has gone away is
counted and the frame dropped: the ends resume on a new link (docs/home-relay.md
"Resume").

In a federation (`[federation]`, appliance/homerelay/federation.py) a household may be
linked to another relay: the table knows which, from the store, and frames to it go
over a peer link to that relay, where this relay is one more appliance link.
"""

from __future__ import annotations

import asyncio
import contextlib
import http
import json
import logging
import ssl
import time
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Protocol

from prometheus_client.core import Metric
from websockets.asyncio.client import connect
from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.datastructures import Headers
from websockets.exceptions import ConnectionClosed, WebSocketException
from websockets.http11 import Request, Response

from appliance.core import metrics
from appliance.homelink import frames
from appliance.homelink.frames import Frame, FrameError, Kind, Reset
from appliance.homelink.link import LinkConnection
from appliance.homelink.registration import (
    CLOSE_CLAIMED,
    CLOSE_MALFORMED,
    RegistrationRefused,
    challenge,
    challenge_message,
    parse_challenge,
    registered_message,
    verify_registration,
)
from appliance.homelink.stream import LINGER, WINDOW
from appliance.homerelay import federation
from appliance.homerelay.config import PEER_PATH, RelayConfig
from appliance.homerelay.poll_front import (
    OPEN_TIMEOUT,
    PollSession,
    PollSessions,
    front_connection,
)
from appliance.homerelay.sources import HEADER, link_source
from appliance.homerelay.table import HouseholdStore, NameMoved, Registrations
from appliance.state.households import Households, LinkEvent

log = logging.getLogger("appliance.homerelay")

AGENT_PATH = "/v1/agent"
APPLIANCE_PATH = "/v1/appliance"
PRESENCE_PREFIX = "/v1/households/"
PING_INTERVAL = 3.0
CLOSE_TIMEOUT = 1.0
PING_TIMEOUT = 5.0
REGISTER_TIMEOUT = 10.0  # an agent link has this long to answer the challenge
MAX_MESSAGE = frames.MAX_FRAME + 64  # websockets closes 1009 above; FrameError below
CLOSE_REPLACED = 4000  # an agent link taken over by a new one of the same key
CLOSE_TOO_SLOW = 1013  # a link whose outbound queue outgrew [limits] link_queue_bytes
# an appliance link closed because the way from here to one of its households changed
# where neither end can see it (the peer link to its relay died, or it moved to another
# relay): the appliance links again at once and its streams resume
CLOSE_RELINK = 4010
PEER_QUEUE_FACTOR = 8  # a peer link carries many households: its queue may be this larger
PEER_RETRY = 1.0  # seconds after a failed dial before a peer relay is dialled again
IDLE_MARGIN = 30.0  # past linger, before a silent half-closed route is forgotten
# A route that carried no frame for this long is forgotten: the agent ends a server
# stream after an hour with no byte (appliance/agent/server.py STREAM_IDLE_TIMEOUT),
# and an end whose peer is gone gives up after linger, so nobody uses it any more.
ROUTE_IDLE = 3600.0 + LINGER + IDLE_MARGIN

COUNTER_NAMES = (
    "agent_links",
    "appliance_links",
    "peer_links",  # links from other relays of the federation
    "peers_dialled",  # links this relay opened to another relay of the federation
    "peer_dial_failures",
    "taken_elsewhere",  # local agent links closed: the household registered at another relay
    "relinks",  # appliance links closed so their streams resume on a new path
    "registered",
    "takeovers",
    "rekeyed",  # names moved to a renewed certificate's key (its previous key's word)
    "registration_refused",
    "source_limit",  # handshakes refused with 429
    "bad_frames",  # links closed 4400 for a frame that is not one
    "text_after_registration",
    "cross_household",
    "unknown_token",
    "open_offline",
    "open_limit",
    "protocol",
    "forwarded",
    "dropped_no_agent",  # the household's agent link is gone
    "dropped_no_appliance",  # the route's appliance link is gone
    "dropped_closed",  # the destination closed while we sent
    "slow_links_closed",  # closed 1013: outbound queue beyond link_queue_bytes
    "window_violations",  # DATA beyond the receiver's acknowledged offset + WINDOW
    "resume_limit",  # RESUMEs of unknown tokens refused (stream limits)
    "routes_opened",
    "routes_learned",
    "routes_reset",
    "routes_finished",
    "routes_expired",
    "routes_idle",  # forgotten after carrying no frame for too long
    "internal_errors",
)


class RelayLinkConnection(LinkConnection, Protocol):
    """What the relay uses of a link: a websockets connection, or a long-poll session
    (poll_front.py) that behaves as one."""

    @property
    def remote_address(self) -> Any: ...

    @property
    def request(self) -> Any: ...  # its path and headers (None before a handshake)

    async def wait_closed(self) -> None: ...


class Side(StrEnum):
    APPLIANCE = "appliance"
    AGENT = "agent"


@dataclass(eq=False)
class _Link:
    """One WebSocket link; frames to it wait in `outbound` for its sender task."""

    id: int
    ws: RelayLinkConnection
    side: Side
    source: str = ""  # the remote IP address, as the per-source limit counts it
    household: str = ""  # agent links, once registered
    # a link between two relays of the federation: the other relay's name.  Side
    # APPLIANCE, it came in (this relay is its households' relay); side AGENT, this
    # relay dialled it (the link stands in for the agents of that relay's households)
    peer: str = ""
    tokens: set[bytes] = field(default_factory=set)  # appliance links: routes they hold
    outbound: deque[bytes] = field(default_factory=deque)
    outbound_bytes: int = 0
    sender: asyncio.Task[None] | None = None
    closing: bool = False  # closed for slowness (or closed): queue nothing more


@dataclass(eq=False)
class _Route:
    """What the relay knows of one stream: whose it is and where its appliance end is.

    `fin[S]` is the length side S announced with FIN; `finished[S]` is set when the
    other side acknowledged it (`ACK length+1`).  Both set: the stream is over.
    `acked[S]` is the highest offset of S's bytes the other side acknowledged (ACK or
    RESUME): S may send no DATA beyond it plus WINDOW."""

    household: str
    appliance: _Link | None
    counted: bool  # counted by Registrations.streams_opened (so streams_closed on forget)
    last_frame: float  # clock() of the last frame it carried
    fin: dict[Side, int] = field(default_factory=dict)
    finished: set[Side] = field(default_factory=set)
    acked: dict[Side, int] = field(default_factory=lambda: dict.fromkeys(Side, 0))
    gone_since: float | None = None  # since when one end's link has been missing


class _Bucket:
    """A token bucket of bytes per second with one second of burst (at least a frame).

    Debt is allowed: `delay(n)` takes n bytes now and says how long the caller waits
    so the average rate holds."""

    def __init__(self, rate: int, now: float) -> None:
        self.rate = float(rate)
        self.capacity = float(max(rate, frames.MAX_PAYLOAD))
        self.level = self.capacity
        self.stamp = now

    def delay(self, n: int, now: float) -> float:
        self.level = min(self.capacity, self.level + (now - self.stamp) * self.rate)
        self.stamp = now
        self.level -= n
        return 0.0 if self.level >= 0 else -self.level / self.rate


class RelayServer:
    """The relay: `await start()`, serve until `await close()`.

    `clock` (monotonic) times linger and rate limits; `wall_clock` is the UNIX time the
    registration table stores and presence reports.  `linger` is how long a route
    survives one of its ends being gone (the ends' own `stream.LINGER`); `idle` is how
    long a route that carries no frame survives (a route that has seen a FIN: linger
    plus a margin, as the relay may have missed the other FIN before a restart).

    `[limits] household_bytes_per_second` delays the forwarding of a household's DATA
    frames, which back-pressures the link they came from.  The caveat: a link is one
    ordered pipe, so while a frame of a throttled household waits, every later frame on
    the same source link waits too (head-of-line blocking).  An agent link carries one
    household only, so that direction is fair; an appliance link shared by several
    households is slowed for all of them by the one over its rate.
    """

    def __init__(
        self,
        config: RelayConfig,
        store: HouseholdStore | None = None,
        clock: Callable[[], float] = time.monotonic,
        *,
        wall_clock: Callable[[], float] = time.time,
        linger: float = LINGER,
        idle: float = ROUTE_IDLE,
    ) -> None:
        self.config = config
        self.clock = clock
        self.wall_clock = wall_clock
        self.linger = linger
        self.idle = idle
        self._own_store: Households | None = None
        fed = config.federation
        self.me = fed.name if fed is not None else "local"
        after = 0
        if store is None:
            config.state_directory.mkdir(mode=0o700, parents=True, exist_ok=True)
            store = self._own_store = Households.open(config.state)
            if fed is not None:
                # before the table loads: no event can fall between the two
                after = self._own_store.last_event()
            # this relay holds no link yet, whatever its rows say (it was killed): else
            # such a row would read "linked" for ever (`home-relay release` refuses those)
            self._own_store.release_all(self.me, wall_clock())
        self.registrations = Registrations(store, me=self.me)
        self.registrations.alive = self._alive
        self._relays: dict[str, tuple[str, float]] = {}  # name -> (peer URL, heartbeat)
        self._peers: dict[str, _Link] = {}  # relays this one dialled, by name
        self._dialling: dict[str, asyncio.Task[None]] = {}
        self._pending: dict[str, deque[bytes]] = {}  # frames for a peer link being dialled
        self._peer_retry: dict[str, float] = {}  # relay -> clock() before which no dial
        # household -> where it was last seen held ('' here, else the relay): a move
        # elsewhere relinks the appliances whose routes lead the old way
        self._held_at: dict[str, str] = {}
        self._peer_tls = federation.peer_tls(fed) if fed is not None else None
        self._follower: federation.Follower | None = None
        self._heartbeat: asyncio.Task[None] | None = None
        if fed is not None and self._own_store is not None:
            self._follower = federation.Follower(
                lambda: Households.open(config.state), after, self._from_store
            )
        self.counters: dict[str, int] = dict.fromkeys(COUNTER_NAMES, 0)
        self._links: dict[int, _Link] = {}
        self._next_link = 0
        self._routes: dict[bytes, _Route] = {}
        self._buckets: dict[str, _Bucket] = {}
        self._per_source: Counter[str] = Counter()
        self._watchers: set[asyncio.Task[None]] = set()
        self._server: Server | None = None
        # links by HTTP long-poll where a WebSocket cannot pass (poll_front.py)
        self.polls = PollSessions(
            frozenset({AGENT_PATH, APPLIANCE_PATH}), self._serve_poll, self._admit, self._source_of
        )
        self._sweeper: asyncio.Task[None] | None = None

    # -- lifecycle ---------------------------------------------------------------

    def _tls(self) -> ssl.SSLContext:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        ctx.load_cert_chain(self.config.certificate, self.config.key)
        return ctx

    async def start(self) -> None:
        self._server = await serve(
            self._handle,
            self.config.listen,
            self.config.port,
            ssl=self._tls(),
            process_request=self._process_request,
            # a POST is the long-poll transport; the front applies the open timeout
            create_connection=front_connection(self.polls),
            open_timeout=None,
            ssl_handshake_timeout=OPEN_TIMEOUT,
            ping_interval=PING_INTERVAL,
            ping_timeout=PING_TIMEOUT,
            max_size=MAX_MESSAGE,
            # the streams carry TLS ciphertext, which does not compress; and inflating
            # is work a hostile link should not get out of the relay
            compression=None,
            server_header=None,
            # a link whose pongs stopped is dead: close it at once, not after the
            # default 10 s wait for a closing handshake that cannot come (the design's
            # "dead within 10 s" holds at the relay too)
            close_timeout=CLOSE_TIMEOUT,
        )
        self._sweeper = asyncio.create_task(self._sweep_forever())
        self.polls.start()
        if self._follower is not None:
            self._loop = asyncio.get_running_loop()
            self._beat()
            self._heartbeat = asyncio.create_task(self._beat_forever())
            self._follower.start()
        log.info("home relay %s on %s:%d", self.config.host, self.config.listen, self.port)

    def metric_families(self) -> list[Metric]:
        """The relay's counters and table as Prometheus families (called per scrape, in
        the metrics server's thread: reads copies, never the live dicts' iterators)."""
        counters = self.counters.copy()
        counters.update(self.polls.counters)
        links: dict[tuple[str, ...], float] = {}
        for link in list(self._links.values()):
            links[(str(link.side),)] = links.get((str(link.side),), 0) + 1
        return [
            metrics.counter(
                "home_relay_events_total",
                "Registrations, takeovers, refusals, drops and routes, by event",
                ["event"],
                {(name,): float(value) for name, value in counters.items()},
            ),
            metrics.gauge(
                "home_relay_households",
                "Claimed households by state",
                ["state"],
                {(state,): float(n) for state, n in self.registrations.states().items()},
            ),
            metrics.gauge("home_relay_links", "Open links by side", ["side"], links),
            metrics.one_gauge("home_relay_routes", "Streams the relay routes", len(self._routes)),
        ]

    @property
    def port(self) -> int:
        if self._server is None:
            raise RuntimeError("the relay is not started")
        port: int = next(iter(self._server.sockets)).getsockname()[1]
        return port

    @property
    def route_count(self) -> int:
        """Streams the relay currently routes."""
        return len(self._routes)

    async def close(self) -> None:
        if self._heartbeat is not None:
            self._heartbeat.cancel()
            self._heartbeat = None
        if self._follower is not None:
            await asyncio.to_thread(self._follower.stop)
            self._follower = None
        for task in list(self._dialling.values()):
            task.cancel()
        for peer in list(self._peers.values()):
            await peer.ws.close()
        if self._sweeper is not None:
            self._sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sweeper
            self._sweeper = None
        await self.polls.close()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None
        for task in list(self._watchers):
            task.cancel()
        if self._own_store is not None:
            self._own_store.close()
            self._own_store = None

    # -- HTTP: presence, limits, 404 ----------------------------------------------

    def _process_request(self, connection: ServerConnection, request: Request) -> Response | None:
        path = request.path.partition("?")[0]
        if path == PEER_PATH and self.config.federation is None:
            return connection.respond(http.HTTPStatus.NOT_FOUND, "not found\n")
        if path in (AGENT_PATH, APPLIANCE_PATH, PEER_PATH):
            source = self._source_of(connection.remote_address, request.headers)
            refusal = self._admit(source)
            if refusal is not None:
                return connection.respond(http.HTTPStatus.TOO_MANY_REQUESTS, refusal)
            # counted until the TCP connection is gone (a callback, not a task per link:
            # an idle household costs less)
            connection.connection_lost_waiter.add_done_callback(lambda _lost: self._release(source))
            return None
        if path.startswith(PRESENCE_PREFIX):
            name = path[len(PRESENCE_PREFIX) :]
            if not frames.HOUSEHOLD_RE.fullmatch(name):
                return connection.respond(http.HTTPStatus.BAD_REQUEST, "not a household name\n")
            presence = self.registrations.presence(name, self.wall_clock())
            if presence is None:
                return connection.respond(http.HTTPStatus.NOT_FOUND, "no such household\n")
            response = connection.respond(http.HTTPStatus.OK, json.dumps(presence) + "\n")
            del response.headers["Content-Type"]
            response.headers["Content-Type"] = "application/json"
            return response
        return connection.respond(http.HTTPStatus.NOT_FOUND, "not found\n")

    def _source_of(self, remote: Any, headers: Headers) -> str:
        """The address a link counts as coming from (sources.py: a trusted front's word)."""
        peer = str(remote[0]) if remote else "?"
        fronts = self.config.limits.trusted_fronts
        return link_source(peer, headers.get_all(HEADER), fronts) if fronts else peer

    def _source(self, connection: RelayLinkConnection) -> str:
        request = connection.request
        headers = request.headers if request is not None else Headers()
        return self._source_of(connection.remote_address, headers)

    def _admit(self, source: str) -> str | None:
        """Count one more link from `source`, or say why not (the per-source limit)."""
        if self._per_source[source] >= self.config.limits.links_per_source:
            self.counters["source_limit"] += 1
            log.warning("refused a link from %s: too many links from it", source)
            return "too many links\n"
        self._per_source[source] += 1
        return None

    def _release(self, source: str) -> None:
        self._per_source[source] -= 1
        if self._per_source[source] <= 0:
            del self._per_source[source]

    async def _release_source(self, connection: RelayLinkConnection, source: str) -> None:
        try:
            await connection.wait_closed()
        finally:
            self._release(source)

    async def _serve_poll(self, session: PollSession) -> None:
        """A long-poll link, admitted by `_admit`: served as a WebSocket one."""
        try:
            await self._handle(session)
        finally:
            session.end(1000)  # as websockets closes a link whose handler returned
            await self._release_source(session, self._source(session))

    # -- links -------------------------------------------------------------------

    async def _handle(self, ws: ServerConnection | PollSession) -> None:
        path = ws.request.path.partition("?")[0] if ws.request else ""
        self._next_link += 1
        side = Side.AGENT if path == AGENT_PATH else Side.APPLIANCE
        source = self._source(ws)  # the agent learns it with each OPEN, if it is an address
        link = _Link(
            self._next_link, ws, side, source if frames.SOURCE_RE.fullmatch(source) else ""
        )
        self._links[link.id] = link
        self.counters["peer_links" if path == PEER_PATH else f"{side}_links"] += 1
        if path == PEER_PATH and not await self._peer_in(link):
            self._links.pop(link.id, None)
            return
        await self._serve(link)

    async def _serve(self, link: _Link) -> None:
        """Read the link until it ends, then forget it (whichever side dialled)."""
        ws, side = link.ws, link.side
        try:
            if side is Side.AGENT and not link.peer and not await self._register(link):
                return
            await self._read(link)
        except ConnectionClosed:
            pass
        except Exception:
            # a bug must cost one link, never the relay
            self.counters["internal_errors"] += 1
            log.exception("link %d (%s) failed", link.id, side)
            await ws.close(1011, "internal error")
        finally:
            link.closing = True
            if link.sender is not None:
                link.sender.cancel()
            link.outbound.clear()
            link.outbound_bytes = 0
            self._links.pop(link.id, None)
            self._link_gone(link)

    # -- the federation: peer links, the store's events, heartbeats ---------------

    def _alive(self, relay: str) -> bool:
        beat = self._relays.get(relay)
        return beat is not None and self.wall_clock() - beat[1] < federation.DEAD_AFTER

    def _beat(self) -> None:
        """This relay's heartbeat, and the others' (a store call on the loop: ~1 ms)."""
        fed, store = self.config.federation, self._own_store
        if fed is None or store is None:
            return
        now = self.wall_clock()
        try:
            store.heartbeat(self.me, fed.url, now)
            self._relays = store.relays()
            if int(now) % 60 < federation.HEARTBEAT:
                store.prune_events(now - 3600.0)
        except Exception:
            self.counters["internal_errors"] += 1
            log.exception("the federation's heartbeat failed")

    async def _beat_forever(self) -> None:
        while True:
            await asyncio.sleep(federation.HEARTBEAT)
            self._beat()

    def _from_store(self, events: list[LinkEvent]) -> None:
        """The follower's thread: hand a batch of the others' changes to the loop."""
        self._loop.call_soon_threadsafe(self._apply, events)

    def _apply(self, events: list[LinkEvent]) -> None:
        if self._own_store is not None and any(e.relay not in self._relays for e in events):
            try:  # a relay that joined since the last heartbeat
                self._relays = self._own_store.relays()
            except Exception:
                self.counters["internal_errors"] += 1
                log.exception("reading the federation's relays failed")
        moved: set[str] = set()
        for event in events:
            before = self.registrations.where(event.name)
            if before is not None:
                self._held_at[event.name] = before
            replaced = self.registrations.apply(event)
            after = self.registrations.where(event.name)
            if after is not None:
                # now at another relay than the one this relay's routes lead to
                if after and self._held_at.get(event.name, after) != after:
                    moved.add(event.name)
                self._held_at[event.name] = after
            old = self._links.get(replaced) if replaced is not None else None
            if old is None:
                continue
            self.counters["taken_elsewhere"] += 1
            log.info(
                "household %s registered at relay %s: link %d closed",
                event.name,
                event.relay,
                old.id,
            )
            task = asyncio.create_task(old.ws.close(CLOSE_REPLACED, "registered elsewhere"))
            self._watchers.add(task)
            task.add_done_callback(self._watchers.discard)
        self._relink(moved)

    async def _peer_in(self, link: _Link) -> bool:
        """A relay of the federation links in: its proof of the shared secret."""
        fed = self.config.federation
        assert fed is not None
        nonce = challenge()
        try:
            await link.ws.send(json.dumps(challenge_message(nonce)))
            message = await asyncio.wait_for(link.ws.recv(), REGISTER_TIMEOUT)
            parsed = json.loads(message) if isinstance(message, str) else None
        except (TimeoutError, ConnectionClosed, ValueError, RecursionError):
            parsed = None
        result = federation.verify_peer(parsed, nonce, fed.secret)
        if isinstance(result, RegistrationRefused):
            await self._refuse(link, result)
            return False
        try:
            await link.ws.send(json.dumps({"type": "peered", "relay": self.me}))
        except ConnectionClosed:
            return False
        link.peer = result
        log.info("relay %s linked in from %s (link %d)", result, link.source, link.id)
        return True

    def _to_peer(self, relay: str, data: bytes) -> bool:
        """Queue `data` for the peer link to `relay`, dialling it first if need be (the
        frames wait in order meanwhile: no reader ever waits for a dial)."""
        link = self._peers.get(relay)
        if link is not None and not link.closing:
            return self._send(link, data)
        pending = self._pending.setdefault(relay, deque())
        if sum(map(len, pending)) + len(data) > self.config.limits.link_queue_bytes:
            self.counters["dropped_closed"] += 1
            return False
        pending.append(data)
        if self.clock() < self._peer_retry.get(relay, 0.0):  # it failed a moment ago
            self._peer_failed(relay)
            return False
        if relay not in self._dialling:
            task = self._dialling[relay] = asyncio.create_task(self._dial_peer(relay))
            task.add_done_callback(lambda _t: self._dialling.pop(relay, None))
        return True

    def _peer_failed(self, relay: str) -> None:
        """The peer link did not come up: the OPENs that waited for it are refused (the
        appliance hears "offline" at once), the rest dropped (the ends resume)."""
        for data in self._pending.pop(relay, deque()):
            frame = frames.decode(data)
            route = self._routes.get(frame.token)
            if frame.kind is Kind.OPEN and route is not None and route.appliance is not None:
                self._reset_back(route.appliance, frame.token, Reset.OFFLINE, "household offline")
                self._forget(frame.token, "routes_reset")
            else:
                self.counters["dropped_no_agent"] += 1

    async def _dial_peer(self, relay: str) -> None:
        fed = self.config.federation
        beat = self._relays.get(relay)
        if fed is None or beat is None or relay == self.me:
            self._peer_failed(relay)
            return
        ws = None
        try:
            ws = await connect(
                beat[0],
                ssl=self._peer_tls,
                server_hostname=self.config.host,
                compression=None,
                ping_interval=PING_INTERVAL,
                ping_timeout=PING_TIMEOUT,
                close_timeout=CLOSE_TIMEOUT,
                open_timeout=federation.PEER_DIAL_TIMEOUT,
                max_size=MAX_MESSAGE,
                proxy=None,
            )
            nonce = parse_challenge(await ws.recv())
            await ws.send(json.dumps(federation.peer_message(fed.secret, nonce, self.me)))
            answer = json.loads(await ws.recv())
            if not isinstance(answer, dict) or answer.get("type") != "peered":
                raise ValueError("the relay did not take the peer link")
            if answer.get("relay") != relay:
                raise ValueError(f"{beat[0]} is relay {answer.get('relay')!r}, not {relay}")
        except (OSError, TimeoutError, WebSocketException, ValueError, RecursionError) as exc:
            self.counters["peer_dial_failures"] += 1
            self._peer_retry[relay] = self.clock() + PEER_RETRY
            log.warning("relay %s at %s: no peer link: %s", relay, beat[0], exc)
            if ws is not None:
                with contextlib.suppress(Exception):
                    await ws.close(CLOSE_MALFORMED, "no peer link")
            self._peer_failed(relay)
            return
        self._next_link += 1
        link = _Link(self._next_link, ws, Side.AGENT, source=beat[0], peer=relay)
        self._links[link.id] = link
        self._peers[relay] = link
        self.counters["peers_dialled"] += 1
        log.info("linked to relay %s at %s (link %d)", relay, beat[0], link.id)
        for data in self._pending.pop(relay, deque()):
            self._send(link, data)
        task = asyncio.create_task(self._serve(link))
        self._watchers.add(task)
        task.add_done_callback(self._watchers.discard)

    async def _register(self, link: _Link) -> bool:
        ws = link.ws
        source = self._source(ws)
        nonce = challenge()
        await ws.send(json.dumps(challenge_message(nonce)))
        try:
            message = await asyncio.wait_for(ws.recv(), REGISTER_TIMEOUT)
        except TimeoutError:
            return await self._refuse(link, RegistrationRefused(CLOSE_MALFORMED, "no register"))
        if not isinstance(message, str):
            return await self._refuse(
                link, RegistrationRefused(CLOSE_MALFORMED, "register is a text message")
            )
        result = verify_registration(message, nonce, self.config.host)
        if isinstance(result, RegistrationRefused):
            return await self._refuse(link, result)
        now = self.wall_clock()
        rekeyed = self.registrations.rekeyed
        refusal = self.registrations.claim_or_check(
            result.household, result.key, now, result.previous
        )
        if self.registrations.rekeyed != rekeyed:
            self.counters["rekeyed"] += 1
            log.info(
                "household %s moved from key %s to its renewed certificate's key %s",
                result.household,
                result.previous,
                result.key,
            )
        if refusal is not None:
            log.warning(
                "refused household %s key %s from %s: %s",
                result.household,
                result.key,
                source,
                refusal.reason,
            )
            return await self._refuse(link, refusal, logged=True)
        try:
            previous = self.registrations.online(result.household, result.key, link.id, now)
        except NameMoved:
            moved = RegistrationRefused(CLOSE_CLAIMED, "household name claimed by another key")
            return await self._refuse(link, moved)
        link.household = result.household
        old = self._links.get(previous) if previous is not None else None
        if old is not None:
            self.counters["takeovers"] += 1
            log.info("household %s: link %d replaces link %d", link.household, link.id, old.id)
            task = asyncio.create_task(old.ws.close(CLOSE_REPLACED, "replaced"))
            self._watchers.add(task)
            task.add_done_callback(self._watchers.discard)
        self.counters["registered"] += 1
        log.info("household %s registered by key %s from %s", link.household, result.key, source)
        await ws.send(json.dumps(registered_message(result.household)))
        return True

    async def _refuse(
        self, link: _Link, refusal: RegistrationRefused, *, logged: bool = False
    ) -> bool:
        self.counters["registration_refused"] += 1
        if not logged:
            log.warning(
                "refused a registration from %s: %d %s",
                self._source(link.ws),
                refusal.code,
                refusal.reason,
            )
        await link.ws.close(refusal.code, refusal.reason)
        return False

    async def _read(self, link: _Link) -> None:
        async for message in link.ws:
            if isinstance(message, str):
                counter = "text_after_registration" if link.side is Side.AGENT else "bad_frames"
                self.counters[counter] += 1
                await link.ws.close(CLOSE_MALFORMED, "a text message where a frame belongs")
                return
            try:
                frame = frames.decode(message)
            except FrameError as exc:
                self.counters["bad_frames"] += 1
                log.info("link %d (%s): closed for a bad frame: %s", link.id, link.side, exc)
                await link.ws.close(CLOSE_MALFORMED, "not a frame")
                return
            if link.side is Side.AGENT and link.peer:
                await self._from_peer(link, frame, message)
            elif link.side is Side.AGENT:
                await self._from_agent(link, frame, message)
            else:
                await self._from_appliance(link, frame, message)

    def _link_gone(self, link: _Link) -> None:
        if link.peer and self._peers.get(link.peer) is link:
            del self._peers[link.peer]
        if link.side is Side.AGENT and link.peer:
            # what was in flight on it is lost, and neither end saw a link drop: the
            # appliances of the households that relay holds resume on a new path
            self._relink({r.household for r in self._routes.values()
                          if self.registrations.where(r.household) == link.peer})  # fmt: skip
            return
        if link.side is Side.AGENT:
            try:
                gone = link.household and self.registrations.offline(
                    link.household, link.id, self.wall_clock()
                )
            except Exception:  # the store: the link is gone either way
                self.counters["internal_errors"] += 1
                log.exception("household %s: going offline was not written", link.household)
                return
            if gone:
                log.info("household %s offline (link %d closed)", link.household, link.id)
            return
        for token in link.tokens:
            route = self._routes.get(token)
            if route is not None and route.appliance is link:
                route.appliance = None
        link.tokens.clear()

    def _relink(self, households: set[str]) -> None:
        """Close the appliance links holding streams of `households`: they link again
        and resume every stream, which rebuilds the routes along the new path."""
        if not households:
            return
        for other in list(self._links.values()):
            if other.side is not Side.APPLIANCE or other.peer or other.closing:
                continue
            if not any(
                (route := self._routes.get(t)) is not None and route.household in households
                for t in other.tokens
            ):
                continue
            self.counters["relinks"] += 1
            log.info("link %d: its households' path changed; closed to resume", other.id)
            other.closing = True
            task = asyncio.create_task(other.ws.close(CLOSE_RELINK, "link again and resume"))
            self._watchers.add(task)
            task.add_done_callback(self._watchers.discard)

    # -- routing -----------------------------------------------------------------

    def _agent_of(self, household: str) -> _Link | None:
        """The link towards the household's agent: its own, or the peer link to the
        relay that holds it (None: offline, or that peer link is not up)."""
        where = self.registrations.where(household)
        if where:
            peer = self._peers.get(where)
            return peer if peer is not None and not peer.closing else None
        link_id = self.registrations.link(household)
        return self._links.get(link_id) if link_id is not None else None

    def _to_agent(self, household: str, data: bytes) -> bool | None:
        """Queue `data` towards the household's agent: True sent, False dropped, None
        nobody holds the household."""
        link = self._agent_of(household)
        if link is not None:
            return self._send(link, data)
        where = self.registrations.where(household)
        return self._to_peer(where, data) if where else None

    def _send(self, link: _Link, data: bytes) -> bool:
        """Queue `data` for `link` without waiting; False when it is dropped (the link
        is closing, or this frame took its queue past the limit and closed it)."""
        if link.closing:
            self.counters["dropped_closed"] += 1
            return False
        link.outbound.append(data)
        link.outbound_bytes += len(data)
        limit = self.config.limits.link_queue_bytes
        if link.outbound_bytes > (limit * PEER_QUEUE_FACTOR if link.peer else limit):
            self._close_slow(link)
            return False
        if link.sender is None:  # one sender at a time, and none for an idle link
            link.sender = asyncio.create_task(self._drain(link))
        return True

    def _close_slow(self, link: _Link) -> None:
        """The link does not read what it is sent: close it, never its sources."""
        self.counters["slow_links_closed"] += 1
        self.counters["dropped_closed"] += len(link.outbound)
        log.warning(
            "link %d (%s %s) closed: %d bytes wait for it",
            link.id,
            link.side,
            link.household or link.source,
            link.outbound_bytes,
        )
        link.closing = True
        link.outbound.clear()
        link.outbound_bytes = 0
        if link.sender is not None:
            link.sender.cancel()  # it may be waiting in send() for the link to drain
        task = asyncio.create_task(link.ws.close(CLOSE_TOO_SLOW, "too slow"))
        self._watchers.add(task)
        task.add_done_callback(self._watchers.discard)

    async def _drain(self, link: _Link) -> None:
        """The link's sender task while it has frames queued: the only place that waits
        for the link to drain.  It ends when the queue is empty (an idle household then
        costs no task), and `_send` starts the next one."""
        try:
            await self._drain_queue(link)
        finally:
            link.sender = None

    async def _drain_queue(self, link: _Link) -> None:
        while link.outbound:
            data = link.outbound.popleft()
            link.outbound_bytes -= len(data)
            try:
                await link.ws.send(data)
            except ConnectionClosed:
                self.counters["dropped_closed"] += 1 + len(link.outbound)
                link.closing = True
                link.outbound.clear()
                link.outbound_bytes = 0
                return
            except Exception:
                # a bug must cost one link, never the relay
                self.counters["internal_errors"] += 1
                log.exception("link %d (%s): sending failed", link.id, link.side)
                link.closing = True
                link.outbound.clear()
                link.outbound_bytes = 0
                await link.ws.close(1011, "internal error")
                return

    def _reset_back(self, link: _Link, token: bytes, code: Reset, reason: str) -> None:
        self._send(link, frames.encode_reset(token, code, reason))

    async def _from_appliance(self, link: _Link, frame: Frame, raw: bytes) -> None:
        token = frame.token
        route = self._routes.get(token)
        if frame.kind is Kind.OPEN:
            await self._open(link, frame, route)
            return
        if frame.kind is Kind.RESUME:
            if route is None:
                learned = self._learn_from_appliance(link, frame)
                if learned is None:
                    return
                route = learned
            elif route.household != frame.household:
                self.counters["cross_household"] += 1
                self._reset_back(link, token, Reset.UNKNOWN, "unknown stream")
                return
            if route.appliance is not link:
                if route.appliance is not None:
                    route.appliance.tokens.discard(token)
                route.appliance = link
                link.tokens.add(token)
        elif route is None:
            if frame.kind is not Kind.RESET:  # never answer a RESET with one
                self.counters["unknown_token"] += 1
                self._reset_back(link, token, Reset.UNKNOWN, "unknown stream")
            return
        await self._forward(route, link, frame, raw, Side.APPLIANCE)

    def _learn_from_appliance(self, link: _Link, frame: Frame) -> _Route | None:
        """A RESUME of a token the relay does not know, from an appliance link: the
        route, within the limits an OPEN has (None: refused, answered).  While the
        household is offline the route is learned uncounted (the per-link limit bounds
        it; the linger sweep ends it) and counted when the agent speaks on it."""
        token = frame.token
        if self.registrations.presence(frame.household) is None:
            self.counters["unknown_token"] += 1
            self._reset_back(link, token, Reset.UNKNOWN, "no such household")
            return None
        if not link.peer and len(link.tokens) >= self.config.limits.streams_per_appliance_link:
            self.counters["resume_limit"] += 1
            self._reset_back(link, token, Reset.LIMIT, "too many streams on this link")
            return None
        refusal = self.registrations.streams_opened(frame.household, self.wall_clock())
        if refusal is Reset.LIMIT:
            self.counters["resume_limit"] += 1
            self._reset_back(link, token, Reset.LIMIT, "household refused the stream")
            return None
        route = self._routes[token] = _Route(
            frame.household, None, refusal is None, last_frame=self.clock()
        )
        self.counters["routes_learned"] += 1
        return route

    async def _open(self, link: _Link, frame: Frame, route: _Route | None) -> None:
        token = frame.token
        if route is not None:
            self.counters["protocol"] += 1
            self._reset_back(link, token, Reset.PROTOCOL, "stream token in use")
            return
        where = self.registrations.where(frame.household)
        if where is None:
            self.counters["open_offline"] += 1
            self._reset_back(link, token, Reset.OFFLINE, "household offline")
            return
        if not link.peer and len(link.tokens) >= self.config.limits.streams_per_appliance_link:
            self.counters["open_limit"] += 1
            self._reset_back(link, token, Reset.LIMIT, "too many streams on this link")
            return
        # a household at another relay: that relay counts its streams
        refusal = (
            None if where else self.registrations.streams_opened(frame.household, self.wall_clock())
        )
        if refusal is not None:
            counter = "open_offline" if refusal is Reset.OFFLINE else "open_limit"
            self.counters[counter] += 1
            self._reset_back(link, token, refusal, "household refused the stream")
            return
        self._routes[token] = _Route(
            frame.household, link, counted=not where, last_frame=self.clock()
        )
        link.tokens.add(token)
        self.counters["routes_opened"] += 1
        # the agent learns the source as the relay saw it, never what the appliance wrote
        # (a peer relay is trusted to pass on what it saw)
        source = frame.source if link.peer else link.source
        if self._to_agent(frame.household, frames.encode_open(token, frame.household, source)):
            self.counters["forwarded"] += 1
        else:
            self._forget(token, "routes_reset")
            self._reset_back(link, token, Reset.OFFLINE, "household offline")

    async def _from_agent(self, link: _Link, frame: Frame, raw: bytes) -> None:
        token = frame.token
        route = self._routes.get(token)
        if frame.kind is Kind.OPEN:
            self.counters["protocol"] += 1
            self._reset_back(link, token, Reset.PROTOCOL, "an agent does not open")
            return
        if route is not None and route.household != link.household:
            self.counters["cross_household"] += 1
            log.warning(
                "household %s used a stream of household %s", link.household, route.household
            )
            self._reset_back(link, token, Reset.UNKNOWN, "unknown stream")
            return
        if route is None:
            if frame.kind is not Kind.RESUME:
                if frame.kind is not Kind.RESET:
                    self.counters["unknown_token"] += 1
                    self._reset_back(link, token, Reset.UNKNOWN, "unknown stream")
                return
            # counted, so the household's MAX_STREAMS bounds what one agent link learns
            if self.registrations.streams_opened(link.household, self.wall_clock()) is not None:
                self.counters["resume_limit"] += 1
                self._reset_back(link, token, Reset.LIMIT, "too many streams")
                return
            route = self._routes[token] = _Route(
                link.household, None, counted=True, last_frame=self.clock()
            )
            self.counters["routes_learned"] += 1
        elif not route.counted and frame.kind is not Kind.RESET:
            # learned from an appliance while the household was offline
            if self.registrations.streams_opened(link.household, self.wall_clock()) is not None:
                self.counters["resume_limit"] += 1
                self._reset_both(route, token, link, Reset.LIMIT, "too many streams")
                return
            route.counted = True
        await self._forward(route, link, frame, raw, Side.AGENT)

    async def _from_peer(self, link: _Link, frame: Frame, raw: bytes) -> None:
        """Frames from a relay this one dialled: its households' agents speaking to
        appliances linked here.  A token is bound to one household, and only to one
        that relay holds now."""
        token = frame.token
        route = self._routes.get(token)
        if frame.kind is Kind.OPEN:
            self.counters["protocol"] += 1
            self._reset_back(link, token, Reset.PROTOCOL, "an agent does not open")
            return
        household = route.household if route is not None else frame.household
        if self.registrations.where(household) != link.peer:
            if route is not None:
                self.counters["cross_household"] += 1
                log.warning(
                    "relay %s spoke for household %s, which it does not hold", link.peer, household
                )
            elif frame.kind is not Kind.RESET:
                self.counters["unknown_token"] += 1
            if frame.kind is not Kind.RESET:
                self._reset_back(link, token, Reset.UNKNOWN, "unknown stream")
            return
        if route is None:
            if frame.kind is not Kind.RESUME:
                if frame.kind is not Kind.RESET:
                    self.counters["unknown_token"] += 1
                    self._reset_back(link, token, Reset.UNKNOWN, "unknown stream")
                return
            route = self._routes[token] = _Route(
                household, None, counted=False, last_frame=self.clock()
            )
            self.counters["routes_learned"] += 1
        await self._forward(route, link, frame, raw, Side.AGENT)

    async def _forward(
        self, route: _Route, source: _Link, frame: Frame, raw: bytes, sender: Side
    ) -> None:
        token = frame.token
        if frame.kind is Kind.DATA:
            end = frame.offset + len(frame.payload)
            if end > route.acked[sender] + WINDOW:
                self.counters["window_violations"] += 1
                log.info(
                    "stream of household %s: %s sent DATA up to %d, acknowledged %d",
                    route.household,
                    sender,
                    end,
                    route.acked[sender],
                )
                self._reset_both(route, token, source, Reset.PROTOCOL, "DATA beyond the window")
                return
            await self._throttle(route.household, len(frame.payload))
        route.last_frame = self.clock()
        done = self._track(route, frame, sender)
        if sender is Side.APPLIANCE:
            sent = self._to_agent(route.household, raw)
        else:
            sent = None if route.appliance is None else self._send(route.appliance, raw)
        if sent is None:
            self.counters[
                "dropped_no_agent" if sender is Side.APPLIANCE else "dropped_no_appliance"
            ] += 1
        elif sent:
            self.counters["forwarded"] += 1
        if done is not None and self._routes.get(token) is route:
            self._forget(token, done)

    def _reset_both(
        self, route: _Route, token: bytes, source: _Link, code: Reset, reason: str
    ) -> None:
        """End the stream for both ends (the one that sent `source` its frame too) and
        forget it."""
        ends = {source, route.appliance, self._agent_of(route.household)}
        for end in ends:
            if end is not None:
                self._reset_back(end, token, code, reason)
        if self._routes.get(token) is route:
            self._forget(token, "routes_reset")

    def _track(self, route: _Route, frame: Frame, sender: Side) -> str | None:
        """Whether this frame ends the route (the counter to count it under)."""
        if frame.kind is Kind.RESET:
            return "routes_reset"
        other = Side.AGENT if sender is Side.APPLIANCE else Side.APPLIANCE
        if frame.kind in (Kind.ACK, Kind.RESUME):
            # the receiver's word on what it has of the other side's bytes: the window
            route.acked[other] = max(route.acked[other], frame.offset)
        if frame.kind is Kind.FIN:
            route.fin.setdefault(sender, frame.offset)
        elif frame.kind is Kind.ACK and route.fin.get(other) == frame.offset - 1:
            route.finished.add(other)
            if len(route.finished) == 2:
                return "routes_finished"
        return None

    async def _throttle(self, household: str, n: int) -> None:
        rate = self.config.limits.household_bytes_per_second
        if rate <= 0:
            return
        now = self.clock()
        bucket = self._buckets.get(household)
        if bucket is None:
            bucket = self._buckets[household] = _Bucket(rate, now)
        wait = bucket.delay(n, now)
        if wait > 0:
            await asyncio.sleep(wait)

    def _forget(self, token: bytes, why: str) -> None:
        route = self._routes.pop(token, None)
        if route is None:
            return
        self.counters[why] += 1
        if route.appliance is not None:
            route.appliance.tokens.discard(token)
        if route.counted:
            self.registrations.streams_closed(route.household, self.wall_clock())

    # -- linger ------------------------------------------------------------------

    def sweep(self) -> None:
        """Forget routes one of whose ends has been gone longer than the linger time
        (the ends have given up on the stream by then), and routes silent too long
        (`idle`; after a FIN, linger and a margin: the other FIN may have passed before
        a restart of the relay, so the route would never finish)."""
        now = self.clock()
        for token, route in list(self._routes.items()):
            silent = now - route.last_frame
            if silent > self.idle or (route.fin and silent > self.linger + IDLE_MARGIN):
                self._forget(token, "routes_idle")
                continue
            present = (
                route.appliance is not None
                and self.registrations.where(route.household) is not None
            )
            if present:
                route.gone_since = None
            elif route.gone_since is None:
                route.gone_since = now
            elif now - route.gone_since > self.linger:
                self._forget(token, "routes_expired")
        for household, bucket in list(self._buckets.items()):
            if bucket.level + (now - bucket.stamp) * bucket.rate >= bucket.capacity:
                del self._buckets[household]

    async def _sweep_forever(self) -> None:
        interval = max(0.05, min(5.0, self.linger / 4))
        while True:
            await asyncio.sleep(interval)
            self.sweep()
