"""A whole site in network namespaces: the test harness and the lab share this code.

The topology is the address plan of docs/design.md ("Address plan"):

    guest1..N --+
                +-- sw (bridge br0) -- guest0 [gw] seg0 -- eth0 [seg]  198.51.100.0/24
                                              [gw] home0 -- eth0 [home] 203.0.113.0/24

`gw` is the appliance, `seg` the hidden segment's servers, `home` a visitor's home
network (and the stand-in for the internet), `sw` the guest-side switch.

With `nat_household=True` the internet becomes a switch of its own, so that more
hosts share 203.0.113.0/24 with `gw` and `home` (whose interfaces and addresses
stay as above), and a household sits behind a NAT router:

    [gw] home0 --+
    [home] eth0 -+-- inet (bridge inet0)                     203.0.113.0/24
    [relay] eth0 +     relay 203.0.113.10
                 +-- wan0 [natrouter] lan0 -- eth0 [bobhome]  192.0.2.0/24
                      203.0.113.20 (masquerade)   agent 192.0.2.1, POP/IMAP 192.0.2.3

With `ha=True` (which brings the internet switch too) a second appliance `gw2` stands
beside `gw`, an active/standby pair: both on the guest switch, the segment a bridge
(br0 in `seg`) holding both, and gw2 on the internet switch as 203.0.113.253.  The
guest address 192.168.1.1 is on neither until keepalived puts it on one.

With `federation=True` (which brings the household too) a second relay `relay2`
(203.0.113.11) shares the name relay.example with `relay`, and `relaydb`
(203.0.113.12) holds their shared PostgreSQL store.

The household is reachable only through connections it opens itself: the router
masquerades on wan0 and forwards nothing new inbound.  Every
veth is created directly inside its namespaces, so nothing is ever configured
in the machine's own namespace.  Namespace names carry the creating process's
pid, so two runs never collide and a later run can sweep what a killed run left.
"""

from __future__ import annotations

import contextlib
import ctypes
import ipaddress
import logging
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from pyroute2 import NetNS, netns

log = logging.getLogger("appliance.lab")

NETNS_ETC = Path("/etc/netns")
LAB_PREFIX = "gglab"
_RUN_PREFIX = re.compile(r"^gg(\d+)x[0-9a-f]{4}-")

GUEST_SUBNET = ipaddress.IPv4Network("192.168.1.0/24")
GW_GUEST = "192.168.1.1/24"
GW_SEGMENT = "198.51.100.1/24"
GW_HOME = "203.0.113.254/24"
# the second appliance of an active/standby pair (ha=True): its own segment and
# internet addresses; the guest address is the pair's, held by the active one
GW2_SEGMENT = "198.51.100.11/24"
GW2_HOME = "203.0.113.253/24"
# the resolver, the SMTP relay and intranet, the web proxy, Prometheus, PostgreSQL
# (servers.py)
SEGMENT_HOSTS = (
    "198.51.100.2/24",
    "198.51.100.3/24",
    "198.51.100.4/24",
    "198.51.100.5/24",
    "198.51.100.6/24",
)
HOME_HOSTS = ("203.0.113.1/24", "203.0.113.3/24", "203.0.113.80/24")
# The internet beside `home` (only with nat_household): a relay, and a household's
# router whose public side is one address, with the household's LAN behind it.
RELAY_HOST = "203.0.113.10/24"
# a federation (federation=True): a second relay under the same name, and the relays'
# shared store
RELAY2_HOST = "203.0.113.11/24"
RELAY_DB_HOST = "203.0.113.12/24"
NAT_ROUTER_WAN = "203.0.113.20/24"
NAT_ROUTER_LAN = "192.0.2.254/24"
HOUSEHOLD_HOSTS = ("192.0.2.1/24", "192.0.2.3/24")  # its agent, its POP/IMAP server
INTERNET_GATEWAY = "203.0.113.254"  # the appliance's home0: the route back to the segment

