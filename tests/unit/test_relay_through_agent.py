"""A guest's POP3 to a household's own server, through the household's agent (issue #17).

The whole proxy path without a relay on the internet: the appliance's real gate over
the real tables and session store, the real relay on loopback, a real AgentServer,
and in place of the dialer role a stand-in that speaks its documented line protocol
(`OPEN RELAY HOUSEHOLD\\n` -> `OK\\n`, then the stream's bytes) and pipes to the agent
on 127.0.0.1.  The household's POP server is a small asyncio server on 127.0.0.1.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import logging
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from agent_helpers import RunningAgent, make_agent_dir
from agent_helpers import free_port as agent_port
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from relay_helpers import (  # noqa: F401  (loop_kind: a fixture, used by every test)
    free_port,
    loop_kind,
    read_until,
    run,
)
from test_relay_personal import NEIGHBOURS, Recorder, logged_in, site_config

from appliance.agent import client
from appliance.core import agent_protocol as wire
from appliance.core.config import Config, HomeRelayConfig
from appliance.homelink import dialer_client
from appliance.policy import Policy
from appliance.proxy.gate import Listener, PolicyGate
from appliance.proxy.relay import Relay

pytestmark = pytest.mark.unit
KEY = Ed25519PrivateKey.generate()
KID = wire.public_key_id(KEY.public_key())
BIG = hashlib.sha256(b"seed").digest() * (2 * 1024 * 1024 // 32)  # 2 MiB
RELAY = "relay.example"


class Threaded:
    """An event loop in a thread, for the servers the test's own loop must not host
    (the blocking agent client logs in through them before the relay starts)."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def call(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(10)

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)


class HomePop(Threaded):
    """The household's POP server: greets, sends 2 MiB on RETR 1, says bye on QUIT."""

    def __init__(self) -> None:
        super().__init__()
        self.server = self.call(asyncio.start_server(self._client, "127.0.0.1", 0))
        self.port = int(self.server.sockets[0].getsockname()[1])
        self.received: list[bytes] = []

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"+OK home POP\r\n")
        while line := await reader.readline():
            self.received.append(line)
            if line.startswith(b"RETR 1"):
                writer.write(b"+OK 2097152 octets\r\n" + BIG + b".\r\n")
            elif line.startswith(b"QUIT"):
                writer.write(b"+OK bye\r\n")
                await writer.drain()
                break
            else:
                writer.write(b"+OK\r\n")
            await writer.drain()
        writer.close()


class StandInDialer(Threaded):
    """The dialer role's socket as documented (docs/home-relay.md "The appliance side"):
    reads OPEN RELAY HOUSEHOLD, answers `answer` (OK, or an ERR line); after OK the
    socket is the stream, here piped to the household's agent on 127.0.0.1."""

    def __init__(self, path: Path, agents: dict[str, int]) -> None:
        super().__init__()
        self.agents = agents  # household -> the agent's port
        self.answer = b"OK\n"
        self.opened: list[bytes] = []
        self.server = self.call(asyncio.start_unix_server(self._client, str(path)))

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        line = await reader.readuntil(b"\n")
        self.opened.append(line)
        asked = dialer_client.parse_open(line)
        if self.answer != b"OK\n" or isinstance(asked, dialer_client.DialerError):
            writer.write(self.answer if self.answer != b"OK\n" else b"ERR bad_request no\n")
            writer.close()
            return
        assert asked[0] == RELAY
        ar, aw = await asyncio.open_connection("127.0.0.1", self.agents[asked[1]])
        writer.write(b"OK\n")
        await asyncio.gather(pipe(reader, aw), pipe(ar, writer))


async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
    try:
        while data := await src.read(65536):
            dst.write(data)
            await dst.drain()
        if dst.can_write_eof():
            dst.write_eof()
    except (ConnectionError, OSError):
        dst.close()


