"""The server's in-memory view of the lease store: who holds which address, and what is free.

It mirrors the `leases` table (loaded at start, then updated by the same changes the
service commits) plus the offers, which live only in memory: an offer is not a lease,
so losing it in a crash hands nothing out twice.  Lookups are dict hits; the next free
address comes from a cursor over never-used addresses, then from a heap of addresses
whose lease ended (oldest first), so a returning client finds its old address free
for as long as possible.
"""

from __future__ import annotations

import heapq
import socket
import struct
from collections.abc import Iterable
from typing import NamedTuple

from appliance.state import leases
from dhcp import codec

OFFER_HOLD = 30.0  # seconds an offered address stays kept for its client
# the kinds the store records (leases.EVENT_KINDS); "offered" and "unoffered" stay in memory
PERSISTED = leases.EVENT_KINDS


def ip_to_int(ip: str) -> int:
    return int(struct.unpack("!I", socket.inet_aton(ip))[0])


def int_to_ip(n: int) -> str:
    return socket.inet_ntoa(struct.pack("!I", n))


class Binding(NamedTuple):
    """One address and its client; `client` is the key (option 61, else htype+chaddr).

    Named tuples, not dataclasses: the server makes one or two per packet."""

    ip: str
    mac: str
    client: bytes
    state: str  # bound | released | expired | declined | offered
    expires: float  # for declined: end of quarantine; for offered: end of the hold
    client_id: bytes | None = None
    hostname: str | None = None


class Change(NamedTuple):
    """What the server decided; kinds in PERSISTED are committed before the reply."""

    kind: str  # granted | renewed | released | expired | declined | offered | unoffered
    binding: Binding


def client_key(client_id: bytes | None, mac: str) -> bytes:
    """The key a stored lease had when it was made (Ethernet: only htype 1 is served)."""
    return codec.client_key(client_id, bytes.fromhex(mac.replace(":", "")))


