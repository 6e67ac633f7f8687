"""The relay's TLS services on loopback: a real TLS server behind it, Python's ssl client in
front, a small CONNECT proxy as the site's web proxy.  What a guest checks: the handshake
is with the origin (its certificate, end to end), the bytes pass unchanged, and a "no" is
a TLS alert; what an admin checks: the reason in the access log, nothing relayed into a
hidden network."""

from __future__ import annotations

import asyncio
import hashlib
import socket
import ssl
from pathlib import Path
from typing import Any

import pytest
from certs import self_signed
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from relay_helpers import free_port, loop_kind, resolver, run  # noqa: F401

from appliance.proxy.gate import HIDDEN, NO_SUCH_HOST, Listener, StaticGate
from appliance.proxy.relay import Relay

pytestmark = pytest.mark.unit

NAME = "www.example.com"
PUBLIC = "203.0.113.80"  # what the test resolver answers for NAME (not hidden)
HIDDEN_NET = "198.51.100."


@pytest.fixture(scope="module")
def cert(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A self-signed certificate for NAME: the origin's own, which the guest must see."""
    d = tmp_path_factory.mktemp("tls")
    key = ec.generate_private_key(ec.SECP256R1())
    crt = self_signed(key, NAME)
    (d / "cert.pem").write_bytes(crt.public_bytes(serialization.Encoding.PEM))
    (d / "key.pem").write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return d / "cert.pem", d / "key.pem"


async def origin(
    cert: tuple[Path, Path], resumed: list[bool] | None = None
) -> tuple[asyncio.Server, int]:
    """A TLS server that answers each line with 'ORIGIN <line upper-cased>' (and notes in
    `resumed` whether each connection's handshake resumed an earlier session)."""
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(*cert)

    async def serve(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        if resumed is not None:
            resumed.append(w.get_extra_info("ssl_object").session_reused)
        try:
            while line := await r.readline():
                w.write(b"ORIGIN " + line.upper())
                await w.drain()
        except (ConnectionError, ssl.SSLError):
            pass
        w.close()

    port = free_port()
    return await asyncio.start_server(serve, "127.0.0.1", port, ssl=ctx), port


class ConnectProxy:
    """The site's web proxy: CONNECT to the origin (whatever name is asked), or a status."""

    def __init__(self, origin_port: int, status: int = 200) -> None:
        self.origin_port = origin_port
        self.status = status
        self.asked: list[bytes] = []
        self.after_refusal: list[bytes] = []  # what came after a refused CONNECT

    async def serve(self, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        head = await r.readuntil(b"\r\n\r\n")
        self.asked.append(head.split(b"\r\n", 1)[0])
        if self.status != 200:
            w.write(f"HTTP/1.1 {self.status} No\r\nContent-Length: 0\r\n\r\n".encode())
            await w.drain()
            # the connection is kept: the relay must close it without a byte more
            self.after_refusal.append(await asyncio.wait_for(r.read(), 5))
            w.close()
            return
        ur, uw = await asyncio.open_connection("127.0.0.1", self.origin_port)
        w.write(b"HTTP/1.1 200 Connection established\r\n\r\n")

        async def pipe(a: asyncio.StreamReader, b: asyncio.StreamWriter) -> None:
            while data := await a.read(65536):
                b.write(data)
                await b.drain()
            b.close()

        await asyncio.gather(pipe(r, uw), pipe(ur, w), return_exceptions=True)


def gate_table(port: int, route: str, servers: list[str], allow: bool = True) -> dict[str, Any]:
    return {
        "portal_url": "http://192.168.1.1/",
        "listeners": [{"service": "https", "protocol": "tls", "port": port}],
        "servers": {"https": servers},
        "routes": {"https": route},
        "users": {
            "127.0.0.1": {"user": "alice", "rule": "staff", "allow": ["https"] if allow else []}
        },
    }


async def start_relay(
    t: dict[str, Any], orig: tuple[str, int] | None = (PUBLIC, 443), **kw: Any
) -> tuple[Relay, list[tuple[Any, ...]]]:
    """The relay, and the access log's lines as their fields (..., result, dest, reason)."""
    lines: list[tuple[Any, ...]] = []
    relay = Relay(
        StaticGate(t),
        resolve=resolver({NAME: [PUBLIC], "intranet.example": [HIDDEN_NET + "3"]}),
        hidden=lambda ip: ip.startswith(HIDDEN_NET),
        **kw,
    )
    relay.original = lambda _sock: orig
    relay.access.enabled = True
    relay.access.connection = lambda *a: lines.append(a)  # type: ignore[method-assign]
    await relay.start("127.0.0.1", (Listener("https", "tls", t["listeners"][0]["port"]),))
    return relay, lines


async def tls_client(
    port: int, cert: Path, name: str | None = NAME, line: bytes = b"hello\n"
) -> tuple[bytes, bytes]:
    """Handshake through the relay, trusting only the origin's certificate; returns the
    certificate seen (DER) and the answer to one line."""
    ctx = ssl.create_default_context(cafile=str(cert))
    if name is None:
        ctx.check_hostname = False
    r, w = await asyncio.wait_for(
        asyncio.open_connection("127.0.0.1", port, ssl=ctx, server_hostname=name), 5
    )
    der = w.get_extra_info("ssl_object").getpeercert(binary_form=True)
    w.write(line)
    answer = await asyncio.wait_for(r.readline(), 5)
    w.close()
    return der, answer


def fingerprint(path: Path) -> bytes:
    return hashlib.sha256(ssl.PEM_cert_to_DER_cert(path.read_text())).digest()


def test_route_server_relays_tls_end_to_end(cert: tuple[Path, Path]) -> None:
    async def body() -> None:
        server, oport = await origin(cert)
        port = free_port()
        relay, lines = await start_relay(gate_table(port, "server", [f"127.0.0.1:{oport}"]))
        der, answer = await tls_client(port, cert[0])
        assert hashlib.sha256(der).digest() == fingerprint(cert[0])  # the origin's own
        assert answer == b"ORIGIN HELLO\n"
        await asyncio.sleep(0.1)
        assert relay.counters[("https", "ok")] == 1
        assert lines[0][-3:] == ("ok", NAME, "")  # result, the name asked for, no reason
        await relay.stop()
        server.close()

    run(body())


def test_route_proxy_asks_the_web_proxy_for_the_name_in_the_hello(
    cert: tuple[Path, Path],
) -> None:
    async def body() -> None:
        server, oport = await origin(cert)
        proxy = ConnectProxy(oport)
        pport = free_port()
        psrv = await asyncio.start_server(proxy.serve, "127.0.0.1", pport)
        port = free_port()
        relay, _ = await start_relay(gate_table(port, "proxy", [f"127.0.0.1:{pport}"]))
        der, answer = await tls_client(port, cert[0])
        assert answer == b"ORIGIN HELLO\n"
        assert hashlib.sha256(der).digest() == fingerprint(cert[0])
        assert proxy.asked == [b"CONNECT www.example.com:443 HTTP/1.1"]
        # no SNI: the original destination's address is asked for, checked the same way
        _, answer = await tls_client(port, cert[0], name=None)
        assert answer == b"ORIGIN HELLO\n"
        assert proxy.asked[1] == f"CONNECT {PUBLIC}:443 HTTP/1.1".encode()
        await relay.stop()
        psrv.close()
        server.close()

    run(body())


async def refused(port: int, cert: Path, name: str | None = NAME) -> str:
    """The TLS error a client gets (the alert's name, as OpenSSL reports it)."""
    with pytest.raises(ssl.SSLError) as info:
        await tls_client(port, cert, name)
    return str(info.value)


def test_refusals_are_tls_alerts_with_the_reason_logged(cert: tuple[Path, Path]) -> None:
    async def body() -> None:
        server, oport = await origin(cert)
        proxy = ConnectProxy(oport)
        pport = free_port()
        psrv = await asyncio.start_server(proxy.serve, "127.0.0.1", pport)
        port = free_port()
        t = gate_table(port, "proxy", [f"127.0.0.1:{pport}"])
        relay, lines = await start_relay(t)
        assert "ACCESS_DENIED" in await refused(port, cert[0], "intranet.example")
        assert "UNRECOGNIZED_NAME" in await refused(port, cert[0], "nowhere.example")
        t["users"]["127.0.0.1"]["allow"] = []
        relay.gate.reload()
        assert "ACCESS_DENIED" in await refused(port, cert[0])
        await asyncio.sleep(0.1)
        assert proxy.asked == []  # none of them reached the proxy
        assert [ln[-3:] for ln in lines] == [
            ("refused-denied", "intranet.example", HIDDEN),
            ("upstream-down", "nowhere.example", NO_SUCH_HOST),
            ("refused-denied", "", "no rule allows https"),
        ]
        await relay.stop()
        psrv.close()
        server.close()

    run(body())


def test_a_hidden_original_destination_is_refused_whatever_the_name(
    cert: tuple[Path, Path],
) -> None:
    async def body() -> None:
        for route in ("proxy", "direct"):
            port = free_port()
            relay, _ = await start_relay(
                gate_table(port, route, ["127.0.0.1:9"] if route == "proxy" else []),
                orig=(HIDDEN_NET + "3", 443),
            )
            assert "ACCESS_DENIED" in await refused(port, cert[0])
            await asyncio.sleep(0.05)
            assert relay.counters[("https", "refused-denied")] == 1, route
            await relay.stop()

    run(body())


def test_a_proxy_that_refuses_the_tunnel_gets_no_guest_byte(cert: tuple[Path, Path]) -> None:
    async def body() -> None:
        proxy = ConnectProxy(0, status=403)
        pport = free_port()
        psrv = await asyncio.start_server(proxy.serve, "127.0.0.1", pport)
        port = free_port()
        relay, _ = await start_relay(gate_table(port, "proxy", [f"127.0.0.1:{pport}"]))
        assert "ACCESS_DENIED" in await refused(port, cert[0])
        await asyncio.sleep(0.1)
        assert relay.counters[("https", "proxy-refused")] == 1
        assert proxy.asked == [b"CONNECT www.example.com:443 HTTP/1.1"]
        assert proxy.after_refusal == [b""]  # the guest's hello never went to the proxy
        await relay.stop()
        psrv.close()

    run(body())


def raw_exchange(port: int, data: bytes, wait: float = 5.0) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=wait) as s:
        s.sendall(data)
        out = b""
        while chunk := s.recv(4096):
            out += chunk
        return out


def test_bad_hellos_are_counted_drops_never_relayed(cert: tuple[Path, Path]) -> None:
    async def body() -> None:
        server, oport = await origin(cert)
        port = free_port()
        relay, lines = await start_relay(
            gate_table(port, "server", [f"127.0.0.1:{oport}"]), hello_timeout=0.3
        )
        loop = asyncio.get_running_loop()
        # plain HTTP to port 443: not TLS, closed without a word
        assert (
            await loop.run_in_executor(None, raw_exchange, port, b"GET / HTTP/1.1\r\n\r\n") == b""
        )
        # a TLS handshake record that is not a ClientHello: a decode_error alert
        bad = bytes([22, 3, 1, 0, 4, 2, 0, 0, 0])
        assert await loop.run_in_executor(None, raw_exchange, port, bad) == bytes(
            [21, 3, 3, 0, 2, 2, 50]
        )
        # a record that never completes: closed after the hello timeout
        t0 = loop.time()
        assert await loop.run_in_executor(None, raw_exchange, port, bytes([22, 3, 1, 1])) == b""
        assert 0.25 <= loop.time() - t0 < 3
        await asyncio.sleep(0.1)
        assert relay.counters[("https", "bad-hello")] == 2
        assert relay.counters[("https", "hello-timeout")] == 1
        assert [ln[-1] for ln in lines] == ["not TLS", "not a ClientHello", ""]
        await relay.stop()
        server.close()

    run(body())


# -- tls = true: the relay speaks TLS to the server, the guest speaks plain ------------
def pop3_table(port: int, oport: int, tls: dict[str, str]) -> dict[str, Any]:
    return {
        "portal_url": "http://192.168.1.1/",
        "listeners": [{"service": "pop3", "protocol": "pop3", "port": port}],
        "servers": {"pop3": [f"127.0.0.1:{oport}"]},
        "tls": {"pop3": tls},
        "users": {"127.0.0.1": {"user": "alice", "rule": "staff", "allow": ["pop3"]}},
    }


async def plain_line(port: int) -> bytes:
    r, w = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), 5)
    w.write(b"stat\n")
    answer = await asyncio.wait_for(r.readline(), 5)
    w.close()
    return answer


