"""The home relay server in process: real TLS and WebSockets on 127.0.0.1, port 0.

Agents are played by hand (challenge, signed register, frames); appliances send raw
frames.  What is checked is what a household or an appliance would see: close codes,
presence answers, frames arriving byte for byte, RESETs.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import shutil
import signal
import ssl
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from certs import self_signed
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, ConnectionClosedOK, InvalidStatus

from appliance.core.agent_protocol import fingerprint
from appliance.core.tomlfile import ConfigError, TomlFile
from appliance.homelink import frames, poll
from appliance.homelink.frames import Kind, Reset
from appliance.homelink.poll_client import PollClient
from appliance.homelink.registration import parse_challenge, sign_registration
from appliance.homelink.stream import LINGER, WINDOW
from appliance.homerelay import cli, poll_front
from appliance.homerelay.config import RelayConfig, parse
from appliance.homerelay.server import IDLE_MARGIN, ROUTE_IDLE, RelayServer
from appliance.homerelay.table import MAX_STREAMS
from appliance.state.households import Households

pytestmark = pytest.mark.unit

HOST = "relay.test"


@dataclass
class Agent:
    key: ec.EllipticCurvePrivateKey
    der: bytes


def make_agent() -> Agent:
    key = ec.generate_private_key(ec.SECP256R1())
    return Agent(key, self_signed(key, "agent").public_bytes(serialization.Encoding.DER))


@pytest.fixture(scope="module")
def relay_tls(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, ssl.SSLContext]:
    d = tmp_path_factory.mktemp("relay-tls")
    key = ec.generate_private_key(ec.SECP256R1())
    cert = self_signed(key, HOST)
    (d / "cert.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (d / "key.pem").write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    client = ssl.create_default_context(cafile=str(d / "cert.pem"))
    return d / "cert.pem", d / "key.pem", client


ConfigMaker = Callable[..., RelayConfig]


@pytest.fixture
def make_config(tmp_path: Path, relay_tls: tuple[Path, Path, ssl.SSLContext]) -> ConfigMaker:
    cert, key, _ = relay_tls

    def make(**limits: int) -> RelayConfig:
        lines = "".join(f"{k} = {v}\n" for k, v in limits.items())
        text = (
            f'[relay]\nhost = "{HOST}"\nlisten = "127.0.0.1"\nport = 0\n'
            f'certificate = "{cert}"\nkey = "{key}"\nstate_directory = "state"\n'
            f"[limits]\n{lines}"
        )
        (tmp_path / "relay.toml").write_text(text)  # (for the CLI's commands)
        return parse(TomlFile.parse(text, tmp_path / "relay.toml"))

    return make


def run(coro: Coroutine[Any, Any, None]) -> None:
    async def bounded() -> None:
        await asyncio.wait_for(coro, 10)

    asyncio.run(bounded())


@asynccontextmanager
async def relay_running(config: RelayConfig, **kw: Any) -> AsyncIterator[RelayServer]:
    server = RelayServer(config, **kw)
    await server.start()
    try:
        yield server
    finally:
        await server.close()


class Client:
    """A test end: the relay's TLS context and where it listens."""

    def __init__(self, server: RelayServer, tls: ssl.SSLContext) -> None:
        self.server = server
        self.tls = tls

    def _connect(self, path: str) -> Any:
        return connect(
            f"wss://127.0.0.1:{self.server.port}{path}",
            ssl=self.tls,
            server_hostname=HOST,
            max_size=None,
        )

    async def appliance(self) -> ClientConnection:
        ws: ClientConnection = await self._connect("/v1/appliance")
        return ws

    async def agent_link(self, agent: Agent, household: str) -> ClientConnection:
        """A link that has sent its register message (the answer is not read yet)."""
        ws: ClientConnection = await self._connect("/v1/agent")
        nonce = parse_challenge(await ws.recv())
        await ws.send(json.dumps(sign_registration(agent.key, agent.der, nonce, household, HOST)))
        return ws

    async def agent(self, agent: Agent, household: str) -> ClientConnection:
        ws = await self.agent_link(agent, household)
        answer = json.loads(await ws.recv())
        assert answer == {"type": "registered", "household": household}
        return ws

    async def get(self, path: str) -> tuple[int, bytes]:
        reader, writer = await asyncio.open_connection(
            "127.0.0.1", self.server.port, ssl=self.tls, server_hostname=HOST
        )
        writer.write(f"GET {path} HTTP/1.1\r\nHost: {HOST}\r\nConnection: close\r\n\r\n".encode())
        data = await reader.read()
        writer.close()
        head, _, body = data.partition(b"\r\n\r\n")
        if head.startswith(b"HTTP/1.1 200"):
            assert b"\r\nContent-Type: application/json" in head
        return int(head.split()[1]), body

    async def presence(self, household: str) -> dict[str, Any]:
        status, body = await self.get(f"/v1/households/{household}")
        assert status == 200, (status, body)
        result: dict[str, Any] = json.loads(body)
        return result


async def frame_of(ws: ClientConnection) -> frames.Frame:
    message = await asyncio.wait_for(ws.recv(), 3)
    return frames.decode(message)


async def close_code(ws: ClientConnection) -> int | None:
    with pytest.raises(ConnectionClosed):
        while True:
            await asyncio.wait_for(ws.recv(), 3)
    return ws.close_code


def token() -> bytes:
    return os.urandom(16)


def test_config_defaults_and_given_limits(make_config: ConfigMaker) -> None:
    cfg = make_config(links_per_source=5)
    assert cfg.host == HOST and cfg.port == 0 and cfg.limits.links_per_source == 5
    assert cfg.limits.streams_per_appliance_link == 256
    assert cfg.limits.link_queue_bytes == 16 << 20
    assert cfg.households_db.name == "households.db"


TestBody = Callable[[Client], Awaitable[None]]


