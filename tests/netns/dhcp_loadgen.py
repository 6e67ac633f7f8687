"""A relay-style DHCP load generator for the crash test: many clients, every ACK logged.

Run inside a namespace with an address on the relay subnet:
    python dhcp_loadgen.py RELAY_IP SERVER_IP COUNT LOGFILE
It acts as a relay (giaddr = RELAY_IP, port 67) for COUNT made-up clients, keeps
WINDOW exchanges in flight, retries each step until answered (the server may be
down for a while), and appends "mac ip" to LOGFILE, flushed, for every ACK, so the
test knows exactly which leases a client was promised.
"""

from __future__ import annotations

import contextlib
import os
import select
import socket
import sys
import time

from dhcp import codec
from dhcp.codec import ACK, DISCOVER, NAK, OFFER, REQUEST, Message

WINDOW = 32
RETRY = 0.5


def main() -> int:
    relay, server, count, logfile = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind((relay, 67))
    sock.setblocking(False)
    log = open(logfile, "a", buffering=1)  # noqa: SIM115
    sid = socket.inet_aton(server)
    todo = list(range(count))
    flight: dict[int, tuple[int, str | None, float]] = {}  # xid -> (n, offered ip, sent at)
    done = 0
    deadline = time.monotonic() + 120

    def chaddr(n: int) -> bytes:
        return bytes([2, 0x99, 0, 0, n >> 8, n & 0xFF]) + bytes(10)

    def send(n: int, ip: str | None) -> None:
        xid = (n << 8) | (os.getpid() & 0xFF)
        opts = {53: bytes([DISCOVER if ip is None else REQUEST])}
        if ip is not None:
            opts[54] = sid
            opts[50] = socket.inet_aton(ip)
        m = Message(xid=xid, giaddr=relay, hops=1, chaddr=chaddr(n), options=opts)
        with contextlib.suppress(OSError):
            sock.sendto(codec.encode(m), (server, 67))
        flight[xid] = (n, ip, time.monotonic())

    while (todo or flight) and time.monotonic() < deadline:
        while todo and len(flight) < WINDOW:
            send(todo.pop(), None)
        ready, _, _ = select.select([sock], [], [], 0.05)
        if ready:
            while True:
                try:
                    data = sock.recv(2048)
                except BlockingIOError:
                    break
                r = codec.decode(data)
                entry = flight.pop(r.xid, None)
                if entry is None:
                    continue
                n, _, _ = entry
                if r.message_type == OFFER:
                    send(n, r.yiaddr)
                elif r.message_type == ACK:
                    log.write(f"{r.mac} {r.yiaddr}\n")
                    done += 1
                elif r.message_type == NAK:
                    send(n, None)
        now = time.monotonic()
        for xid, (n, ip, sent) in list(flight.items()):
            if now - sent > RETRY:
                del flight[xid]
                send(n, ip)
    print(f"acked {done} of {count}")
    return 0 if done == count else 1


if __name__ == "__main__":
    sys.exit(main())
