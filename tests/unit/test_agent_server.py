"""The agent's HTTPS server against hostile clients (loopback): sizes, garbage, slowness, load."""

from __future__ import annotations

import json
import socket
import ssl
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from agent_helpers import RunningAgent, free_port, make_agent_dir, signed
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from appliance.core import agent_protocol as wire

pytestmark = pytest.mark.unit
KEY = Ed25519PrivateKey.generate()


@pytest.fixture(scope="module")
def agent(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningAgent]:
    d: Path = tmp_path_factory.mktemp("server-agent")
    s = make_agent_dir(
        d,
        port=free_port(),
        users={"alice": ("alice-pw", {"title": "engineer"}, {})},
        extra=(
            f'[appliances]\ntrusted = ["{wire.public_key_id(KEY.public_key())}"]\n'
            "[limits]\nrequest_timeout = 1.0\nrate = 10000\nburst = 10000\n"
        ),
    )
    running = RunningAgent(s)
    yield running
    running.close()


def exchange(agent: RunningAgent, data: bytes) -> tuple[int, dict[str, str]]:
    ctx = ssl.create_default_context(cafile=str(agent.server.settings.tls_certificate))
    ctx.check_hostname = False
    raw = socket.create_connection(("127.0.0.1", agent.server.port), timeout=10)
    with raw, ctx.wrap_socket(raw) as tls:
        tls.sendall(data)
        reply = b""
        while chunk := tls.recv(65536):
            reply += chunk
    head, _, body = reply.partition(b"\r\n\r\n")
    return int(head.split()[1]), json.loads(body)


def post(body: bytes, headers: dict[str, str], extra: str = "") -> bytes:
    lines = "".join(f"{k}: {v}\r\n" for k, v in headers.items())
    return (
        f"POST /v1/authenticate HTTP/1.1\r\nHost: x\r\n{lines}{extra}"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode() + body


def test_a_signed_login_over_https(agent: RunningAgent) -> None:
    body, headers = signed(KEY, {"user": "alice", "password": "alice-pw"}, agent.server.fingerprint)
    status, doc = exchange(agent, post(body, headers))
    assert status == 200 and doc["attributes"] == {"title": "engineer"}


def test_oversized_body_is_413_before_it_is_read(agent: RunningAgent) -> None:
    head = b"POST /v1/authenticate HTTP/1.1\r\nHost: x\r\nContent-Length: 10000000\r\n\r\n"
    assert exchange(agent, head) == (413, {"error": "too_large", "message": "at most 16384 bytes"})


def test_chunked_body_is_capped_too(agent: RunningAgent) -> None:
    chunk = b"4000\r\n" + b"x" * 0x4000 + b"\r\n"
    req = b"POST /v1/authenticate HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
    status, _ = exchange(agent, req + chunk * 2)
    assert status == 413


@pytest.mark.parametrize(
    "data",
    [b"\x00\x01garbage\r\n\r\n", b"GET / HTTP/1.1\r\n" + b"X: " + b"y" * 20000 + b"\r\n\r\n"],
)
def test_garbage_http_is_4xx(agent: RunningAgent, data: bytes) -> None:
    status, doc = exchange(agent, data)
    assert 400 <= status < 500 and doc["error"] == "bad_http"


def test_a_slow_client_gets_408(agent: RunningAgent) -> None:
    start = time.monotonic()
    status, doc = exchange(agent, b"POST /v1/authenticate HTTP/1.1\r\nHost: x\r\n")
    assert (status, doc["error"]) == (408, "timeout") and time.monotonic() - start < 3


def test_parallel_logins_all_answered(agent: RunningAgent) -> None:
    def one(i: int) -> int:
        pw = "alice-pw" if i % 2 else "wrong"
        body, headers = signed(KEY, {"user": "alice", "password": pw}, agent.server.fingerprint)
        return exchange(agent, post(body, headers))[0]

    with ThreadPoolExecutor(6) as pool:
        codes = list(pool.map(one, range(6)))
    assert sorted(codes) == [200, 200, 200, 401, 401, 401]


def test_expect_100_continue_is_answered(agent: RunningAgent) -> None:
    """curl sends large bodies only after an interim 100; the agent must send it."""
    body, headers = signed(KEY, {"user": "alice", "password": "alice-pw"}, agent.server.fingerprint)
    request = post(body, headers, extra="Expect: 100-continue\r\n")
    head = request[: -len(body)]
    ctx = ssl.create_default_context(cafile=str(agent.server.settings.tls_certificate))
    ctx.check_hostname = False
    raw = socket.create_connection(("127.0.0.1", agent.server.port), timeout=5)
    with raw, ctx.wrap_socket(raw) as tls:
        tls.sendall(head)
        assert tls.recv(1024).startswith(b"HTTP/1.1 100 ")
        tls.sendall(body)
        reply = b""
        while chunk := tls.recv(65536):
            reply += chunk
    assert reply.startswith(b"HTTP/1.1 200 ")


def test_a_flood_of_new_keys_over_https_is_braked_and_coalesced(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """500 signed requests, each with a new key, from 127.0.0.3; a visitor at 127.0.0.2."""
    from appliance.agent import server as server_mod

    writes: list[str] = []
    real_write = server_mod.write_atomically

    def counting_write(path: Path, text: str, mode: int = 0o644) -> None:
        if path.name == "pending-appliances.json":  # (not the status file)
            writes.append(text)
        real_write(path, text, mode)

    monkeypatch.setattr(server_mod, "write_atomically", counting_write)
    s = make_agent_dir(tmp_path, port=free_port(), users={"alice": ("alice-pw", {}, {})})
    running = RunningAgent(s)
    fp = running.server.fingerprint

    def send(key: Ed25519PrivateKey, source: str) -> int:
        body, headers = signed(key, {"user": "alice", "password": "x"}, fp)
        ctx = ssl.create_default_context(cafile=str(s.tls_certificate))
        ctx.check_hostname = False
        raw = socket.create_connection(
            ("127.0.0.1", running.server.port), timeout=10, source_address=(source, 0)
        )
        with raw, ctx.wrap_socket(raw) as tls:
            tls.sendall(post(body, headers))
            reply = b""
            while chunk := tls.recv(65536):
                reply += chunk
        return int(reply.split()[1])

    try:
        visitor = Ed25519PrivateKey.generate()
        assert send(visitor, "127.0.0.2") == 403
        visitor_id = wire.public_key_id(visitor.public_key())
        keys = [Ed25519PrivateKey.generate() for _ in range(500)]
        start = time.monotonic()
        with ThreadPoolExecutor(8) as pool:
            codes = list(pool.map(lambda k: send(k, "127.0.0.3"), keys))
        took = time.monotonic() - start
        assert set(codes) <= {403, 429, 503} and codes.count(429) >= 450, codes
        time.sleep(1.5)  # the coalesced write of what was noted
        pending = json.loads(s.pending_file.read_text())
        assert visitor_id in pending
        flood = [k for k, e in pending.items() if e["address"] == "127.0.0.3"]
        assert 1 <= len(flood) <= 4
        assert len(writes) <= 2 + took, (len(writes), took)  # at most one a second
    finally:
        running.close()