@dataclasses.dataclass
class Home:
    config: Config  # the appliance's, with [home_relay] pointing at the stand-in
    agent: RunningAgent  # alice logged in through it
    fresh: RunningAgent  # the same household's users, no login recorded
    dialer: StandInDialer
    pop: HomePop


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Home]:
    tmp = tmp_path_factory.mktemp("through-agent")
    pop = HomePop()
    site_pop = agent_port()  # nothing listens there: the site's server is never used
    config = site_config(tmp / "appliance", site_pop)
    home_relay = HomeRelayConfig(
        {RELAY: f"wss://{RELAY}/v1/appliance"}, None, tmp / "dialer.sock", "", 5.0
    )
    config = dataclasses.replace(config, home_relay=home_relay)
    state = Path(config.state.directory)
    state.mkdir(parents=True, exist_ok=True)
    (state / client.KEY_FILE).write_bytes(
        KEY.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    (state / client.KEY_FILE).chmod(0o600)
    agents = []
    for name in ("alice-home", "fresh-home"):
        settings = make_agent_dir(
            tmp / name,
            port=agent_port(),
            users={"alice": ("alice-pw", {}, {"pop3": f"127.0.0.1:{pop.port}"})},
            extra=f'[appliances]\ntrusted = ["{KID}"]\n[limits]\nrate = 10000\nburst = 10000\n',
        )
        agents.append(
            RunningAgent(
                settings, verify=lambda stored, pw: stored is not None and pw == "alice-pw"
            )
        )
    agent, fresh = agents
    dialer = StandInDialer(
        home_relay.socket, {"alice-home": agent.server.port, "fresh-home": fresh.server.port}
    )
    # the portal's login, through the dialer: the agent notes it (and the appliance
    # refuses its loopback server table, which does not matter here: the proxy asks the
    # agent for the server, it never dials the address)
    sock = dialer_client.dial(home_relay, RELAY, "alice-home", 5.0)
    with pytest.raises(client.AgentError) as err:
        client.authenticate(config, spec(agent, "alice-home"), "alice-pw", sock=sock)
    assert err.value.code == "refused_servers"
    assert agent.server.settings.logins_file.exists()
    yield Home(config, agent, fresh, dialer, pop)
    dialer.stop()
    agent.close()
    fresh.close()
    pop.stop()


def spec(agent: RunningAgent, household: str, pin: str | None = None) -> str:
    return f"alice@{household}.{RELAY}#{pin or agent.server.fingerprint}"


async def guest_relay(home: Home, personal: str, splice: bool = True) -> tuple[Relay, int]:
    """The proxy for pop3, its gate over alice's session whose pop3 server is `personal`."""
    store = logged_in(home.config, personal)
    gate = PolicyGate(home.config, Policy.load(home.config), store, neighbour=NEIGHBOURS.get)
    port = free_port()
    relay = Relay(gate, connect_timeout=1.0, idle_timeout=10.0, splice=splice)
    await relay.start("127.0.0.1", (Listener("pop3", "pop3", port),))
    return relay, port


@pytest.mark.parametrize("splice", [True, False])  # raw accept, or the Protocol path throughout
def test_the_guests_pop_client_reads_its_home_mail_through_the_agent(
    home: Home, splice: bool
) -> None:
    home.dialer.answer = b"OK\n"
    personal = wire.relayed_server_text(spec(home.agent, "alice-home"))

    async def body() -> None:
        relay, port = await guest_relay(home, personal, splice)
        try:
            r, w = await asyncio.open_connection("127.0.0.1", port)
            assert await read_until(r, b"\r\n") == b"+OK home POP\r\n"
            w.write(b"USER alice\r\nRETR 1\r\n")
            assert await read_until(r, b"\r\n") == b"+OK\r\n"
            assert await read_until(r, b"\r\n") == b"+OK 2097152 octets\r\n"
            mail = await asyncio.wait_for(r.readexactly(len(BIG)), 10)
            assert hashlib.sha256(mail).digest() == hashlib.sha256(BIG).digest()
            assert await read_until(r, b"\r\n") == b".\r\n"
            w.write(b"QUIT\r\n")
            assert await read_until(r, b"\r\n") == b"+OK bye\r\n"
            assert await asyncio.wait_for(r.read(), 5) == b""  # the server's close reaches us
            w.close()
            await asyncio.sleep(0.1)
        finally:
            await relay.stop()
        assert relay.counters[("pop3", "ok")] == 1

    run(body())
    assert home.dialer.opened[-1] == b"OPEN relay.example alice-home\n"
    assert home.pop.received[-3:] == [b"USER alice\r\n", b"RETR 1\r\n", b"QUIT\r\n"]


async def refused_dialog(port: int) -> list[bytes]:
    r, w = await asyncio.open_connection("127.0.0.1", port)
    lines = [await read_until(r, b"\r\n")]
    w.write(b"USER alice\r\n")
    lines.append(await read_until(r, b"\r\n"))
    w.close()
    return lines


@pytest.mark.parametrize(
    ("household", "pin", "answer", "code"),
    [
        ("fresh-home", None, b"OK\n", "no_login"),  # an agent alice never logged in through
        ("alice-home", "sha256:" + "A" * 43, b"OK\n", "bad_certificate"),  # not her agent
        ("alice-home", None, b"ERR offline alice-home is not online\n", "offline"),
    ],
)
def test_no_stream_is_a_refusal_in_pop3_words_and_soon(
    home: Home,
    caplog: pytest.LogCaptureFixture,
    household: str,
    pin: str | None,
    answer: bytes,
    code: str,
) -> None:
    home.dialer.answer = answer
    agent = home.fresh if household == "fresh-home" else home.agent
    personal = wire.relayed_server_text(spec(agent, household, pin))
    received = len(home.pop.received)

    async def body() -> tuple[list[bytes], float, Relay]:
        relay, port = await guest_relay(home, personal)
        try:
            started = time.monotonic()
            lines = await refused_dialog(port)
            took = time.monotonic() - started
            await asyncio.sleep(0.1)
        finally:
            await relay.stop()
        return lines, took, relay

    with caplog.at_level(logging.WARNING, "appliance.proxy"):
        lines, took, relay = run(body())
    home.dialer.answer = b"OK\n"
    assert lines[0].startswith(b"+OK guest gateway")  # the relay's own refusal dialog
    assert lines[1].startswith(b"-ERR [SYS/TEMP]")
    assert took < 1.5
    assert relay.counters[("pop3", "upstream-down")] == 1
    failed = [r.getMessage() for r in caplog.records if "pop3/personal failed" in r.getMessage()]
    assert len(failed) == 1 and f": {code}:" in failed[0], failed
    assert len(home.pop.received) == received  # the home server saw nothing


def test_the_site_server_is_never_asked_in_its_place(home: Home, tmp_path: Path) -> None:
    """A relayed server this appliance cannot use (another relay) is a refusal: the site's
    POP server, a recorder here, gets no connection and so no home password."""
    seen: list[bytes] = []

    async def body() -> list[bytes]:
        loop = asyncio.get_running_loop()
        site_pop = free_port()
        site = await loop.create_server(
            type("R", (Recorder,), {"connections": seen}), "127.0.0.1", site_pop
        )
        config = dataclasses.replace(
            site_config(tmp_path, site_pop), home_relay=home.config.home_relay
        )
        store = logged_in(
            config,
            wire.relayed_server_text(
                "alice@alice-home.other.example#" + home.agent.server.fingerprint
            ),
        )
        gate = PolicyGate(config, Policy.load(config), store, neighbour=NEIGHBOURS.get)
        port = free_port()
        relay = Relay(gate, connect_timeout=1.0, idle_timeout=5.0)
        await relay.start("127.0.0.1", (Listener("pop3", "pop3", port),))
        try:
            lines = await refused_dialog(port)
        finally:
            await relay.stop()
            site.close()
        return lines

    lines = run(body())
    assert lines[1].startswith(b"-ERR [SYS/PERM]")
    assert seen == []
