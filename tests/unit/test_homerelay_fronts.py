"""A relay behind a trusted front: links count by the address the front names.

The pure rule (sources.py) is checked case by case and by hypothesis; then a real
relay behind a real nginx that appends X-Forwarded-For, with one link allowed per
source: guests of the same front are told apart, for WebSocket and long-poll links
alike, and a client that writes the header itself, straight to the relay, is
counted by its own address.  Clients take several loopback addresses (127.0.0.x).
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import shutil
import ssl
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from home_front import NginxFront
from home_world import RELAY, Pki, make_pki
from hypothesis import given
from hypothesis import strategies as st
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus

from appliance.core.tomlfile import ConfigError, TomlFile
from appliance.homerelay.config import RelayConfig, parse
from appliance.homerelay.server import RelayServer
from appliance.homerelay.sources import link_source

pytestmark = pytest.mark.unit

FRONTS = (ipaddress.ip_network("10.0.0.0/8"), ipaddress.ip_network("2001:db8::/32"))


@pytest.mark.parametrize(
    ("peer", "forwarded", "source"),
    [
        ("192.0.2.7", ["198.51.100.1"], "192.0.2.7"),  # not a front: its own address
        ("10.1.1.1", ["198.51.100.1"], "198.51.100.1"),
        ("10.1.1.1", ["6.6.6.6, 198.51.100.1"], "198.51.100.1"),  # the client's own word
        ("10.1.1.1", ["198.51.100.1, 10.2.2.2"], "198.51.100.1"),  # two fronts in a row
        ("10.1.1.1", ["198.51.100.1", "10.2.2.2"], "198.51.100.1"),  # two header lines
        ("10.1.1.1", [], "10.1.1.1"),  # no header: the front itself
        ("10.1.1.1", ["unknown"], "10.1.1.1"),  # garbage: the front itself
        ("10.1.1.1", ["198.51.100.1, junk, 10.2.2.2"], "10.2.2.2"),
        ("10.1.1.1", ["10.2.2.2, 10.3.3.3"], "10.2.2.2"),  # fronts all the way
        ("2001:db8::1", ["2001:DB8:1::5"], "2001:db8:1::5"),
        ("10.1.1.1", ["2001:db8:ffff::1, 203.0.113.9"], "203.0.113.9"),
        ("10.1.1.1", ["198.51.100.1", ""], "10.1.1.1"),
        # fronts are a few: past 16 entries the last trusted one counts
        (
            "10.1.1.1",
            [", ".join(["198.51.100.1"] + [f"10.0.0.{i}" for i in range(20)])],
            "10.0.0.4",
        ),
        (
            "10.1.1.1",
            [", ".join(["198.51.100.1"] + [f"10.0.0.{i}" for i in range(15)])],
            "198.51.100.1",
        ),
    ],
)
def test_the_source_is_the_first_address_right_of_the_trusted_fronts(
    peer: str, forwarded: list[str], source: str
) -> None:
    assert link_source(peer, forwarded, FRONTS) == source


hops = st.one_of(
    st.ip_addresses(v=4).map(str),
    st.sampled_from(["10.0.0.1", "10.9.9.9", "unknown", "", " ", "::1", "a,b"]),
)


@given(
    st.one_of(st.just("10.0.0.5"), st.ip_addresses().map(str)),
    st.lists(st.lists(hops, max_size=4).map(", ".join), max_size=3),
)
def test_a_source_is_the_peer_or_an_address_a_trusted_front_was_given(
    peer: str, forwarded: list[str]
) -> None:
    source = link_source(peer, forwarded, FRONTS)
    named = {h.strip() for v in forwarded for h in v.split(",")}
    trusted_peer = any(ipaddress.ip_address(peer) in n for n in FRONTS)
    if not trusted_peer:
        assert source == peer
    else:
        assert source == peer or source in named
        ipaddress.ip_address(source)  # always an address, never the header's garbage


def test_trusted_fronts_are_networks_and_an_error_names_the_key(tmp_path: Path) -> None:
    base = '[relay]\nhost = "relay.test"\ncertificate = "c"\nkey = "k"\n[limits]\n'
    cfg = parse(TomlFile.parse(base + 'trusted_fronts = ["127.0.0.1/32", "::1/128"]\n'))
    assert [str(n) for n in cfg.limits.trusted_fronts] == ["127.0.0.1/32", "::1/128"]
    assert parse(TomlFile.parse(base)).limits.trusted_fronts == ()
    with pytest.raises(ConfigError) as err:
        parse(TomlFile.parse(base + 'trusted_fronts = ["nginx.local"]\n', tmp_path / "r.toml"))
    assert err.value.key == "limits.trusted_fronts" and err.value.line == 6


# -- a real relay behind a real nginx ---------------------------------------------


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


def _config(pki: Pki, directory: Path, trusted: bool) -> RelayConfig:
    fronts = 'trusted_fronts = ["127.0.0.1/32"]\n' if trusted else ""
    text = (
        f'[relay]\nhost = "{RELAY}"\nlisten = "127.0.0.1"\nport = 0\n'
        f'certificate = "{pki.relay_cert}"\nkey = "{pki.key}"\nstate_directory = "state"\n'
        f"[limits]\nlinks_per_source = 1\n{fronts}"
    )
    return parse(TomlFile.parse(text, directory / "relay.toml"))


@pytest.fixture
def fronts(tmp_path: Path, pki: Pki) -> Iterator[list[NginxFront]]:
    made: list[NginxFront] = []
    yield made
    for front in made:
        front.stop()


async def _websocket(port: int, tls: ssl.SSLContext, source: str, **kw: Any) -> int:
    """The status of a WebSocket handshake to the agents' path from `source` (101: a link,
    held open until the test ends)."""
    try:
        ws = await connect(
            f"wss://127.0.0.1:{port}/v1/agent",
            ssl=tls,
            server_hostname=RELAY,
            local_addr=(source, 0),
            open_timeout=5,
            **kw,
        )
    except InvalidStatus as exc:
        return exc.response.status_code
    _held.append(ws)
    return 101


async def _poll(port: int, tls: ssl.SSLContext, source: str) -> int:
    """The status of a long-poll session's opening POST from `source`."""
    reader, writer = await asyncio.open_connection(
        "127.0.0.1", port, ssl=tls, server_hostname=RELAY, local_addr=(source, 0)
    )
    writer.write(f"POST /v1/agent HTTP/1.1\r\nHost: {RELAY}\r\nContent-Length: 0\r\n\r\n".encode())
    status = int((await reader.readline()).split()[1])
    _writers.append(writer)  # a session counts while it lives: keep the connection
    return status


