"""The segment stays hidden: a guest reaches DHCP, DNS and the portal, and after login the
service proxies, on the appliance only; nothing behind it, whatever address it uses."""

from __future__ import annotations

import ipaddress
import re
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from _guestside import (
    banner_of,
    banners,
    give_address,
    lab_resolver,
    nmap_open,
    record_lease,
    wait_leased,
    write_config,
)

from appliance.core.config import load
from appliance.lab.topology import NetnsSwitch, Node, Topology, guest_mac
from appliance.net.firewall import Firewall, revoker
from appliance.state import store
from appliance.state.sessions import SessionStore

pytestmark = pytest.mark.netns

GW = "192.168.1.1"
APPLIANCE_PORTS = "22,25,53,67,80,110,443,1110,2525,3128,8000,8081"
SEGMENT_PORTS = "22,25,53,80,110,443,3128"


def _tables(topo: Topology) -> str:
    return topo["gw"].run("nft", "list", "tables").stdout


def _start(topo: Topology, tmp_path: Path) -> tuple[Path, object]:
    gw, seg = topo["gw"], topo["seg"]
    cfg = write_config(tmp_path)
    # stand-ins: the portal on the guest address, the proxies and an admin page
    # anywhere on the appliance, and the segment's real servers
    banners(
        gw,
        f"{GW},80,PORTAL",
        "0.0.0.0,2525,PROXY 2525 for {orig}",
        "0.0.0.0,1110,PROXY 1110 for {orig}",
        "0.0.0.0,8081,PROXY 8081 for {orig}",
        "0.0.0.0,3128,PROXY 3128",
        "0.0.0.0,8000,SECRET 8000",
        "0.0.0.0,22,SECRET 22",
    )
    banners(
        seg,
        *(f"198.51.100.{h},{p},SEGMENT {p}" for h in (3, 4) for p in (22, 25, 80, 110, 3128)),
    )
    lab_resolver(topo)
    # the supervisor: net first (ruleset, lease follower), then dns
    run = gw.start(
        sys.executable, "-m", "appliance", "run", "--config", str(cfg), "net", "dns", name="run"
    )
    gw.wait_port(53, GW, proto="udp")
    assert "table inet appliance" in _tables(topo)
    return cfg, run


