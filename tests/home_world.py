"""The world of the home-link tests and benchmarks, in one process on loopback: a
test PKI, a real RelayServer, bob-home's agent link bridging each stream to an echo
server, and the appliance's Dialer with its unix socket; and the two ways a client
echoes bytes through it (the portal's blocking one and the proxy's asyncio one)."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime
import hashlib
import json
import os
import socket
import threading
from collections.abc import AsyncIterator, Callable, Coroutine
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from appliance.core.config import HomeRelayConfig
from appliance.core.tomlfile import TomlFile
from appliance.homelink import frames
from appliance.homelink.dialer import Dialer, tls_context
from appliance.homelink.dialer_client import dial, dial_async
from appliance.homelink.link import Link, LinkConnection, LinkStream
from appliance.homelink.poll_client import dial_link
from appliance.homelink.registration import parse_challenge, sign_registration
from appliance.homerelay.config import RelayConfig, parse
from appliance.homerelay.server import RelayServer

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


def make_pki(d: Path) -> Pki:
    """A CA and two leaves under it (one names the relay, one another host), one key."""
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
