"""The dialer role against the real relay, in process: real TLS, real WebSockets, loopback.

A test CA signs the relay's certificate for `relay.example`; the dialer reaches the
relay at 127.0.0.1 but checks the certificate against that name, as on a real site.
An agent-side `Link` registered for `bob-home` bridges every stream to an echo
server.  What is checked is what the portal or the proxy would see through the
dialer's socket: OK and the bytes back unchanged, or the ERR code and its text.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime
import hashlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from home_front import NginxFront
from relay_helpers import free_port

from appliance.core.config import HomeRelayConfig
from appliance.core.tomlfile import TomlFile
from appliance.homelink import frames
from appliance.homelink.dialer import Dialer, tls_context
from appliance.homelink.dialer_client import DialerError, dial, dial_async
from appliance.homelink.link import Link, LinkConnection, LinkStream
from appliance.homelink.poll_client import PollClient, dial_link
from appliance.homelink.registration import parse_challenge, sign_registration
from appliance.homerelay.config import RelayConfig, parse
from appliance.homerelay.server import RelayServer

pytestmark = pytest.mark.unit

RELAY = "relay.example"
HOUSEHOLD = "bob-home"
PAYLOAD = os.urandom(2 * 1024 * 1024)
DIGEST = hashlib.sha256(PAYLOAD).hexdigest()
OPEN_TIMEOUT = 2.0


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _cert(
    subject: str, key: ec.EllipticCurvePrivateKey, issuer: str, signer: ec.EllipticCurvePrivateKey
) -> x509.Certificate:
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(subject))
        .issuer_name(_name(issuer))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
    )
    if subject == issuer:
        builder = builder.add_extension(
            x509.BasicConstraints(ca=True, path_length=0), critical=True
        ).add_extension(
            x509.KeyUsage(False, False, False, False, False, True, True, False, False),
            critical=True,
        )
    else:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.DNSName(subject)]), critical=False
        ).add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
    return builder.sign(signer, hashes.SHA256())


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


@dataclass
class Pki:
    ca: Path
    relay_cert: Path  # names relay.example
    other_cert: Path  # the same CA, but names other.example
    key: Path  # both leaves share it


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    d = tmp_path_factory.mktemp("pki")
    ca_key, leaf_key = (
        ec.generate_private_key(ec.SECP256R1()),
        ec.generate_private_key(ec.SECP256R1()),
    )
    ca = _cert("Test relay CA", ca_key, "Test relay CA", ca_key)
    (d / "ca.pem").write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    for name, file in ((RELAY, "relay.pem"), ("other.example", "other.pem")):
        cert = _cert(name, leaf_key, "Test relay CA", ca_key)
        (d / file).write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (d / "key.pem").write_bytes(_pem_key(leaf_key))
    return Pki(d / "ca.pem", d / "relay.pem", d / "other.pem", d / "key.pem")


@pytest.fixture
def short_dir() -> Iterator[Path]:
    """A directory for unix sockets (their paths must stay under 108 bytes)."""
    d = Path(tempfile.mkdtemp(prefix="hl", dir="/tmp"))
    yield d
    shutil.rmtree(d, ignore_errors=True)


def relay_config(directory: Path, cert: Path, key: Path, port: int = 0) -> RelayConfig:
    text = (
        f'[relay]\nhost = "{RELAY}"\nlisten = "127.0.0.1"\nport = {port}\n'
        f'certificate = "{cert}"\nkey = "{key}"\nstate_directory = "state"\n'
    )
    return parse(TomlFile.parse(text, directory / "relay.toml"))


def dialer_config(
    socket_path: Path, ca: Path, port: int, dead_first: int | None = None
) -> HomeRelayConfig:
    """The dialer's [home_relay]; `dead_first`: a port nothing listens on, listed first
    (a federation's relay that died)."""
    urls = [f"wss://127.0.0.1:{port}/v1/appliance"]
    if dead_first is not None:
        urls.insert(0, f"wss://127.0.0.1:{dead_first}/v1/appliance")
    return HomeRelayConfig(
        relays={RELAY: tuple(urls)},
        ca=ca,
        socket=socket_path,
        proxy="",
        open_timeout=OPEN_TIMEOUT,
    )


async def _echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    with contextlib.suppress(ConnectionError):
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
        writer.write_eof()
    writer.close()


class World:
    """The relay, the agent of bob-home behind it, an echo server, and the dialer."""

    def __init__(self, pki: Pki, directory: Path) -> None:
        self.pki = pki
        self.directory = directory
        self.relay: RelayServer | None = None
        self.port = 0
        self.dialer: Dialer | None = None
        self.agent: Link | None = None
        self.tasks: list[asyncio.Task[None]] = []
        self.front = 0  # a port in front of the relay that ends agents and dialer go to

    @property
    def cfg(self) -> HomeRelayConfig:
        assert self.dialer is not None
        return self.dialer.cfg

    async def start_relay(self) -> None:
        self.relay = RelayServer(
            relay_config(self.directory, self.pki.relay_cert, self.pki.key, self.port)
        )
        await self.relay.start()
        self.port = self.relay.port

    async def stop_relay(self) -> None:
        assert self.relay is not None
        await self.relay.close()
        self.relay = None

    async def start_agent(self) -> None:
        """bob-home's agent: registers with its own key, bridges each stream to the echo."""
        echo = await asyncio.start_server(_echo, "127.0.0.1", 0)
        echo_port = echo.sockets[0].getsockname()[1]
        key = ec.generate_private_key(ec.SECP256R1())
        der = _cert("agent", key, "agent", key).public_bytes(serialization.Encoding.DER)
        ctx = tls_context(dataclasses.replace(self.cfg, ca=self.pki.ca))

        async def dial_agent() -> LinkConnection:
            ws: LinkConnection = await dial_link(
                f"wss://127.0.0.1:{self.front or self.port}/v1/agent",
                tls=ctx,
                server_hostname=RELAY,
                compression=None,
                ping_interval=3,
                ping_timeout=5,
                proxy=None,
                max_size=frames.MAX_FRAME + 256,
            )
            return ws

        async def register(ws: Any) -> None:
            nonce = parse_challenge(await ws.recv())
            await ws.send(json.dumps(sign_registration(key, der, nonce, HOUSEHOLD, RELAY)))
            answer = json.loads(await ws.recv())
            assert answer == {"type": "registered", "household": HOUSEHOLD}

        async def accept(ls: LinkStream) -> None:
            reader, writer = await asyncio.open_connection("127.0.0.1", echo_port)
            ls.hold()
            await ls.bridge(reader, writer)

        self.agent = Link(dial_agent, name="agent", register=register, accept=accept)
        self.tasks.append(asyncio.create_task(self.agent.run()))
        await asyncio.wait_for(self.agent.up.wait(), 5)

    async def start_dialer(self, cfg: HomeRelayConfig) -> None:
        self.dialer = Dialer(cfg)
        await self.dialer.start()

    async def close(self) -> None:
        if self.dialer is not None:
            await self.dialer.close()
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        if self.relay is not None:
            await self.relay.close()


@asynccontextmanager
async def world(
    pki: Pki,
    directory: Path,
    agent: bool = True,
    dead_first: int | None = None,
    front: Callable[[int], int] | None = None,
) -> AsyncIterator[World]:
    """`front(relay_port)`: starts what stands in front of the relay, returns its port."""
    w = World(pki, directory)
    try:
        await w.start_relay()
        if front is not None:
            w.front = front(w.port)
        socket_path = directory / "run" / "homelink.sock"
        await w.start_dialer(dialer_config(socket_path, pki.ca, w.front or w.port, dead_first))
        if agent:
            await w.start_agent()
        assert w.dialer is not None
        await asyncio.wait_for(w.dialer.links[RELAY].up.wait(), 5)
        yield w
    finally:
        await w.close()


def run(coro: Coroutine[Any, Any, None], limit: float = 15) -> None:
    async def bounded() -> None:
        await asyncio.wait_for(coro, limit)

    asyncio.run(bounded())


def sync_echo(cfg: HomeRelayConfig, household: str = HOUSEHOLD) -> str:
    """The portal's way (blocking sockets, in a thread): send it all, read it all back."""
    sock = dial(cfg, RELAY, household, timeout=10)
    with sock:

        def send() -> None:
            sock.sendall(PAYLOAD)
            sock.shutdown(socket.SHUT_WR)

        sender = threading.Thread(target=send)
        sender.start()
        digest = hashlib.sha256()
        while chunk := sock.recv(65536):
            digest.update(chunk)
        sender.join()
    return digest.hexdigest()


async def async_echo(cfg: HomeRelayConfig, midway: Any = None, household: str = HOUSEHOLD) -> str:
    """The proxy's way; `midway` (a coroutine function) runs after a third is echoed."""
    reader, writer = await dial_async(cfg, RELAY, household, timeout=10)

    async def send() -> None:
        for i in range(0, len(PAYLOAD), 65536):
            writer.write(PAYLOAD[i : i + 65536])
            await writer.drain()
        writer.write_eof()

    sender = asyncio.create_task(send())
    digest = hashlib.sha256()
    received = 0
    fired = False
    while chunk := await reader.read(65536):
        digest.update(chunk)
        received += len(chunk)
        if midway is not None and not fired and received >= len(PAYLOAD) // 3:
            fired = True
            await midway()
    await sender
    writer.close()
    assert fired or midway is None
    return digest.hexdigest()


async def refusal(cfg: HomeRelayConfig, relay: str, household: str) -> DialerError:
    with pytest.raises(DialerError) as caught:
        await dial_async(cfg, relay, household, timeout=10)
    return caught.value


def test_streams_echo_two_mebibytes_through_both_clients(pki: Pki, short_dir: Path) -> None:
    async def body() -> None:
        async with world(pki, short_dir) as w:
            assert oct(w.cfg.socket.stat().st_mode & 0o777) == "0o660"
            assert oct(w.cfg.socket.parent.stat().st_mode & 0o777) == "0o750"
            threaded = asyncio.to_thread(sync_echo, w.cfg)
            assert list(await asyncio.gather(threaded, async_echo(w.cfg))) == [DIGEST, DIGEST]
            assert w.dialer is not None and w.dialer.counters["streams_opened"] == 2

    run(body())


def test_a_dead_relay_listed_first_under_the_name_costs_one_refused_dial(
    pki: Pki, short_dir: Path
) -> None:
    async def body() -> None:
        async with world(pki, short_dir, dead_first=free_port()) as w:
            assert await async_echo(w.cfg) == DIGEST
            assert w.dialer is not None
            assert w.dialer.links[RELAY].counters["link_failures"] == 0

    run(body())


def test_offline_household_and_unknown_relay_are_refused_readably(
    pki: Pki, short_dir: Path
) -> None:
    async def body() -> None:
        async with world(pki, short_dir) as w:
            err = await refusal(w.cfg, RELAY, "carol-home")
            assert err.code == "offline"
            assert err.message == f"your household carol-home is not online at {RELAY}"
            with pytest.raises(DialerError) as sync_err:
                await asyncio.to_thread(dial, w.cfg, RELAY, "carol-home", 10)
            assert sync_err.value.code == "offline"
            err = await refusal(w.cfg, "elsewhere.example", HOUSEHOLD)
            assert err.code == "bad_request" and "elsewhere.example" in err.message
            assert await async_echo(w.cfg) == DIGEST  # the dialer serves on

    run(body())


def test_garbage_lines_get_bad_request_and_the_dialer_keeps_serving(
    pki: Pki, short_dir: Path
) -> None:
    async def body() -> None:
        async with world(pki, short_dir) as w:
            path = str(w.cfg.socket)
            for garbage in (b"HELLO\n", b"OPEN relay.example Bad_Name\n", b"\xff\xfe x y\n"):
                reader, writer = await asyncio.open_unix_connection(path)
                writer.write(garbage)
                line = await asyncio.wait_for(reader.readline(), 5)
                assert line.startswith(b"ERR bad_request "), (garbage, line)
                assert await reader.read() == b""
                writer.close()
            reader, writer = await asyncio.open_unix_connection(path)
            writer.write(b"x" * 4000)  # no newline, far past MAX_LINE
            assert (await asyncio.wait_for(reader.readline(), 5)).startswith(b"ERR bad_request")
            writer.close()
            assert await async_echo(w.cfg) == DIGEST
            assert w.dialer is not None and w.dialer.counters["errors"] == 0

    run(body())


def test_clients_beyond_the_limit_get_err_limit(pki: Pki, short_dir: Path) -> None:
    async def body() -> None:
        async with world(pki, short_dir) as w:
            assert w.dialer is not None
            w.dialer.max_clients = 1
            _, idle = await asyncio.open_unix_connection(str(w.cfg.socket))  # sends no line
            await asyncio.wait_for(_until(lambda: w.dialer is not None and w.dialer._clients), 5)
            err = await refusal(w.cfg, RELAY, HOUSEHOLD)
            assert err.code == "limit"
            idle.close()
            await asyncio.wait_for(
                _until(lambda: w.dialer is not None and not w.dialer._clients), 5
            )
            assert await async_echo(w.cfg) == DIGEST

    run(body())


def test_a_relay_whose_certificate_names_another_host_is_unreachable(
    pki: Pki, short_dir: Path
) -> None:
    async def body() -> None:
        impostor = RelayServer(relay_config(short_dir, pki.other_cert, pki.key))
        await impostor.start()
        dialer = Dialer(dialer_config(short_dir / "d.sock", pki.ca, impostor.port))
        await dialer.start()
        try:
            started = time.monotonic()
            err = await refusal(dialer.cfg, RELAY, HOUSEHOLD)
            assert err.code == "unreachable"
            assert err.message.startswith(f"relay {RELAY} is not reachable: ")
            assert "certificate" in err.message.lower(), err.message
            assert time.monotonic() - started < OPEN_TIMEOUT + 1
            assert impostor.counters["routes_opened"] == 0
        finally:
            await dialer.close()
            await impostor.close()
        assert not dialer.cfg.socket.exists()  # close() removes the socket

    run(body())


def test_a_stopped_relay_is_unreachable(pki: Pki, short_dir: Path) -> None:
    async def body() -> None:
        async with world(pki, short_dir, agent=False) as w:
            await w.stop_relay()
            assert w.dialer is not None
            link = w.dialer.links[RELAY]
            await asyncio.wait_for(_until(lambda: not link.up.is_set()), 5)
            err = await refusal(w.cfg, RELAY, HOUSEHOLD)
            assert err.code == "unreachable" and RELAY in err.message

    run(body())


async def _until(check: Any) -> None:
    while not check():
        await asyncio.sleep(0.02)


def test_a_stream_survives_the_relay_restarting_mid_way(pki: Pki, short_dir: Path) -> None:
    async def body() -> None:
        async with world(pki, short_dir) as w:

            async def restart() -> None:
                await w.stop_relay()
                await w.start_relay()  # the same port and state directory

            assert await async_echo(w.cfg, midway=restart) == DIGEST
            assert w.dialer is not None and w.dialer.links[RELAY].counters["links"] >= 2

    run(body())


def test_the_role_with_no_relays_idles_until_sigterm() -> None:
    example = Path(__file__).parents[2] / "policies" / "appliance.toml"  # no [home_relay]
    code = (
        "import sys, logging\n"
        "from appliance.core.config import load\n"
        "from appliance.homelink.service import main\n"
        "logging.basicConfig(level=logging.INFO)\n"
        "sys.exit(main(load(sys.argv[1])))\n"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", code, str(example)],
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[2])},
    )
    try:
        assert proc.stderr is not None
        line = proc.stderr.readline()
        assert "home relay off" in line, line
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(5) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@contextlib.contextmanager
def squid(directory: Path) -> Iterator[tuple[int, Path]]:
    """A site's web proxy on loopback (CONNECT to any port), as the lab starts it."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    directory.chmod(0o711)  # squid runs as user proxy
    d = directory / "squid"
    d.mkdir()
    shutil.chown(d, "proxy")
    (d / "squid.conf").write_text(
        f"http_port 127.0.0.1:{port}\nvisible_hostname sitewebproxy\ncache deny all\n"
        f"cache_mem 8 MB\naccess_log stdio:{d}/access.log\ncache_log {d}/cache.log\n"
        f"pid_filename {d}/squid.pid\ncoredump_dir {d}\ncache_effective_user proxy\n"
        "http_access allow all\nshutdown_lifetime 0 seconds\n"
    )
    proc = subprocess.Popen(["squid", "-N", "-f", str(d / "squid.conf")])
    try:
        deadline = time.monotonic() + 10
        while True:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 1):
                break
            assert proc.poll() is None and time.monotonic() < deadline, "squid did not start"
            time.sleep(0.05)
        yield port, d / "access.log"
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.mark.skipif(shutil.which("squid") is None, reason="squid is not installed")
def test_the_relay_is_reached_through_the_sites_proxy_with_connect(
    pki: Pki, short_dir: Path
) -> None:
    relay_ports: list[int] = []
    with squid(short_dir) as (proxy_port, access_log):

        async def body() -> None:
            w = World(pki, short_dir)
            try:
                await w.start_relay()
                relay_ports.append(w.port)
                cfg = dialer_config(short_dir / "p.sock", pki.ca, w.port)
                await w.start_dialer(
                    dataclasses.replace(cfg, proxy=f"http://127.0.0.1:{proxy_port}")
                )
                await w.start_agent()
                assert await async_echo(w.cfg) == DIGEST
            finally:
                await w.close()

        run(body())
        time.sleep(0.3)  # squid logs a tunnel when it ends
        log = access_log.read_text()
        assert f"CONNECT 127.0.0.1:{relay_ports[0]}" in log, log


# -- where a WebSocket cannot pass: links by long-poll ------------------------------


@pytest.fixture
def nginx_front(short_dir: Path, pki: Pki) -> Iterator[NginxFront]:
    front = NginxFront(short_dir / "nginx", pki.relay_cert, pki.key, RELAY)
    try:
        yield front
    finally:
        front.stop()


def _poll_links(w: World) -> list[bool]:
    assert w.dialer is not None and w.agent is not None
    return [isinstance(link._ws, PollClient) for link in (w.dialer.links[RELAY], w.agent)]


@pytest.mark.skipif(shutil.which("nginx") is None, reason="nginx is not installed")
def test_where_the_upgrade_is_blocked_both_ends_link_by_long_poll(
    pki: Pki, short_dir: Path, nginx_front: NginxFront
) -> None:
    async def body() -> None:
        async with world(pki, short_dir, front=nginx_front) as w:
            assert _poll_links(w) == [True, True]
            threaded = asyncio.to_thread(sync_echo, w.cfg)
            assert list(await asyncio.gather(threaded, async_echo(w.cfg))) == [DIGEST, DIGEST]
            assert w.relay is not None
            assert w.relay.metric_families()  # the poll counters are among the relay's
            assert w.relay.polls.counters["poll_sessions"] == 2
            log = nginx_front.access_log()
            # nginx asked the relay in HTTP/1.0 without the Upgrade: no 101, a refusal
            assert re.search(r'"GET /v1/appliance HTTP/1.1" [45]\d\d ', log), log
            assert '"POST /v1/poll/' in log

    run(body(), limit=30)


@pytest.mark.skipif(shutil.which("nginx") is None, reason="nginx is not installed")
def test_a_long_poll_link_rides_out_its_connections_failing_mid_stream(
    pki: Pki, short_dir: Path, nginx_front: NginxFront
) -> None:
    """nginx killed and started again in the middle of a 2 MiB echo: every HTTP
    connection of both links breaks, the requests are retried, no byte is lost or
    repeated, and the links stay the same links (no relink, no resume needed)."""

    async def body() -> None:
        async with world(pki, short_dir, front=nginx_front) as w:

            async def restart() -> None:
                nginx_front.stop()
                await asyncio.sleep(0.5)
                await asyncio.to_thread(nginx_front.start)

            assert await async_echo(w.cfg, midway=restart) == DIGEST
            assert w.dialer is not None and w.agent is not None
            assert w.dialer.links[RELAY].counters["links"] == 1
            assert w.agent.counters["links"] == 1
            assert _poll_links(w) == [True, True]
            links = (w.dialer.links[RELAY]._ws, w.agent._ws)
            assert all(isinstance(ws, PollClient) and ws.retries > 0 for ws in links)

    run(body(), limit=30)
