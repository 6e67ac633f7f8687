"""Relay benchmark: our relay vs HAProxy (TCP mode, splice-auto) vs kernel forwarding.

Client in `home`, servers in `seg`, the middlebox in `gw`: forwarding is the
gw routing home<->seg itself (the physical limit for a middlebox), HAProxy and
our relay listen on gw's home address and relay to the same servers.  Every
figure is measured in this run, on whatever the machine is doing: ratios are
what to read (it is a shared 2-core machine; absolute numbers are noisy).
"""

from __future__ import annotations

import json
import os
import socket
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from middlebox import main_pid, row, tree, tree_rss_kib, widen_ports, write_report, wrk

from appliance.lab import servers
from appliance.lab.topology import NetnsSwitch, Node, Process, Topology

pytestmark = pytest.mark.bench

GW = "203.0.113.254"
SEG_SRV = "198.51.100.3"
IPERF_PORT, WEB_PORT = 5201, 80
HAPROXY = {"iperf": 25201, "web": 28080}
# HAProxy in HTTP mode: the peer of our HTTP path (both parse every request head)
HAPROXY_HTTP = 28081
# the same with `http-reuse always`: every request may take an idle server connection
# (the default, `safe`, sends a client connection's first request on a new one: with
# Connection: close, every request here); reported beside the default
HAPROXY_HTTP_ALWAYS = 28082
# relay variants run side by side on their own ports; measurements interleave them
# name: (loop, splice, workers (0: one per core, the appliance's default), ports)
VARIANTS = {
    "relay": ("uvloop", True, 0, {"iperf": 15201, "web": 18080}),
    "relay-1worker": ("uvloop", True, 1, {"iperf": 14201, "web": 22080}),
    "relay-protocol": ("uvloop", False, 1, {"iperf": 16201, "web": 19080}),
    "relay-asyncio": ("asyncio", False, 1, {"iperf": 17201, "web": 20080}),
}
# the path guests' port-80 traffic takes: h11 parsing, head rewritten, per-request checks
# (explicit proxy mode here: no nftables redirect in the bench, so no SO_ORIGINAL_DST)
HTTP_PORT = 21080
ROUNDS = 5
IDLE_CONNS = 5000
# RELAY_BENCH_ONLY=http: only the HTTP path's rows (ours and HAProxy mode http, same run),
# reported as relay-http.json: a few minutes less while working on that path
ONLY = os.environ.get("RELAY_BENCH_ONLY", "")


def relay_table(path: Path, ports: dict[str, int]) -> None:
    users = {
        ip: {"user": "bench", "allow": ["iperf", "web"], "rule": "bench"}
        for ip in ("203.0.113.1", "203.0.113.3", "203.0.113.80")
    }
    path.write_text(
        json.dumps(
            {
                "listeners": [
                    {"service": "iperf", "protocol": "tcp", "port": ports["iperf"]},
                    {"service": "web", "protocol": "tcp", "port": ports["web"]},
                ],
                "servers": {
                    "iperf": [f"{SEG_SRV}:{IPERF_PORT}"],
                    "web": [f"{SEG_SRV}:{WEB_PORT}"],
                },
                "users": users,
            }
        )
    )


def start_relay(gw: Node, workdir: Path, name: str) -> Process:
    loop, splice, workers, ports = VARIANTS[name]
    table = workdir / f"{name}.json"
    relay_table(table, ports)
    proc = gw.start(
        sys.executable,
        "-m",
        "appliance.proxy",
        str(table),
        "--host",
        GW,
        "--loop",
        loop,
        "--splice" if splice else "--no-splice",
        "--workers",
        str(workers),
        "--max-connections",  # one source stands for many guests here
        "1000000",
        name=name,
    )
    gw.wait_port(ports["web"], GW)
    return proc


