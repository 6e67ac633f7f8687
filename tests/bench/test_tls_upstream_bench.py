"""TLS we speak to an upstream (`tls = true`): our relay vs HAProxy originating TLS.

The guest speaks plain bytes to the middlebox; the middlebox speaks TLS to the
server, verifying it with the lab CA and the name (servers.toml `tls = true`,
`tls_ca`, `tls_name`).  That connection leaves the relay's raw core at accept for
asyncio's TLS transport (relay.py's `Link`): the bytes must be encrypted in user
space, so splice(2) and the raw core's one-buffer copy have nothing to offer it.
This measures whether that path holds up against HAProxy doing the same work
(`server ... ssl verify required`), with its TLS session reuse to the server on
(its default) and off (`no-ssl-reuse`: a full handshake per connection).  Ours
offers the session of its last full handshake to that server (upstream_tls.py's
`Resuming`), as HAProxy's default does.

Client in `home`, nginx with TLS in `seg`, the middlebox in `gw`, as in
test_tls_bench; peers interleaved round by round, medians: read the ratios.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from middlebox import cpu_seconds, main_pid, row, tree, widen_ports, write_report, wrk_run
from test_tls_bench import passive_opens

from appliance.lab import servers
from appliance.lab.tls import LabCA
from appliance.lab.topology import Node, Process, Topology

pytestmark = pytest.mark.bench

GW = "203.0.113.254"
SEG_SRV = "198.51.100.3"
NAME = "www.example.com"  # what the server's certificate names
HTTPS = servers.HTTPS_PORT
RELAY_PORT = 17443
HAPROXY = {"haproxy": 28444, "haproxy-no-reuse": 28445}
ROUNDS = 5
SECONDS = 3
BIG = 256 * 1024 * 1024
PAGE = b"x" * 1024


def haproxy_config(ca: LabCA) -> str:
    server = f"server s {SEG_SRV}:{HTTPS} ssl verify required ca-file {ca.cert} sni str({NAME})"
    return f"""global
    maxconn 6000
    nbthread 2
defaults
    mode tcp
    timeout connect 5s
    timeout client 600s
    timeout server 600s
listen tls-up
    bind {GW}:{HAPROXY["haproxy"]}
    {server}
listen tls-up-no-reuse
    bind {GW}:{HAPROXY["haproxy-no-reuse"]}
    {server} no-ssl-reuse