class LeaseIndex:
    def __init__(self, pool_start: str, pool_end: str, reserved: dict[str, str]):
        self.start = ip_to_int(pool_start)
        self.end = ip_to_int(pool_end)
        self.reserved = dict(reserved)  # mac -> ip
        self.reserved_ips = {ip: mac for mac, ip in reserved.items()}
        self.by_ip: dict[str, Binding] = {}
        self.by_client: dict[bytes, str] = {}
        self.offers: dict[str, Binding] = {}
        self.offer_by_client: dict[bytes, str] = {}
        # per hardware address: its bound leases and its offers, ip -> binding (the cap)
        self.bound_by_mac: dict[str, dict[str, Binding]] = {}
        self.offers_by_mac: dict[str, dict[str, Binding]] = {}
        self.declined_by_mac: dict[str, dict[str, Binding]] = {}
        self._heap: list[tuple[float, str]] = []
        self._cursor = self.start

    # -- queries ----------------------------------------------------------------
    def in_pool(self, ip: str, mac: str) -> bool:
        """May this client be given this address (the pool, or its own reservation)?"""
        owner = self.reserved_ips.get(ip)
        if owner is not None:
            return owner == mac
        try:
            n = ip_to_int(ip)
        except OSError:
            return False
        return self.start <= n <= self.end

    def is_free(self, ip: str, client: bytes | None, now: float) -> bool:
        """Nobody else holds it: no unexpired lease, offer or quarantine of another client."""
        b = self.by_ip.get(ip)
        if b is not None and b.expires > now:
            if b.state == "declined":
                return False
            if b.state == "bound" and b.client != client:
                return False
        o = self.offers.get(ip)
        return o is None or o.expires <= now or o.client == client

    def current(self, client: bytes, now: float) -> Binding | None:
        """The client's bound, unexpired lease."""
        ip = self.by_client.get(client)
        if ip is None:
            return None
        b = self.by_ip.get(ip)
        if b is not None and b.state == "bound" and b.client == client and b.expires > now:
            return b
        return None

    def held_by_mac(self, mac: str, client: bytes, now: float) -> list[Binding]:
        """The live bound leases of this hardware address under other client keys, oldest first."""
        held = self.bound_by_mac.get(mac)
        if not held:
            return []
        out = [b for b in held.values() if b.client != client and b.expires > now]
        out.sort(key=lambda b: b.expires)
        return out

    def quarantined_by_mac(self, mac: str, now: float) -> int:
        """How many addresses this hardware address declined that are still in quarantine."""
        held = self.declined_by_mac.get(mac)
        return sum(1 for b in held.values() if b.expires > now) if held else 0

    def offered_to_mac(self, mac: str, client: bytes) -> list[Binding]:
        """The offers this hardware address holds under other client keys."""
        held = self.offers_by_mac.get(mac)
        return [b for b in held.values() if b.client != client] if held else []

    def allocate(self, now: float) -> str | None:
        """A free pool address nobody used yet, else the one free the longest, else None."""
        while self._cursor <= self.end:
            ip = int_to_ip(self._cursor)
            if ip in self.by_ip or ip in self.offers or ip in self.reserved_ips:
                self._cursor += 1
                continue
            return ip
        heap = self._heap
        while heap:
            when, ip = heap[0]
            if when > now:
                return None
            if ip not in self.reserved_ips and self.is_free(ip, None, now):
                return ip
            heapq.heappop(heap)  # stale: held again since it was pushed
        return None

    def lapsed(self, now: float) -> list[Binding]:
        """Bound leases past their end (the sweep writes 'expired' for them)."""
        return [b for b in self.by_ip.values() if b.state == "bound" and b.expires <= now]

    def forget_offers(self, now: float) -> None:
        for ip, o in list(self.offers.items()):
            if o.expires <= now:
                self._drop_offer(ip)
                if self.offer_by_client.get(o.client) == ip:
                    del self.offer_by_client[o.client]
        if len(self._heap) > 4 * (len(self.by_ip) + len(self.offers)) + 1024:
            self._heap = [(b.expires, b.ip) for b in (*self.by_ip.values(), *self.offers.values())]
            heapq.heapify(self._heap)

    # -- updates ----------------------------------------------------------------
    def _put_offer(self, b: Binding) -> None:
        self._drop_offer(b.ip)
        self.offers[b.ip] = b
        self.offers_by_mac.setdefault(b.mac, {})[b.ip] = b

    def _drop_offer(self, ip: str) -> None:
        o = self.offers.pop(ip, None)
        if o is not None:
            _unmac(self.offers_by_mac, o)

    def load(self, bindings: Iterable[Binding]) -> None:
        """Fill from the store, oldest change first (so by_client ends on the latest)."""
        for b in bindings:
            self.apply(Change("granted" if b.state == "bound" else b.state, b))

    def apply(self, change: Change) -> None:
        b = change.binding
        kind = change.kind
        if kind == "offered":
            self._put_offer(b)
            self.offer_by_client[b.client] = b.ip
            heapq.heappush(self._heap, (b.expires, b.ip))
            return
        if kind == "unoffered":
            if self.offers.get(b.ip, b).client == b.client:
                self._drop_offer(b.ip)
            if self.offer_by_client.get(b.client) == b.ip:
                del self.offer_by_client[b.client]
            return
        old = self.by_ip.get(b.ip)
        if old is not None:
            if old.state == "bound":
                _unmac(self.bound_by_mac, old)
            elif old.state == "declined":
                _unmac(self.declined_by_mac, old)
        self.by_ip[b.ip] = b
        if b.state == "bound":
            self.bound_by_mac.setdefault(b.mac, {})[b.ip] = b
        elif b.state == "declined":
            self.declined_by_mac.setdefault(b.mac, {})[b.ip] = b
        heapq.heappush(self._heap, (b.expires, b.ip))
        o = self.offers.get(b.ip)
        if o is not None and (o.client == b.client or kind in leases.BINDING_KINDS):
            self._drop_offer(b.ip)
        if self.offer_by_client.get(b.client) == b.ip:
            del self.offer_by_client[b.client]
        if kind == "declined":
            if self.by_client.get(b.client) == b.ip:
                del self.by_client[b.client]
        else:  # the latest address of a client is the one it gets back while free
            self.by_client[b.client] = b.ip


def _unmac(table: dict[str, dict[str, Binding]], b: Binding) -> None:
    held = table.get(b.mac)
    if held is not None and held.pop(b.ip, None) is not None and not held:
        del table[b.mac]