@pytest.mark.parametrize(
    ("how", "works"),
    [
        ({"name": NAME, "ca": "CERT"}, True),  # the site's CA file and the name
        ({"name": "other.example", "ca": "CERT"}, False),  # right CA, wrong name
        ({"name": NAME}, False),  # the system's CAs do not know the lab's
        ({"name": "", "pin": "PIN"}, True),  # the pin alone
        ({"name": "", "pin": "0" * 64}, False),  # another certificate's pin
    ],
)
def test_tls_to_the_upstream_is_verified_or_no_connection(
    cert: tuple[Path, Path], how: dict[str, str], works: bool, caplog: pytest.LogCaptureFixture
) -> None:
    how = {k: v.replace("CERT", str(cert[0])) for k, v in how.items()}
    if how.get("pin") == "PIN":
        how["pin"] = fingerprint(cert[0]).hex()

    async def body() -> None:
        server, oport = await origin(cert)  # speaks TLS only
        port = free_port()
        relay = Relay(StaticGate(pop3_table(port, oport, how)), splice=True)
        await relay.start("127.0.0.1")
        answer = await plain_line(port)
        if works:
            assert answer == b"ORIGIN STAT\n"  # plain in, TLS out, the answer back
        else:  # never spoken to unverified: the guest hears "unavailable"
            assert answer.startswith(b"+OK guest gateway")
            await asyncio.sleep(0.05)
            assert relay.counters[("pop3", "upstream-down")] == 1
        await relay.stop()
        server.close()

    run(body())
    if not works:
        assert "pop3 upstream pop3/site failed: " in caplog.text
        assert "TLS" in caplog.text or "pin" in caplog.text


