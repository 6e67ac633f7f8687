"""Server streams (`POST /v1/connect`): who may open one, and bytes through a real agent."""

from __future__ import annotations

import asyncio
import hashlib
import json
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from agent_helpers import RunningAgent, appliance_config, free_port, make_agent_dir, signed
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from appliance.agent import api, client, tables
from appliance.agent.api import AgentApp, Request, Response, Tunnel
from appliance.agent.settings import load
from appliance.core import agent_protocol as wire

pytestmark = pytest.mark.unit
FP = "sha256:" + "A" * 43
KEY = Ed25519PrivateKey.generate()
KID = wire.public_key_id(KEY.public_key())


class Clock:
    def __init__(self) -> None:
        self.now = 1_800_000_000.0

    def __call__(self) -> float:
        return self.now


def make_app(tmp_path: Path, clock: Clock, saved: list[dict[Any, float]]) -> AgentApp:
    s = make_agent_dir(
        tmp_path,
        users={
            "alice": ("x", {}, {"pop3": "203.0.113.3:110", "imap": "home.example:993#" + FP}),
            "bob": ("x", {}, {}),
        },
        extra=f'[appliances]\ntrusted = ["{KID}"]\n',
    )
    users = tables.load_users(s.users_file)
    return AgentApp(
        s,
        FP,
        lambda: users,
        lambda: tables.ApplianceTable({}),
        clock=clock,
        verify=lambda stored, pw: stored is not None and pw == "right",
        persist_logins=lambda d: saved.append(dict(d)),
    )


def post(app: AgentApp, path: str, body: Any, clock: Clock, key: Any = KEY) -> Response | Tunnel:
    raw, headers = signed(key, body, FP, clock.now, path=path)
    return app.handle(Request("POST", path, headers, raw, "192.0.2.9"))


def login(app: AgentApp, clock: Clock, user: str = "alice") -> None:
    r = post(app, wire.AUTHENTICATE_PATH, {"user": user, "password": "right"}, clock)
    assert isinstance(r, Response) and r.status == 200


def connect(app: AgentApp, clock: Clock, user: str = "alice", service: str = "pop3") -> Any:
    return post(app, wire.CONNECT_PATH, {"user": user, "service": service}, clock)


def test_a_login_opens_streams_for_24_hours_only(tmp_path: Path) -> None:
    clock, saved = Clock(), []
    app = make_app(tmp_path, clock, saved)
    r = connect(app, clock)
    assert isinstance(r, Response) and (r.status, r.body["error"]) == (403, "no_login")
    login(app, clock)
    assert saved[-1] == {(KID, "alice"): clock.now}
    clock.now += api.LOGIN_TTL - 5
    assert connect(app, clock) == Tunnel("203.0.113.3", 110, "alice", "pop3", KID)
    t = connect(app, clock, service="imap")  # the pin is the appliance's to check, not ours
    assert isinstance(t, Tunnel) and (t.host, t.port) == ("home.example", 993)
    clock.now += 10
    r = connect(app, clock)
    assert isinstance(r, Response) and (r.status, r.body["error"]) == (403, "no_login")
    assert app.dropped["no_login"] == 2


def test_a_login_is_for_that_key_and_that_user(tmp_path: Path) -> None:
    clock = Clock()
    app = make_app(tmp_path, clock, [])
    login(app, clock, "bob")
    r = connect(app, clock)  # bob logged in, not alice
    assert isinstance(r, Response) and r.body["error"] == "no_login"
    login(app, clock)
    other = Ed25519PrivateKey.generate()
    r = post(app, wire.CONNECT_PATH, {"user": "alice", "service": "pop3"}, clock, key=other)
    assert isinstance(r, Response) and r.status == 403  # not allowed, let alone logged in


def test_no_server_for_that_service_is_404(tmp_path: Path) -> None:
    clock = Clock()
    app = make_app(tmp_path, clock, [])
    login(app, clock)
    login(app, clock, "bob")
    for user, service in (("alice", "nntp"), ("bob", "pop3")):
        r = connect(app, clock, user, service)
        assert isinstance(r, Response) and (r.status, r.body["error"]) == (404, "no_server")