def absolute_form_script(workdir: Path, url: str) -> Path:
    """wrk as a proxy's client: the absolute-form target, and Host naming the same
    authority (RFC 9112 3.2.2; HAProxy 2.6.12 answers 400 to a Host that differs)."""
    script = workdir / "absolute.lua"
    host = url.split("/")[2]
    script.write_text(f'wrk.path = "{url}"\nwrk.headers["Host"] = "{host}"\n')
    return script


def start_http_relay(gw: Node, workdir: Path) -> Process:
    table = workdir / "relay-http.json"
    table.write_text(
        json.dumps(
            {
                "listeners": [
                    {"service": "web", "protocol": "http", "port": HTTP_PORT, "explicit": True}
                ],
                "servers": {"web": [f"{SEG_SRV}:{WEB_PORT}"]},
                "users": {
                    ip: {"user": "bench", "allow": ["web"], "rule": "bench"}
                    for ip in ("203.0.113.1", "203.0.113.3", "203.0.113.80")
                },
            }
        )
    )
    proc = gw.start(
        *(sys.executable, "-m", "appliance.proxy", str(table), "--host", GW),
        *("--workers", "0"),
        name="relay-http",
    )
    gw.wait_port(HTTP_PORT, GW)
    return proc


def start_haproxy(gw: Node, workdir: Path) -> Process:
    cfg = workdir / "haproxy.cfg"
    cfg.write_text(
        f"""global
    maxconn 6000
defaults
    mode tcp
    timeout connect 5s
    timeout client 600s
    timeout server 600s
listen iperf
    bind {GW}:{HAPROXY["iperf"]}
    option splice-auto
    server s {SEG_SRV}:{IPERF_PORT}
listen web
    bind {GW}:{HAPROXY["web"]}
    option splice-auto
    server s {SEG_SRV}:{WEB_PORT}
listen webhttp
    mode http
    bind {GW}:{HAPROXY_HTTP}
    server s {SEG_SRV}:{WEB_PORT}
listen webhttp-always
    mode http
    http-reuse always
    bind {GW}:{HAPROXY_HTTP_ALWAYS}
    server s {SEG_SRV}:{WEB_PORT}
"""
    )
    proc = gw.start("haproxy", "-db", "-f", str(cfg), name="haproxy")
    gw.wait_port(HAPROXY["web"], GW)
    return proc


def iperf(home: Node, host: str, port: int, streams: int, seconds: int = 3) -> float:
    out = home.run(
        "iperf3",
        "-c",
        host,
        "-p",
        str(port),
        "-t",
        str(seconds),
        "-P",
        str(streams),
        "-J",
        timeout=seconds + 30,
    ).stdout
    return float(json.loads(out)["end"]["sum_received"]["bits_per_second"]) / 1e9


HTTP_TARGETS = (
    ("relay-http", HTTP_PORT),
    ("haproxy-http", HAPROXY_HTTP),
    ("haproxy-http/always", HAPROXY_HTTP_ALWAYS),
)


def http_rate_rows(f: dict[str, float], c: dict[str, float]) -> list[dict[str, Any]]:
    """The HTTP path's rate and CPU rows: HAProxy mode http with its default reuse (the
    target's peer) and with `http-reuse always` (reported)."""
    m = "connection rate, HTTP path (port-80 service, pooled upstreams)"
    rows = [row(m, "req/s", f["relay-http"], "haproxy mode http", f["haproxy-http"], ">= 0.5")]
    peer = "haproxy mode http, http-reuse always"
    rows.append(row(m, "req/s", f["relay-http"], peer, f["haproxy-http/always"], "report"))
    m = "CPU per connection of wrk -c64 (user+system), HTTP path"
    rows.append(row(m, "us", c["relay-http"], "haproxy mode http", c["haproxy-http"], "report"))
    rows.append(row(m, "us", c["relay-http"], peer, c["haproxy-http/always"], "report"))
    return rows


