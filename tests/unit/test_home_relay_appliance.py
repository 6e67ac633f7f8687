"""The appliance's side of the home relay that needs no relay: `[home_relay]` in
appliance.toml, the dialer socket's line protocol and its clients, and the portal's
choice of a relayed login (against a stand-in dialer speaking that protocol)."""

from __future__ import annotations

import asyncio
import shutil
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from appliance.core import agent_protocol as wire
from appliance.core.config import load
from appliance.core.tomlfile import ConfigError
from appliance.homelink import dialer_client
from appliance.homelink.dialer_client import DialerError
from appliance.portal import gates

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]
PIN = "sha256:" + wire.b64(bytes(32))


def site(tmp_path: Path, home_relay: str = "") -> Path:
    for name in ("appliance.toml", "servers.toml", "access.toml"):
        shutil.copy(ROOT / "policies" / name, tmp_path / name)
    cfg = tmp_path / "appliance.toml"
    text = cfg.read_text().replace("/var/lib/appliance", str(tmp_path / "state"))
    cfg.write_text(text + home_relay)
    return cfg


def relay_section(sock: Path) -> str:
    return (
        f'\n[home_relay]\nsocket = "{sock}"\nopen_timeout = 2\n'
        '[home_relay.relays]\n"relay.example" = "wss://203.0.113.10:443/v1/appliance"\n'
    )


# -- config ---------------------------------------------------------------------


def test_home_relay_is_off_by_default(tmp_path: Path) -> None:
    cfg = load(site(tmp_path))
    assert not cfg.home_relay.enabled
    assert dialer_client.relayed(cfg.home_relay, "bob-home.relay.example") is None


def test_a_listed_relay_makes_household_names_relayed(tmp_path: Path) -> None:
    cfg = load(site(tmp_path, relay_section(tmp_path / "d.sock")))
    assert cfg.home_relay.enabled
    assert cfg.home_relay.relays == {"relay.example": ("wss://203.0.113.10:443/v1/appliance",)}
    assert dialer_client.relayed(cfg.home_relay, "Bob-Home.relay.example.") == (
        "relay.example",
        "bob-home",
    )
    for host in (
        "relay.example",
        "a.b.relay.example",
        "bob-home.other.example",
        "-x.relay.example",
    ):
        assert dialer_client.relayed(cfg.home_relay, host) is None, host


@pytest.mark.parametrize(
    ("section", "key"),
    [
        ('[home_relay.relays]\n"relay.example" = "https://x/v1/appliance"\n', "relay.example"),
        ('[home_relay.relays]\n"nodot" = "wss://x/v1/appliance"\n', "nodot"),
        ('[home_relay.relays]\n"relay.example" = ["wss://x/v1/a", "http://y/"]\n', "relay.example"),
        ('[home_relay.relays]\n"relay.example" = []\n', "relay.example"),
        ('[home_relay]\nproxy = "socks5://198.51.100.4:1080"\n', "proxy"),
        ('[home_relay]\nca = "/nonexistent/ca.pem"\n', "ca"),
        ('[home_relay]\nsockett = "/run/x"\n', "sockett"),
    ],
)
def test_config_errors_name_the_file_line_and_key(tmp_path: Path, section: str, key: str) -> None:
    path = site(tmp_path, "\n" + section)
    with pytest.raises(ConfigError) as err:
        load(path)
    text = str(err.value)
    assert "appliance.toml" in text and key in text and ":" in text
    assert err.value.line is not None


# -- the line protocol ------------------------------------------------------------


def test_open_lines_and_answers_round_trip() -> None:
    line = dialer_client.open_line("relay.example", "bob-home")
    assert line == b"OPEN relay.example bob-home\n"
    assert dialer_client.parse_open(line) == ("relay.example", "bob-home")
    assert dialer_client.parse_answer(dialer_client.answer_line(None)) is None
    err = dialer_client.parse_answer(
        dialer_client.answer_line(DialerError("offline", "bob-home is not online"))
    )
    assert isinstance(err, DialerError) and err.code == "offline"
    assert err.message == "bob-home is not online"


@pytest.mark.parametrize(
    "line",
    [
        b"",
        b"OPEN\n",
        b"OPEN relay.example\n",
        b"OPEN r BOB\n",
        b"GET / HTTP/1.1\n",
        b"OPEN r \xff\n",
    ],
)
def test_bad_open_lines_are_refused_not_raised(line: bytes) -> None:
    got = dialer_client.parse_open(line)
    assert isinstance(got, DialerError) and got.code == "bad_request"


@pytest.mark.parametrize("line", [b"", b"HTTP/1.1 200 OK\r\n", b"ERR\n", b"ok\n"])
def test_an_answer_that_is_neither_ok_nor_err_is_a_protocol_error(line: bytes) -> None:
    got = dialer_client.parse_answer(line)
    assert isinstance(got, DialerError) and got.code == "protocol"