def test_guest_reaches_only_the_appliance(
    make_topology: Callable[..., Topology], tmp_path: Path
) -> None:
    topo = make_topology(guests=2)
    cfg, run = _start(topo, tmp_path)
    g1 = give_address(topo, 1, "192.168.1.101")

    # before login: DNS and the portal on the appliance, nothing else
    assert nmap_open(g1, GW, APPLIANCE_PORTS) == {(GW, 53), (GW, 80)}
    assert (GW, 53) in nmap_open(g1, GW, "53", udp=True)
    g1.run("ping", "-c1", "-W2", GW)
    # (the appliance's DNS answers its own names; until login an outside name gets the
    # stand-in, whose port 80 is the portal and whose other ports refuse at once, and
    # any other question about it is refused: no tunnel)
    assert g1.run("dig", "+short", f"@{GW}", "portal.guest.example").stdout.strip() == GW
    assert g1.run("dig", "+short", f"@{GW}", "www.public.example").stdout.strip() == "198.18.0.1"
    assert "status: REFUSED" in g1.run("dig", f"@{GW}", "TXT", "www.public.example").stdout
    assert banner_of(g1, "198.18.0.1", 80) == "PORTAL"
    t0 = time.monotonic()
    with pytest.raises(ConnectionRefusedError):
        g1.connect("198.18.0.1", 443, timeout=5).close()
    assert time.monotonic() - t0 < 1.0  # a reset, not a silent drop a browser waits on
    # the segment: only port 80 answers anywhere, and what answers is the portal
    seg_open = nmap_open(g1, "198.51.100.2-4", SEGMENT_PORTS)
    assert {p for _, p in seg_open} <= {80}
    assert banner_of(g1, "198.51.100.3", 80) == "PORTAL"
    assert banner_of(g1, "198.51.100.3", 25) is None
    assert banner_of(g1, "198.51.100.3", 22) is None
    assert g1.run("ping", "-c1", "-W1", "198.51.100.3", check=False).returncode != 0
    udp = g1.run("dig", "+time=1", "+tries=1", "@198.51.100.2", "www.public.example", check=False)
    assert udp.returncode != 0
    assert "198.51.100" not in g1.run("ip", "route").stdout
    assert "198.51.100" not in g1.run("ip", "neigh").stdout

    # login: the portal writes a session, the net role puts (ip, mac) into nftables and
    # confirms it; authorize returns on the confirmation, within 100 ms
    t0 = time.monotonic()
    st = _log_in(cfg, topo, 1, "192.168.1.101")
    took = time.monotonic() - t0
    with NetnsSwitch(topo["gw"].netns):
        fw = Firewall(load(cfg))
        assert ("192.168.1.101", guest_mac(1)) in fw.members()
    assert took < 0.1, f"login took {took * 1000:.0f} ms"
    opened = nmap_open(g1, GW, APPLIANCE_PORTS)
    assert opened == {(GW, p) for p in (25, 53, 80, 110, 1110, 2525, 3128, 8081)}
    # intercepted: any address on 25/110/80 lands on the local proxies, never the segment
    # and the proxy learns where the guest wanted to go (SO_ORIGINAL_DST)
    assert banner_of(g1, "198.51.100.3", 25) == "PROXY 2525 for 198.51.100.3:25"
    assert banner_of(g1, "198.51.100.3", 110) == "PROXY 1110 for 198.51.100.3:110"
    assert banner_of(g1, "203.0.113.80", 80) == "PROXY 8081 for 203.0.113.80:80"
    assert banner_of(g1, GW, 25) == f"PROXY 2525 for {GW}:25"
    assert banner_of(g1, GW, 80) == "PORTAL"  # the portal itself stays reachable (logout)
    assert banner_of(g1, "198.51.100.3", 22) is None
    assert banner_of(g1, GW, 8000) is None
    seg_open = nmap_open(g1, "198.51.100.2-4", SEGMENT_PORTS)
    assert {p for _, p in seg_open} <= {25, 80, 110}
    assert g1.run("ping", "-c1", "-W1", "198.51.100.3", check=False).returncode != 0

    # a second guest copies guest1's address by hand: it reaches nothing at all
    g2 = give_address(topo, 2, "192.168.1.101", lease=False)
    assert g2.run("ping", "-c1", "-W1", GW, check=False).returncode != 0
    assert (
        g2.run("dig", "+time=1", "+tries=1", f"@{GW}", "www.public.example", check=False).returncode
        != 0
    )
    assert banner_of(g2, GW, 80, timeout=1) is None
    assert banner_of(g2, "198.51.100.3", 25, timeout=1) is None
    counters = topo["gw"].run("nft", "list", "counter", "inet", "appliance", "guest_spoofed")
    assert "packets 0 " not in counters.stdout

    # logout: the session ends, revoke returns once the pair is out of nftables
    sess = st.lookup_ip("192.168.1.101")
    assert sess is not None
    assert st.end(sess.id, "logout")
    with NetnsSwitch(topo["gw"].netns):
        assert fw.members() == set()
    fw.revoke("192.168.1.101", guest_mac(1))  # idempotent
    assert banner_of(g1, "198.51.100.3", 25) is None

    # the lease ends: its pair leaves the leased set within moments, the guest is cut off
    record_lease(tmp_path / "state", "192.168.1.101", guest_mac(1), kind="released")
    t0 = time.monotonic()
    wait_leased(topo, "192.168.1.101", guest_mac(1), present=False)
    assert time.monotonic() - t0 < 2
    assert g1.run("ping", "-c1", "-W1", GW, check=False).returncode != 0

    # stop: the guest side is left closed, not open
    run.stop()  # type: ignore[attr-defined]
    assert "table inet appliance" in _tables(topo)
    assert "guest_closed" in topo["gw"].run("nft", "list", "table", "inet", "appliance").stdout


def _ipv6_repliers(guest: Node) -> set[str]:
    """Link-local addresses that answer an all-nodes ping on the guest link."""
    out = guest.run("ping", "-6", "-c2", "-i0.3", "-W1", "-I", "eth0", "ff02::1", check=False)
    return {m.group(1) for m in re.finditer(r"from (fe80::[0-9a-f:]+)", out.stdout)}


def _link_local(mac: str) -> str:
    b = [int(x, 16) for x in mac.split(":")]
    b[0] ^= 0x02
    eui = bytes([*b[:3], 0xFF, 0xFE, *b[3:]])
    return str(ipaddress.IPv6Address(b"\xfe\x80" + bytes(6) + eui))


