"""Which MAC is behind a guest address: the one reading of the kernel's neighbour table.

The portal binds each page to a MAC and the relay checks every new connection's
source against its session's MAC; both ask here, with the guest interface, and a
missing or incomplete entry is no MAC (fail closed: no entry, no admission).
"""

from __future__ import annotations


def neighbour_mac(ifname: str, ip: str) -> str | None:
    """The MAC the kernel's neighbour (ARP) table has for `ip` on `ifname`, or None.

    Read from /proc/net/arp, the same kernel table pyroute2 dumps over netlink:
    measured here at ~0.05 ms a lookup against ~2.6 ms for a pyroute2 IPRoute
    call, and the portal does one on every request (it binds each page to a MAC).
    Only complete entries (ATF_COM) on `ifname` count.  The file shows the namespace of the
    reading process, which is the appliance's.
    """
    try:
        with open("/proc/net/arp", encoding="ascii") as f:
            next(f, None)
            for line in f:
                fields = line.split()
                if (
                    len(fields) >= 6
                    and fields[0] == ip
                    and fields[5] == ifname
                    and int(fields[2], 16) & 0x2
                    and fields[3] != "00:00:00:00:00:00"
                ):
                    return fields[3].lower()
    except OSError:
        return None
    return None
