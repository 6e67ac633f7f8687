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
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from home_front import NginxFront
from home_world import (
    DIGEST,
    HOUSEHOLD,
    OPEN_TIMEOUT,
    RELAY,
    Pki,
    World,
    async_echo,
    dialer_config,
    make_pki,
    relay_config,
    run,
    sync_echo,
    world,
)
from relay_helpers import free_port

from appliance.core.config import HomeRelayConfig
from appliance.homelink import poll_client
from appliance.homelink.dialer import Dialer, tls_context
from appliance.homelink.dialer_client import DialerError, dial, dial_async
from appliance.homelink.poll_client import PollClient
from appliance.homerelay.server import RelayServer

pytestmark = pytest.mark.unit


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture
def short_dir() -> Iterator[Path]:
    """A directory for unix sockets (their paths must stay under 108 bytes)."""
    d = Path(tempfile.mkdtemp(prefix="hl", dir="/tmp"))
    yield d
    shutil.rmtree(d, ignore_errors=True)


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


@pytest.mark.skipif(shutil.which("nginx") is None, reason="nginx is not installed")
def test_where_the_upgrade_goes_unanswered_both_ends_link_by_long_poll_after_the_timeout(
    pki: Pki, short_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A front that holds every Upgrade (nginx sends it where nothing answers): each end
    waits out its WebSocket handshake, then links by long-poll; dialling that URL again
    goes by long-poll at once, not after another timeout."""
    monkeypatch.setattr(poll_client, "HANDSHAKE_TIMEOUT", 1.0)
    front = NginxFront(short_dir / "nginx", pki.relay_cert, pki.key, RELAY, hold_upgrade=True)

    async def body() -> None:
        async with world(pki, short_dir, front=front) as w:
            assert _poll_links(w) == [True, True]
            assert await async_echo(w.cfg) == DIGEST
            assert w.relay is not None
            assert w.relay.polls.counters["poll_sessions"] == 2
            t0 = time.monotonic()
            again = await poll_client.dial_link(
                f"wss://127.0.0.1:{w.front}/v1/appliance",
                tls=tls_context(w.cfg),
                server_hostname=RELAY,
                proxy=None,
            )
            assert isinstance(again, PollClient)
            assert time.monotonic() - t0 < 0.9  # (a WebSocket first would take 1 s)
            assert w.relay.polls.counters["poll_sessions"] == 3
            # the relay's own 429 ends the dial at once: no WebSocket tried after it
            limits = dataclasses.replace(w.relay.config.limits, links_per_source=3)
            w.relay.config = dataclasses.replace(w.relay.config, limits=limits)
            t0 = time.monotonic()
            with pytest.raises(poll_client.PollRefused) as refused:
                await poll_client.dial_link(
                    f"wss://127.0.0.1:{w.front}/v1/appliance",
                    tls=tls_context(w.cfg),
                    server_hostname=RELAY,
                    proxy=None,
                )
            assert refused.value.status == 429 and time.monotonic() - t0 < 0.9
            await again.close()

    try:
        run(body(), limit=30)
    finally:
        front.stop()


def test_a_relay_that_does_not_answer_tcp_is_not_tried_by_long_poll(
    pki: Pki, short_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Where TCP itself goes unanswered (here: a listener whose accept queue is full, so
    the kernel drops further SYNs) the dial fails after one handshake timeout, and no
    long-poll is tried: it would only double the wait before the next relay's URL."""
    monkeypatch.setattr(poll_client, "HANDSHAKE_TIMEOUT", 0.5)
    polls: list[str] = []

    async def no_poll(url: str, **kw: Any) -> PollClient:
        polls.append(url)
        raise AssertionError("long-poll tried")

    monkeypatch.setattr(PollClient, "open", no_poll)
    full = socket.create_server(("127.0.0.1", 0), backlog=0)
    port = full.getsockname()[1]
    queued = []
    for _ in range(8):  # fill the accept queue (nothing accepts)
        s = socket.socket()
        s.setblocking(False)
        with contextlib.suppress(BlockingIOError):
            s.connect(("127.0.0.1", port))
        queued.append(s)

    async def body() -> None:
        cfg = dialer_config(short_dir / "x.sock", pki.ca, port)
        t0 = time.monotonic()
        with pytest.raises(TimeoutError):
            await poll_client.dial_link(
                f"wss://127.0.0.1:{port}/v1/appliance",
                tls=tls_context(cfg),
                server_hostname=RELAY,
                proxy=None,
            )
        assert 0.4 < time.monotonic() - t0 < 2.0
        assert polls == []

    try:
        run(body())
    finally:
        for s in queued:
            s.close()
        full.close()
