"""The guest interface (pyroute2): up, with the guest address, never forwarding.

Everything here acts on the network namespace the appliance runs in, and is
idempotent: running it again on a configured box changes nothing.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from pyroute2 import IPRoute

from appliance.core.config import Config

log = logging.getLogger("appliance.net")


class InterfaceError(RuntimeError):
    pass


def _sysctl(path: str, value: str) -> None:
    p = Path("/proc/sys") / path
    if p.read_text().strip() != value:
        p.write_text(value + "\n")


def guest_up(config: Config) -> None:
    """Bring the guest interface up with the guest address (in a pair: keepalived's
    to add); forwarding and IPv6 off on it."""
    ifc = config.interfaces
    with IPRoute() as ipr:
        found = ipr.link_lookup(ifname=ifc.guest)
        if not found:
            raise InterfaceError(f"guest interface {ifc.guest} does not exist")
        idx = found[0]
        have = {
            (a.get_attr("IFA_ADDRESS"), a["prefixlen"]) for a in ipr.get_addr(index=idx, family=2)
        }
        want = (str(ifc.guest_ip), ifc.guest_address.network.prefixlen)
        # in a pair keepalived alone puts the guest address on (the active box's) link
        if want not in have and not config.ha.enabled:
            ipr.addr("add", index=idx, address=want[0], prefixlen=want[1])
            log.info("added %s/%d to %s", *want, ifc.guest)
        ipr.link("set", index=idx, state="up")
    if config.ha.enabled:
        # the roles listen on the guest address on the standby too, before it holds it,
        # so that a takeover needs no restart of anything
        _sysctl("net/ipv4/ip_nonlocal_bind", "1")
    # no forwarding from the guest side, and no IPv6 there at all (no RA, no link-local)
    _sysctl(f"net/ipv4/conf/{ifc.guest}/forwarding", "0")
    _sysctl(f"net/ipv6/conf/{ifc.guest}/forwarding", "0")
    _sysctl(f"net/ipv6/conf/{ifc.guest}/accept_ra", "0")
    _sysctl(f"net/ipv6/conf/{ifc.guest}/disable_ipv6", "1")
    # ARP on each side for that side's own address only: by default Linux answers for
    # any local address on any interface, which tells a guest the segment address
    # (and the segment the guest address).  arp_announce=2: the source of our own
    # requests is an address of the interface they leave by.
    for name in (ifc.guest, ifc.uplink):
        if Path(f"/proc/sys/net/ipv4/conf/{name}").is_dir():
            _sysctl(f"net/ipv4/conf/{name}/arp_ignore", "1")
            _sysctl(f"net/ipv4/conf/{name}/arp_announce", "2")


@dataclass(frozen=True)
class LinkState:
    name: str
    exists: bool
    up: bool
    addresses: tuple[str, ...]


def link_state(name: str) -> LinkState:
    with IPRoute() as ipr:
        found = ipr.link_lookup(ifname=name)
        if not found:
            return LinkState(name, False, False, ())
        link = ipr.get_links(found[0])[0]
        addrs = tuple(
            f"{a.get_attr('IFA_ADDRESS')}/{a['prefixlen']}"
            for a in ipr.get_addr(index=found[0], family=2)
        )
        return LinkState(name, True, link.get_attr("IFLA_OPERSTATE") == "UP", addrs)


def check_uplink(config: Config) -> LinkState:
    """The uplink must exist and be up (the resolver and the servers are behind it)."""
    st = link_state(config.interfaces.uplink)
    if not st.exists:
        raise InterfaceError(f"uplink {st.name} does not exist")
    if not st.up:
        log.warning("uplink %s is not up", st.name)
    want = config.interfaces.uplink_address
    if want is not None and str(want) not in st.addresses:
        log.warning("uplink %s lacks its configured address %s", st.name, want)
    return st


def forwarding(name: str) -> str:
    return Path(f"/proc/sys/net/ipv4/conf/{name}/forwarding").read_text().strip()