@pytest.mark.parametrize("right_pin", [True, False])
def test_a_households_server_named_with_a_pin_is_spoken_to_over_tls(
    cert: tuple[Path, Path], right_pin: bool
) -> None:
    """The agent names `host:port#sha256:...`: the guest's plain POP3 goes out as TLS to
    that server, and only to the certificate with that fingerprint."""
    from appliance.core import agent_protocol as wire

    pin = wire.fingerprint(ssl.PEM_cert_to_DER_cert(cert[0].read_text()))
    if not right_pin:
        pin = wire.fingerprint(b"another certificate")

    async def body() -> None:
        server, oport = await origin(cert)  # TLS only
        port = free_port()
        t = pop3_table(port, oport, {})
        del t["tls"]  # the site's own pop3 server is plain: the pin is the household's
        t["personal_allowed"] = ["pop3"]
        t["users"]["127.0.0.1"]["personal"] = {"pop3": f"127.0.0.1:{oport}#{pin}"}
        relay = Relay(StaticGate(t), splice=True)
        await relay.start("127.0.0.1")
        answer = await plain_line(port)
        if right_pin:
            assert answer == b"ORIGIN STAT\n"
        else:
            assert answer.startswith(b"+OK guest gateway")  # refusing: unavailable
        await asyncio.sleep(0.2)
        result = "ok" if right_pin else "upstream-down"
        assert relay.counters[("pop3", result)] == 1, relay.counters
        await relay.stop()
        server.close()

    run(body())