def with_relay(
    make_config: ConfigMaker,
    relay_tls: tuple[Path, Path, ssl.SSLContext],
    body: TestBody,
    **limits: int,
) -> None:
    async def main() -> None:
        async with relay_running(make_config(**limits)) as server:
            await body(Client(server, relay_tls[2]))

    run(main())


def test_registration_then_presence_online_and_offline_after_leaving(
    make_config: ConfigMaker, relay_tls: tuple[Path, Path, ssl.SSLContext]
) -> None:
    async def body(c: Client) -> None:
        alice = make_agent()
        ws = await c.agent(alice, "alice-home")
        assert (await c.presence("alice-home"))["state"] == "online"
        await ws.close()
        await asyncio.sleep(0.1)
        gone = await c.presence("alice-home")
        assert gone["state"] == "offline" and gone["household"] == "alice-home"
        assert abs(gone["last_seen"] - c.server.wall_clock()) < 5
        assert (await c.get("/v1/households/nobody"))[0] == 404
        assert (await c.get("/v1/households/Not_A_Name"))[0] == 400
        assert (await c.get("/elsewhere"))[0] == 404

    with_relay(make_config, relay_tls, body)


def test_bad_signature_and_claimed_name_are_refused(
    make_config: ConfigMaker, relay_tls: tuple[Path, Path, ssl.SSLContext]
) -> None:
    async def body(c: Client) -> None:
        alice, mallory = make_agent(), make_agent()
        ws = await c._connect("/v1/agent")
        nonce = parse_challenge(await ws.recv())
        message = sign_registration(alice.key, alice.der, nonce, "alice-home", "other.relay")
        await ws.send(json.dumps(message))
        assert await close_code(ws) == 4401

        await c.agent(alice, "alice-home")
        intruder = await c.agent_link(mallory, "alice-home")
        assert await close_code(intruder) == 4403
        assert (await c.presence("alice-home"))["state"] == "online"

    with_relay(make_config, relay_tls, body)


def test_takeover_by_the_same_key_closes_the_old_link_and_stays_online(
    make_config: ConfigMaker, relay_tls: tuple[Path, Path, ssl.SSLContext]
) -> None:
    async def body(c: Client) -> None:
        alice = make_agent()
        old = await c.agent(alice, "alice-home")
        new = await c.agent(alice, "alice-home")
        async with asyncio.timeout(1):
            assert await close_code(old) == 4000
        assert old.close_reason == "replaced"
        await asyncio.sleep(0.05)
        assert (await c.presence("alice-home"))["state"] == "online"
        # and the new link carries the household's streams
        app = await c.appliance()
        t = token()
        await app.send(frames.encode_open(t, "alice-home"))
        assert (await frame_of(new)).kind is Kind.OPEN

    with_relay(make_config, relay_tls, body)


def test_open_offline_household_is_reset_at_once(
    make_config: ConfigMaker, relay_tls: tuple[Path, Path, ssl.SSLContext]
) -> None:
    async def body(c: Client) -> None:
        app = await c.appliance()
        t = token()
        await app.send(frames.encode_open(t, "nobody-home"))
        f = await frame_of(app)
        assert (f.kind, f.token, f.code) == (Kind.RESET, t, Reset.OFFLINE)

    with_relay(make_config, relay_tls, body)


async def open_stream(c: Client, app: ClientConnection, agent: ClientConnection, h: str) -> bytes:
    t = token()
    await app.send(frames.encode_open(t, h))
    f = await frame_of(agent)
    assert (f.kind, f.token, f.household) == (Kind.OPEN, t, h)
    await agent.send(frames.encode_ack(t, 0))
    f = await frame_of(app)
    assert (f.kind, f.token, f.offset) == (Kind.ACK, t, 0)
    return t


async def data_both_ways(app: ClientConnection, agent: ClientConnection, t: bytes) -> None:
    up = os.urandom(frames.MAX_PAYLOAD)
    await app.send(frames.encode_data(t, 0, up))
    f = await frame_of(agent)
    assert (f.kind, f.token, f.offset, f.payload) == (Kind.DATA, t, 0, up)
    down = b"\x00\xffhello" * 7
    await agent.send(frames.encode_data(t, 5, down))
    f = await frame_of(app)
    assert (f.kind, f.token, f.offset, f.payload) == (Kind.DATA, t, 5, down)


def test_stream_opens_and_data_is_routed_byte_exact_then_forgotten_after_fin_ack(
    make_config: ConfigMaker, relay_tls: tuple[Path, Path, ssl.SSLContext]
) -> None:
    async def body(c: Client) -> None:
        agent = await c.agent(make_agent(), "alice-home")
        app = await c.appliance()
        t = await open_stream(c, app, agent, "alice-home")
        assert (await c.presence("alice-home"))["state"] == "in_use"
        await data_both_ways(app, agent, t)
        # both directions end: FIN n, ACK n+1 each way
        await app.send(frames.encode_fin(t, 65536))
        assert (await frame_of(agent)).kind is Kind.FIN
        await agent.send(frames.encode_fin(t, 100))
        assert (await frame_of(app)).kind is Kind.FIN
        await agent.send(frames.encode_ack(t, 65537))
        assert (await frame_of(app)).offset == 65537
        assert c.server.route_count == 1  # one direction still open
        await app.send(frames.encode_ack(t, 101))
        assert (await frame_of(agent)).offset == 101
        await asyncio.sleep(0.05)
        assert c.server.route_count == 0
        assert c.server.counters["routes_finished"] == 1
        assert (await c.presence("alice-home"))["state"] == "online"
        # the token is no longer routed
        await app.send(frames.encode_data(t, 0, b"late"))
        f = await frame_of(app)
        assert (f.kind, f.code) == (Kind.RESET, Reset.UNKNOWN)

    with_relay(make_config, relay_tls, body)


