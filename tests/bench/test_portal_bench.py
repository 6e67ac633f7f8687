"""Portal benchmark: wrk on the RFC 8908 API and the status page for a logged-in guest.

The peer is nginx serving a static file of the same size as our API answer from
the same namespace (gw), on another port: the ceiling for "a tiny HTTP answer on
this machine".  Login cost is dominated by the KDF, reported with its parameters.
The machine is shared (2 cores, several engineers): figures are noisy.
"""

from __future__ import annotations

import json
import re
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from portal_conf import add_user, apply_ruleset, load, write_config

from appliance.accounts import site as accounts
from appliance.core import passwords
from appliance.core.config import CAPTIVE_API_PATH
from appliance.lab.topology import Node, Topology, guest_mac
from appliance.state import leases, schema, store
from appliance.state.leases import Lease

pytestmark = pytest.mark.bench
GUEST_IP = "192.168.1.100"
PORTAL = "http://192.168.1.1"
DURATION = "5s"


def wrk(node: Node, url: str) -> tuple[float, float]:
    """(requests/s, p99 ms) from wrk run in `node`."""
    out = node.run("wrk", "-t2", "-c32", f"-d{DURATION}", "--latency", url, timeout=60).stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    m = re.search(r"99%\s+([\d.]+)(us|ms|s)\b", out)
    assert m, out
    scale = {"us": 0.001, "ms": 1.0, "s": 1000.0}[m.group(2)]
    assert "Non-2xx" not in out, out
    return rps, float(m.group(1)) * scale


def curl(node: Node, jar: Path, *args: str) -> str:
    return node.run("curl", "-sS", "-m", "10", "-b", str(jar), "-c", str(jar), *args).stdout


def login(node: Node, jar: Path) -> None:
    page = curl(node, jar, "-L", f"{PORTAL}/login")  # logged in already: the status form
    token = re.search(r'name="csrf" value="([0-9a-f]+)"', page).group(1)  # type: ignore[union-attr]
    out = curl(
        node,
        jar,
        "-o",
        "/dev/null",
        "-w",
        "%{http_code}",
        f"{PORTAL}/login",
        "--data-urlencode",
        f"csrf={token}",
        "--data-urlencode",
        "user=alice",
        "--data-urlencode",
        "password=correct horse",
    )
    assert out == "303", out


def test_portal_bench(
    make_topology: Callable[..., Topology], tmp_path: Path, artifacts: Path
) -> None:
    topo = make_topology(guests=1)
    cfg_path = write_config(tmp_path / "etc")
    cfg = load(cfg_path)
    add_user(cfg, "alice", "correct horse", department="Sales 1")
    guest, gw = topo["guest1"], topo["gw"]
    guest.run("ip", "addr", "add", f"{GUEST_IP}/24", "dev", "eth0")
    conn = store.connect(cfg.state.database)
    schema.upgrade(conn)
    leases.record(conn, "granted", Lease(GUEST_IP, guest_mac(1), time.time() + 3600), time.time())
    apply_ruleset(gw, cfg_path)  # a login adds the guest to the firewall's set
    # the peer (nginx on 8080) is no part of the appliance: let the guest reach it too
    gw.run("nft", "insert", "rule", "inet", "appliance", "input", "tcp", "dport", "8080", "accept")
    gw.start(
        sys.executable, "-m", "appliance", "run", "--config", str(cfg_path), "portal", name="portal"
    )
    gw.wait_port(80, "192.168.1.1")
    jar = tmp_path / "jar"
    login(guest, jar)

    # the peer: nginx, one worker (our portal is one process), a static file of the same size
    api_body = curl(guest, jar, f"{PORTAL}{CAPTIVE_API_PATH}")
    assert '"captive": false' in api_body
    www = tmp_path / "www"
    www.mkdir()
    (www / "captive.json").write_text(api_body)
    status_body = curl(guest, jar, f"{PORTAL}/status")
    assert "alice" in status_body
    (www / "status.html").write_text(status_body)
    (tmp_path / "nginx.conf").write_text(f"""
user root;
worker_processes 1;
pid {tmp_path}/nginx.pid;
error_log {tmp_path}/nginx-error.log;
events {{ worker_connections 1024; }}
http {{
  access_log off;
  types {{ application/captive+json json; text/html html; }}
  server {{ listen 192.168.1.1:8080; root {www}; }}
  client_body_temp_path {tmp_path}/nb; proxy_temp_path {tmp_path}/np;
  fastcgi_temp_path {tmp_path}/nf; uwsgi_temp_path {tmp_path}/nu; scgi_temp_path {tmp_path}/ns;
}}
""")
    gw.start("nginx", "-c", str(tmp_path / "nginx.conf"), "-g", "daemon off;", name="nginx")
    gw.wait_port(8080, "192.168.1.1")

    api_rps, api_p99 = wrk(guest, f"{PORTAL}{CAPTIVE_API_PATH}")
    peer_api_rps, peer_api_p99 = wrk(guest, "http://192.168.1.1:8080/captive.json")
    st_rps, st_p99 = wrk(guest, f"{PORTAL}/status")
    peer_st_rps, peer_st_p99 = wrk(guest, "http://192.168.1.1:8080/status.html")

    # login cost: the KDF alone, in this process, and whole logins over HTTP from the guest
    n = 10
    t0 = time.perf_counter()
    for _ in range(n):
        assert accounts.authenticate(cfg.policies.users, "alice", "correct horse")
    kdf_per_s = n / (time.perf_counter() - t0)
    t0 = time.perf_counter()
    for i in range(n):
        login(guest, tmp_path / f"jar{i}")
    logins_per_s = n / (time.perf_counter() - t0)

    rows = [
        ("captive API req/s", "req/s", api_rps, "nginx static file", peer_api_rps, ">= 2000 req/s"),
        ("captive API p99", "ms", api_p99, "nginx static file", peer_api_p99, ""),
        ("status page req/s", "req/s", st_rps, "nginx static file", peer_st_rps, ""),
        ("status page p99", "ms", st_p99, "nginx static file", peer_st_p99, ""),
        ("site-account verify (KDF) /s, 1 thread", "1/s", kdf_per_s, "", 0.0, ""),
        (
            "logins/s over HTTP, sequential (curl: GET form + POST)",
            "1/s",
            logins_per_s,
            "",
            0.0,
            "",
        ),
    ]
    report = {
        "title": "Captive portal (waitress + Flask) vs nginx static file",
        "rows": [
            {
                "metric": m,
                "unit": u,
                "ours": round(o, 2),
                "peer": p,
                "peer_value": round(pv, 2),
                "ratio": round(o / pv, 3) if pv else 0.0,
                "target": t,
            }
            for m, u, o, p, pv, t in rows
        ],
        "notes": (
            f"wrk -t2 -c32 -d{DURATION} from a guest namespace; portal: waitress 8 threads, "
            f"one process; nginx: 1 worker. KDF: {passwords.parameters()}. "
            "Shared, noisy 2-core machine (several engineers running tests at once)."
        ),
    }
    out = artifacts / "bench"
    out.mkdir(parents=True, exist_ok=True)
    (out / "portal.json").write_text(json.dumps(report, indent=2))
    print()
    print(f"{'metric':58} {'ours':>10} {'peer':>10} {'ratio':>7}")
    for r in report["rows"]:  # type: ignore[attr-defined]
        print(f"{r['metric']:58} {r['ours']:>10} {r['peer_value']:>10} {r['ratio']:>7}")
    print(report["notes"])