# The household router's own rules: masquerade out of wan0, only replies back in.
NAT_ROUTER_RULES = """\
table ip household {
    chain forward {
        type filter hook forward priority filter; policy drop;
        ct state established,related accept
        iifname "lan0" oifname "wan0" accept
    }
    chain input {
        type filter hook input priority filter; policy accept;
        iifname "wan0" ct state established,related accept
        iifname "wan0" icmp type echo-request accept
        iifname "wan0" drop
    }
    chain postrouting {
        type nat hook postrouting priority srcnat;
        oifname "wan0" masquerade
    }
}
"""
# A cut uplink: every IP packet through wan0 vanishes, both ways, before conntrack sees
# it; ARP, addresses, routes and the NAT mappings themselves stay as they were.
UPLINK_CUT_TABLE = "household_uplink_cut"
UPLINK_CUT_RULES = f"""\
table ip {UPLINK_CUT_TABLE} {{}}
flush table ip {UPLINK_CUT_TABLE}
table ip {UPLINK_CUT_TABLE} {{
    chain prerouting {{
        type filter hook prerouting priority raw; policy accept;
        iifname "wan0" drop
    }}
    chain postrouting {{
        type filter hook postrouting priority raw; policy accept;
        oifname "wan0" drop
    }}
}}
"""
UPLINK_RESTORE_RULES = f"""\
table ip {UPLINK_CUT_TABLE} {{}}
delete table ip {UPLINK_CUT_TABLE}
"""


class LabError(RuntimeError):
    pass


def guest_mac(index: int) -> str:
    """Guests get stable, locally administered MACs so tests can name them."""
    return f"02:47:00:00:{index >> 8:02x}:{index & 0xFF:02x}"


@dataclass
class Process:
    """A background process in a namespace, with its output in a log file."""

    name: str
    node: str
    argv: list[str]
    popen: subprocess.Popen[bytes]
    log_path: Path

    def output(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def alive(self) -> bool:
        return self.popen.poll() is None

    def stop(self, timeout: float = 5.0) -> int | None:
        """SIGTERM the process group, then SIGKILL what is left."""
        if self.popen.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.popen.pid, signal.SIGTERM)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.popen.pid, signal.SIGKILL)
                self.popen.wait(timeout)
        return self.popen.returncode


@dataclass
class Node:
    """One namespace of the topology, known by its short name (gw, seg, guest1...)."""

    name: str
    netns: str
    topology: Topology

    def argv(self, cmd: Sequence[str]) -> list[str]:
        return ["ip", "netns", "exec", self.netns, *cmd]

    def run(
        self, *cmd: str, check: bool = True, timeout: float = 60, input: str | None = None
    ) -> subprocess.CompletedProcess[str]:
        """Run a command in this namespace and wait for it; output is captured as text."""
        proc = subprocess.run(
            self.argv(cmd),
            capture_output=True,
            text=True,
            timeout=timeout,
            input=input,
            check=False,
        )
        if check and proc.returncode != 0:
            raise LabError(
                f"[{self.name}] {' '.join(cmd)} exited {proc.returncode}:\n"
                f"{proc.stdout}{proc.stderr}"
            )
        return proc

    def start(
        self, *cmd: str, name: str | None = None, env: dict[str, str] | None = None
    ) -> Process:
        """Start a background process in this namespace; the topology stops it on teardown."""
        return self.topology.start(self, list(cmd), name=name, env=env)

    def wait_port(
        self, port: int, host: str = "127.0.0.1", timeout: float = 20.0, proto: str = "tcp"
    ) -> None:
        """Wait until something listens on host:port inside this namespace."""
        flag = "-tln" if proto == "tcp" else "-uln"
        deadline = time.monotonic() + timeout
        want = re.compile(rf"(^|\s)({re.escape(host)}|0\.0\.0\.0|\*|\[::\])(%\S+)?:{port}\s")
        while time.monotonic() < deadline:
            out = self.run("ss", "-H", flag, check=False).stdout
            if any(want.search(line) for line in out.splitlines()):
                return
            time.sleep(0.05)
        raise LabError(
            f"[{self.name}] nothing listens on {host}:{port}/{proto} after {timeout:.0f}s"
        )

    def connect(self, host: str, port: int, timeout: float = 5.0) -> socket.socket:
        """A TCP socket connected from inside this namespace (for tests that speak bytes)."""
        with NetnsSwitch(self.netns):
            sock = socket.create_connection((host, port), timeout=timeout)
        return sock

    def mac(self, ifname: str = "eth0") -> str:
        with NetNS(self.netns) as ns:
            idx = ns.link_lookup(ifname=ifname)[0]
            return str(ns.get_links(idx)[0].get("address"))


_CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)