def test_reset_forgets_the_route(
    make_config: ConfigMaker, relay_tls: tuple[Path, Path, ssl.SSLContext]
) -> None:
    async def body(c: Client) -> None:
        agent = await c.agent(make_agent(), "alice-home")
        app = await c.appliance()
        t = await open_stream(c, app, agent, "alice-home")
        await agent.send(frames.encode_reset(t, Reset.REFUSED, "no service"))
        f = await frame_of(app)
        assert (f.kind, f.code, f.reason) == (Kind.RESET, Reset.REFUSED, "no service")
        await asyncio.sleep(0.05)
        assert c.server.route_count == 0
        assert (await c.presence("alice-home"))["state"] == "online"

    with_relay(make_config, relay_tls, body)


def test_token_of_household_a_used_from_b_is_refused_and_a_is_unaffected(
    make_config: ConfigMaker, relay_tls: tuple[Path, Path, ssl.SSLContext]
) -> None:
    async def body(c: Client) -> None:
        a = await c.agent(make_agent(), "alice-home")
        b = await c.agent(make_agent(), "bob-home")
        app = await c.appliance()
        t = await open_stream(c, app, a, "alice-home")
        await b.send(frames.encode_data(t, 0, b"injected"))
        await b.send(frames.encode_resume(t, 0, "bob-home", answer=True))
        for _ in range(2):
            f = await frame_of(b)
            assert (f.kind, f.token, f.code) == (Kind.RESET, t, Reset.UNKNOWN)
        assert c.server.counters["cross_household"] == 2
        await data_both_ways(app, a, t)

    with_relay(make_config, relay_tls, body)


def test_relay_restart_then_resume_from_both_sides_relearns_the_route(
    make_config: ConfigMaker, relay_tls: tuple[Path, Path, ssl.SSLContext]
) -> None:
    async def main() -> None:
        config = make_config()
        alice = make_agent()
        t = token()
        async with relay_running(config) as server:
            c = Client(server, relay_tls[2])
            agent = await c.agent(alice, "alice-home")
            app = await c.appliance()
            t = await open_stream(c, app, agent, "alice-home")
        async with relay_running(config) as server:
            c = Client(server, relay_tls[2])
            # the claim survived: another key cannot take the name
            squatter = await c.agent_link(make_agent(), "alice-home")
            assert await close_code(squatter) == 4403
            agent = await c.agent(alice, "alice-home")
            app = await c.appliance()
            await agent.send(frames.encode_resume(t, 10, "alice-home", answer=True))
            await app.send(frames.encode_resume(t, 20, "alice-home", answer=True))
            f = await frame_of(agent)
            assert (f.kind, f.token, f.offset, f.answer) == (Kind.RESUME, t, 20, True)
            await data_both_ways(app, agent, t)

    run(main())


def test_resume_from_an_appliance_for_an_unclaimed_household_is_unknown(
    make_config: ConfigMaker, relay_tls: tuple[Path, Path, ssl.SSLContext]
) -> None:
    async def body(c: Client) -> None:
        app = await c.appliance()
        t = token()
        await app.send(frames.encode_resume(t, 0, "nobody-home", answer=True))
        f = await frame_of(app)
        assert (f.kind, f.token, f.code) == (Kind.RESET, t, Reset.UNKNOWN)
        await app.send(frames.encode_data(t, 0, b"x"))
        assert (await frame_of(app)).code is Reset.UNKNOWN

    with_relay(make_config, relay_tls, body)


def test_garbage_closes_only_that_link(
    make_config: ConfigMaker, relay_tls: tuple[Path, Path, ssl.SSLContext]
) -> None:
    async def body(c: Client) -> None:
        a = await c.agent(make_agent(), "alice-home")
        b = await c.agent(make_agent(), "bob-home")
        app = await c.appliance()
        t = await open_stream(c, app, b, "bob-home")
        await a.send(b"\x63" + os.urandom(40))
        assert await close_code(a) == 4400
        other = await c.appliance()
        await other.send(b"short")
        assert await close_code(other) == 4400
        agent_text = await c.agent(make_agent(), "carol-home")
        await agent_text.send("hello")
        assert await close_code(agent_text) == 4400
        assert c.server.counters["bad_frames"] == 2
        assert c.server.counters["text_after_registration"] == 1
        await data_both_ways(app, b, t)

    with_relay(make_config, relay_tls, body)


def test_links_per_source_are_limited_with_429(
    make_config: ConfigMaker, relay_tls: tuple[Path, Path, ssl.SSLContext]
) -> None:
    async def body(c: Client) -> None:
        first = await c.appliance()
        await c.agent(make_agent(), "alice-home")
        with pytest.raises(InvalidStatus) as refused:
            await c.appliance()
        assert refused.value.response.status_code == 429
        # presence is not a link and still answers
        assert (await c.presence("alice-home"))["state"] == "online"
        await first.close()
        await asyncio.sleep(0.1)
        await c.appliance()

    with_relay(make_config, relay_tls, body, links_per_source=2)


def test_streams_per_appliance_link_are_limited(
    make_config: ConfigMaker, relay_tls: tuple[Path, Path, ssl.SSLContext]
) -> None:
    async def body(c: Client) -> None:
        agent = await c.agent(make_agent(), "alice-home")
        app = await c.appliance()
        for _ in range(2):
            await open_stream(c, app, agent, "alice-home")
        t = token()
        await app.send(frames.encode_open(t, "alice-home"))
        f = await frame_of(app)
        assert (f.kind, f.token, f.code) == (Kind.RESET, t, Reset.LIMIT)
        # another link has its own allowance
        await open_stream(c, await c.appliance(), agent, "alice-home")

    with_relay(make_config, relay_tls, body, streams_per_appliance_link=2)