@pytest.mark.parametrize(
    "body",
    [
        b"not json",
        b"[]",
        {"user": "alice"},
        {"user": "alice", "service": "pop3", "password": "x"},
        {"user": "alice", "service": "POP 3"},
        {"user": "alice", "service": "../x"},
        {"user": "al ice", "service": "pop3"},
        {"user": "alice", "service": 3},
    ],
)
def test_bad_bodies_are_400(tmp_path: Path, body: Any) -> None:
    clock = Clock()
    app = make_app(tmp_path, clock, [])
    login(app, clock)
    r = post(app, wire.CONNECT_PATH, body, clock)
    assert isinstance(r, Response) and r.status == 400


def test_connect_is_signed_like_authenticate(tmp_path: Path) -> None:
    clock = Clock()
    app = make_app(tmp_path, clock, [])
    login(app, clock)
    raw, headers = signed(KEY, {"user": "alice", "service": "pop3"}, FP, clock.now)  # wrong path
    r = app.handle(Request("POST", wire.CONNECT_PATH, headers, raw, "192.0.2.9"))
    assert isinstance(r, Response) and (r.status, r.body["error"]) == (401, "bad_signature")
    raw, headers = signed(
        KEY, {"user": "alice", "service": "pop3"}, FP, clock.now, wire.CONNECT_PATH
    )
    del headers["appliance-signature"]
    r = app.handle(Request("POST", wire.CONNECT_PATH, headers, raw, "192.0.2.9"))
    assert isinstance(r, Response) and r.body["error"] == "unsigned"
    r = app.handle(Request("GET", wire.CONNECT_PATH, {}, b"", "192.0.2.9"))
    assert isinstance(r, Response) and r.status == 405


def test_connect_shares_the_rate_limits(tmp_path: Path) -> None:
    clock = Clock()
    app = make_app(tmp_path, clock, [])
    login(app, clock)
    codes = [getattr(connect(app, clock), "status", 200) for _ in range(40)]
    assert 429 in codes and codes.index(429) < 25  # burst 20 by default, login included


def test_the_login_record_survives_a_restart_without_stale_entries() -> None:
    now = 1_800_000_000.0
    other = wire.public_key_id(Ed25519PrivateKey.generate().public_key())
    record = {(KID, "alice"): now - 60, (other, "bob"): now - api.LOGIN_TTL - 1}
    text = api.dump_logins(record)
    assert api.parse_logins(text, now) == {(KID, "alice"): now - 60}
    assert api.parse_logins("{broken", now) == {}
    bad = json.dumps({"logins": [{"key": "x", "user": "alice", "time": now}, 7]})
    assert api.parse_logins(bad, now) == {}


# -- through a real agent over TLS, to a real TCP server -----------------------------------

BIG = bytes(range(256)) * 4096  # 1 MiB


