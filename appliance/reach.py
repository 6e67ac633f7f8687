"""Which addresses a guest's traffic must never be sent to, IPv4 and IPv6 alike.

One verdict for every place that sends a connection on a guest's behalf (the
agent client, the personal-server choice of the relay's gate, the web proxy's
host check), so an IPv6 spelling cannot reach what the IPv4 one may not:
an IPv6 address that carries an IPv4 one on the wire (IPv4-mapped, the NAT64
prefix 64:ff9b::/96, 6to4) is judged as that IPv4 address; loopback,
unspecified, link-local, site-local, multicast, reserved and the other tunnel
and translation ranges are refused; the rest is refused when it is in a
configured hidden network (IPv6 ones included: list the segment's prefix, and
fc00::/7 when the site's ULA ranges must stay hidden too).
"""

from __future__ import annotations

import ipaddress
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from appliance.config import Interfaces

Address = ipaddress.IPv4Address | ipaddress.IPv6Address
NAT64 = ipaddress.IPv6Network("64:ff9b::/96")  # RFC 6052: the last 32 bits are the IPv4 address
# translators and tunnels whose IPv4 end cannot be read off the address: never a target
OPAQUE = (
    ipaddress.IPv6Network("64:ff9b:1::/48"),  # RFC 8215, local-use NAT64 (any prefix length)
    ipaddress.IPv6Network("2001::/32"),  # Teredo (the client address is obfuscated)
)
_BROADCAST = ipaddress.IPv4Address("255.255.255.255")


def carried_ipv4(ip: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    """The IPv4 address an IPv6 one delivers to, when it says so itself."""
    if ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    if ip in NAT64:
        return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    return ip.sixtofour


def forbidden(ifs: Interfaces, address: str | Address) -> str | None:
    """Why a guest's connection may not go to `address`, as the end of "it is ..."
    without the address (None: it may).  Anything that is not an IP address is refused:
    names are resolved first and each address judged."""
    if isinstance(address, str):
        try:
            ip: Address = ipaddress.ip_address(address)
        except ValueError:
            return "not an IP address"
    else:
        ip = address
    if isinstance(ip, ipaddress.IPv6Address):
        inner = carried_ipv4(ip)
        if inner is None:
            return _forbidden6(ifs, ip)
        ip = inner
    if ip.is_loopback or ip.is_unspecified or ip.is_multicast or ip.is_link_local:
        return "a special-purpose address"
    if ip.is_reserved or ip == _BROADCAST:
        return "a special-purpose address"
    own = {ifs.guest_ip, ifs.management_address}
    if ifs.uplink_address is not None:
        own.add(ifs.uplink_address.ip)
    if ip in own:
        return "the appliance itself"
    if ip in ifs.guest_subnet:
        return "in the guest subnet"
    if any(ip in net for net in ifs.hidden_networks):
        return "on a network hidden from guests"
    return None


def _forbidden6(ifs: Interfaces, ip: ipaddress.IPv6Address) -> str | None:
    if (
        ip.is_loopback
        or ip.is_unspecified
        or ip.is_multicast
        or ip.is_link_local
        or ip.is_site_local
        or ip.is_reserved  # ::/8 (IPv4-compatible ::a.b.c.d among them) and other IETF ranges
        or any(ip in net for net in OPAQUE)
    ):
        return "a special-purpose address"
    if any(ip in net for net in ifs.hidden_networks6):
        return "on a network hidden from guests"
    return None


def hidden(ifs: Interfaces, address: str | Address) -> bool:
    return forbidden(ifs, address) is not None


__all__ = ["Address", "carried_ipv4", "forbidden", "hidden"]