def test_routes_of_a_vanished_end_expire_after_linger(
    make_config: ConfigMaker, relay_tls: tuple[Path, Path, ssl.SSLContext]
) -> None:
    async def main() -> None:
        async with relay_running(make_config(), linger=0.2) as server:
            c = Client(server, relay_tls[2])
            agent = await c.agent(make_agent(), "alice-home")
            app = await c.appliance()
            await open_stream(c, app, agent, "alice-home")
            await app.close()
            await asyncio.sleep(0.2)
            assert server.route_count == 1  # the appliance may still come back
            await asyncio.sleep(0.5)
            assert server.route_count == 0
            assert (await c.presence("alice-home"))["state"] == "online"

    run(main())


def test_household_rate_limit_delays_data(
    make_config: ConfigMaker, relay_tls: tuple[Path, Path, ssl.SSLContext]
) -> None:
    async def body(c: Client) -> None:
        agent = await c.agent(make_agent(), "alice-home")
        app = await c.appliance()
        t = await open_stream(c, app, agent, "alice-home")
        chunk = b"x" * frames.MAX_PAYLOAD
        start = asyncio.get_running_loop().time()
        # a second's worth (two frames) passes at once, the third waits half a second
        for i in range(3):
            await app.send(frames.encode_data(t, i * len(chunk), chunk))
        for _ in range(3):
            assert (await frame_of(agent)).payload == chunk
        elapsed = asyncio.get_running_loop().time() - start
        assert 0.4 <= elapsed < 2

    with_relay(make_config, relay_tls, body, household_bytes_per_second=2 * frames.MAX_PAYLOAD)


def test_config_errors_name_the_key_and_line(tmp_path: Path) -> None:
    text = '[relay]\nhost = "relay.example"\ncertificate = "c.pem"\nkey = "k.pem"\nprot = 1\n'
    with pytest.raises(ConfigError) as err:
        parse(TomlFile.parse(text, tmp_path / "relay.toml"))
    assert err.value.key == "relay.prot" and err.value.line == 5
    with pytest.raises(ConfigError) as err:
        parse(TomlFile.parse(text.replace("prot = 1", "[limits]\nlinks_per_source = 0")))
    assert err.value.key == "limits.links_per_source" and err.value.line == 6
    with pytest.raises(ConfigError) as err:
        parse(TomlFile.parse('[relay]\nhost = "no such host!"\n'))
    assert err.value.key == "relay.host"
    base = text.replace("prot = 1\n", "")
    with pytest.raises(ConfigError) as err:  # relays sharing a PostgreSQL need its dsn
        parse(TomlFile.parse(base + '[state]\nbackend = "postgresql"\n'))
    assert err.value.key == "state.dsn"
    with pytest.raises(ConfigError) as err:
        parse(TomlFile.parse(base + '[state]\nbackend = "postgresql"\ndsn = "password=x"\n'))
    assert err.value.key == "state.dsn" and "no password" in str(err.value)
    shared = parse(TomlFile.parse(base + '[state]\nbackend = "postgresql"\ndsn = "dbname=r"\n'))
    assert (shared.state.backend, shared.state.dsn) == ("postgresql", "dbname=r")


def test_example_config_loads() -> None:
    example = Path(cli.__file__).with_name("relay.example.toml")
    cfg = parse(TomlFile.load(example))
    assert cfg.port == 443 and cfg.listen == "0.0.0.0"
    assert cfg.limits.household_bytes_per_second == 0


def test_cli_refuses_a_bad_config(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "relay.toml"
    path.write_text('[relay]\nhost = "relay.example"\n')
    assert cli.main(["--config", str(path)]) == 2
    assert "relay.certificate" in capsys.readouterr().err


def test_the_operator_frees_a_name_whose_household_lost_its_key(
    make_config: ConfigMaker,
    relay_tls: tuple[Path, Path, ssl.SSLContext],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """`home-relay names` lists the claims; `home-relay release NAME` refuses while the
    name's link is up (whoever holds the key keeps using it), then frees it while the
    relay runs: a new key claims it at its next registration, where it got 4403."""
    path = tmp_path / "relay.toml"  # make_config's: the relay's store is the CLI's

    def command(*args: str) -> tuple[int, str, str]:
        code = cli.main(["--config", str(path), *args])
        out, err = capsys.readouterr()
        return code, out, err

    async def body(c: Client) -> None:
        lost, new = make_agent(), make_agent()
        ws = await c.agent(lost, "bob-home")
        code, out, _ = command("names")
        assert code == 0 and out.startswith("bob-home\tsha256:") and "linked at" in out
        code, _, err = command("release", "bob-home")
        assert code == 1 and "bob-home is linked now" in err
        await ws.close()
        async with asyncio.timeout(3):
            while (await c.presence("bob-home"))["state"] != "offline":
                await asyncio.sleep(0.02)
        assert await close_code(await c.agent_link(new, "bob-home")) == 4403
        code, out, _ = command("release", "bob-home")
        assert code == 0 and out.startswith("released bob-home (it was claimed by sha256:")
        assert command("release", "bob-home")[0] == 1  # (no such claim any more)
        assert command("release", "Bob_Home")[0] == 2
        ws = await c.agent(new, "bob-home")  # claimed anew
        assert (await c.presence("bob-home"))["state"] == "online"
        code, _, _ = command("release", "bob-home")
        assert code == 1  # the new key's link is up
        assert await close_code(await c.agent_link(lost, "bob-home")) == 4403
        # given to a named key (no race for the name): only that key may take it
        await ws.close()
        async with asyncio.timeout(3):
            while (await c.presence("bob-home"))["state"] != "offline":
                await asyncio.sleep(0.02)
        assert command("release", "bob-home", "--to", "sha256:nonsense")[0] == 2
        code, out, _ = command("release", "bob-home", "--to", fingerprint(lost.der))
        assert code == 0 and out.startswith(f"gave bob-home to {fingerprint(lost.der)}")
        assert await close_code(await c.agent_link(new, "bob-home")) == 4403
        await c.agent(lost, "bob-home")

    with_relay(make_config, relay_tls, body)


def test_a_name_left_linked_by_a_killed_relay_is_released_after_its_restart(
    make_config: ConfigMaker,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    cfg = make_config()
    path = tmp_path / "relay.toml"
    assert cli.main(["--config", str(path), "names"]) == 1  # no store yet: none is made
    assert "no households store at" in capsys.readouterr().err
    assert not (tmp_path / "state").exists()
    cfg.state_directory.mkdir()
    store = Households.open(cfg.state)
    store.claim("bob-home", "sha256:" + "A" * 43, 1.0)
    store.linked("bob-home", "sha256:" + "A" * 43, "local", 2.0)  # then the relay was killed
    store.conn.close()
    assert cli.main(["--config", str(path), "release", "bob-home"]) == 1
    assert "linked now (at local)" in capsys.readouterr().err

    async def restarted() -> None:
        async with relay_running(cfg):
            assert cli.main(["--config", str(path), "release", "bob-home"]) == 0

    run(restarted())


def test_cli_serves_until_sigterm(
    relay_tls: tuple[Path, Path, ssl.SSLContext], tmp_path: Path
) -> None:
    cert, key, tls = relay_tls
    path = tmp_path / "relay.toml"
    path.write_text(
        f'[relay]\nhost = "{HOST}"\nlisten = "127.0.0.1"\nport = 0\n'
        f'certificate = "{cert}"\nkey = "{key}"\nstate_directory = "state"\n'
    )
    proc = subprocess.Popen(
        [sys.executable, "-m", "appliance.homerelay.cli", "--config", str(path)],
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])},
    )
    try:
        assert proc.stderr is not None
        port = 0
        for line in proc.stderr:
            m = re.search(r"home relay relay.test on 127.0.0.1:(\d+)", line)
            if m:
                port = int(m.group(1))
                break
        assert port

        async def ask() -> None:
            reader, writer = await asyncio.open_connection(
                "127.0.0.1", port, ssl=tls, server_hostname=HOST
            )
            writer.write(b"GET /v1/households/nobody HTTP/1.1\r\nHost: relay.test\r\n\r\n")
            assert (await reader.readline()).startswith(b"HTTP/1.1 404")
            writer.close()

        run(ask())
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=5) == 0
        assert (tmp_path / "state" / "households.db").exists()
    finally:
        proc.kill()
        proc.wait()


