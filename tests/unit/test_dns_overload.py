"""A flood of made-up names while upstream is silent: bounded, answered, counted."""

from __future__ import annotations

import asyncio
import socket
from typing import Any

import pytest
from dnslib import RCODE, DNSRecord
from test_dns_core import ask, resolver

from appliance.dns.logins import Logins
from appliance.dns.service import GuestUdp, Server

pytestmark = pytest.mark.unit


class Member:
    """A sessions store in which every address is logged in (made-up names get forwarded)."""

    def lookup_ip(self, ip: str) -> object:
        return type("S", (), {"expires": lambda self: 4e9})()

    def ended_after(self, last_id: int, limit: int) -> list[Any]:
        return []

    def last_event(self) -> int:
        return 0


def test_misses_beyond_the_pending_cap_get_servfail_at_once() -> None:
    async def go() -> None:
        silent = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)  # upstream that never answers
        silent.bind(("127.0.0.1", 0))
        res = resolver()
        server = Server(
            res, [silent.getsockname()], timeout=5.0, max_pending=2, logins=Logins(Member())
        )
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.bind(("127.0.0.1", 0))
        udp = GuestUdp(server, sock, asyncio.get_running_loop())
        udp.start()
        guest = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        guest.setblocking(False)
        loop = asyncio.get_running_loop()
        try:
            for i in range(2):  # these two wait upstream
                guest.sendto(ask(f"made-up-{i}.example.com"), sock.getsockname())
            for _ in range(50):
                if len(server.tasks) == 2:
                    break
                await asyncio.sleep(0.02)
            assert len(server.tasks) == 2
            guest.sendto(ask("one-more.example.com", qid=0x4242), sock.getsockname())
            data = await asyncio.wait_for(loop.sock_recv(guest, 4096), 1.0)
            reply = DNSRecord.parse(data)
            assert reply.header.id == 0x4242 and reply.header.rcode == RCODE.SERVFAIL
            assert str(reply.q.qname) == "one-more.example.com."
            assert res.stats.overload == 1 and len(server.tasks) == 2
        finally:
            udp.close()
            for task in list(server.tasks):
                task.cancel()
            guest.close()
            silent.close()

    asyncio.run(go())
