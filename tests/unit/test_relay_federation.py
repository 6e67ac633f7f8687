"""Federated relays on one real PostgreSQL: real TLS and WebSockets on 127.0.0.1.

What is checked is what a household and an appliance would see: a registration at
relay A is known at relay B at once; a stream an appliance opens at B reaches the
household's agent linked to A; an agent that moves to B takes its name over from its
link at A; a relay that is not of the federation cannot link in; and after kill -9 of
relay A its agent registers at B and an open stream comes out byte-exact.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import signal
import ssl
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from certs import self_signed
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from relay_helpers import free_port
from websockets.asyncio.client import ClientConnection, connect
from websockets.asyncio.connection import Connection
from websockets.exceptions import ConnectionClosed

from appliance.core.tomlfile import ConfigError, TomlFile
from appliance.homelink import frames
from appliance.homelink.frames import Kind
from appliance.homelink.link import Link, LinkStream
from appliance.homelink.registration import (
    CLOSE_BAD_SIGNATURE,
    parse_challenge,
    sign_registration,
)
from appliance.homerelay import federation
from appliance.homerelay.config import RelayConfig, parse
from appliance.homerelay.server import CLOSE_REPLACED, RelayServer
from appliance.homerelay.table import Registrations
from appliance.state.households import LinkEvent

pytestmark = pytest.mark.unit

HOST = "relay.test"
HOUSEHOLD = "bob-home"


@dataclass
class Agent:
    key: ec.EllipticCurvePrivateKey
    der: bytes


def make_agent() -> Agent:
    key = ec.generate_private_key(ec.SECP256R1())
    return Agent(key, self_signed(key, "agent").public_bytes(serialization.Encoding.DER))


@dataclass
class Site:
    """What the relays of one federation share: TLS for the host name, a secret, a store."""

    dir: Path
    cert: Path
    key: Path
    secret: Path
    dsn: str
    tls: ssl.SSLContext

    def config_text(self, name: str, port: int, secret: Path | None = None) -> str:
        return (
            f'[relay]\nhost = "{HOST}"\nlisten = "127.0.0.1"\nport = {port}\n'
            f'certificate = "{self.cert}"\nkey = "{self.key}"\n'
            f'state_directory = "{self.dir / name}"\n'
            f'[state]\nbackend = "postgresql"\ndsn = "{self.dsn}"\n'
            f'[federation]\nname = "{name}"\nurl = "wss://127.0.0.1:{port}/v1/peer"\n'
            f'secret = "{secret or self.secret}"\nca = "{self.cert}"\n'
        )

    def config(self, name: str, port: int, secret: Path | None = None) -> RelayConfig:
        path = self.dir / f"{name}.toml"
        path.write_text(self.config_text(name, port, secret))
        return parse(TomlFile.load(path))


@pytest.fixture
def site(tmp_path: Path, pg_dsn: str) -> Site:
    key = ec.generate_private_key(ec.SECP256R1())
    cert = self_signed(key, HOST)
    (tmp_path / "cert.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (tmp_path / "key.pem").write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    (tmp_path / "federation.key").write_text(os.urandom(32).hex() + "\n")
    tls = ssl.create_default_context(cafile=str(tmp_path / "cert.pem"))
    return Site(
        tmp_path,
        tmp_path / "cert.pem",
        tmp_path / "key.pem",
        tmp_path / "federation.key",
        pg_dsn,
        tls,
    )


def run(coro: Awaitable[None], timeout: float = 30) -> None:
    async def bounded() -> None:
        await asyncio.wait_for(coro, timeout)

    asyncio.run(bounded())


@asynccontextmanager
async def relays(site: Site, *names: str) -> AsyncIterator[list[RelayServer]]:
    servers = [RelayServer(site.config(name, free_port())) for name in names]
    try:
        for server in servers:
            await server.start()
        yield servers
    finally:
        for server in servers:
            await server.close()


def ws_connect(site: Site, port: int, path: str) -> Any:
    return connect(
        f"wss://127.0.0.1:{port}{path}", ssl=site.tls, server_hostname=HOST, max_size=None
    )


async def register(site: Site, port: int, agent: Agent) -> ClientConnection:
    ws: ClientConnection = await ws_connect(site, port, "/v1/agent")
    nonce = parse_challenge(await ws.recv())
    await ws.send(json.dumps(sign_registration(agent.key, agent.der, nonce, HOUSEHOLD, HOST)))
    assert json.loads(await ws.recv()) == {"type": "registered", "household": HOUSEHOLD}
    return ws


async def presence(site: Site, port: int) -> str:
    reader, writer = await asyncio.open_connection(
        "127.0.0.1", port, ssl=site.tls, server_hostname=HOST
    )
    writer.write(f"GET /v1/households/{HOUSEHOLD} HTTP/1.1\r\nHost: {HOST}\r\n\r\n".encode())
    data = await reader.read()
    writer.close()
    head, _, body = data.partition(b"\r\n\r\n")
    if not head.startswith(b"HTTP/1.1 200"):
        return head.split(b"\r\n")[0].decode()
    state: str = json.loads(body)["state"]
    return state


async def until(check: Callable[[], Awaitable[bool]], timeout: float = 5.0) -> float:
    """Seconds until `check` holds (fails the test after `timeout`)."""
    start = time.monotonic()
    while not await check():
        assert time.monotonic() - start < timeout, "timed out"
        await asyncio.sleep(0.01)
    return time.monotonic() - start


async def frame_of(ws: ClientConnection) -> frames.Frame:
    return frames.decode(await asyncio.wait_for(ws.recv(), 5))


# -- configuration and the peer proof (no store needed) ----------------------------


def test_federation_config_is_refused_without_a_shared_store_or_with_a_short_secret(
    tmp_path: Path,
) -> None:
    (tmp_path / "c.pem").write_text("x")
    (tmp_path / "short.key").write_text("too short\n")
    (tmp_path / "good.key").write_text("k" * 40)
    base = (
        '[relay]\nhost = "relay.test"\ncertificate = "c.pem"\nkey = "c.pem"\n'
        'state_directory = "s"\n'
    )
    pg = '[state]\nbackend = "postgresql"\ndsn = "dbname=r"\n'
    fed = '[federation]\nname = "relay-a"\nurl = "wss://192.0.2.10/v1/peer"\n'

    def load(text: str) -> RelayConfig:
        return parse(TomlFile.parse(text, tmp_path / "relay.toml"))

    with pytest.raises(ConfigError, match=r"relay.toml:\d+: federation.name: .*postgresql"):
        load(base + fed + 'secret = "good.key"\n')
    with pytest.raises(ConfigError, match=r"secret.*at least 32 bytes"):
        load(base + pg + fed + 'secret = "short.key"\n')
    with pytest.raises(ConfigError, match=r"url.*/v1/peer"):
        load(base + pg + '[federation]\nname = "a"\nurl = "https://x/"\nsecret = "good.key"\n')
    with pytest.raises(ConfigError, match=r"name"):
        load(base + pg + '[federation]\nname = "A B"\nurl = "wss://x/v1/peer"\nsecret = "g"\n')
    cfg = load(base + pg + fed + 'secret = "good.key"\n')
    assert cfg.federation is not None
    assert (cfg.federation.name, cfg.federation.secret) == ("relay-a", b"k" * 40)
    assert "k" * 40 not in repr(cfg)  # the secret never reaches a log line
    assert load(base).federation is None


def test_the_peer_proof_holds_only_for_the_secret_and_the_nonce() -> None:
    secret, nonce = os.urandom(32), os.urandom(32)
    message = federation.peer_message(secret, nonce, "relay-b")
    assert federation.verify_peer(message, nonce, secret) == "relay-b"
    refused = [
        federation.verify_peer(message, os.urandom(32), secret),
        federation.verify_peer(message, nonce, os.urandom(32)),
        federation.verify_peer({**message, "relay": "relay-c"}, nonce, secret),
    ]
    assert {getattr(r, "code", None) for r in refused} == {CLOSE_BAD_SIGNATURE}
    for garbage in (None, [], {"type": "peer"}, {**message, "proof": "!!"}, "text"):
        assert not isinstance(federation.verify_peer(garbage, nonce, secret), str)


def test_a_registration_elsewhere_replaces_the_local_link_and_the_latest_wins() -> None:
    table = Registrations(None, me="relay-a")
    assert table.claim_or_check("h", "sha256:k", 1.0) is None
    assert table.online("h", "sha256:k", 7, 1.0) is None
    assert table.where("h") == ""
    # relay-b took the household: the local link 7 is the one to close
    assert table.apply(LinkEvent(1, "h", "sha256:k", "relay-b", True, 2.0)) == 7
    assert table.where("h") == "relay-b"
    assert table.presence("h")["state"] == "online"  # type: ignore[index]
    # a link by another key: the name was moved to it (a renewed certificate; the store
    # lets only a name's owner link), and where that link is, the household is
    assert table.apply(LinkEvent(2, "h", "sha256:new", "relay-c", True, 3.0)) is None
    assert table.where("h") == "relay-c"
    # the old key's link ending somewhere says nothing any more
    assert table.apply(LinkEvent(3, "h", "sha256:k", "relay-b", False, 4.0)) is None
    assert table.where("h") == "relay-c"
    assert table.claim_or_check("h", "sha256:k", 4.0) is not None  # the old key lost it
    table.alive = lambda relay: relay != "relay-c"  # relay-c stopped beating
    assert table.where("h") is None
    assert table.presence("h")["state"] == "offline"  # type: ignore[index]
    table.alive = lambda relay: True
    assert table.apply(LinkEvent(4, "h", "sha256:new", "relay-c", False, 5.0)) is None
    assert table.where("h") is None
    # households claimed through another relay since this one loaded appear
    assert table.apply(LinkEvent(5, "new", "sha256:n", "relay-b", True, 6.0)) is None
    assert table.where("new") == "relay-b"


class Store:
    """The table's store, in memory: each link write is an event with the next id."""

    def __init__(self) -> None:
        self.events = 0
        self.owners: dict[str, str] = {}

    def load(self) -> list[Any]:
        return []

    def claim(self, name: str, key: str, claimed_at: float) -> str:
        return self.owners.setdefault(name, key)

    def owner(self, name: str) -> str:
        return self.owners.get(name, "")

    def linked(self, name: str, key: str, relay: str, now: float) -> int:
        self.events += 10
        return self.events

    def unlinked(self, name: str, key: str, relay: str, now: float) -> bool:
        return True