@pytest.mark.parametrize("how", [{"name": NAME, "ca": "CERT"}, {"name": "", "pin": "PIN"}])
def test_tls_to_the_upstream_resumes_its_session_and_still_checks(
    cert: tuple[Path, Path], how: dict[str, str]
) -> None:
    """The relay's second connection to a tls = true server resumes the first one's
    session (no certificate, a cheaper handshake); a pinned server is still held to its
    pin, and a session is never offered where another check applies."""
    how = {k: v.replace("CERT", str(cert[0])) for k, v in how.items()}
    if how.get("pin") == "PIN":
        how["pin"] = fingerprint(cert[0]).hex()

    async def body() -> None:
        resumed: list[bool] = []
        server, oport = await origin(cert, resumed)
        port, other_port = free_port(), free_port()
        relay = Relay(StaticGate(pop3_table(port, oport, how)), splice=True)
        await relay.start("127.0.0.1")
        for _ in range(3):
            assert await plain_line(port) == b"ORIGIN STAT\n"
        # the same server under another check (a wrong pin or name): no session offered,
        # so a full handshake, which fails the check
        wrong = {**how, "pin": "0" * 64} if how.get("pin") else {**how, "name": "other.example"}
        other = Relay(StaticGate(pop3_table(other_port, oport, wrong)), splice=True)
        await other.start("127.0.0.1")
        assert (await plain_line(other_port)).startswith(b"+OK guest gateway")
        await asyncio.sleep(0.05)
        assert other.counters[("pop3", "upstream-down")] == 1
        await other.stop()
        await relay.stop()
        server.close()
        assert resumed[:3] == [False, True, True], resumed
        assert resumed[3:] in ([], [False]), resumed  # (a name refused in the handshake)

    run(body())


