"""Helpers for the DHCP namespace tests: start our server in `gw`, read its store and stats."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

from appliance.lab.topology import Process, Topology
from appliance.state import leases, store
from dhcp.labconfig import write_config


class DhcpServer:
    def __init__(self, topo: Topology, workdir: Path, **dhcp: Any):
        dhcp.setdefault("pool_start", "192.168.1.100")
        dhcp.setdefault("pool_end", "192.168.1.199")
        self.topo = topo
        self.config = write_config(workdir, **dhcp)
        self.state = workdir / "state"
        self.proc: Process | None = None
        self.start()

    def start(self) -> None:
        self.proc = self.topo["gw"].start(
            sys.executable, "-m", "appliance", "run", "--config", str(self.config), "dhcp"
        )
        wait_for(lambda: self.proc is not None and "dhcp serving" in self.proc.output(), 20)

    def output(self) -> str:
        return self.proc.output() if self.proc else ""

    def events(self, mac: str | None = None) -> list[leases.LeaseEvent]:
        conn = store.connect(self.state / "state.sqlite", readonly=True)
        try:
            evs = leases.events_since(conn, 0, limit=100000)
        finally:
            conn.close()
        return [e for e in evs if mac is None or e.mac == mac]

    def kinds(self, mac: str) -> list[str]:
        return [e.kind for e in self.events(mac)]

    def lease(self, mac: str) -> leases.Lease | None:
        conn = store.connect(self.state / "state.sqlite", readonly=True)
        try:
            return leases.lookup_mac(conn, mac, time.time())
        finally:
            conn.close()

    def all_leases(self) -> list[leases.Lease]:
        conn = store.connect(self.state / "state.sqlite", readonly=True)
        try:
            return leases.all_leases(conn)
        finally:
            conn.close()

    def stats(self) -> dict[str, Any]:
        """The server's counters (it writes them every 2 s)."""
        out: dict[str, Any] = json.loads((self.state / "dhcp-stats.json").read_text())
        return out


def wait_for(cond: Any, timeout: float, what: str = "condition", every: float = 0.2) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def ipv4(topo: Topology, node: str) -> str | None:
    """The address on eth0 as 'a.b.c.d/len', or None."""
    out = topo[node].run("ip", "-4", "-o", "addr", "show", "eth0").stdout.split()
    return out[out.index("inet") + 1] if "inet" in out else None