def test_an_event_older_than_this_relays_own_link_does_not_replace_it() -> None:
    # the agent registered at B (event 5), then at A (event 10): when A's follower
    # catches up with event 5, A's newer link stands
    table = Registrations(Store(), me="relay-a")
    assert table.claim_or_check("h", "sha256:k", 1.0) is None
    table.online("h", "sha256:k", 7, 1.0)
    assert table.apply(LinkEvent(5, "h", "sha256:k", "relay-b", True, 1.0)) is None
    assert table.where("h") == ""
    assert table.apply(LinkEvent(11, "h", "sha256:k", "relay-b", True, 2.0)) == 7


# -- two relays on one store -------------------------------------------------------


def test_a_registration_at_a_is_seen_at_b_and_a_stream_opened_at_b_reaches_the_agent(
    site: Site,
) -> None:
    async def go() -> None:
        async with relays(site, "relay-a", "relay-b") as (a, b):
            assert await presence(site, b.port) == "HTTP/1.1 404 Not Found"
            agent_ws = await register(site, a.port, make_agent())
            seen = await until(lambda: _is(presence(site, b.port), "online"), 2.0)
            assert seen < 0.5
            app = await ws_connect(site, b.port, "/v1/appliance")
            token = os.urandom(16)
            await app.send(frames.encode_open(token, HOUSEHOLD, source="6.6.6.6"))
            opened = await frame_of(agent_ws)
            assert (opened.kind, opened.token, opened.household) == (Kind.OPEN, token, HOUSEHOLD)
            assert opened.source == "127.0.0.1"  # what B saw, never the appliance's word
            await agent_ws.send(frames.encode_ack(token, 0))
            await agent_ws.send(frames.encode_data(token, 0, b"+OK home POP3\r\n"))
            assert (await frame_of(app)).kind is Kind.ACK
            data = await frame_of(app)
            assert (data.kind, data.payload) == (Kind.DATA, b"+OK home POP3\r\n")
            await app.send(frames.encode_data(token, 0, b"USER bob\r\n"))
            back = await frame_of(agent_ws)
            assert (back.kind, back.payload) == (Kind.DATA, b"USER bob\r\n")
            assert b.counters["peers_dialled"] == 1 and a.counters["peer_links"] == 1
            # a token of this stream used for another household through the peer is refused
            await app.close()
            await agent_ws.close()

    run(go())


