"""A guest's connection to a household's own server, through the household's agent.

A visitor whose agent sits behind a home relay (docs/home-relay.md) has personal
servers that are no addresses: the session holds "agent:USER@HOUSEHOLD.RELAY#PIN"
and the gate's Upstream carries that spec in `agent`.  The relay reaches such a
server in four steps, all within one deadline (`AgentStreams.timeout`, the
config's `[agent] timeout`: the same as the portal's `open_server_stream`, since the
agent connects to the household's server inside it):

1. a stream from the dialer role (`dialer_client.dial_async`: OPEN RELAY HOUSEHOLD);
2. TLS to the agent over it, pinned by the spec's fingerprint (`UpstreamTls.pinned`);
3. the signed `POST /v1/connect` {"user", "service"} (`client.ConnectCall`, shared
   with the blocking client);
4. on `HTTP/1.1 200` the bytes are the server's: `AgentPump` becomes the Link's
   ordinary upstream Pump (what came after the head goes to the guest first).

Any failure is an `AgentStreamFailed(code, reason)`: the Link logs it as a failed
upstream and the guest gets the relay's refusal dialog, never the site's server.
"""

from __future__ import annotations

import asyncio
import logging

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from appliance.agent import client
from appliance.core import agent_protocol as wire
from appliance.core.config import Config, HomeRelayConfig
from appliance.homelink import dialer_client
from appliance.proxy.tracked import Pump, Tracked, failure
from appliance.proxy.upstream_tls import UpstreamTls

log = logging.getLogger("appliance.proxy.agent_stream")


class AgentStreamFailed(Exception):
    """No stream to the household's server: `code` (the dialer's, the agent's
    no_login / no_server / server_unreachable, bad_certificate, ...) and words for logs."""

    def __init__(self, code: str, reason: str) -> None:
        super().__init__(f"{code}: {reason}")
        self.code = code
        self.reason = reason


class AgentStreams:
    """What the relay needs to open streams through agents: the home relay settings,
    the appliance's key (read from its file once, on first use, not per connection)
    and the setup deadline."""

    def __init__(
        self,
        home_relay: HomeRelayConfig,
        timeout: float,
        key: Ed25519PrivateKey | None = None,
        config: Config | None = None,
    ) -> None:
        if key is None and config is None:
            raise ValueError("an appliance key, or the config to load it from")
        self.home_relay = home_relay
        self.timeout = timeout
        self._key = key
        self._config = config

    @classmethod
    def from_config(cls, config: Config) -> AgentStreams:
        return cls(config.home_relay, config.agent.timeout, config=config)

    def key(self) -> Ed25519PrivateKey:
        if self._key is None:
            assert self._config is not None
            self._key = client.appliance_key(self._config)
        return self._key

    async def open(self, link: Tracked, agent_spec: str, service: str) -> AgentPump:
        """The household server's stream for `link` (not yet joined: `AgentPump.join`),
        or AgentStreamFailed.  The caller bounds it with `timeout`."""
        try:
            spec = client.parse_spec(agent_spec)
        except client.AgentError as exc:
            raise AgentStreamFailed(exc.code, exc.message) from None
        where = dialer_client.relayed(self.home_relay, spec.host)
        if where is None or not spec.fingerprint:
            raise AgentStreamFailed("bad_address", "not an agent behind a listed relay, pinned")
        tls = UpstreamTls.pinned(spec.fingerprint)
        loop = asyncio.get_running_loop()
        try:
            _reader, writer = await dialer_client.dial_async(
                self.home_relay, where[0], where[1], self.timeout
            )
        except dialer_client.DialerError as exc:
            raise AgentStreamFailed(exc.code, exc.message) from None
        pump = AgentPump(link, loop, writer)
        try:
            transport = await loop.start_tls(
                writer.transport, pump, tls.context(), server_hostname=None
            )
            if transport is None:
                raise AgentStreamFailed("unreachable", "the stream closed during TLS")
            pump.connection_made(transport)  # (start_tls does not call it)
            ssl_object = transport.get_extra_info("ssl_object")
            why = tls.problem(ssl_object)
            if why is not None:
                raise AgentStreamFailed("bad_certificate", f"the agent's {why}")
            peer = wire.fingerprint(ssl_object.getpeercert(binary_form=True) or b"")
            try:
                call = client.ConnectCall(spec, self.key(), peer, spec.user, service)
            except client.AgentError as exc:
                raise AgentStreamFailed(exc.code, exc.message) from None
            transport.write(call.request)
            await pump.answered(call)
        except AgentStreamFailed:
            pump.drop()
            raise
        except (OSError, EOFError) as exc:  # (ssl.SSLError is an OSError)
            pump.drop()
            raise AgentStreamFailed("unreachable", failure(exc)) from None
        except BaseException:  # the deadline (cancelled), the relay stopping
            pump.drop()
            raise
        return pump


class AgentPump(Pump):
    """The Link's upstream Pump for a stream through an agent: what the agent sends
    before the join is held as any Pump's, and read here for the answer head (the
    server's first bytes follow it); after the join it behaves as Pump."""

    __slots__ = ("_answer", "_call", "_fed", "stream")

    def __init__(
        self, link: Tracked, loop: asyncio.AbstractEventLoop, stream: asyncio.StreamWriter
    ) -> None:
        super().__init__(link)
        # the dialer socket's writer: kept for the connection's life, since a collected
        # StreamWriter closes its transport (the socket under our TLS)
        self.stream = stream
        self._answer: asyncio.Future[None] = loop.create_future()
        self._call: client.ConnectCall | None = None
        self._fed = 0  # bytes after the head given to the refusal reader

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        if self.transport is None:
            super().connection_made(transport)

    async def answered(self, call: client.ConnectCall) -> None:
        """Wait for the agent's answer to `call`: returns on 200, else AgentStreamFailed."""
        self._call = call
        self._check()
        await self._answer

    def _check(self) -> None:
        call = self._call
        if call is None or self._answer.done():
            return
        try:
            status = call.head(bytes(self.held))
        except client.AgentError as exc:
            self._fail(exc.code, exc.message)
            return
        if status is None:
            if self.ended:
                self._fail("bad_answer", "the agent closed the stream without an answer")
            return
        if status == 200:
            self._answer.set_result(None)
            return
        if not self._fed:
            self._fed = call.head_length
        more = bytes(self.held[self._fed :])
        self._fed = len(self.held)
        refusal = call.refusal(more, self.ended)
        if refusal is not None:
            self._fail(refusal.code, f"the household's agent refused: {refusal.message}")

    def _fail(self, code: str, reason: str) -> None:
        self._answer.set_exception(AgentStreamFailed(code, reason))

    def join(self, skip: int = 0) -> None:
        """What arrived after the answer head goes to the guest (Pump.join)."""
        assert self._call is not None
        super().join(skip or self._call.head_length)

    def drop(self) -> None:
        """A failed setup: close the stream (the guest is refused by the Link)."""
        self._call = None  # nobody waits for an answer any more
        self._answer.cancel()
        if self.transport is not None:
            self.transport.abort()
        self.stream.close()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if not self.joined:
            self._check()

    def eof_received(self) -> bool:
        if self.joined:
            return super().eof_received()
        self.ended = True
        self._check()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        if self.joined:
            super().connection_lost(exc)
            return
        self.ended = self.lost = True
        self._check()


__all__ = ["AgentPump", "AgentStreamFailed", "AgentStreams"]