def http_ttfb_rows(
    home: Node, absolute: str, forwarding: tuple[float, float]
) -> list[dict[str, Any]]:
    """The HTTP path's added time to first byte (p50, p99) beside HAProxy mode http's,
    both over what going straight to the server takes (`forwarding`)."""
    ours = ttfb(home, GW, HTTP_PORT, target=absolute)
    peer = ttfb(home, GW, HAPROXY_HTTP, target=absolute)
    return [
        row(
            f"added time to first byte {pct}, HTTP path",
            "ms",
            ours[i] - forwarding[i],
            "haproxy mode http",
            peer[i] - forwarding[i],
            "< 1 ms" if pct == "p99" else "report",
        )
        for i, pct in ((0, "p50"), (1, "p99"))
    ]


def ttfb(
    home: Node, host: str, port: int, n: int = 300, target: str = "/1k.bin"
) -> tuple[float, float]:
    """p50 and p99 (ms) from connect to the first response byte of a 1 KiB GET (each
    answer checked: a 200)."""
    authority = target.split("/")[2] if "://" in target else host
    req = f"GET {target} HTTP/1.1\r\nHost: {authority}\r\nConnection: close\r\n\r\n"
    samples = []
    with NetnsSwitch(home.netns):
        for _ in range(n):
            t0 = time.perf_counter()
            with socket.create_connection((host, port), timeout=5) as s:
                s.sendall(req.encode())
                first = s.recv(1)
                samples.append((time.perf_counter() - t0) * 1000)
                status = first + s.recv(11)
                assert status.startswith(b"HTTP/1.1 200"), (host, port, status)
    samples.sort()
    return statistics.median(samples), samples[int(len(samples) * 0.99) - 1]


def idle_rss_per_conn(home: Node, gw: Node, proc: Process, port: int) -> float:
    """RSS growth (KiB) per idle relayed connection, at IDLE_CONNS connections."""
    pid = main_pid(proc)
    time.sleep(0.5)
    before = tree_rss_kib(pid)
    socks = []
    try:
        with NetnsSwitch(home.netns):
            for _ in range(IDLE_CONNS):
                socks.append(socket.create_connection((GW, port), timeout=10))
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:  # until every upstream leg is established
            n = gw.run("ss", "-Htn", "state", "established", "dst", f"{SEG_SRV}:{WEB_PORT}").stdout
            if len(n.splitlines()) >= IDLE_CONNS:
                break
            time.sleep(0.5)
        time.sleep(1.0)
        after = tree_rss_kib(pid)
    finally:
        for s in socks:
            s.close()
    return (after - before) / IDLE_CONNS


def test_relay_against_haproxy_and_forwarding(
    make_topology: Callable[..., Topology], tmp_path: Path
) -> None:
    topo = make_topology(guests=0)
    seg = topo["seg"]
    for node in (topo["home"], topo["gw"]):
        widen_ports(node)
    seg.start("iperf3", "-s", "-B", SEG_SRV, "-p", str(IPERF_PORT), name="iperf3")
    web = servers.start_web(seg, host=SEG_SRV, files={"1k.bin": b"x" * 1024}, workers=1)
    try:
        if ONLY == "http":
            run_http_bench(topo, tmp_path)
        else:
            run_bench(topo, tmp_path)
    finally:
        web.stop()


def run_http_bench(topo: Topology, tmp_path: Path) -> None:
    """The HTTP path's rows only (RELAY_BENCH_ONLY=http), measured as in run_bench."""
    gw, seg, home = topo["gw"], topo["seg"], topo["home"]
    seg.wait_port(WEB_PORT, SEG_SRV)
    haproxy = start_haproxy(gw, tmp_path)
    http_relay = start_http_relay(gw, tmp_path)
    absolute = f"http://{SEG_SRV}/1k.bin"
    script = absolute_form_script(tmp_path, absolute)
    cpu_of = {"relay-http": tree(main_pid(http_relay)), "haproxy-http": tree(main_pid(haproxy))}
    samples: dict[str, dict[str, list[float]]] = {"wrk": {}, "cpu": {}}
    for _ in range(ROUNDS):
        for target, port in HTTP_TARGETS:
            rate, cpu = wrk(home, GW, port, script=script, cpu_of=cpu_of[target.split("/")[0]])
            samples["wrk"].setdefault(target, []).append(rate)
            samples["cpu"].setdefault(target, []).append(cpu)
    f = {k: statistics.median(v) for k, v in samples["wrk"].items()}
    c = {k: statistics.median(v) for k, v in samples["cpu"].items()}
    rows = http_rate_rows(f, c)
    rows += http_ttfb_rows(home, absolute, ttfb(home, SEG_SRV, WEB_PORT))
    notes = f"HTTP path only (RELAY_BENCH_ONLY=http). Raw samples: {json.dumps(samples)}"
    write_report("relay-http", "Relay HTTP path vs HAProxy mode http", rows, notes)
    assert all(r["ours"] > 0 for r in rows if r["unit"] != "ms")