async def _is(probe: Awaitable[str], want: str) -> bool:
    return await probe == want


def test_an_agent_that_moves_to_b_takes_its_name_from_its_link_at_a_at_once(
    site: Site,
) -> None:
    async def go() -> None:
        async with relays(site, "relay-a", "relay-b") as (a, b):
            agent = make_agent()
            old = await register(site, a.port, agent)
            await until(lambda: _is(presence(site, b.port), "online"))
            started = time.monotonic()
            new = await register(site, b.port, agent)
            with pytest.raises(ConnectionClosed):
                await asyncio.wait_for(old.recv(), 2)
            assert old.close_code == CLOSE_REPLACED
            assert time.monotonic() - started < 1.0
            assert a.counters["taken_elsewhere"] == 1
            assert await presence(site, a.port) == "online"  # (at B, as A knows)
            await new.close()
            await until(lambda: _is(presence(site, a.port), "offline"))
            # another key cannot take the name at either relay
            intruder: Connection = await ws_connect(site, b.port, "/v1/agent")
            nonce = parse_challenge(await intruder.recv())
            other = make_agent()
            await intruder.send(
                json.dumps(sign_registration(other.key, other.der, nonce, HOUSEHOLD, HOST))
            )
            with pytest.raises(ConnectionClosed):
                await asyncio.wait_for(intruder.recv(), 2)
            assert intruder.close_code == 4403

    run(go())