class PopLike:
    """A tiny POP-like server on loopback: greets, echoes lines, sends 1 MiB on RETR,
    and notes what it received up to the client's EOF."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.received: list[bytes] = []
        self.got_eof = threading.Event()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.server = asyncio.run_coroutine_threadsafe(
            asyncio.start_server(self._client, "127.0.0.1", 0, limit=1 << 20), self.loop
        ).result(5)
        self.port = int(self.server.sockets[0].getsockname()[1])

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"+OK hello\r\n")
        got = bytearray()
        while line := await reader.readline():
            got += line
            if line.startswith(b"RETR"):
                writer.write(b"+OK 1048576 octets\r\n" + BIG)
            elif line.startswith(b"QUIT"):
                writer.write(b"+OK bye\r\n")
                await writer.drain()
                writer.close()
                self.received.append(bytes(got))
                return
            else:
                writer.write(b"+OK " + line)
            await writer.drain()
        self.received.append(bytes(got))  # the client's EOF
        self.got_eof.set()
        writer.close()

    def close(self) -> None:
        self.server.close()
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)


@pytest.fixture(scope="module")
def pop() -> Iterator[PopLike]:
    p = PopLike()
    yield p
    p.close()


@pytest.fixture(scope="module")
def agent(tmp_path_factory: pytest.TempPathFactory, pop: PopLike) -> Iterator[RunningAgent]:
    closed = free_port()
    s = make_agent_dir(
        tmp_path_factory.mktemp("connect-agent"),
        port=free_port(),
        users={
            "alice": (
                "alice-pw",
                {},
                {"pop3": f"127.0.0.1:{pop.port}", "imap": f"127.0.0.1:{closed}"},
            ),
            "carol": ("carol-pw", {}, {"pop3": f"127.0.0.1:{pop.port}"}),
        },
        extra=f'[appliances]\ntrusted = ["{KID}"]\n[limits]\nrate = 10000\nburst = 10000\n',
    )
    running = RunningAgent(s, verify=lambda stored, pw: stored is not None and pw.endswith("-pw"))
    yield running
    running.close()


@pytest.fixture(scope="module")
def config(tmp_path_factory: pytest.TempPathFactory) -> Any:
    cfg = appliance_config(tmp_path_factory.mktemp("connect-appliance"), timeout=5.0)
    state = Path(cfg.state.directory)
    state.mkdir(parents=True, exist_ok=True)
    # the appliance's key is the one the agent trusts
    from cryptography.hazmat.primitives import serialization

    (state / client.KEY_FILE).write_bytes(
        KEY.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    (state / client.KEY_FILE).chmod(0o600)
    return cfg


def spec(agent: RunningAgent, user: str = "alice") -> str:
    return f"{user}@127.0.0.1:{agent.server.port}#{agent.server.fingerprint}"


def dial(agent: RunningAgent) -> socket.socket:
    """Loopback is never an agent address to the appliance: connect for it, as the relay will."""
    return socket.create_connection(("127.0.0.1", agent.server.port), timeout=5)


def recv_until(tls: Any, end: bytes, size: int | None = None) -> bytes:
    got = bytearray()
    while not (got.endswith(end) if size is None else len(got) >= size):
        chunk = tls.recv(65536)
        assert chunk, f"EOF after {len(got)} bytes"
        got += chunk
    return bytes(got)


def test_without_a_login_a_stream_is_403(config: Any, agent: RunningAgent) -> None:
    with pytest.raises(client.AgentError) as err:
        client.open_server_stream(config, spec(agent, "carol"), "carol", "pop3", sock=dial(agent))
    assert err.value.code == "no_login"


def test_bytes_through_a_stream_arrive_exact_both_ways(
    config: Any, agent: RunningAgent, pop: PopLike
) -> None:
    with pytest.raises(client.AgentError) as err:  # loopback servers are refused to the portal...
        client.authenticate(config, spec(agent), "alice-pw", sock=dial(agent))
    assert err.value.code == "refused_servers"  # ...but the agent accepted and noted the login
    assert agent.server.settings.logins_file.exists()

    tls = client.open_server_stream(config, spec(agent), "alice", "pop3", sock=dial(agent))
    with tls:
        tls.settimeout(10)
        assert recv_until(tls, b"\r\n") == b"+OK hello\r\n"
        lines = [b"USER alice\r\n", b"x" * 70000 + b"\r\n"]
        for line in lines:
            tls.sendall(line)
            echo = recv_until(tls, b"\r\n")
            assert hashlib.sha256(echo).digest() == hashlib.sha256(b"+OK " + line).digest()
        tls.sendall(b"RETR 1\r\n")
        head = b"+OK 1048576 octets\r\n"
        got = recv_until(tls, b"", len(head) + len(BIG))
        assert got[: len(head)] == head
        assert hashlib.sha256(got[len(head) :]).hexdigest() == hashlib.sha256(BIG).hexdigest()
        tls.sendall(b"QUIT\r\n")
        assert recv_until(tls, b"\r\n") == b"+OK bye\r\n"
        assert tls.recv(100) == b""  # the server's close reaches the appliance
    assert pop.received[-1] == b"".join(lines) + b"RETR 1\r\nQUIT\r\n"


def test_the_appliances_eof_reaches_the_server(
    config: Any, agent: RunningAgent, pop: PopLike
) -> None:
    tls = client.open_server_stream(config, spec(agent), "alice", "pop3", sock=dial(agent))
    tls.settimeout(10)
    assert recv_until(tls, b"\r\n") == b"+OK hello\r\n"
    tls.sendall(b"NOOP\r\n")
    assert recv_until(tls, b"\r\n") == b"+OK NOOP\r\n"
    pop.got_eof.clear()
    raw = tls.unwrap()  # close_notify: TLS's nearest thing to a half-close
    raw.close()
    assert pop.got_eof.wait(10)
    assert pop.received[-1] == b"NOOP\r\n"


def test_a_closed_server_port_is_502(config: Any, agent: RunningAgent) -> None:
    with pytest.raises(client.AgentError) as err:
        client.open_server_stream(config, spec(agent), "alice", "imap", sock=dial(agent))
    assert err.value.code == "server_unreachable"
    with pytest.raises(client.AgentError) as err:
        client.open_server_stream(config, spec(agent), "alice", "nntp", sock=dial(agent))
    assert err.value.code == "no_server"


def test_a_restarted_agent_remembers_the_login(agent: RunningAgent) -> None:
    from appliance.agent.server import AgentServer

    again = AgentServer(load(agent.server.settings.path))  # not started: only its record
    assert (KID, "alice") in again.app.logins
    again.pool.shutdown(wait=False)


def test_concurrent_connects_never_open_more_streams_than_the_cap(
    config: Any, agent: RunningAgent, pop: PopLike, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The cap is checked before the agent connects to the user's server, an await: a slow
    server (here: 0.3 s to connect) must not let a burst of connects all pass the check."""
    from appliance.agent import server as agent_server

    cap = 2
    monkeypatch.setattr(agent_server, "MAX_STREAMS", cap)
    real_open = asyncio.open_connection

    async def slow_open(host: Any = None, port: Any = None, **kw: Any) -> Any:
        if port == pop.port:
            await asyncio.sleep(0.3)
        return await real_open(host, port, **kw)

    monkeypatch.setattr(asyncio, "open_connection", slow_open)
    with pytest.raises(client.AgentError):  # loopback servers are refused; the login is noted
        client.authenticate(config, spec(agent), "alice-pw", sock=dial(agent))

    def one() -> Any:
        try:
            return client.open_server_stream(config, spec(agent), "alice", "pop3", sock=dial(agent))
        except client.AgentError as exc:
            return exc

    results: list[Any] = []
    threads = [threading.Thread(target=lambda: results.append(one())) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(15)
    opened = [r for r in results if not isinstance(r, client.AgentError)]
    refused = [r for r in results if isinstance(r, client.AgentError)]
    try:
        assert len(results) == 6
        assert len(opened) == cap, [str(r) for r in refused]
        assert agent.server.open_streams == cap
        assert all("HTTP 503" in str(r) for r in refused), [str(r) for r in refused]
        assert agent.server.app.dropped["streams_busy"] >= len(refused)
        for tls in opened:
            tls.settimeout(10)
            assert recv_until(tls, b"\r\n") == b"+OK hello\r\n"  # the admitted ones work
    finally:
        for tls in opened:
            tls.close()
    deadline = time.monotonic() + 5
    while agent.server.open_streams and time.monotonic() < deadline:
        time.sleep(0.02)
    assert agent.server.open_streams == 0  # closed streams give their slots back
    with pytest.raises(client.AgentError) as err:  # and so does a connect that fails
        client.open_server_stream(config, spec(agent), "alice", "imap", sock=dial(agent))
    assert err.value.code == "server_unreachable"
    assert agent.server.open_streams == 0


def test_the_agents_metrics_count_logins_streams_and_refusals(
    config: Any, agent: RunningAgent
) -> None:
    from prometheus_client import generate_latest
    from prometheus_client.parser import text_string_to_metric_families

    from appliance.core.metrics import registry_for

    def value(name: str, **labels: str) -> float:
        text = generate_latest(registry_for(agent.server.metric_families)).decode()
        assert "alice" not in text and "carol" not in text  # no user is a label
        for fam in text_string_to_metric_families(text):
            for s in fam.samples:
                if s.name == name and s.labels == labels:
                    return float(s.value)
        return 0.0

    logins, streams = (
        value("appliance_agent_accepted_total", kind="logins"),
        value("appliance_agent_accepted_total", kind="streams"),
    )
    no_login = value("appliance_agent_refused_total", reason="no_login")
    with pytest.raises(client.AgentError):
        client.open_server_stream(config, spec(agent, "carol"), "carol", "pop3", sock=dial(agent))
    with pytest.raises(client.AgentError):  # (loopback servers: refused by the portal side)
        client.authenticate(config, spec(agent, "carol"), "carol-pw", sock=dial(agent))
    client.open_server_stream(
        config, spec(agent, "carol"), "carol", "pop3", sock=dial(agent)
    ).close()
    assert value("appliance_agent_refused_total", reason="no_login") == no_login + 1
    assert value("appliance_agent_accepted_total", kind="logins") == logins + 1
    assert value("appliance_agent_accepted_total", kind="streams") == streams + 1
