"""The agent's link to a home relay, end to end in process: a real RelayServer, a real
AgentServer with `[relay]`, an appliance-side Link, and the appliance's own client code
speaking TLS to the agent through the relayed stream.  All on loopback, real TLS.

What is checked is what a household and a visitor would see: presence online, a login
answered, a mailbox fetched byte for byte, also across a dropped agent link; and that a
wrong relay pin or a name claimed by another key keeps the agent out (without a storm of
retries, and without handing a signature to the wrong relay)."""

from __future__ import annotations

import asyncio
import datetime
import hashlib
import json
import logging
import os
import shutil
import socket
import ssl
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
from agent_helpers import appliance_config, free_port, make_agent_dir
from certs import self_signed
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.x509.oid import NameOID
from home_front import NginxFront
from websockets.asyncio.client import connect

from appliance.agent import client
from appliance.agent.server import AgentServer
from appliance.core import agent_protocol as wire
from appliance.core.tomlfile import TomlFile
from appliance.homelink.frames import Frame
from appliance.homelink.link import Link
from appliance.homelink.poll_client import PollClient
from appliance.homelink.registration import parse_challenge, sign_registration
from appliance.homerelay.config import parse as parse_relay_config
from appliance.homerelay.server import RelayServer

pytestmark = pytest.mark.unit

HOST = "localhost"  # the relay's name: a DNS name (the relay insists) that reaches loopback
HOUSEHOLD = "alice-home"
KEY = Ed25519PrivateKey.generate()  # the appliance's key, trusted by the agent
KID = wire.public_key_id(KEY.public_key())
MAILBOX = os.urandom(4 << 20)
RETR_HEAD = b"+OK 4194304 octets\r\n"


@pytest.fixture(scope="module")
def relay_tls(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, str]:
    """The relay's certificate and key files, and the certificate's fingerprint."""
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
    return (
        d / "cert.pem",
        d / "key.pem",
        wire.fingerprint(cert.public_bytes(serialization.Encoding.DER)),
    )