def test_a_relay_without_the_federations_secret_cannot_link_in(site: Site) -> None:
    other = site.dir / "other.key"
    other.write_text(os.urandom(32).hex())

    async def go() -> None:
        async with relays(site, "relay-a") as (a,):
            b = RelayServer(site.config("relay-b", free_port(), secret=other))
            await b.start()
            try:
                agent_ws = await register(site, a.port, make_agent())
                await until(lambda: _is(presence(site, b.port), "online"))
                app = await ws_connect(site, b.port, "/v1/appliance")
                token = os.urandom(16)
                await app.send(frames.encode_open(token, HOUSEHOLD))
                refused = await frame_of(app)
                assert (refused.kind, refused.code) == (Kind.RESET, frames.Reset.OFFLINE)
                assert b.counters["peer_dial_failures"] == 1
                assert a.counters["registration_refused"] == 1
                with pytest.raises(TimeoutError):  # the agent heard nothing
                    await asyncio.wait_for(agent_ws.recv(), 0.3)
            finally:
                await b.close()

    run(go())


# -- kill -9 of relay A with a stream open through B --------------------------------


def _spawn(site: Site, name: str, port: int) -> subprocess.Popen[str]:
    path = site.dir / f"{name}.toml"
    path.write_text(site.config_text(name, port))
    return subprocess.Popen(
        [sys.executable, "-m", "appliance.homerelay.cli", "--config", str(path)],
        stderr=subprocess.DEVNULL,
        text=True,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])},
    )


