"""Helpers shared by the middlebox benchmarks (test_relay_bench, test_tls_bench).

A middlebox (our relay, HAProxy) runs in `gw` between a client in `home` and
servers in `seg`; these measure it with wrk, charge the CPU its processes use
to the requests they relayed, and write the rows the report gathers
(tests/bench/benchreport.py reads tests/artifacts/bench/<name>.json).
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from appliance.lab.topology import Node, Process

ROOT = Path(__file__).resolve().parents[2]
ARTIFACTS = ROOT / "tests" / "artifacts" / "bench"


def widen_ports(node: Node) -> None:
    """Room for ~10,000 new connections a second to one address and port.

    With the default 28,000 ephemeral ports the fastest peer ran into its own
    TIME_WAIT leftovers within a few rounds (HAProxy fell from 10,000 to 90 req/s).
    The benchmark's namespaces only, every peer alike."""
    node.run("sysctl", "-w", "net.ipv4.ip_local_port_range=1024 65000")
    node.run("sysctl", "-w", "net.ipv4.tcp_tw_reuse=1")


def cpu_seconds(pids: list[int]) -> float:
    """User plus system CPU time these processes have used so far."""
    ticks = 0
    for pid in pids:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        ticks += int(fields[11]) + int(fields[12])  # utime, stime
    return ticks / os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True)
class WrkRun:
    """One wrk run: its rate, its count, what failed, and the CPU charged per request."""

    rate: float  # requests a second
    requests: int
    cpu_us: float  # CPU µs per request of the `cpu_of` processes
    socket_errors: int  # connect + read + write + timeout
    bad_status: int  # non-2xx/3xx responses
    output: str


def wrk_run(
    home: Node,
    url: str,
    seconds: int = 3,
    script: Path | None = None,
    cpu_of: list[int] | None = None,
    connections: int = 64,
) -> WrkRun:
    """wrk -t2 with `Connection: close`: every request a new connection (and, over
    https, a new TLS handshake)."""
    cpu0 = cpu_seconds(cpu_of or [])
    out = home.run(
        "wrk",
        "-t2",
        f"-c{connections}",
        f"-d{seconds}s",
        "-H",
        "Connection: close",
        *(("-s", str(script)) if script else ()),
        url,
        timeout=seconds + 30,
    ).stdout
    used = cpu_seconds(cpu_of or []) - cpu0
    m = re.search(r"Requests/sec:\s+([\d.]+)", out)
    n = re.search(r"(\d+) requests in", out)
    assert m and n, out
    errors = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    bad = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    requests = int(n.group(1))
    return WrkRun(
        rate=float(m.group(1)),
        requests=requests,
        cpu_us=used / max(1, requests) * 1e6,
        socket_errors=sum(int(g) for g in errors.groups()) if errors else 0,
        bad_status=int(bad.group(1)) if bad else 0,
        output=out,
    )


def wrk(
    home: Node,
    host: str,
    port: int,
    seconds: int = 3,
    script: Path | None = None,
    cpu_of: list[int] | None = None,
) -> tuple[float, float]:
    """Requests a second, and the CPU µs per request that the `cpu_of` processes used.
    Every answer must be a success: a rate of error pages is no figure (HAProxy once
    answered this benchmark's requests with 400 at three times the rate of real ones)."""
    run = wrk_run(home, f"http://{host}:{port}/1k.bin", seconds, script, cpu_of)
    assert run.bad_status == 0, f"{host}:{port} answered errors:\n{run.output}"
    return run.rate, run.cpu_us


def main_pid(proc: Process) -> int:
    """The server's own pid (the child of `ip netns exec`, which execs: same pid)."""
    return proc.popen.pid


def tree(pid: int) -> list[int]:
    """pid and its descendants (the relay's workers)."""
    out = [pid]
    for task in Path(f"/proc/{pid}/task").iterdir():
        for child in (task / "children").read_text().split():
            out += tree(int(child))
    return out


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def tree_rss_kib(pid: int) -> int:
    return sum(rss_kib(p) for p in tree(pid))


def row(
    metric: str, unit: str, ours: float, peer: str, peer_value: float, target: str
) -> dict[str, Any]:
    ratio = ours / peer_value if peer_value else 0.0
    return {
        "metric": metric,
        "unit": unit,
        "ours": round(ours, 3),
        "peer": peer,
        "peer_value": round(peer_value, 3),
        "ratio": round(ratio, 3),
        "target": target,
    }


def write_report(name: str, title: str, rows: list[dict[str, Any]], notes: str) -> Path:
    """tests/artifacts/bench/<name>.json for benchreport, and the table on stdout (-s)."""
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    path = ARTIFACTS / f"{name}.json"
    path.write_text(json.dumps({"title": title, "rows": rows, "notes": notes}, indent=1))
    print()
    print(
        f"{'metric':52} {'unit':7} {'ours':>10} {'peer':>20} {'peer value':>11} "
        f"{'ratio':>6}  target"
    )
    for r in rows:
        print(
            f"{r['metric'][:52]:52} {r['unit']:7} {r['ours']:>10.3f} {r['peer'][:20]:>20} "
            f"{r['peer_value']:>11.3f} {r['ratio']:>6.2f}  {r['target']}"
        )
    print(notes)
    return path
