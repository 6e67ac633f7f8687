"""dnsperf against our guest resolver and against dnsmasq, both answering from cache.

Same run, same namespaces, same names, same upstream (dnsmasq in the segment as the
site's resolver): a guest namespace runs dnsperf at the appliance's guest address,
port 53 (ours) and port 5353 (dnsmasq forwarding to the same upstream, with its
cache).  Both caches are warmed first, so this measures the cached-answer path.
The guest is logged in (a lease and a session in the store) and its rate limit is set
far above what dnsperf reaches: every query pays the session and bucket checks, none
is dropped.
"""

from __future__ import annotations

import json
import re
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from appliance import store
from appliance.lab import servers
from appliance.lab.topology import Node, Topology, guest_mac
from appliance.sessions import SessionStore

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "netns"))
from _guestside import record_lease, write_config

pytestmark = [pytest.mark.bench, pytest.mark.netns]
ROOT = Path(__file__).resolve().parents[2]
GW = "192.168.1.1"
NAMES = 200
CLIENTS = 8
SECONDS = 3
ROUNDS = 3


def dnsperf(node: Node, port: int, names: Path, seconds: int) -> dict[str, float]:
    out = node.run(
        "dnsperf",
        "-s",
        GW,
        "-p",
        str(port),
        "-d",
        str(names),
        "-c",
        str(CLIENTS),
        "-l",
        str(seconds),
        "-t",
        "2",
        timeout=seconds + 30,
    ).stdout
    qps = float(re.search(r"Queries per second:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    lat = re.search(r"Average Latency \(s\):\s+([\d.]+)", out)
    lost = re.search(r"Queries lost:\s+(\d+)", out)
    noerr = re.search(r"NOERROR (\d+)", out)
    return {
        "qps": qps,
        "latency_ms": float(lat.group(1)) * 1000 if lat else float("nan"),
        "lost": float(lost.group(1)) if lost else 0.0,
        "noerror": float(noerr.group(1)) if noerr else 0.0,
    }


def test_dns_cached_answers_against_dnsmasq(
    make_topology: Callable[..., Topology], tmp_path: Path
) -> None:
    topo = make_topology(guests=1)
    gw, seg, guest = topo["gw"], topo["seg"], topo["guest1"]
    names = [f"host{i}.bench.example" for i in range(NAMES)]
    records = [(n, f"203.0.113.{i % 250 + 1}") for i, n in enumerate(names)]
    servers.start_resolver(seg, records, tmp_path, ttl=3600)
    cfg = write_config(tmp_path)
    # one address asks for all eight dnsperf clients: checked per query, never reached
    cfg.write_text(
        cfg.read_text().replace("[dns]\n", "[dns]\nrate_limit = 1000000\nrate_burst = 1000000\n")
    )
    record_lease(tmp_path / "state", "192.168.1.101", guest_mac(1))
    conn = store.connect(tmp_path / "state" / "state.sqlite")
    SessionStore(conn).create(
        user="bench", source="site", attributes={}, ip="192.168.1.101", mac=guest_mac(1)
    )
    conn.close()
    gw.start(sys.executable, "-m", "appliance", "run", "--config", str(cfg), "dns", name="ours")
    gw.start(
        *servers.dnsmasq_argv(GW, tmp_path / "peer.pid", 5353),
        "--server=198.51.100.2",
        "--cache-size=10000",
        name="dnsmasq",
    )
    gw.wait_port(53, GW, proto="udp")
    gw.wait_port(5353, GW, proto="udp")
    guest.run("ip", "addr", "add", "192.168.1.101/24", "dev", "eth0")
    qfile = tmp_path / "queries.txt"
    qfile.write_text("".join(f"{n} A\n" for n in names))
    for port in (53, 5353):  # warm both caches (each name once), then check one answer
        guest.run("dnsperf", "-s", GW, "-p", str(port), "-d", str(qfile), "-n", "1", "-t", "3")
        ans = guest.run("dig", "+short", "+time=2", "-p", str(port), f"@{GW}", names[-1])
        assert ans.stdout.strip() == f"203.0.113.{(NAMES - 1) % 250 + 1}"
    # alternate the two, several short rounds each: the machine is shared and noisy,
    # so the best round of each is the fairest single figure
    results: dict[str, dict[str, float]] = {}
    for round_ in range(1, ROUNDS + 1):
        for label, port in (("ours", 53), ("dnsmasq", 5353)):
            results[f"{label}{round_}"] = dnsperf(guest, port, qfile, SECONDS)
            time.sleep(0.3)
    ours_runs = [r for k, r in results.items() if k.startswith("ours")]
    peer_runs = [r for k, r in results.items() if k.startswith("dnsmasq")]
    ours = max(r["qps"] for r in ours_runs)
    peer = max(r["qps"] for r in peer_runs)
    lat_ours = min(r["latency_ms"] for r in ours_runs)
    lat_peer = min(r["latency_ms"] for r in peer_runs)
    ratio = ours / peer
    print()
    print(f"{'':10} {'qps':>10} {'latency ms':>11} {'lost':>6}")
    for label, r in results.items():
        print(f"{label:10} {r['qps']:10.0f} {r['latency_ms']:11.3f} {r['lost']:6.0f}")
    print(f"ratio ours/dnsmasq (best round of each): {ratio:.2f} (target >= 0.5)")
    rows = [
        {
            "metric": "cached A queries/s (dnsperf -c 8, 200 names)",
            "unit": "queries/s",
            "ours": ours,
            "peer": "dnsmasq (cache)",
            "peer_value": peer,
            "ratio": ratio,
            "target": ">= 0.5",
        },
        {
            "metric": "average latency, cached",
            "unit": "ms",
            "ours": lat_ours,
            "peer": "dnsmasq (cache)",
            "peer_value": lat_peer,
            "ratio": lat_ours / lat_peer if lat_peer else float("nan"),
            "target": "lower is better",
        },
    ]
    out = ROOT / "tests" / "artifacts" / "bench" / "dns.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps(
            {
                "title": "Guest DNS: cached answers, ours vs dnsmasq",
                "rows": rows,
                "notes": (
                    "dnsperf from a guest namespace to the appliance's guest address; both "
                    "servers forward to the same dnsmasq in the segment and answer from "
                    "cache. Shared 2-core machine: figures are noisy. "
                    f"Runs: {json.dumps(results)}"
                ),
            },
            indent=2,
        )
    )
    for r in results.values():
        assert r["noerror"] > 0 and r["lost"] < r["noerror"] * 0.01