async def exact_through(
    site: Site,
    agent_ports: list[int],
    appliance_port: int,
    midway: Callable[[], Awaitable[None]],
    size: int = 6 << 20,
) -> Link:
    """A stream from an appliance linked at `appliance_port` to an agent that dials
    `agent_ports` in turn (as a name with several addresses would), echoed back;
    `midway` runs once a third came back.  Asserts the echo is byte-exact; returns
    the agent's link."""
    agent = make_agent()
    payload = os.urandom(size)

    async def agent_dial() -> Connection:
        for port in agent_ports:
            with contextlib.suppress(OSError):
                ws: Connection = await ws_connect(site, port, "/v1/agent")
                return ws
        raise OSError("no relay answers")

    async def agent_register(ws: Connection) -> None:
        nonce = parse_challenge(await ws.recv())
        signed = sign_registration(agent.key, agent.der, nonce, HOUSEHOLD, HOST)
        await ws.send(json.dumps(signed))
        assert json.loads(await ws.recv())["type"] == "registered"

    echo = await asyncio.start_server(_echo, "127.0.0.1", 0)
    echo_port = echo.sockets[0].getsockname()[1]

    async def accept(ls: LinkStream) -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", echo_port)
        ls.hold()
        await ls.bridge(reader, writer)

    async def appliance_dial() -> Connection:
        ws: Connection = await ws_connect(site, appliance_port, "/v1/appliance")
        return ws

    agent_link = Link(agent_dial, name="agent", register=agent_register, accept=accept)
    appliance = Link(appliance_dial, name="appliance")
    tasks = [asyncio.ensure_future(agent_link.run()), asyncio.ensure_future(appliance.run())]
    try:
        await asyncio.wait_for(agent_link.up.wait(), 10)
        await asyncio.wait_for(appliance.up.wait(), 10)
        await until(lambda: _is(presence(site, appliance_port), "online"))
        ls = appliance.open(HOUSEHOLD)
        assert await ls.wait_opened(10) is None
        got = bytearray()
        fired = False

        async def send() -> None:
            for i in range(0, len(payload), 64 << 10):
                await ls.write(payload[i : i + (64 << 10)])
            ls.close()

        sender = asyncio.ensure_future(send())
        while data := await ls.read():
            got += data
            if not fired and len(got) >= len(payload) // 3:
                fired = True
                await midway()
        await sender
        assert fired, "the stream ended before the fault"
        assert hashlib.sha256(got).digest() == hashlib.sha256(payload).digest()
        return agent_link
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        echo.close()


@pytest.mark.parametrize("to", ["b", "c"])
def test_after_kill_9_of_relay_a_its_agent_registers_elsewhere_and_the_stream_is_exact(
    site: Site, to: str
) -> None:
    # the appliance is linked at B; the agent at A, then (A killed) at B itself or at a
    # third relay C, which the appliance's relay B learns of from the store
    port_a = free_port()
    proc = _spawn(site, "relay-a", port_a)

    async def go() -> None:
        async with relays(site, "relay-b", "relay-c") as (b, c):
            await until(lambda: _up(site, port_a), 15.0)
            elsewhere = b if to == "b" else c

            async def kill() -> None:
                os.kill(proc.pid, signal.SIGKILL)  # relay A, mid-stream

            agent = await exact_through(site, [port_a, elsewhere.port], b.port, kill)
            assert elsewhere.counters["registered"] >= 1  # the agent came there
            assert agent.counters["links"] == 2
            if to == "c":
                assert b.counters["relinks"] >= 1  # B sent its appliance to resume

    try:
        run(go(), timeout=90)
    finally:
        proc.kill()
        proc.wait()


def test_a_peer_link_that_drops_while_both_relays_live_loses_nothing(site: Site) -> None:
    async def go() -> None:
        async with relays(site, "relay-a", "relay-b") as (a, b):

            async def cut() -> None:  # B's link to A dies, no close handshake
                b._peers["relay-a"].ws.transport.abort()

            await exact_through(site, [a.port], b.port, cut)
            assert b.counters["relinks"] >= 1 and b.counters["peers_dialled"] == 2

    run(go(), timeout=60)


async def _up(site: Site, port: int) -> bool:
    try:
        return await presence(site, port) != ""
    except OSError:
        return False


async def _echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    while data := await reader.read(65536):
        writer.write(data)
        await writer.drain()
    writer.write_eof()
    await writer.drain()
    writer.close()