def test_net_cli_up_status_down(make_topology: Callable[..., Topology], tmp_path: Path) -> None:
    topo = make_topology(guests=1)
    gw, g1 = topo["gw"], topo["guest1"]
    cfg = str(write_config(tmp_path))
    app = [sys.executable, "-m", "appliance"]
    gw_ll = _link_local(gw.mac("guest0"))
    deadline = time.monotonic() + 5  # the guest's link-local may still be tentative (DAD)
    while gw_ll not in _ipv6_repliers(g1) and time.monotonic() < deadline:
        time.sleep(0.3)
    assert gw_ll in _ipv6_repliers(g1)  # without our rules the appliance answers over IPv6
    assert gw.run(*app, "net", "status", "--config", cfg, check=False).returncode == 3
    gw.run(*app, "net", "up", "--config", cfg)
    assert gw_ll not in _ipv6_repliers(g1)  # with them: nothing, link-local included
    gw.run(*app, "net", "up", "--config", cfg)  # idempotent
    st = gw.run(*app, "net", "status", "--config", cfg).stdout
    assert "table inet appliance: loaded" in st and "forwarding on guest0: 0" in st
    assert gw.run("sysctl", "-n", "net.ipv6.conf.guest0.disable_ipv6").stdout.strip() == "1"
    assert gw.run("ip", "-6", "addr", "show", "dev", "guest0").stdout.strip() == ""
    gw.run(*app, "net", "down", "--config", cfg)
    gw.run(*app, "net", "down", "--config", cfg)
    assert "appliance" not in gw.run("nft", "list", "tables").stdout


# -- the guest side across restarts and stops of the net role (issue #14, finding 7) --------


