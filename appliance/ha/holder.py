"""Whether this box is the active one of a pair: it holds the guest address.

keepalived (VRRP) puts the guest address on the active box's guest interface and
takes it away when the box goes standby, so the address itself is the one truth
every role can read, with nothing else to agree on.  The DHCP role asks before it
answers anyone: two servers that answer from one pool would hand out one address
twice.  The portal, the DNS role and the proxy need not ask: with no guest address
on their link, no guest's packet reaches them (the kernel answers ARP only for
addresses it has, arp_ignore=1).
"""

from __future__ import annotations

import ipaddress
import time
from collections.abc import Callable

from pyroute2 import IPRoute

CHECK_EVERY = 0.2  # seconds: a takeover is noticed this long after keepalived acts


def holds(ifname: str, address: ipaddress.IPv4Address) -> bool:
    """True when `address` is on the interface now (netlink: one dump of its addresses)."""
    with IPRoute() as ipr:
        found = ipr.link_lookup(ifname=ifname)
        if not found:
            return False
        return any(
            a.get_attr("IFA_ADDRESS") == str(address)
            for a in ipr.get_addr(index=found[0], family=2)
        )


class Holder:
    """The answer to "am I active?", asked at most every CHECK_EVERY seconds.

    `changed()` reports each flip once, so that the caller can act on it (the DHCP
    role reloads its lease index from the shared store before it answers again)."""

    def __init__(
        self,
        check: Callable[[], bool],
        every: float = CHECK_EVERY,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._check, self._every, self._clock = check, every, clock
        self.active = check()
        self._next = clock() + every
        self._flipped = False

    @classmethod
    def of(cls, ifname: str, address: ipaddress.IPv4Address) -> Holder:
        return cls(lambda: holds(ifname, address))

    def refresh(self, asked: bool = False) -> bool:
        """Ask again if it is time; returns whether this box is active.  `asked`: guests
        wait for an answer, so a standby looks again now (a DISCOVER in the moment after a
        takeover must not wait for the client's next try, seconds away).  That costs one
        netlink dump per batch of requests a standby reads: few while few ask, and a
        flood comes in big batches."""
        now = self._clock()
        if now >= self._next or (asked and not self.active):
            self._next = now + self._every
            was, self.active = self.active, self._check()
            self._flipped = self._flipped or was != self.active
        return self.active

    def changed(self) -> bool:
        """Whether the answer flipped since the last call (once per flip)."""
        flipped, self._flipped = self._flipped, False
        return flipped


class AlwaysActive:
    """The Holder of a single box: the guest address is its own, always."""

    active = True

    def refresh(self, asked: bool = False) -> bool:
        return True

    def changed(self) -> bool:
        return False