async def wait_for_counter(server: RelayServer, name: str, value: int) -> None:
    try:
        async with asyncio.timeout(5):
            while server.counters[name] < value:
                await asyncio.sleep(0.01)
    except TimeoutError:
        raise AssertionError({k: v for k, v in server.counters.items() if v}) from None


async def frame_for(ws: ClientConnection, t: bytes) -> frames.Frame:
    """The next frame of stream `t` (others' RESETs are skipped)."""
    while True:
        f = await frame_of(ws)
        if f.token == t:
            return f


def test_an_agent_that_stops_reading_stalls_neither_the_appliance_link_nor_others(
    make_config: ConfigMaker, relay_tls: tuple[Path, Path, ssl.SSLContext]
) -> None:
    """The reviewer's case: one appliance link carries streams of two households, and
    one household's agent never reads.  Its queue at the relay overflows, so its link
    is closed 1013; the appliance link and the other household's stream carry on."""

    async def body(c: Client) -> None:
        alice = await c.agent(make_agent(), "alice-home")
        stuck = await c.agent(make_agent(), "stuck-home")  # never reads from here on
        app = await c.appliance()
        t_alice = await open_stream(c, app, alice, "alice-home")
        chunk = b"x" * frames.MAX_PAYLOAD
        # 24 streams of one window each: within every stream's window, and far more
        # than the kernel's socket buffers and the 1 MiB queue limit hold
        for _ in range(24):
            t = token()
            await app.send(frames.encode_open(t, "stuck-home"))
            for i in range(WINDOW // len(chunk)):
                await app.send(frames.encode_data(t, i * len(chunk), chunk))
        await wait_for_counter(c.server, "slow_links_closed", 1)
        up = os.urandom(1000)
        await app.send(frames.encode_data(t_alice, 0, up))
        assert (await frame_of(alice)).payload == up
        await alice.send(frames.encode_data(t_alice, 0, b"down"))
        assert (await frame_for(app, t_alice)).payload == b"down"
        assert c.server.counters["window_violations"] == 0
        # the stuck link, read at last, ends with 1013; the shared link is still up
        assert await close_code(stuck) == 1013
        await app.send(frames.encode_ack(t_alice, 10))
        assert (await frame_of(alice)).offset == 10
        assert app.close_code is None

    with_relay(make_config, relay_tls, body, link_queue_bytes=1 << 20)


def test_data_beyond_the_window_resets_the_stream_at_the_relay(
    make_config: ConfigMaker, relay_tls: tuple[Path, Path, ssl.SSLContext]
) -> None:
    async def body(c: Client) -> None:
        agent = await c.agent(make_agent(), "alice-home")
        app = await c.appliance()
        t = await open_stream(c, app, agent, "alice-home")
        chunk = b"y" * frames.MAX_PAYLOAD
        frames_per_window = WINDOW // len(chunk)
        for i in range(frames_per_window):  # exactly one window: all of it passes
            await app.send(frames.encode_data(t, i * len(chunk), chunk))
        for i in range(frames_per_window):
            assert (await frame_of(agent)).offset == i * len(chunk)
        await agent.send(frames.encode_ack(t, len(chunk)))  # one chunk more may follow
        assert (await frame_of(app)).kind is Kind.ACK
        await app.send(frames.encode_data(t, WINDOW, chunk))
        assert (await frame_of(agent)).offset == WINDOW
        await app.send(frames.encode_data(t, WINDOW + len(chunk), chunk))  # one too many
        for ws in (app, agent):
            f = await frame_of(ws)
            assert (f.kind, f.token, f.code) == (Kind.RESET, t, Reset.PROTOCOL)
        assert c.server.counters["window_violations"] == 1
        assert c.server.route_count == 0
        assert (await c.presence("alice-home"))["state"] == "online"

    with_relay(make_config, relay_tls, body)


def test_resumes_of_unknown_tokens_learn_no_more_routes_than_opens_could(
    make_config: ConfigMaker, relay_tls: tuple[Path, Path, ssl.SSLContext]
) -> None:
    async def body(c: Client) -> None:
        alice = await c.agent(make_agent(), "alice-home")
        await alice.close()  # offline; the name stays claimed
        await asyncio.sleep(0.05)
        app = await c.appliance()
        for _ in range(3000):
            await app.send(frames.encode_resume(token(), 0, "alice-home", True))
        for _ in range(2998):
            f = await frame_of(app)
            assert (f.kind, f.code) == (Kind.RESET, Reset.LIMIT)
        assert c.server.route_count == 2  # streams_per_appliance_link
        # an agent link (any fresh name, a self-made key) learns at most MAX_STREAMS
        mallory = await c.agent(make_agent(), "mallory")
        for _ in range(3000):
            await mallory.send(frames.encode_resume(token(), 0, "mallory", True))
        for _ in range(3000 - MAX_STREAMS):
            f = await frame_of(mallory)
            assert (f.kind, f.code) == (Kind.RESET, Reset.LIMIT)
        assert c.server.route_count == 2 + MAX_STREAMS
        assert c.server.counters["routes_learned"] == 2 + MAX_STREAMS

    with_relay(make_config, relay_tls, body, streams_per_appliance_link=2)


def test_a_route_half_closed_before_a_relay_restart_is_forgotten_when_silent(
    make_config: ConfigMaker, relay_tls: tuple[Path, Path, ssl.SSLContext]
) -> None:
    now = [1000.0]

    def clock() -> float:
        return now[0]

    async def main() -> None:
        config = make_config()
        alice = make_agent()
        async with relay_running(config, clock=clock) as server:
            c = Client(server, relay_tls[2])
            agent = await c.agent(alice, "alice-home")
            app = await c.appliance()
            t = await open_stream(c, app, agent, "alice-home")
            idle = await open_stream(c, app, agent, "alice-home")  # open, just quiet
            await app.send(frames.encode_fin(t, 0))  # the appliance's direction ends
            assert (await frame_of(agent)).kind is Kind.FIN
            await agent.send(frames.encode_ack(t, 1))
            assert (await frame_of(app)).offset == 1
        async with relay_running(config, clock=clock) as server:
            c = Client(server, relay_tls[2])
            agent = await c.agent(alice, "alice-home")
            app = await c.appliance()
            for stream in (t, idle):
                await agent.send(frames.encode_resume(stream, 0, "alice-home", answer=True))
                await app.send(frames.encode_resume(stream, 1, "alice-home", answer=False))
                assert (await frame_of(agent)).kind is Kind.RESUME
            await agent.send(frames.encode_fin(t, 0))  # the other direction ends
            assert (await frame_of(app)).kind is Kind.FIN
            await app.send(frames.encode_ack(t, 1))
            assert (await frame_of(agent)).offset == 1
            await asyncio.sleep(0.05)
            assert server.route_count == 2  # the relay never saw the first FIN
            now[0] += LINGER + IDLE_MARGIN + 1
            server.sweep()
            assert server.route_count == 1  # the quiet stream stays
            assert server.counters["routes_idle"] == 1
            await data_both_ways(app, agent, idle)
            now[0] += ROUTE_IDLE + 1
            server.sweep()
            assert server.route_count == 0
            assert (await c.presence("alice-home"))["state"] == "online"

    run(main())


def test_the_agent_learns_the_appliance_links_source_address_never_the_appliances_word(
    make_config: ConfigMaker, relay_tls: tuple[Path, Path, ssl.SSLContext]
) -> None:
    async def body(c: Client) -> None:
        agent = await c.agent(make_agent(), "alice-home")
        app = await c.appliance()
        for claimed in ("", "192.0.2.66"):
            t = token()
            await app.send(frames.encode_open(t, "alice-home", source=claimed))
            f = await frame_of(agent)
            assert (f.kind, f.token, f.household, f.source) == (
                Kind.OPEN,
                t,
                "alice-home",
                "127.0.0.1",
            )

    with_relay(make_config, relay_tls, body)


def test_the_relays_metrics_count_households_links_and_events(
    make_config: ConfigMaker, relay_tls: tuple[Path, Path, ssl.SSLContext]
) -> None:
    from prometheus_client import generate_latest
    from prometheus_client.parser import text_string_to_metric_families

    from appliance.core.metrics import registry_for

    async def body(c: Client) -> None:
        await c.agent(make_agent(), "alice-home")
        app = await c.appliance()
        await app.send(b"\x01garbage")  # a bad frame: that link is closed and counted
        with contextlib.suppress(Exception):
            await asyncio.wait_for(app.recv(), 2)
        text = generate_latest(registry_for(c.server.metric_families)).decode()
        samples = {
            (s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in text_string_to_metric_families(text)
            for s in fam.samples
        }
        assert samples[("appliance_home_relay_households", (("state", "online"),))] == 1
        assert samples[("appliance_home_relay_links", (("side", "agent"),))] == 1
        assert samples[("appliance_home_relay_events_total", (("event", "registered"),))] == 1
        assert samples[("appliance_home_relay_events_total", (("event", "bad_frames"),))] == 1
        assert "alice" not in text  # no household name is a label value

    with_relay(make_config, relay_tls, body)


async def post(
    c: Client, path: str, body: bytes, sid: str = "", length: int | None = None
) -> tuple[int, bytes]:
    """One long-poll request on its own connection, as a proxy in front might send it;
    `length`: a Content-Length to claim instead of the body's."""
    reader, writer = await asyncio.open_connection(
        "127.0.0.1", c.server.port, ssl=c.tls, server_hostname=HOST
    )
    size = len(body) if length is None else length
    head = f"POST {path} HTTP/1.1\r\nHost: {HOST}\r\nContent-Length: {size}\r\n"
    if sid:
        head += f"Poll-Session: {sid}\r\n"
    writer.write(head.encode() + b"Connection: close\r\n\r\n" + body)
    data = await asyncio.wait_for(reader.read(), 6)
    writer.close()
    status_line, _, rest = data.partition(b"\r\n")
    return int(status_line.split()[1]), rest.partition(b"\r\n\r\n")[2]


async def poll_session(c: Client, path: str = "/v1/appliance") -> str:
    status, sid = await post(c, path, b"")
    assert status == 200 and poll.SESSION_RE.fullmatch(sid.decode()), (status, sid)
    return sid.decode()


def test_long_poll_requests_with_bad_input_get_clear_errors_and_the_relay_serves_on(
    make_config: ConfigMaker, relay_tls: tuple[Path, Path, ssl.SSLContext]
) -> None:
    async def body(c: Client) -> None:
        have0 = poll.NUMBER.pack(0)
        assert (await post(c, poll.DOWN_PATH, have0, "0" * 32))[0] == 404
        assert (await post(c, poll.DOWN_PATH, have0))[0] == 404  # no session named
        assert (await post(c, "/v1/poll/../../etc", b""))[0] == 404
        assert (await post(c, "/v1/households/alice-home", b""))[0] == 404

        garbled = await poll_session(c)
        status, why = await post(c, poll.UP_PATH, b"\x00\x01", garbled)
        assert (status, why) == (400, b"not a u64\n")
        # the session is over: its id names nothing any more
        assert (await post(c, poll.DOWN_PATH, have0, garbled))[0] == 404

        gap = await poll_session(c)
        ahead = poll.encode_batch(5, [poll.of_value(b"x")])
        status, why = await post(c, poll.UP_PATH, ahead, gap)
        assert status == 400 and b"5" in why
        assert (await post(c, poll.DOWN_PATH, have0, gap))[0] == 404

        big = await poll_session(c)
        # refused on its Content-Length, before a byte of the body is read
        assert (await post(c, poll.UP_PATH, b"", big, length=poll.MAX_BODY + 1))[0] == 413

        # a session that keeps to the protocol still works, and so do WebSocket links
        good = await poll_session(c)
        status, answer = await post(c, poll.UP_PATH, poll.encode_batch(0, []), good)
        assert (status, answer) == (200, have0)
        a = await c.agent(make_agent(), "alice-home")
        app = await c.appliance()
        await data_both_ways(app, a, await open_stream(c, app, a, "alice-home"))
        assert c.server.polls.counters["poll_sessions"] == 4

    with_relay(make_config, relay_tls, body)


def test_long_poll_sessions_count_against_the_links_per_source_and_die_unpolled(
    make_config: ConfigMaker, relay_tls: tuple[Path, Path, ssl.SSLContext]
) -> None:
    async def body(c: Client) -> None:
        first = await c.appliance()
        sid = await poll_session(c)
        status, why = await post(c, "/v1/appliance", b"")
        assert status == 429 and why
        with pytest.raises(InvalidStatus) as refused:
            await c.appliance()
        assert refused.value.response.status_code == 429
        assert c.server.polls.counters["poll_refused"] == 1

        # nobody polls the session: the sweep closes it as a link without pongs
        c.server.polls.sweep(time.monotonic() + poll.DEAD_AFTER + 1)
        assert c.server.polls.counters["poll_dead"] == 1
        assert (await post(c, poll.DOWN_PATH, poll.NUMBER.pack(0), sid))[0] == 404
        await asyncio.sleep(0.1)
        await c.appliance()  # its place is free again
        await first.close()

    with_relay(make_config, relay_tls, body, links_per_source=2)


def test_a_long_poll_agent_refused_gets_its_close_code_even_when_an_answer_is_lost(
    make_config: ConfigMaker, relay_tls: tuple[Path, Path, ssl.SSLContext]
) -> None:
    """By hand: a poll agent signs for the wrong relay; the down answer carrying the
    relay's 4401 is "lost" and asked again with the same number: the same close comes,
    and once acknowledged the session is gone."""

    async def body(c: Client) -> None:
        sid = await poll_session(c, "/v1/agent")
        status, answer = await post(c, poll.DOWN_PATH, poll.NUMBER.pack(0), sid)
        first, messages = poll.decode_batch(answer)
        assert status == 200 and first == 0 and messages[0].kind is poll.MessageKind.TEXT
        nonce = parse_challenge(messages[0].payload.decode())
        alice = make_agent()
        signed = sign_registration(alice.key, alice.der, nonce, "alice-home", "other.relay")
        up = poll.encode_batch(0, [poll.of_value(json.dumps(signed))])
        assert await post(c, poll.UP_PATH, up, sid) == (200, poll.NUMBER.pack(1))
        for _ in range(2):  # the first answer is dropped on the floor
            status, answer = await post(c, poll.DOWN_PATH, poll.NUMBER.pack(1), sid)
            assert status == 200
            first, messages = poll.decode_batch(answer)
            assert first == 1 and [m.kind for m in messages] == [poll.MessageKind.CLOSE]
            assert poll.parse_close(messages[0])[0] == 4401
        assert (await post(c, poll.DOWN_PATH, poll.NUMBER.pack(2), sid))[0] == 200
        assert (await post(c, poll.DOWN_PATH, poll.NUMBER.pack(2), sid))[0] == 404
        assert (await c.get("/v1/households/alice-home"))[0] == 404

    with_relay(make_config, relay_tls, body)


def test_a_long_poll_link_hears_the_relay_going_away_as_a_websocket_would(
    make_config: ConfigMaker, relay_tls: tuple[Path, Path, ssl.SSLContext]
) -> None:
    async def main() -> None:
        server = RelayServer(make_config())
        await server.start()
        link = await PollClient.open(
            f"https://127.0.0.1:{server.port}/v1/appliance",
            tls=relay_tls[2],
            server_hostname=HOST,
        )
        await asyncio.sleep(0.2)  # its down request waits at the relay
        assert len(server.polls.sessions) == 1
        await server.close()
        with pytest.raises(ConnectionClosedOK) as closed:
            await asyncio.wait_for(link.recv(), 3)
        assert closed.value.rcvd is not None and closed.value.rcvd.code == 1001

    run(main())


def test_a_long_poll_body_dripped_slowly_is_cut_off_at_its_deadline(
    make_config: ConfigMaker,
    relay_tls: tuple[Path, Path, ssl.SSLContext],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(poll_front, "REQUEST_BODY_TIMEOUT", 0.5)

    async def body(c: Client) -> None:
        reader, writer = await asyncio.open_connection(
            "127.0.0.1", c.server.port, ssl=c.tls, server_hostname=HOST
        )
        writer.write(f"POST /v1/appliance HTTP/1.1\r\nHost: {HOST}\r\n".encode())
        writer.write(b"Content-Length: 1000\r\n\r\n")
        start = time.monotonic()
        with contextlib.suppress(ConnectionError):
            for _ in range(40):  # a byte each 0.1 s: each arrives well within any gap
                writer.write(b"x")
                await writer.drain()
                await asyncio.sleep(0.1)
                if reader.at_eof():
                    break
        assert await asyncio.wait_for(reader.read(), 2) == b""  # cut off, no answer
        assert time.monotonic() - start < 1.5
        assert c.server.polls.counters["poll_sessions"] == 0
        writer.close()

    with_relay(make_config, relay_tls, body)


def test_a_relay_stops_promptly_whatever_its_poll_connections_do(
    make_config: ConfigMaker, relay_tls: tuple[Path, Path, ssl.SSLContext]
) -> None:
    """One peer read its answer and keeps its socket without finishing the TLS close
    (as a front's upstream connection may), another sits idle in keep-alive: the relay
    cuts both and is closed within seconds, not after a 30 s TLS or keep-alive wait."""

    async def main() -> None:
        server = RelayServer(make_config())
        await server.start()
        c = Client(server, relay_tls[2])
        lingering = await asyncio.open_connection(
            "127.0.0.1", server.port, ssl=c.tls, server_hostname=HOST
        )
        lingering[1].write(
            f"POST /v1/appliance HTTP/1.0\r\nHost: {HOST}\r\nContent-Length: 0\r\n\r\n".encode()
        )
        answer = await asyncio.wait_for(lingering[0].read(), 3)
        assert answer.startswith(b"HTTP/1.1 200")
        sid = answer.partition(b"\r\n\r\n")[2].decode()
        idle = await asyncio.open_connection(
            "127.0.0.1", server.port, ssl=c.tls, server_hostname=HOST
        )
        idle[1].write(
            f"POST {poll.UP_PATH} HTTP/1.1\r\nHost: {HOST}\r\nPoll-Session: {sid}\r\n"
            f"Content-Length: 8\r\n\r\n".encode()
            + poll.NUMBER.pack(0)
        )
        head = await asyncio.wait_for(idle[0].readuntil(b"\r\n\r\n"), 3)
        assert head.startswith(b"HTTP/1.1 200") and b"connection: close" not in head.lower()
        start = time.monotonic()
        await asyncio.wait_for(server.close(), 5)
        assert time.monotonic() - start < 4
        for _, writer in (lingering, idle):
            writer.transport.abort()

    run(main())


@pytest.mark.skipif(os.geteuid() != 0, reason="changes user: needs root")
def test_roots_claim_commands_run_as_the_stores_owner_and_leave_its_files_theirs(
    relay_tls: tuple[Path, Path, ssl.SSLContext], capsys: pytest.CaptureFixture[str]
) -> None:
    """The relay runs as its own user; root's `home-relay release` works as that user
    (a root-owned households.db-wal left by a killed command would lock the relay out),
    and anyone else who does not own the store is told to be its owner."""
    cert, key, _ = relay_tls
    nobody = 65534
    top = Path(tempfile.mkdtemp(prefix="relay-owner"))
    try:
        top.chmod(0o755)
        state = top / "state"
        state.mkdir(mode=0o700)
        path = top / "relay.toml"
        path.write_text(
            f'[relay]\nhost = "{HOST}"\nlisten = "127.0.0.1"\nport = 0\n'
            f'certificate = "{cert}"\nkey = "{key}"\nstate_directory = "{state}"\n'
        )
        store = Households.open(parse(TomlFile.parse(path.read_text(), path)).state)
        store.claim("bob-home", "sha256:" + "A" * 43, 1.0)
        store.conn.close()
        for p in (state, *state.iterdir()):
            os.chown(p, nobody, nobody)
        env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
        cmd = [sys.executable, "-m", "appliance.homerelay.cli", "--config", str(path)]
        listed = subprocess.run([*cmd, "names"], capture_output=True, text=True, env=env)
        assert listed.returncode == 0 and listed.stdout.startswith("bob-home\t"), listed
        freed = subprocess.run(
            [*cmd, "release", "bob-home"], capture_output=True, text=True, env=env
        )
        assert freed.returncode == 0 and "released bob-home" in freed.stdout, freed
        owners = {p.name: p.stat().st_uid for p in state.iterdir()}
        assert set(owners.values()) == {nobody}, owners
        # not root, not the owner: refused before the store is touched
        for p in (state, *state.iterdir()):
            os.chown(p, 0, 0)
        os.seteuid(nobody)  # (the real uid stays root's: given back below)
        try:
            code = cli.main(["--config", str(path), "names"])
        finally:
            os.seteuid(0)
        assert code == 1 and "run this as the owner of" in capsys.readouterr().err
    finally:
        shutil.rmtree(top, ignore_errors=True)
