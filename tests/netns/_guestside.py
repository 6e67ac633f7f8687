"""Helpers for the guest-side tests: a config, the lab resolver, stand-in listeners, leases.

The DHCP server, portal and proxies are built in parallel, so these tests stand in
for them: a guest gets its address by hand plus a lease row (what DHCP would write),
and small banner servers say who answered a connection (PORTAL, PROXY <port>,
SEGMENT <port>, SECRET <port>), so a test can tell interception from leakage.
"""

from __future__ import annotations

import socket
import sys
import time
from pathlib import Path

import pyroute2.config

from appliance.lab import servers
from appliance.lab.topology import Node, Process, Topology, guest_mac
from appliance.state import leases, schema, store

ROOT = Path(__file__).resolve().parents[2]
INTERCEPTS = {25: 2525, 110: 1110, 80: 8081}
SEGMENT_NAMES = {"intranet.site.example": "198.51.100.3", "files.site.example": "198.51.100.4"}
PUBLIC_NAMES = {"www.public.example": "203.0.113.80"}
BIG_NAME = "big.public.example"
BIG_COUNT = 40

# pyroute2 forks a helper per namespace socket and SIGTERMs it when it is slow (a busy
# machine); with the suite's SIGTERM handler inherited, such a helper would go on
# running pytest.  Default SIGTERM in the helpers makes them just die.
pyroute2.config.disable_mp_signal = True

BANNER = r"""
import socket, struct, sys, threading
def original_dst(c):
    # what a transparent proxy does: SO_ORIGINAL_DST (80) gives the pre-DNAT address
    raw = c.getsockopt(socket.SOL_IP, 80, 16)
    port, ip = struct.unpack_from("!H4s", raw, 2)
    return f"{socket.inet_ntoa(ip)}:{port}"
def serve(host, port, text):
    s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind((host, port)); s.listen(64)
    while True:
        c, _ = s.accept()
        try: c.sendall(text.replace("{orig}", original_dst(c)).encode() + b"\n")
        except OSError: pass
        finally: c.close()
for spec in sys.argv[1:]:
    host, port, text = spec.split(",", 2)
    threading.Thread(target=serve, args=(host, int(port), text), daemon=True).start()
print("ready", flush=True)
threading.Event().wait()
"""


def write_config(tmp: Path, dns_port: int = 53, cache_size: int = 10000) -> Path:
    path = tmp / "appliance.toml"
    path.write_text(
        f"""
[interfaces]
guest = "guest0"
guest_address = "192.168.1.1/24"
uplink = "seg0"
uplink_address = "198.51.100.1/24"
management_address = "198.51.100.1"
hidden_networks = ["198.51.100.0/24"]

[dhcp]
domain = "guest.example"

[dns]
port = {dns_port}
upstream = ["198.51.100.2"]
cache_size = {cache_size}

[portal]
http_port = 80
hostname = "portal.guest.example"

[proxy]
explicit_http_port = 3128

[policies]
servers = "{ROOT / "policies" / "servers.toml"}"
access = "{ROOT / "policies" / "access.toml"}"

[state]
directory = "{tmp / "state"}"
"""
    )
    return path


def banners(node: Node, *specs: str) -> Process:
    """Start banner servers: specs are "host,port,text"."""
    script = node.topology.workdir / "banner.py"
    script.write_text(BANNER)
    proc = node.start(sys.executable, str(script), *specs, name="banner")
    deadline = time.monotonic() + 10
    while "ready" not in proc.output() and time.monotonic() < deadline:
        time.sleep(0.05)
    return proc


def lab_resolver(topo: Topology, extra: list[str] | None = None, port: int = 53) -> Process:
    """dnsmasq in the segment at 198.51.100.2: the site's resolver, knowing a few names."""
    records = [*SEGMENT_NAMES.items(), *PUBLIC_NAMES.items()]
    records += [(BIG_NAME, f"203.0.113.{100 + i}") for i in range(BIG_COUNT)]
    return servers.start_resolver(topo["seg"], records, topo.workdir, port=port, extra=extra)


def give_address(topo: Topology, n: int, ip: str, lease: bool = True) -> Node:
    """What DHCP would do: address and default route on the guest, a lease row in the store."""
    guest = topo[f"guest{n}"]
    guest.run("ip", "addr", "add", f"{ip}/24", "dev", "eth0")
    guest.run("ip", "route", "add", "default", "via", "192.168.1.1")
    if lease:
        record_lease(topo.workdir.parent / "state", ip, guest_mac(n))
        wait_leased(topo, ip, guest_mac(n))
    return guest


def wait_leased(topo: Topology, ip: str, mac: str, present: bool = True) -> None:
    """Until the lease follower has put the pair into (or taken it out of) `leased`."""
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        out = topo["gw"].run("nft", "list", "set", "inet", "appliance", "leased", check=False)
        if (f"{ip} . {mac}" in out.stdout) == present:
            return
        time.sleep(0.05)
    raise AssertionError(f"{ip} . {mac} {'not ' if present else ''}in the leased set after 10 s")


def record_lease(state_dir: Path, ip: str, mac: str, kind: str = "granted") -> None:
    conn = store.connect(state_dir / "state.sqlite")
    schema.upgrade(conn)
    now = time.time()
    leases.record(conn, kind, leases.Lease(ip, mac, now + 3600), now)
    conn.close()


def banner_of(node: Node, host: str, port: int, timeout: float = 1.5) -> str | None:
    """The first line a TCP server sends, or None when nothing answers."""
    try:
        with node.connect(host, port, timeout=timeout) as sock:
            sock.settimeout(timeout)
            return sock.recv(100).decode(errors="replace").strip()
    except OSError:
        return None


def nmap_open(node: Node, targets: str, ports: str, udp: bool = False) -> set[tuple[str, int]]:
    """(host, port) pairs nmap reports open from this node."""
    # -T4 and two retries: a busy machine must not turn an open port into "filtered"
    argv = ["nmap", "-n", "-Pn", "-T4", "--max-retries", "2", "--host-timeout", "60s"]
    argv += ["-sU" if udp else "-sS", "-p", ports, "-oG", "-", *targets.split()]
    out = node.run(*argv, timeout=90).stdout
    found = set()
    for line in out.splitlines():
        if not line.startswith("Host:") or "Ports:" not in line:
            continue
        host = line.split()[1]
        for item in line.split("Ports:")[1].split(","):
            fields = item.strip().split("/")
            if len(fields) > 1 and fields[1] == "open":
                found.add((host, int(fields[0])))
    return found


def udp_ask(node: Node, data: bytes, host: str = "192.168.1.1", port: int = 53) -> bytes | None:
    from appliance.lab.topology import NetnsSwitch

    with NetnsSwitch(node.netns):
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        sock.settimeout(2)
        sock.sendto(data, (host, port))
        return sock.recv(4096)
    except OSError:
        return None
    finally:
        sock.close()