_held: list[Any] = []
_writers: list[asyncio.StreamWriter] = []


@pytest.mark.skipif(shutil.which("nginx") is None, reason="nginx is not installed")
@pytest.mark.parametrize("trusted", [True, False])
def test_behind_a_trusted_front_each_client_address_counts_for_itself(
    pki: Pki,
    tmp_path: Path,
    fronts: list[NginxFront],
    trusted: bool,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="appliance.homerelay.server")
    tls = ssl.create_default_context(cafile=str(pki.ca))

    async def body() -> None:
        relay = RelayServer(_config(pki, tmp_path, trusted))
        await relay.start()
        try:
            ws_front = NginxFront(
                tmp_path / "ws", pki.relay_cert, pki.key, RELAY, upgrade=True, forwarded_for=True
            )
            poll_front = NginxFront(
                tmp_path / "poll", pki.relay_cert, pki.key, RELAY, forwarded_for=True
            )
            fronts.extend([ws_front, poll_front])
            ws_port, poll_port = ws_front(relay.port), poll_front(relay.port)
            first = await _websocket(ws_port, tls, "127.0.0.2")
            other = await _websocket(ws_port, tls, "127.0.0.3")
            again = await _websocket(ws_port, tls, "127.0.0.2")
            polled = [await _poll(poll_port, tls, a) for a in ("127.0.0.4", "127.0.0.5")]
            # straight to the relay, a header of its own naming nobody yet: no front's word
            forged = await _websocket(
                relay.port,
                tls,
                "127.0.0.6",
                additional_headers={"X-Forwarded-For": "127.0.0.7"},
            )
            forged_again = await _websocket(
                relay.port,
                tls,
                "127.0.0.6",
                additional_headers={"X-Forwarded-For": "127.0.0.8"},
            )
            if trusted:
                assert (first, other, again) == (101, 101, 429)
                assert polled == [200, 200]
                assert (forged, forged_again) == (101, 429)
                refused = [r.getMessage() for r in caplog.records if "refused a link" in r.message]
                assert refused == [
                    "refused a link from 127.0.0.2: too many links from it",
                    "refused a link from 127.0.0.6: too many links from it",
                ]
            else:
                # every client of the front is the front: one link for all of them
                assert (first, other, again) == (101, 429, 429)
                assert polled == [429, 429]
        finally:
            for ws in _held:
                await ws.close()
            for writer in _writers:
                writer.close()
            _held.clear()
            _writers.clear()
            await relay.close()

    asyncio.run(asyncio.wait_for(body(), 30))