"""


def start_relay(gw: Node, workdir: Path, ca: LabCA) -> Process:
    table = workdir / "relay-tls-up.json"
    table.write_text(
        json.dumps(
            {
                "listeners": [{"service": "secure", "protocol": "tcp", "port": RELAY_PORT}],
                "servers": {"secure": [f"{SEG_SRV}:{HTTPS}"]},
                "tls": {"secure": {"name": NAME, "ca": str(ca.cert)}},
                "users": {
                    ip: {"user": "bench", "allow": ["secure"], "rule": "bench"}
                    for ip in ("203.0.113.1", "203.0.113.3", "203.0.113.80")
                },
            }
        )
    )
    proc = gw.start(
        *(sys.executable, "-m", "appliance.proxy", str(table), "--host", GW),
        *("--loop", "uvloop", "--splice", "--workers", "0"),
        *("--max-connections", "1000000"),  # one source stands for many guests here
        name="relay",
    )
    gw.wait_port(RELAY_PORT, GW)
    return proc


def download(home: Node, port: int, cpu_of: list[int]) -> tuple[float, float]:
    """Gbit/s of one plain download of BIG bytes through the middlebox (TLS behind it),
    and the CPU s/GiB `cpu_of` used for it."""
    cpu0 = cpu_seconds(cpu_of)
    out = home.run(
        *("curl", "-sS", "-o", "/dev/null", "-w", "%{json}", f"http://{GW}:{port}/big.bin"),
        check=False,
        timeout=120,
    )
    used = cpu_seconds(cpu_of) - cpu0
    assert out.returncode == 0, out.stderr
    info = json.loads(out.stdout)
    assert info["size_download"] == BIG and info["http_code"] == 200, info
    return info["speed_download"] * 8 / 1e9, used / (BIG / 2**30)


def test_tls_upstream_relay_against_haproxy(
    make_topology: Callable[..., Topology], tmp_path: Path
) -> None:
    topo = make_topology(guests=0)
    home, gw, seg = topo["home"], topo["gw"], topo["seg"]
    for node in (home, gw):
        widen_ports(node)
    ca = LabCA.create(tmp_path / "ca")
    web = servers.start_web(
        seg, host=SEG_SRV, files={"1k.bin": PAGE, "big.bin": b"\0" * BIG}, workers=1, tls=ca
    )
    relay = start_relay(gw, tmp_path, ca)
    cfg = tmp_path / "haproxy-tls-up.cfg"
    cfg.write_text(haproxy_config(ca))
    haproxy = gw.start("haproxy", "-db", "-f", str(cfg), name="haproxy")
    try:
        gw.wait_port(HAPROXY["haproxy"], GW)
        run_bench(home, seg, relay, haproxy, tmp_path)
    finally:
        web.stop()


def run_bench(home: Node, seg: Node, relay: Process, haproxy: Process, work: Path) -> None:
    load0 = os.getloadavg()[0]
    ports = {"relay": RELAY_PORT, **HAPROXY}
    # each middlebox reaches nginx over TLS and hands back the page
    for target, port in ports.items():
        got = home.run("curl", "-sS", f"http://{GW}:{port}/1k.bin", check=False, timeout=30)
        assert got.returncode == 0 and got.stdout == PAGE.decode(), (target, got.stderr)
    cpu_of = {"relay": tree(main_pid(relay)), "haproxy": tree(main_pid(haproxy))}
    cpu_of["haproxy-no-reuse"] = cpu_of["haproxy"]
    samples: dict[str, dict[str, list[float]]] = {}
    checks: list[tuple[str, int, int, int]] = []  # target, requests, nginx connections, errors

    def sample(test: str, target: str, value: float) -> None:
        samples.setdefault(test, {}).setdefault(target, []).append(value)

    for _ in range(ROUNDS):
        for target, port in ports.items():
            opens0 = passive_opens(seg)
            run = wrk_run(home, f"http://{GW}:{port}/1k.bin", SECONDS, cpu_of=cpu_of[target])
            assert run.bad_status == 0, run.output
            checks.append((target, run.requests, passive_opens(seg) - opens0, run.socket_errors))
            sample("wrk", target, run.rate)
            sample("cpu", target, run.cpu_us)
        for target in ("relay", "haproxy"):
            gbps, cpu = download(home, ports[target], cpu_of[target])
            sample("bulk", target, gbps)
            sample("bulk-cpu", target, cpu)
    # every wrk request was a TLS connection of its own from the middlebox to nginx
    for target, requests, opens, errors in checks:
        assert errors <= requests // 100, (target, errors, requests)
        assert 0.95 <= opens / requests <= 1.2, (target, opens, requests)

    med = {t: {k: statistics.median(v) for k, v in d.items()} for t, d in samples.items()}
    f, c, b, bc = med["wrk"], med["cpu"], med["bulk"], med["bulk-cpu"]
    no_reuse, reuse = "haproxy ssl, no-ssl-reuse", "haproxy ssl (session reuse)"
    rows: list[dict[str, Any]] = []
    m = "connection rate, TLS to the upstream, wrk -c64 Connection: close, 1 KiB"
    rows.append(row(m, "req/s", f["relay"], no_reuse, f["haproxy-no-reuse"], "report"))
    rows.append(row(m, "req/s", f["relay"], reuse, f["haproxy"], "report"))
    m = "CPU per connection, TLS to the upstream (user+system)"
    rows.append(row(m, "us", c["relay"], no_reuse, c["haproxy-no-reuse"], "report"))
    rows.append(row(m, "us", c["relay"], reuse, c["haproxy"], "report"))
    m = "download through TLS to the upstream, 1 connection, 256 MiB (curl)"
    rows.append(row(m, "Gbit/s", b["relay"], "haproxy ssl", b["haproxy"], "report"))
    m = "CPU per GiB of that download"
    rows.append(row(m, "s", bc["relay"], "haproxy ssl", bc["haproxy"], "report"))
    notes = (
        f"Load average (1 min) {load0:.1f} at the start, {os.getloadavg()[0]:.1f} at the end. "
        f"Medians of {ROUNDS} interleaved rounds ({SECONDS} s wrk runs). Client in home (plain "
        "HTTP), nginx (1 worker, TLS, EC P-256 lab certificate) in seg, middlebox in gw "
        "speaking TLS to nginx and verifying its certificate with the lab CA and the name "
        f"{NAME}. relay = a tcp service with tls = true: asyncio's TLS transport on uvloop "
        "(Link) resuming its TLS session to the server, one worker per core "
        f"({os.cpu_count()}); HAProxy 2 threads, mode tcp, "
        "`ssl verify required ca-file sni`, with its TLS session cache to the server (default) "
        "and with no-ssl-reuse. Each wrk request was a TLS connection of its own at nginx "
        f"(checked per run). Raw samples: {json.dumps(samples)}; per-run checks (target, "
        f"requests, nginx connections, socket errors): {checks}"
    )
    write_report("tls-upstream", "TLS to the upstream: relay (Link) vs HAProxy ssl", rows, notes)
    assert all(r["ours"] > 0 for r in rows)