class StandInDialer:
    """A unix socket server speaking the dialer's protocol: `answer` to every OPEN,
    then (after OK) an echo of the stream's bytes."""

    def __init__(self, path: Path, answer: bytes) -> None:
        self.path, self.answer = path, answer
        self.lines: list[bytes] = []
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.bind(str(path))
        self.sock.listen()
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with conn:
                f = conn.makefile("rb")
                self.lines.append(f.readline())
                conn.sendall(self.answer)
                if self.answer == b"OK\n":
                    while data := conn.recv(65536):
                        conn.sendall(data)

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def ok_dialer(tmp_path: Path) -> Iterator[StandInDialer]:
    d = StandInDialer(tmp_path / "ok.sock", b"OK\n")
    yield d
    d.close()


def test_both_clients_get_a_stream_after_ok(tmp_path: Path, ok_dialer: StandInDialer) -> None:
    cfg = load(site(tmp_path, relay_section(ok_dialer.path))).home_relay
    sock = dialer_client.dial(cfg, "relay.example", "bob-home", 2)
    with sock:
        sock.sendall(b"hello")
        assert sock.recv(5) == b"hello"

    async def main() -> bytes:
        reader, writer = await dialer_client.dial_async(cfg, "relay.example", "bob-home", 2)
        writer.write(b"again")
        got = await reader.readexactly(5)
        writer.close()
        return got

    assert asyncio.run(main()) == b"again"
    assert ok_dialer.lines[0] == b"OPEN relay.example bob-home\n"


def test_a_refusal_is_a_dialer_error_with_its_code(tmp_path: Path) -> None:
    d = StandInDialer(
        tmp_path / "off.sock", b"ERR offline bob-home is not online at relay.example\n"
    )
    try:
        cfg = load(site(tmp_path, relay_section(d.path))).home_relay
        with pytest.raises(DialerError) as err:
            dialer_client.dial(cfg, "relay.example", "bob-home", 2)
        assert err.value.code == "offline" and "not online" in err.value.message
    finally:
        d.close()


def test_no_dialer_running_is_unreachable(tmp_path: Path) -> None:
    cfg = load(site(tmp_path, relay_section(tmp_path / "nobody.sock"))).home_relay
    with pytest.raises(DialerError) as err:
        dialer_client.dial(cfg, "relay.example", "bob-home", 1)
    assert err.value.code == "unreachable"
    with pytest.raises(DialerError) as err:
        asyncio.run(dialer_client.dial_async(cfg, "relay.example", "bob-home", 1))
    assert err.value.code == "unreachable"


# -- the portal's choice -----------------------------------------------------------


def test_the_portal_dials_only_households_of_listed_relays(tmp_path: Path) -> None:
    d = StandInDialer(
        tmp_path / "off.sock", b"ERR offline bob-home is not online at relay.example\n"
    )
    try:
        cfg = load(site(tmp_path, relay_section(d.path)))
        with pytest.raises(gates.AgentFailure) as err:
            gates.agent_authenticate(cfg, f"bob@bob-home.relay.example#{PIN}", "pw")
        assert err.value.code == "offline"
        assert d.lines == [b"OPEN relay.example bob-home\n"]
        # without the pin a relayed household is refused before anything is dialled
        with pytest.raises(gates.AgentFailure) as err:
            gates.agent_authenticate(cfg, "bob@bob-home.relay.example", "pw")
        assert err.value.code == "bad_address" and "fingerprint" in err.value.message
        with pytest.raises(gates.AgentFailure) as err:  # a pin that is no fingerprint
            gates.agent_authenticate(cfg, "bob@bob-home.relay.example#sha256:short", "pw")
        assert err.value.code == "bad_address"
        assert len(d.lines) == 1  # neither of them opened a stream
    finally:
        d.close()


def test_with_home_relay_off_a_relay_name_is_an_ordinary_agent_name(tmp_path: Path) -> None:
    cfg = load(site(tmp_path))
    assert gates._through_relay(cfg, f"bob@bob-home.relay.example#{PIN}") is None


def test_a_relayed_agents_servers_are_reached_through_it() -> None:
    spec = f"bob@bob-home.relay.example#{PIN}"
    from appliance.agent.client import _relayed_servers

    got = _relayed_servers({"pop3": "192.0.2.3:110", "imap": "mail.lan:143"}, spec)
    assert got == {"pop3": "agent:" + spec, "imap": "agent:" + spec}
    assert wire.relayed_server_spec(got["pop3"]) == spec
    assert wire.relayed_server_spec("203.0.113.3:110") is None
