"""The appliances that share one store, each with the guest subnet it serves.

The DHCP role of each box writes its row at start and again with each expiry sweep
(`seen`).  Leases are keyed by address, so two boxes of different segments on one
store must serve different guest subnets; the two boxes of a pair serve the same one
and name each other in `[ha] peers`.  This module is the only one that knows the SQL.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass

from appliance.state.connection import Connection

FRESH = 600.0  # seconds: a row older than this is a box that went away


@dataclass(frozen=True, slots=True)
class Appliance:
    name: str  # its management address
    guest_subnet: ipaddress.IPv4Network
    seen: float


def register(conn: Connection, name: str, subnet: ipaddress.IPv4Network, now: float) -> None:
    conn.execute(
        "INSERT INTO appliances (name, guest_subnet, seen) VALUES (?, ?, ?) ON CONFLICT (name) "
        "DO UPDATE SET guest_subnet = excluded.guest_subnet, seen = excluded.seen",
        (name, str(subnet), now),
    )


def listed(conn: Connection) -> list[Appliance]:
    rows = conn.execute("SELECT name, guest_subnet, seen FROM appliances ORDER BY name").fetchall()
    return [Appliance(str(n), ipaddress.IPv4Network(str(g)), float(s)) for n, g, s in rows]


def overlapping(
    conn: Connection,
    name: str,
    subnet: ipaddress.IPv4Network,
    peers: Iterable[str],
    now: float,
) -> list[Appliance]:
    """Other boxes, not this box's pair, seen lately, whose guest subnet overlaps."""
    pair = {name, *peers}
    return [
        a
        for a in listed(conn)
        if a.name not in pair and now - a.seen < FRESH and a.guest_subnet.overlaps(subnet)
    ]


def serving(boxes: Iterable[Appliance], ip: str) -> str:
    """The name of the box whose guest subnet holds `ip` ('' none known)."""
    try:
        address = ipaddress.IPv4Address(ip)
    except ValueError:
        return ""
    return next((a.name for a in boxes if address in a.guest_subnet), "")


__all__ = ["FRESH", "Appliance", "listed", "overlapping", "register", "serving"]
