"""Which address a link comes from: its TCP peer, or what a trusted front says.

A relay behind a reverse proxy or CDN front (where the long-poll transport is for)
sees every link arrive from the front's own address, so the per-source limit would
count all households as one and the agents would be told the front's address.
The fronts the operator lists (`[limits] trusted_fronts`) are believed about the
address they took a request from: the X-Forwarded-For entries are read from the
right, past further trusted fronts, to the first address no listed front has.  A
request from anywhere else is its TCP peer, whatever it writes in the header; a
trusted front's entry that is not an address ends the walk at that front (fail
closed: counted as the front, never as an address someone made up).
"""

from __future__ import annotations

import ipaddress
import itertools
from collections.abc import Iterator, Sequence

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
HEADER = "X-Forwarded-For"
MAX_HOPS = 16  # entries read, from the right; past them the last trusted front counts


def _trusted(address: str, fronts: Sequence[Network]) -> bool:
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    return any(ip in net for net in fronts)


def _hops_from_the_right(forwarded: Sequence[str]) -> Iterator[str]:
    for value in reversed(forwarded):
        if not value.strip():
            yield ""  # (an empty header is no address either)
            continue
        end = len(value)
        while end > 0:
            start = value.rfind(",", 0, end) + 1
            yield value[start:end].strip()
            end = start - 1


def link_source(peer: str, forwarded: Sequence[str], fronts: Sequence[Network]) -> str:
    """The address the limit counts and the agent is told for a link from `peer` whose
    request carried `forwarded` (each X-Forwarded-For header's value, in order).  At
    most MAX_HOPS entries are read (from the right): fronts are a few, not many."""
    source = peer
    if not fronts or not _trusted(peer, fronts):
        return source
    for hop in itertools.islice(_hops_from_the_right(forwarded), MAX_HOPS):
        try:
            source = str(ipaddress.ip_address(hop))
        except ValueError:
            return source  # the last front whose word counts
        if not _trusted(source, fronts):
            return source
    return source