@pytest.fixture(scope="module")
def config(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """The appliance's config, its key the one the agent trusts."""
    cfg = appliance_config(tmp_path_factory.mktemp("relay-appliance"), timeout=5.0)
    state = Path(cfg.state.directory)
    state.mkdir(parents=True, exist_ok=True)
    (state / client.KEY_FILE).write_bytes(
        KEY.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    (state / client.KEY_FILE).chmod(0o600)
    return cfg


def run(coro: Coroutine[Any, Any, None]) -> None:
    async def bounded() -> None:
        await asyncio.wait_for(coro, 15)

    asyncio.run(bounded())


class PopLike:
    """A POP-like server: greets, sends the 4 MiB mailbox on RETR, says bye on QUIT."""

    async def start(self) -> None:
        self.server = await asyncio.start_server(self._client, "127.0.0.1", 0)
        self.port = int(self.server.sockets[0].getsockname()[1])

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"+OK hello\r\n")
        while line := await reader.readline():
            if line.startswith(b"RETR"):
                writer.write(RETR_HEAD + MAILBOX)
            elif line.startswith(b"QUIT"):
                writer.write(b"+OK bye\r\n")
                await writer.drain()
                break
            await writer.drain()
        writer.close()


class Rig:
    """Relay, agent and an appliance link on one event loop."""

    def __init__(
        self,
        relay: RelayServer,
        agent: AgentServer,
        appliance: Link,
        pop: PopLike,
        dial_appliance: Callable[[], Awaitable[Any]],
    ):
        self.relay = relay
        self.dial_appliance = dial_appliance  # another appliance's link dials the same way
        self.agent = agent
        self.appliance = appliance
        self.pop = pop
        self.bridges: list[asyncio.Task[None]] = []
        self.settings: Any = None  # the agent's

    @property
    def spec(self) -> str:
        return f"alice@{HOUSEHOLD}.{HOST}#{self.agent.fingerprint}"

    async def presence(self) -> tuple[int, dict[str, Any]]:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
        reader, writer = await asyncio.open_connection(
            "127.0.0.1", self.relay.port, ssl=ctx, server_hostname=HOST
        )
        writer.write(
            f"GET /v1/households/{HOUSEHOLD} HTTP/1.1\r\nHost: {HOST}\r\n"
            "Connection: close\r\n\r\n".encode()
        )
        data = await reader.read()
        writer.close()
        head, _, body = data.partition(b"\r\n\r\n")
        status = int(head.split()[1])
        return status, json.loads(body) if status == 200 else {}

    async def wait_online(self, within: float) -> float:
        """Seconds until presence says the household is reachable."""
        start = time.monotonic()
        async with asyncio.timeout(within):
            while True:
                status, doc = await self.presence()
                if status == 200 and doc["state"] in ("online", "in_use"):
                    return time.monotonic() - start
                await asyncio.sleep(0.02)

    async def bob_logs_in(self, config: Any, appliance: Link | None = None) -> Any:
        """bob's login through the relay, as the portal makes it."""
        return await asyncio.to_thread(
            client.authenticate,
            config,
            f"bob@{HOUSEHOLD}.{HOST}#{self.agent.fingerprint}",
            "bob-pw",
            sock=await self.relayed_socket(appliance),
        )

    async def relayed_socket(self, appliance: Link | None = None) -> socket.socket:
        """A stream through the relay to the agent, as a blocking socket for client.py."""
        ls = (appliance or self.appliance).open(HOUSEHOLD)
        assert await ls.wait_opened(5) is None
        ours, theirs = socket.socketpair()
        reader, writer = await asyncio.open_connection(sock=ours)
        self.bridges.append(asyncio.create_task(ls.bridge(reader, writer)))
        return theirs


async def claim(relay: RelayServer, cert: Path) -> None:
    """Register HOUSEHOLD with a P-256 key that is not the agent's, then leave."""
    squatter = ec.generate_private_key(ec.SECP256R1())
    der = self_signed(squatter, "squatter").public_bytes(serialization.Encoding.DER)
    async with connect(
        f"wss://127.0.0.1:{relay.port}/v1/agent",
        ssl=ssl.create_default_context(cafile=str(cert)),
        server_hostname=HOST,
    ) as ws:
        nonce = parse_challenge(await ws.recv())
        await ws.send(json.dumps(sign_registration(squatter, der, nonce, HOUSEHOLD, HOST)))
        assert json.loads(await ws.recv())["type"] == "registered"


def fetch(tls: ssl.SSLSocket, progress: list[int]) -> str:
    """RETR the mailbox (noting bytes so far in `progress`), QUIT; the mailbox's sha256."""
    tls.settimeout(10)

    def until(end: bytes) -> bytes:
        got = bytearray()
        while not got.endswith(end):
            chunk = tls.recv(1)
            assert chunk, "EOF mid-line"
            got += chunk
        return bytes(got)

    assert until(b"\r\n") == b"+OK hello\r\n"
    tls.sendall(b"RETR 1\r\n")
    assert until(b"\r\n") == RETR_HEAD
    got = bytearray()
    while len(got) < len(MAILBOX):
        chunk = tls.recv(65536)
        assert chunk, f"EOF after {len(got)} bytes"
        got += chunk
        progress[0] = len(got)
    tls.sendall(b"QUIT\r\n")
    assert until(b"\r\n") == b"+OK bye\r\n"
    tls.close()
    return hashlib.sha256(got).hexdigest()


@asynccontextmanager
async def rig(
    tmp_path: Path,
    relay_tls: tuple[Path, Path, str],
    pin: str | None = None,
    squat: bool = False,
    limits: tuple[int, int] = (10000, 10000),
    front: Callable[[int], int] | None = None,
) -> AsyncIterator[Rig]:
    """`pin`: the relay pin the agent is given (default the right one); `squat`: the
    household's name is claimed by another key before the agent starts; `limits`: the
    agent's rate limits, (per minute, burst); `front(relay_port)`: starts what stands
    between the agent and the relay, gives its port."""
    cert, key, relay_pin = relay_tls
    relay_config = parse_relay_config(
        TomlFile.parse(
            f'[relay]\nhost = "{HOST}"\nlisten = "127.0.0.1"\nport = 0\n'
            f'certificate = "{cert}"\nkey = "{key}"\nstate_directory = "state"\n',
            tmp_path / "relay.toml",
        )
    )
    relay = RelayServer(relay_config)
    await relay.start()
    if squat:
        await claim(relay, cert)
    pop = PopLike()
    await pop.start()
    agent_port = relay.port if front is None else await asyncio.to_thread(front, relay.port)
    settings = make_agent_dir(
        tmp_path / "agent",
        port=free_port(),
        users={
            "alice": ("alice-pw", {}, {"pop3": f"127.0.0.1:{pop.port}"}),
            "bob": ("bob-pw", {"name": "Bob"}, {}),
        },
        extra=(
            f'[appliances]\ntrusted = ["{KID}"]\n[limits]\nrate = {limits[0]}\n'
            f"burst = {limits[1]}\n"
            f'[relay]\nurl = "wss://{HOST}:{agent_port}/v1/agent"\n'
            f'household = "{HOUSEHOLD}"\npin = "{pin or relay_pin}"\n'
        ),
    )
    agent = AgentServer(
        settings, verify=lambda stored, pw: stored is not None and pw.endswith("-pw")
    )
    trust = ssl.create_default_context(cafile=str(cert))

    async def dial_appliance() -> Any:
        return await connect(
            f"wss://127.0.0.1:{relay.port}/v1/appliance",
            ssl=trust,
            server_hostname=HOST,
            compression=None,
            proxy=None,
            max_size=None,
        )

    appliance = Link(dial_appliance, name="appliance")
    appliance_task = asyncio.create_task(appliance.run())
    await agent.start()
    r = Rig(relay, agent, appliance, pop, dial_appliance)
    r.settings = settings
    try:
        yield r
    finally:
        for task in (*r.bridges, appliance_task):
            task.cancel()
        await asyncio.gather(*r.bridges, appliance_task, return_exceptions=True)
        await agent.close()
        pop.server.close()
        await relay.close()


def test_relayed_login_and_fetch_survive_a_dropped_agent_link(
    tmp_path: Path, relay_tls: tuple[Path, Path, str], config: Any
) -> None:
    figures: dict[str, float] = {}

    async def body() -> None:
        async with rig(tmp_path, relay_tls) as r:
            figures["online"] = await r.wait_online(2)
            assert r.agent.relay is not None
            link = r.agent.relay

            # a login through the relay: TLS end to end, pinned to the agent's certificate
            answer = await r.bob_logs_in(config)
            assert answer.user == "bob" and answer.attributes["name"] == "Bob"
            assert answer.fingerprint == r.agent.fingerprint
            with pytest.raises(client.AgentError) as err:  # the portal refuses loopback
                await asyncio.to_thread(  # servers, but the agent noted alice's login
                    client.authenticate, config, r.spec, "alice-pw", sock=await r.relayed_socket()
                )
            assert err.value.code == "refused_servers"

            async def stream() -> ssl.SSLSocket:
                tls: ssl.SSLSocket = await asyncio.to_thread(
                    client.open_server_stream,
                    config,
                    r.spec,
                    "alice",
                    "pop3",
                    sock=await r.relayed_socket(),
                )
                return tls

            progress = [0]
            digest = await asyncio.to_thread(fetch, await stream(), progress)
            assert digest == hashlib.sha256(MAILBOX).hexdigest()

            # the agent's link dies mid-fetch (a NAT mapping lost): it comes back, and the
            # stream resumes on the new link
            progress = [0]
            fetching = asyncio.ensure_future(asyncio.to_thread(fetch, await stream(), progress))
            async with asyncio.timeout(5):
                while progress[0] < 1 << 20:
                    await asyncio.sleep(0.005)
            dials, registrations = link.dials, r.relay.counters["registered"]
            assert link.ws is not None
            cut = time.monotonic()
            link.ws.transport.abort()
            async with asyncio.timeout(3):
                while link.registered_at < cut:
                    await asyncio.sleep(0.005)
            figures["back_total"] = link.registered_at - cut
            figures["back_registering"] = link.registered_at - link.dial_started
            assert link.dials == dials + 1
            assert r.relay.counters["registered"] == registrations + 1
            assert await asyncio.wait_for(fetching, 10) == hashlib.sha256(MAILBOX).hexdigest()
            assert await r.wait_online(1) < 1
            assert link.status()["up"] is True

    run(body())
    print("measured:", {k: f"{v * 1000:.0f} ms" for k, v in figures.items()})
    assert figures["online"] < 2
    assert figures["back_registering"] < 1
    assert figures["back_total"] < 2


def junk_post(tls_sock: socket.socket) -> int:
    """One unsigned POST /v1/authenticate on a relayed stream, as a flood sends them: the status."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
    tls_sock.settimeout(10)
    with ctx.wrap_socket(tls_sock, server_hostname=HOST) as tls:
        tls.sendall(
            b"POST /v1/authenticate HTTP/1.1\r\nHost: agent\r\n"
            b"Content-Type: application/json\r\nContent-Length: 2\r\n\r\n{}"
        )
        head = tls.recv(4096)
    return int(head.split()[1])


def test_a_flood_through_the_relay_brakes_only_the_appliance_that_sends_it(
    tmp_path: Path,
    relay_tls: tuple[Path, Path, str],
    config: Any,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Every relayed request reaches the agent's API from loopback; the relay's OPEN says
    who opened the stream, and the agent's per-source brake counts that address.  Here
    the two appliances' links get different source addresses at the relay (on loopback
    both would be 127.0.0.1): one floods junk until it gets 429, the other still logs in."""
    sources: dict[int, str] = {}  # appliance link's port at the relay -> the source it gets
    real_open = RelayServer._open

    async def open_with_source(self: RelayServer, link: Any, frame: Frame, route: Any) -> None:
        # the relay passes on the appliance link's address (link.source) with each OPEN
        link.source = sources.setdefault(link.ws.remote_address[1], f"192.0.2.{len(sources) + 1}")
        await real_open(self, link, frame, route)

    monkeypatch.setattr(RelayServer, "_open", open_with_source)

    async def body() -> None:
        async with rig(tmp_path, relay_tls, limits=(1, 5)) as r:
            await r.wait_online(2)
            assert r.agent.relay is not None
            flooder = Link(r.dial_appliance, name="flooder")
            flooding = asyncio.create_task(flooder.run())
            try:
                statuses = []
                while 429 not in statuses:
                    assert len(statuses) < 20, statuses
                    sock = await r.relayed_socket(flooder)
                    statuses.append(await asyncio.to_thread(junk_post, sock))
                assert statuses == [400] * 5 + [429]  # the burst, then the brake
                assert await asyncio.to_thread(junk_post, await r.relayed_socket(flooder)) == 429

                answer = await asyncio.to_thread(  # another appliance behind the same relay
                    client.authenticate,
                    config,
                    f"bob@{HOUSEHOLD}.{HOST}#{r.agent.fingerprint}",
                    "bob-pw",
                    sock=await r.relayed_socket(),
                )
                assert answer.user == "bob"
                assert sorted(sources.values()) == ["192.0.2.1", "192.0.2.2"]
                # one entry per open stream: the ended ones are gone
                async with asyncio.timeout(5):
                    while r.agent.relay.bridges:
                        await asyncio.sleep(0.02)
            finally:
                flooding.cancel()
                await asyncio.gather(flooding, return_exceptions=True)

    run(body())


def test_a_wrong_relay_pin_never_gets_a_registration(
    tmp_path: Path, relay_tls: tuple[Path, Path, str]
) -> None:
    async def body() -> None:
        async with rig(tmp_path, relay_tls, pin="sha256:" + "A" * 43) as r:
            await asyncio.sleep(1.5)
            assert r.agent.relay is not None
            assert "pin mismatch" in r.agent.relay.last_error
            assert r.agent.relay.dials >= 1
            assert (await r.presence())[0] == 404
            assert r.relay.counters["registered"] == 0
            assert r.relay.counters["registration_refused"] == 0
            assert r.relay.counters["agent_links"] >= 1  # it did reach the relay, no further

    run(body())


@pytest.mark.skipif(shutil.which("nginx") is None, reason="nginx is not installed")
def test_behind_a_front_that_blocks_upgrades_the_agent_links_by_long_poll(
    tmp_path: Path, relay_tls: tuple[Path, Path, str], config: Any
) -> None:
    """nginx in front of the relay drops the Upgrade: the agent's link falls back to
    long-poll, still pinned (every TLS connection it opens is checked), and a visitor's
    login and fetch through the relay work as over a WebSocket."""
    cert, key, _ = relay_tls
    nginx = NginxFront(tmp_path / "nginx", cert, key, HOST)

    async def body() -> None:
        async with rig(tmp_path, relay_tls, front=nginx) as r:
            await r.wait_online(5)
            assert r.agent.relay is not None and isinstance(r.agent.relay.ws, PollClient)
            assert (await r.bob_logs_in(config)).user == "bob"
            with pytest.raises(client.AgentError):  # refused (loopback servers), but noted
                await asyncio.to_thread(
                    client.authenticate, config, r.spec, "alice-pw", sock=await r.relayed_socket()
                )
            tls = await asyncio.to_thread(
                client.open_server_stream,
                config,
                r.spec,
                "alice",
                "pop3",
                sock=await r.relayed_socket(),
            )
            digest = await asyncio.to_thread(fetch, tls, [0])
            assert digest == hashlib.sha256(MAILBOX).hexdigest()
            assert r.relay.polls.counters["poll_sessions"] == 1
            assert '"POST /v1/poll/' in nginx.access_log()

    try:
        run(body())
    finally:
        nginx.stop()


@pytest.mark.skipif(shutil.which("nginx") is None, reason="nginx is not installed")
def test_a_wrong_relay_pin_keeps_a_long_poll_link_out_too(
    tmp_path: Path, relay_tls: tuple[Path, Path, str]
) -> None:
    cert, key, _ = relay_tls
    nginx = NginxFront(tmp_path / "nginx", cert, key, HOST)

    async def body() -> None:
        async with rig(tmp_path, relay_tls, pin="sha256:" + "A" * 43, front=nginx) as r:
            await asyncio.sleep(1.5)
            assert r.agent.relay is not None
            assert "pin mismatch" in r.agent.relay.last_error
            assert (await r.presence())[0] == 404
            assert r.relay.counters["registered"] == 0
            # the fallback dialled no session: the pin failed on the first connection
            assert r.relay.polls.counters["poll_sessions"] == 0

    try:
        run(body())
    finally:
        nginx.stop()


def test_a_household_that_renews_its_certificate_keeps_its_name(
    tmp_path: Path, relay_tls: tuple[Path, Path, str]
) -> None:
    """The agent is stopped, its certificate and key replaced by new ones (a renewal),
    and started again: it registers under its name at once, with the new fingerprint,
    where without the old key's word the relay would refuse it as claimed (4403)."""

    async def body() -> None:
        async with rig(tmp_path, relay_tls) as r:
            await r.wait_online(2)
            old = r.agent.fingerprint
            kept = r.settings.relay_identity_file
            assert kept.stat().st_mode & 0o777 == 0o600
            await r.agent.close()
            r.settings.tls_certificate.unlink()
            r.settings.tls_key.unlink()
            renewed = AgentServer(
                r.settings, verify=lambda stored, pw: stored is not None and pw.endswith("-pw")
            )
            assert renewed.fingerprint != old
            await renewed.start()
            try:
                await r.wait_online(3)
                assert renewed.relay is not None and renewed.relay.registered
                assert r.relay.counters["rekeyed"] == 1
                assert r.relay.counters["registration_refused"] == 0
                # the name is the new key's now, and the kept identity follows it
                assert r.relay.registrations.claim_or_check(HOUSEHOLD, old, 0.0) is not None
                assert renewed.relay._previous_identity() is None
                # a kept file that is not a usable identity is ignored, never a crash
                p384 = ec.generate_private_key(ec.SECP384R1())
                for junk in (
                    b"not pem",
                    p384.private_bytes(
                        serialization.Encoding.PEM,
                        serialization.PrivateFormat.PKCS8,
                        serialization.BestAvailableEncryption(b"pw"),
                    ),
                    p384.private_bytes(
                        serialization.Encoding.PEM,
                        serialization.PrivateFormat.PKCS8,
                        serialization.NoEncryption(),
                    )
                    + self_signed(p384, "x").public_bytes(serialization.Encoding.PEM),
                ):
                    kept.write_bytes(junk)
                    assert renewed.relay._previous_identity() is None
            finally:
                await renewed.close()

    run(body())


def test_a_name_claimed_by_another_key_is_retried_with_backoff(
    tmp_path: Path, relay_tls: tuple[Path, Path, str], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="appliance.agent.relay")

    async def body() -> None:
        async with rig(tmp_path, relay_tls, squat=True) as r:
            assert r.agent.relay is not None
            await asyncio.sleep(3)
            link = r.agent.relay
            assert "4403" in link.last_error and "claimed by another key" in link.last_error
            print("dials in 3 s:", link.dials)
            assert 2 <= link.dials <= 8, link.dials  # retried, with backoff (0.5, 1, 2 s caps)
            assert link.status()["up"] is False
            assert r.relay.counters["registered"] == 1  # the squatter's, never the agent's
            status, doc = await r.presence()
            assert status == 200 and doc["state"] == "offline"

    run(body())
    warnings = [
        rec
        for rec in caplog.records
        if rec.name == "appliance.agent.relay"
        and rec.levelno == logging.WARNING
        and "claimed by another key" in rec.getMessage()
    ]
    assert len(warnings) == 1  # once per change, not at every retry


def test_an_agent_key_that_is_not_p256_leaves_the_link_off_and_says_why(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from cryptography.hazmat.primitives.asymmetric import rsa

    settings = make_agent_dir(
        tmp_path,
        port=free_port(),
        extra=f'[relay]\nurl = "wss://{HOST}:1/v1/agent"\nhousehold = "{HOUSEHOLD}"\n',
    )
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "agent")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .sign(key, hashes.SHA256())
    )
    settings.tls_certificate.parent.mkdir(parents=True, exist_ok=True)
    settings.tls_certificate.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    settings.tls_key.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )

    async def body() -> None:
        agent = AgentServer(settings)
        await agent.start()
        try:
            assert agent.relay is None and agent.relay_status() is None
            assert agent.port > 0  # the direct API still serves
        finally:
            await agent.close()

    with caplog.at_level(logging.ERROR, logger="appliance.agent"):
        run(body())
    assert any("not a P-256" in rec.getMessage() for rec in caplog.records)


def test_personal_agent_status_says_whether_the_relay_link_is_up(
    tmp_path: Path, relay_tls: tuple[Path, Path, str], capsys: pytest.CaptureFixture[str]
) -> None:
    from appliance.agent import cli

    def status(path: Path) -> tuple[int, str]:
        code = cli.main(["status", "--config", str(path)])
        return code, capsys.readouterr().out

    async def wait_status(path: Path, want: str) -> tuple[int, str]:
        for _ in range(60):
            code, out = await asyncio.to_thread(status, path)
            if want in out:
                return code, out
            await asyncio.sleep(0.1)
        raise AssertionError(out)

    async def body() -> None:
        async with rig(tmp_path, relay_tls) as r:
            await r.wait_online(2)
            path = r.agent.settings.path
            code, out = await wait_status(path, "link up")
            assert code == 0 and HOUSEHOLD in out
        async with rig(tmp_path / "bad", relay_tls, pin="sha256:" + "A" * 43) as r:
            code, out = await wait_status(r.agent.settings.path, "DOWN")
            assert code == 1 and "pin mismatch" in out
        # no agent runs any more: the status file names a process that is gone, or none
        code, out = status(tmp_path / "nowhere" / "agent.toml")
        assert code in (2, 3)

    run(body())