def _wait_for(check: Callable[[], bool], timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(0.1)
    return check()


def _net_role(topo: Topology, cfg: Path) -> object:
    """The net role alone, as appliance-net.service runs it; returns once its table is in."""
    proc = topo["gw"].start(
        sys.executable, "-m", "appliance", "run", "--config", str(cfg), "net", name="net"
    )
    assert _wait_for(lambda: "table inet appliance" in _tables(topo)), proc.output()
    return proc


def _log_in(cfg: Path, topo: Topology, n: int, ip: str) -> SessionStore:
    """What the portal does on a good login: a session in the store, then authorize."""
    config = load(cfg)
    st = SessionStore.from_config(
        config, store.connect(config.state.database), revoke=revoker(config)
    )
    st.create(user=f"user{n}", source="site", attributes={}, ip=ip, mac=guest_mac(n))
    with NetnsSwitch(topo["gw"].netns):
        Firewall(config).authorize(ip, guest_mac(n))
    return st


def test_a_restarted_net_role_keeps_logged_in_guests_logged_in(
    make_topology: Callable[..., Topology], tmp_path: Path
) -> None:
    topo = make_topology(guests=2)
    cfg = write_config(tmp_path)
    banners(topo["gw"], "0.0.0.0,2525,PROXY 2525 for {orig}")
    net = _net_role(topo, cfg)
    g1 = give_address(topo, 1, "192.168.1.101")
    g2 = give_address(topo, 2, "192.168.1.102")
    _log_in(cfg, topo, 1, "192.168.1.101")
    assert banner_of(g1, "198.51.100.3", 25) == "PROXY 2525 for 198.51.100.3:25"
    assert banner_of(g2, "198.51.100.3", 25) is None

    net.stop()  # type: ignore[attr-defined]
    net = _net_role(topo, cfg)
    # the session is still active in the store: its guest still reaches its service ...
    assert _wait_for(lambda: banner_of(g1, "198.51.100.3", 25) is not None, 5), net.output()  # type: ignore[attr-defined]
    assert banner_of(g1, "198.51.100.3", 25) == "PROXY 2525 for 198.51.100.3:25"
    # ... and a guest that never logged in still does not
    assert banner_of(g2, "198.51.100.3", 25) is None
    net.stop()  # type: ignore[attr-defined]


def test_when_the_net_role_stops_the_guest_side_stays_closed(
    make_topology: Callable[..., Topology], tmp_path: Path
) -> None:
    topo = make_topology(guests=1)
    gw = topo["gw"]
    cfg = write_config(tmp_path)
    banners(gw, f"{GW},80,PORTAL", "0.0.0.0,8000,SECRET 8000", "0.0.0.0,2525,PROXY 2525")
    lab_resolver(topo)
    app = [sys.executable, "-m", "appliance"]
    net = _net_role(topo, cfg)
    dns = gw.start(*app, "run", "--config", str(cfg), "dns", name="dns")
    gw.wait_port(53, GW, proto="udp")
    g1 = give_address(topo, 1, "192.168.1.101")
    _log_in(cfg, topo, 1, "192.168.1.101")

    def dig_ok() -> bool:
        r = g1.run("dig", "+time=1", "+tries=1", f"@{GW}", "www.public.example", check=False)
        return r.returncode == 0

    assert dig_ok() and banner_of(g1, GW, 80) == "PORTAL"
    assert banner_of(g1, GW, 8000) is None

    def closed() -> bool:
        return (
            not dig_ok()
            and banner_of(g1, GW, 80, timeout=1) is None
            and banner_of(g1, GW, 8000, timeout=1) is None
            and banner_of(g1, GW, 2525, timeout=1) is None
            and g1.run("ping", "-c1", "-W1", GW, check=False).returncode != 0
        )

    # the net role stops (or dies) while the DNS role keeps running: nothing gets through
    net.stop()  # type: ignore[attr-defined]
    assert dns.alive()
    assert "table inet appliance" in _tables(topo)
    assert closed()
    st = gw.run(*app, "net", "status", "--config", str(cfg), check=False)
    assert st.returncode == 4 and "closed" in st.stdout, st.stdout

    # killed outright (no clean-up in the process): what ExecStopPost= runs closes it
    net = _net_role(topo, cfg)
    assert _wait_for(dig_ok, 5)
    gw.run("kill", "-9", str(net.popen.pid))  # type: ignore[attr-defined]
    gw.run(*app, "net", "close", "--config", str(cfg))
    assert dns.alive() and closed()
    # an explicit `net down` is what opens the guest side again (the admin's choice)
    gw.run(*app, "net", "down", "--config", str(cfg))
    assert "appliance" not in _tables(topo)


ARP_PROBE = r"""
import sys
from scapy.all import ARP, Ether, conf, srp
conf.verb = 0
for target in sys.argv[1:]:
    ans, _ = srp(Ether(dst="ff:ff:ff:ff:ff:ff") / ARP(pdst=target, psrc="192.168.1.101"),
                 iface="eth0", timeout=1, retry=1)
    print(target, len(ans))
"""


def test_the_guest_side_answers_arp_only_for_the_guest_address(
    make_topology: Callable[..., Topology], tmp_path: Path
) -> None:
    topo = make_topology(guests=1)
    cfg = write_config(tmp_path)
    net = _net_role(topo, cfg)
    g1 = give_address(topo, 1, "192.168.1.101")
    out = g1.run(sys.executable, "-c", ARP_PROBE, GW, "198.51.100.1").stdout.split()
    answers = dict(zip(out[::2], map(int, out[1::2]), strict=True))
    assert answers[GW] > 0  # the probe works: the guest address answers
    assert answers["198.51.100.1"] == 0  # the segment address does not, on the guest side
    net.stop()  # type: ignore[attr-defined]


def test_a_session_written_straight_into_the_store_opens_nothing(
    make_topology: Callable[..., Topology], tmp_path: Path
) -> None:
    """Every role can write the shared store; only the portal's grant opens the firewall.

    A role other than the portal (DNS, DHCP, proxy: they share the user appliance)
    that writes a session row for a guest must not get that guest let in."""
    topo = make_topology(guests=2)
    cfg = write_config(tmp_path)
    banners(topo["gw"], "0.0.0.0,2525,PROXY 2525 for {orig}")
    net = _net_role(topo, cfg)
    g1 = give_address(topo, 1, "192.168.1.101")
    g2 = give_address(topo, 2, "192.168.1.102")
    config = load(cfg)
    st = SessionStore.from_config(
        config, store.connect(config.state.database), revoke=revoker(config)
    )
    st.create(user="forged", source="site", attributes={}, ip="192.168.1.102", mac=guest_mac(2))
    _log_in(cfg, topo, 1, "192.168.1.101")  # a real login, for comparison
    time.sleep(0.5)  # many net-role polls
    assert banner_of(g1, "198.51.100.3", 25) == "PROXY 2525 for 198.51.100.3:25"
    assert banner_of(g2, "198.51.100.3", 25) is None
    with NetnsSwitch(topo["gw"].netns):
        assert ("192.168.1.102", guest_mac(2)) not in Firewall(config).members()
    net.stop()  # type: ignore[attr-defined]