def run_bench(topo: Topology, tmp_path: Path) -> None:
    gw, seg, home = topo["gw"], topo["seg"], topo["home"]
    load0 = os.getloadavg()[0]
    seg.wait_port(IPERF_PORT, SEG_SRV)
    relays = {name: start_relay(gw, tmp_path, name) for name in VARIANTS}
    haproxy = start_haproxy(gw, tmp_path)
    http_relay = start_http_relay(gw, tmp_path)
    absolute = f"http://{SEG_SRV}/1k.bin"
    script = absolute_form_script(tmp_path, absolute)
    targets = {
        "forwarding": {"iperf": (SEG_SRV, IPERF_PORT), "web": (SEG_SRV, WEB_PORT)},
        "haproxy": {"iperf": (GW, HAPROXY["iperf"]), "web": (GW, HAPROXY["web"])},
        **{n: {k: (GW, p) for k, p in v[3].items()} for n, v in VARIANTS.items()},
    }
    rows: list[dict[str, Any]] = []
    # samples[test][target] -> values; targets interleave within each round so that the
    # machine's load (shared, noisy) hits every peer alike; medians over ROUNDS
    samples: dict[str, dict[str, list[float]]] = {}

    def sample(test: str, target: str, value: float) -> None:
        samples.setdefault(test, {}).setdefault(target, []).append(value)

    # whose CPU time a wrk run is charged to: the middlebox's processes (workers too)
    cpu_of = {"haproxy": tree(main_pid(haproxy)), "relay-http": tree(main_pid(http_relay))}
    cpu_of["haproxy-http"] = cpu_of["haproxy-http/always"] = cpu_of["haproxy"]
    cpu_of.update({n: tree(main_pid(p)) for n, p in relays.items()})

    def wrk_sample(target: str, host: str, port: int, **kw: Any) -> None:
        rate, cpu = wrk(home, host, port, cpu_of=cpu_of.get(target), **kw)
        sample("wrk", target, rate)
        if target in cpu_of:
            sample("cpu", target, cpu)

    for _ in range(ROUNDS):
        for target, where in targets.items():
            sample("iperf1", target, iperf(home, *where["iperf"], 1))
            sample("iperf8", target, iperf(home, *where["iperf"], 8))
            wrk_sample(target, *where["web"])
        for target, port in HTTP_TARGETS:
            wrk_sample(target, GW, port, script=script)
    med = {t: {k: statistics.median(v) for k, v in d.items()} for t, d in samples.items()}
    for streams in (1, 8):
        m = f"TCP throughput, {streams} stream{'s' if streams > 1 else ''} (iperf3)"
        f = med[f"iperf{streams}"]
        rows.append(row(m, "Gbit/s", f["relay"], "haproxy splice-auto", f["haproxy"], ">= 1.0"))
        rows.append(row(m, "Gbit/s", f["relay"], "kernel forwarding", f["forwarding"], "report"))
        for v in ("relay-1worker", "relay-protocol", "relay-asyncio"):
            rows.append(row(m, "Gbit/s", f["relay"], v, f[v], "report"))
    m = "connection rate, wrk -c64 Connection: close, 1 KiB"
    f = med["wrk"]
    rows.append(row(m, "req/s", f["relay"], "haproxy", f["haproxy"], ">= 0.6"))
    rows.append(row(m, "req/s", f["relay-1worker"], "haproxy", f["haproxy"], "report (1 worker)"))
    rows.append(row(m, "req/s", f["relay"], "direct (forwarding)", f["forwarding"], "report"))
    for v in ("relay-1worker", "relay-protocol", "relay-asyncio"):
        rows.append(row(m, "req/s", f["relay"], v, f[v], "report"))
    paired = statistics.median(
        r / h for r, h in zip(samples["wrk"]["relay"], samples["wrk"]["haproxy"], strict=True)
    )
    rows.append(row(m + ", median of per-round ratios", "ratio", paired, "1", 1.0, "report"))
    m = "CPU per connection of wrk -c64 (user+system)"
    c = med["cpu"]
    for v in ("relay", "relay-1worker", "relay-protocol", "relay-asyncio"):
        rows.append(row(f"{m}, {v}", "us", c[v], "haproxy", c["haproxy"], "report"))
    rows += http_rate_rows(f, c)
    m = "connection rate, HTTP path (port-80 service, pooled upstreams)"
    rows.append(row(m, "req/s", f["relay-http"], "haproxy", f["haproxy"], "report"))
    lat = {
        t: ttfb(home, *targets[t]["web"])
        for t in ("forwarding", "haproxy", "relay", "relay-protocol")
    }
    rows += http_ttfb_rows(home, absolute, lat["forwarding"])
    for i, pct in ((0, "p50"), (1, "p99")):
        ours = lat["relay"][i] - lat["forwarding"][i]
        for peer in ("haproxy", "relay-protocol"):
            rows.append(
                row(
                    f"added time to first byte {pct}",
                    "ms",
                    ours,
                    peer,
                    lat[peer][i] - lat["forwarding"][i],
                    "< 1 ms" if pct == "p99" else "report",
                )
            )
    ours_rss = idle_rss_per_conn(home, gw, relays["relay"], VARIANTS["relay"][3]["web"])
    hap_rss = idle_rss_per_conn(home, gw, haproxy, HAPROXY["web"])
    prot_rss = idle_rss_per_conn(
        home, gw, relays["relay-protocol"], VARIANTS["relay-protocol"][3]["web"]
    )
    m = f"RSS per idle relayed connection at {IDLE_CONNS}"
    rows.append(row(m, "KiB", ours_rss, "haproxy", hap_rss, "<= 4 KiB"))
    rows.append(row(m, "KiB", ours_rss, "relay-protocol", prot_rss, "report"))
    fds = sum(len(list(Path(f"/proc/{p}/fd").iterdir())) for p in tree(main_pid(relays["relay"])))
    notes = (
        f"Load average (1 min) {load0:.1f} at the start, {os.getloadavg()[0]:.1f} at the end; "
        "a shared machine gives noisy absolute figures: read the ratios. "
        f"Medians of {ROUNDS} interleaved rounds. Client in home, servers in "
        "seg, middlebox in gw. relay = the default (uvloop, raw sockets: copy, splice(2) for bulk, "
        f"one worker per core: {os.cpu_count()}); relay-1worker = the same in one process; "
        "relay-protocol = asyncio Protocol copy path on uvloop (1 worker); relay-asyncio = "
        "the same on the stock loop; the HTTP path rows are the raw-socket HTTP path that "
        "guests' port 80 takes, kept-alive upstream connections pooled (explicit mode, "
        "absolute-form to nginx, one worker per core), beside "
        "HAProxy in mode http (absolute-form too)."
        f" Relay fds after the idle test: {fds}. "
        f"Raw samples: {json.dumps(samples)}"
    )
    write_report("relay", "Relay vs HAProxy vs kernel forwarding", rows, notes)
    assert all(r["ours"] > 0 for r in rows if r["unit"] != "ms")
