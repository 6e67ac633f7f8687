"""Helpers of the relay tests: a free port, an echo upstream, a static table, and every
relay test run on both event loops."""

from __future__ import annotations

import asyncio
import socket
from typing import Any, cast

import pytest

PORTAL = "http://192.168.1.1/"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Echo(asyncio.Protocol):
    """An upstream that echoes, upper-cased, and answers EOF with 'BYE' then closes."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.t = cast(asyncio.Transport, transport)
        transport.write(b"HELLO\n")

    def data_received(self, data: bytes) -> None:
        self.t.write(data.upper())

    def eof_received(self) -> bool:
        self.t.write(b"BYE\n")
        self.t.close()
        return True


def resolver(names: dict[str, list[str]]) -> Any:
    """A site resolver that knows only `names` (name -> IPv4 answers): the relay's own
    look-ups in tests never leave the machine, and an unknown name fails as it would."""

    async def resolve(name: str, _port: int) -> list[str]:
        if name not in names:
            raise OSError(f"{name}: no such host")
        return names[name]

    return resolve


def table(up_port: int, relay_port: int, **user: Any) -> dict[str, Any]:
    u = {"user": "alice", "allow": ["smtp", "pop3"], "rule": "staff", **user}
    return {
        "portal_url": PORTAL,
        "listeners": [
            {"service": "smtp", "protocol": "smtp", "port": relay_port},
            {"service": "pop3", "protocol": "pop3", "port": relay_port + 1},
        ],
        "servers": {
            "smtp": [f"127.0.0.1:{free_port()}", f"127.0.0.1:{up_port}"],
            "pop3": [f"127.0.0.1:{up_port}"],
        },
        "users": {"127.0.0.1": u},
    }


async def read_until(reader: asyncio.StreamReader, what: bytes) -> bytes:
    return await asyncio.wait_for(reader.readuntil(what), 5)


LOOP = {"kind": "asyncio"}


@pytest.fixture(autouse=True, params=["asyncio", "uvloop"])
def loop_kind(request: pytest.FixtureRequest) -> None:
    """Every relay test runs on the stock loop and on uvloop (they differ in details)."""
    LOOP["kind"] = request.param


def run(coro: Any) -> Any:
    if LOOP["kind"] == "uvloop":
        import uvloop

        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            return runner.run(coro)
    return asyncio.run(coro)