def test_a_server_that_fails_its_pin_gets_the_next_one_and_reaches_the_guest_with_nothing(
    cert: tuple[Path, Path], tmp_path: Path
) -> None:
    """The site's first pop3 server answers TLS with another certificate and greets at
    once: the relay drops it and goes on to the second, the right one.  The guest's
    connection stays up, and not a byte of the first server reaches it."""
    key = ec.generate_private_key(ec.SECP256R1())
    (tmp_path / "other.pem").write_bytes(
        self_signed(key, NAME).public_bytes(serialization.Encoding.PEM)
    )
    (tmp_path / "other.key").write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(tmp_path / "other.pem", tmp_path / "other.key")

    async def impostor(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        w.write(b"+OK IMPOSTOR\r\n")  # before a byte from the relay: a greeting
        try:
            await w.drain()
            await r.read()
        except (ConnectionError, ssl.SSLError):
            pass
        w.close()

    async def body() -> None:
        bad_port = free_port()
        bad = await asyncio.start_server(impostor, "127.0.0.1", bad_port, ssl=ctx)
        server, oport = await origin(cert)
        port = free_port()
        t = pop3_table(port, oport, {"name": "", "pin": fingerprint(cert[0]).hex()})
        t["servers"]["pop3"] = [f"127.0.0.1:{bad_port}", f"127.0.0.1:{oport}"]
        relay = Relay(StaticGate(t), splice=True)
        await relay.start("127.0.0.1")
        r, w = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), 5)
        w.write(b"stat\n")
        assert await asyncio.wait_for(r.readline(), 5) == b"ORIGIN STAT\n"
        w.close()
        await asyncio.sleep(0.1)
        assert relay.counters[("pop3", "ok")] == 1, relay.counters
        await relay.stop()
        server.close()
        bad.close()

    run(body())


def test_a_resumed_connection_is_still_held_to_its_pin(cert: tuple[Path, Path]) -> None:
    """A resumed handshake sends no certificate; the pin is checked on the one the
    session remembers, so a resumed connection passes its own pin and fails another."""
    from appliance.proxy.upstream_tls import UpstreamTls

    right = UpstreamTls("", "", fingerprint(cert[0]).hex())
    wrong = UpstreamTls("", "", "0" * 64)

    async def body() -> None:
        server, oport = await origin(cert)
        ctx = right.resuming("127.0.0.1", oport)
        reused = []
        for _ in range(2):
            r, w = await asyncio.open_connection("127.0.0.1", oport, ssl=ctx)
            w.write(b"x\n")
            assert await r.readline() == b"ORIGIN X\n"  # (the TLS 1.3 ticket is in)
            obj = w.get_extra_info("ssl_object")
            reused.append(obj.session_reused)
            ctx.remember(obj)
            assert right.problem(obj) is None
            assert wrong.problem(obj) == "certificate does not match its pin"
            w.close()
        assert reused == [False, True]
        server.close()

    run(body())