def _setns(fd: int) -> None:
    if _libc.setns(fd, _CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


class NetnsSwitch:
    """Temporarily move this thread into a namespace (sockets made inside stay there)."""

    def __init__(self, name: str):
        self.name = name
        self._own: int | None = None

    def __enter__(self) -> NetnsSwitch:
        self._own = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
        fd = os.open(f"/var/run/netns/{self.name}", os.O_RDONLY)
        try:
            _setns(fd)
        finally:
            os.close(fd)
        return self

    def __exit__(self, *exc: object) -> None:
        assert self._own is not None
        _setns(self._own)
        os.close(self._own)


@dataclass
class Topology:
    """The namespaces of one run, their processes, and how to remove them all."""

    prefix: str
    workdir: Path
    nodes: dict[str, Node] = field(default_factory=dict)
    processes: list[Process] = field(default_factory=list)
    guests: int = 0

    # -- building -----------------------------------------------------------
    @classmethod
    def build(
        cls,
        guests: int = 2,
        prefix: str | None = None,
        workdir: Path | None = None,
        route_uplinks: bool = True,
        nat_household: bool = False,
        ha: bool = False,
        federation: bool = False,
    ) -> Topology:
        """Create the whole site; on any failure what was made is removed again.

        `nat_household` adds the internet switch, the relay and the household behind
        NAT (see the module docstring); without it the site is exactly as before.
        `ha` adds the second appliance gw2 (and so the internet switch as well).
        `federation` adds the second relay and the relays' store (and the household).
        """
        prefix = prefix or run_prefix()
        workdir = workdir or Path(f"/tmp/{prefix}")
        workdir.mkdir(parents=True, exist_ok=True)
        topo = cls(prefix, workdir)
        try:
            topo._build(guests, route_uplinks, nat_household or ha or federation, ha, federation)
        except BaseException:
            topo.destroy()
            raise
        return topo

    @classmethod
    def attach(cls, prefix: str, workdir: Path) -> Topology:
        """The nodes of a topology built by another process (the lab), found by prefix."""
        topo = cls(prefix, workdir)
        for full in our_namespaces(prefix):
            name = full.removeprefix(prefix + "-")
            topo.nodes[name] = Node(name, full, topo)
        topo.guests = sum(1 for n in topo.nodes if n.startswith("guest"))
        return topo

    def _add_node(self, name: str) -> Node:
        full = f"{self.prefix}-{name}"
        netns.create(full)
        node = Node(name, full, self)
        self.nodes[name] = node
        # `ip netns exec` bind-mounts /etc/netns/NAME/* over /etc: a DHCP client's
        # resolv.conf then lands here, never in the machine's own /etc/resolv.conf.
        etc = NETNS_ETC / full
        etc.mkdir(parents=True, exist_ok=True)
        (etc / "resolv.conf").write_text("# lab node resolver, written by DHCP clients\n")
        with NetNS(full) as ns:
            ns.link("set", index=ns.link_lookup(ifname="lo")[0], state="up")
        return node

    def _veth(self, a: str, a_if: str, b: str, b_if: str, mac: str | None = None) -> None:
        with NetNS(self.nodes[a].netns) as ns:
            spec: dict[str, object] = {
                "ifname": a_if,
                "kind": "veth",
                "peer": {"ifname": b_if, "net_ns_fd": self.nodes[b].netns},
            }
            if mac:
                spec["address"] = mac
            ns.link("add", **spec)

    def _up(self, node: str, ifname: str, *addrs: str, master: str | None = None) -> None:
        with NetNS(self.nodes[node].netns) as ns:
            idx = ns.link_lookup(ifname=ifname)[0]
            for a in addrs:
                iface = ipaddress.IPv4Interface(a)
                ns.addr("add", index=idx, address=str(iface.ip), prefixlen=iface.network.prefixlen)
            if master:
                ns.link("set", index=idx, master=ns.link_lookup(ifname=master)[0])
            ns.link("set", index=idx, state="up")

    def _route(self, node: str, gateway: str) -> None:
        with NetNS(self.nodes[node].netns) as ns:
            ns.route("add", dst="0.0.0.0/0", gateway=gateway)

    def _bridge(self, node: str, ifname: str) -> None:
        with NetNS(self.nodes[node].netns) as ns:
            ns.link("add", ifname=ifname, kind="bridge")
            ns.link("set", index=ns.link_lookup(ifname=ifname)[0], state="up")

    def _build(
        self,
        guests: int,
        route_uplinks: bool,
        nat_household: bool = False,
        ha: bool = False,
        federation: bool = False,
    ) -> None:
        for name in ("gw", "sw", "seg", "home", *(("gw2",) if ha else ())):
            self._add_node(name)
        if nat_household:
            self._build_internet()
        if federation:
            self._build_federation()
        with NetNS(self.nodes["sw"].netns) as ns:
            ns.link("add", ifname="br0", kind="bridge")
            ns.link("set", index=ns.link_lookup(ifname="br0")[0], state="up")
        self._veth("gw", "guest0", "sw", "p-gw")
        self._up("sw", "p-gw", master="br0")
        if ha:  # the pair's guest address is keepalived's to place
            self._up("gw", "guest0")
            self._build_second_appliance()
            self._veth("gw", "seg0", "seg", "p-gw")
            self._up("seg", "p-gw", master="br0")
        else:
            self._up("gw", "guest0", GW_GUEST)
            self._veth("gw", "seg0", "seg", "eth0")
            self._up("seg", "eth0", *SEGMENT_HOSTS)
        self._up("gw", "seg0", GW_SEGMENT)
        self._route("seg", "198.51.100.1")
        if nat_household:
            # gw and home each meet the internet switch instead of each other; same
            # interface names and addresses, so nothing that uses them can tell.
            self._veth("gw", "home0", "inet", "p-gw")
            self._up("inet", "p-gw", master="inet0")
            self._veth("home", "eth0", "inet", "p-home")
            self._up("inet", "p-home", master="inet0")
        else:
            self._veth("gw", "home0", "home", "eth0")
        self._up("gw", "home0", GW_HOME)
        self._up("home", "eth0", *HOME_HOSTS)
        self._route("home", "203.0.113.254")
        for gw in [self.nodes[n] for n in ("gw", "gw2") if n in self.nodes]:
            self._isolate(gw, route_uplinks)
        for _ in range(guests):
            self.add_guest()

    def _build_second_appliance(self) -> None:
        """gw2 on the guest switch, the segment's bridge and the internet switch."""
        self._bridge("seg", "br0")
        self._up("seg", "br0", *SEGMENT_HOSTS)
        self._veth("gw2", "guest0", "sw", "p-gw2")
        self._up("sw", "p-gw2", master="br0")
        self._up("gw2", "guest0")
        self._veth("gw2", "seg0", "seg", "p-gw2")
        self._up("seg", "p-gw2", master="br0")
        self._up("gw2", "seg0", GW2_SEGMENT)
        self._veth("gw2", "home0", "inet", "p-gw2")
        self._up("inet", "p-gw2", master="inet0")
        self._up("gw2", "home0", GW2_HOME)

    def _isolate(self, gw: Node, route_uplinks: bool) -> None:
        # The guest side never forwards; the segment and home legs route for each other so
        # the site's web proxy can reach "the internet" (the home namespace).
        gw.run("sysctl", "-qw", "net.ipv4.conf.all.forwarding=0")
        if route_uplinks:
            gw.run("sysctl", "-qw", "net.ipv4.conf.seg0.forwarding=1")
            gw.run("sysctl", "-qw", "net.ipv4.conf.home0.forwarding=1")
        gw.run("sysctl", "-qw", "net.ipv4.conf.guest0.forwarding=0")

    def _build_internet(self) -> None:
        """The internet switch, the relay, and the household behind its NAT router."""
        for name in ("inet", "relay", "natrouter", "bobhome"):
            self._add_node(name)
        self._bridge("inet", "inet0")
        self._veth("relay", "eth0", "inet", "p-relay")
        self._up("inet", "p-relay", master="inet0")
        self._up("relay", "eth0", RELAY_HOST)
        # Replies to the segment (the site's proxies reach the internet through gw, unNATed).
        self._route("relay", INTERNET_GATEWAY)
        self._veth("natrouter", "wan0", "inet", "p-nat")
        self._up("inet", "p-nat", master="inet0")
        self._up("natrouter", "wan0", NAT_ROUTER_WAN)
        self._route("natrouter", INTERNET_GATEWAY)
        self._veth("natrouter", "lan0", "bobhome", "eth0")
        self._up("natrouter", "lan0", NAT_ROUTER_LAN)
        self._up("bobhome", "eth0", *HOUSEHOLD_HOSTS)
        self._route("bobhome", str(ipaddress.IPv4Interface(NAT_ROUTER_LAN).ip))
        router = self.nodes["natrouter"]
        router.run("sysctl", "-qw", "net.ipv4.ip_forward=1")
        router.run("nft", "-f", "-", input=NAT_ROUTER_RULES)

    def _build_federation(self) -> None:
        """The second relay and the relays' store, on the internet switch."""
        for name, host in (("relay2", RELAY2_HOST), ("relaydb", RELAY_DB_HOST)):
            self._add_node(name)
            self._veth(name, "eth0", "inet", f"p-{name}")
            self._up("inet", f"p-{name}", master="inet0")
            self._up(name, "eth0", host)
            self._route(name, INTERNET_GATEWAY)

    def cut_household_link(self, down: bool) -> None:
        """Black-hole (down=True) or restore the household's uplink, keeping all state.

        Drops every IP packet through the router's wan0 both ways, silently, like an
        uplink that went dark upstream: nobody gets a reset or an ICMP error, both ends
        only see silence and time out.  The link, its routes and the router's NAT
        mappings stay, so a connection that outlives a short cut carries on afterwards
        (a lost mapping would also need the router's conntrack flushed).  A link-down
        of wan0 would instead answer the household at once with "network unreachable"
        and delete wan0's routes, which a real dead uplink rarely does.
        """
        router = self.node("natrouter")
        router.run("nft", "-f", "-", input=UPLINK_CUT_RULES if down else UPLINK_RESTORE_RULES)

    def add_guest(self) -> Node:
        """Plug one more guest (no address yet: it asks DHCP) into the guest switch."""
        self.guests += 1
        n = self.guests
        name = f"guest{n}"
        self._add_node(name)
        self._veth(name, "eth0", "sw", f"p-g{n}", mac=guest_mac(n))
        self._up("sw", f"p-g{n}", master="br0")
        self._up(name, "eth0")
        return self.nodes[name]

    def node(self, name: str) -> Node:
        try:
            return self.nodes[name]
        except KeyError:
            raise LabError(f"no node {name!r}; nodes are {', '.join(self.nodes)}") from None

    def __getitem__(self, name: str) -> Node:
        return self.node(name)

    # -- processes ----------------------------------------------------------
    def start(
        self,
        node: Node,
        argv: list[str],
        name: str | None = None,
        env: dict[str, str] | None = None,
    ) -> Process:
        name = name or Path(argv[0]).name
        log_path = self.workdir / f"{node.name}-{name}-{len(self.processes)}.log"
        with open(log_path, "wb") as out:
            popen = subprocess.Popen(
                node.argv(argv),
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
                env={**os.environ, **(env or {})},
            )
        proc = Process(name, node.name, argv, popen, log_path)
        self.processes.append(proc)
        return proc

    # -- teardown -----------------------------------------------------------
    def destroy(self) -> None:
        """Stop every process and remove every namespace of this run; safe to call twice."""
        for proc in reversed(self.processes):
            with contextlib.suppress(Exception):
                proc.stop()
        remove_namespaces([n.netns for n in self.nodes.values()])
        self.nodes.clear()


def run_prefix() -> str:
    return f"gg{os.getpid()}x{secrets.token_hex(2)}"


def _kill_namespace_pids(name: str) -> None:
    out = subprocess.run(
        ["ip", "netns", "pids", name], capture_output=True, text=True, check=False
    ).stdout
    pids = [int(p) for p in out.split()]
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        deadline = time.monotonic() + 2
        while pids and time.monotonic() < deadline:
            pids = [p for p in pids if Path(f"/proc/{p}").exists()]
            time.sleep(0.02)


def remove_namespaces(names: list[str]) -> None:
    """Kill what runs in them, then delete them (their veths go with them)."""
    for name in names:
        with contextlib.suppress(Exception):
            _kill_namespace_pids(name)
    for name in names:
        with contextlib.suppress(Exception):
            netns.remove(name)
        shutil.rmtree(NETNS_ETC / name, ignore_errors=True)


def our_namespaces(prefix: str | None = None) -> list[str]:
    names = [str(n) for n in netns.listnetns()]
    if prefix:
        return [n for n in names if n.startswith(prefix + "-")]
    return [n for n in names if _RUN_PREFIX.match(n) or n.startswith(LAB_PREFIX + "-")]


def sweep_stale() -> list[str]:
    """Remove namespaces of earlier test runs whose process is gone (a kill -9, a crash)."""
    stale = []
    for name in netns.listnetns():
        m = _RUN_PREFIX.match(str(name))
        if m and not Path(f"/proc/{m.group(1)}").exists():
            stale.append(str(name))
    if stale:
        log.warning("removing namespaces left by dead runs: %s", " ".join(stale))
        remove_namespaces(stale)
    return stale
