"""DHCP throughput: our server against kea-dhcp4 (memfile) and dnsmasq, with perfdhcp;
and on PostgreSQL (issue #18): our server with `[state] backend = "postgresql"` against
kea-dhcp4 with its PostgreSQL lease backend, both on one throwaway PostgreSQL (fsync on).

    pytest -m bench tests/bench/test_dhcp_bench.py -s
    DHCP_BENCH_PEERS=ours-pg,kea-pg pytest -m bench tests/bench/test_dhcp_bench.py -s

DHCP_BENCH_PEERS picks the servers (default all: ours, kea, ours-pg, kea-pg, dnsmasq);
a row of the artifact needs both of its servers in the run.

Each server in turn serves the same /16 pool on guest0 in the `gw` namespace;
perfdhcp runs in `guest1` as a relay (giaddr), as in the issue:
`perfdhcp -4 -l eth0 -R 60000 -p 5 -r RATE`.  The offered rate is swept step by
step, every server at each step one after the other (a fresh server and lease
file, or PostgreSQL database, per run), so a change in the shared machine's load
hits all of them alike; past the end of the list the rate grows by a quarter each step, until every
server drops at least 5% (or DHCP_BENCH_MAX is reached), so no server's figure is
capped by the sweep.  Kept per server: the highest rate answered with under 1%
drops, with its DISCOVER->OFFER and REQUEST->ACK average delays, and the highest
rate it answered at any step (its capacity; the sustained figure can only be one
of the steps); then an unlimited flood, then a low rate again to see that it
recovers.  Compare only figures of one run.
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict
from pathlib import Path
from types import FrameType

import pytest
from middlebox import cpu_seconds, main_pid, tree
from perfdhcp_report import Run, parse
from postgres_server import USER, PostgresServer

from appliance.lab.topology import Process, Topology
from dhcp.labconfig import write_config

pytestmark = pytest.mark.bench
ROOT = Path(__file__).resolve().parents[2]
ARTIFACT = ROOT / "tests" / "artifacts" / "bench" / "dhcp.json"
SUBNET, GW, RELAY = "10.30.0.0/16", "10.30.0.1", "10.30.0.2"
POOL = ("10.30.1.0", "10.30.255.254")
RATES = [
    int(r)
    for r in os.environ.get(
        "DHCP_BENCH_RATES", "250,500,1000,1500,2000,2500,3000,4000,6000,8000"
    ).split(",")
]
PERIOD = os.environ.get("DHCP_BENCH_PERIOD", "5")
MAX_RATE = int(os.environ.get("DHCP_BENCH_MAX", "100000"))
KNEE = 0.05  # drops that mean "past the knee": this server's sweep ends
KEA_PGSQL_SCHEMA = Path("/usr/share/kea/scripts/pgsql/dhcpdb_create.pgsql")


class Peer:
    name = ""

    def __init__(self, topo: Topology, work: Path):
        self.topo, self.work = topo, work
        self.proc: Process | None = None

    def argv(self) -> list[str]:
        raise NotImplementedError

    def prepare(self) -> None:
        pass

    def ready(self) -> bool:
        return True

    def start(self) -> None:
        shutil.rmtree(self.work, ignore_errors=True)
        self.work.mkdir(parents=True)
        self.prepare()
        self.proc = self.topo["gw"].start(*self.argv(), name=self.name, env=self.env())
        deadline = time.monotonic() + 20
        while not self.ready():
            assert self.proc.alive(), self.proc.output()
            assert time.monotonic() < deadline, f"{self.name} did not start: {self.proc.output()}"
            time.sleep(0.1)
        time.sleep(0.3)

    def env(self) -> dict[str, str]:
        return {}

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.stop()


class FreshDatabase:
    """A new, empty database on the shared PostgreSQL for each run of a peer, dropped
    after it (open sessions and all), as the other peers get a new lease file."""

    def __init__(self, server: PostgresServer, prefix: str):
        self.server, self.prefix = server, prefix
        self.runs = 0
        self.name = ""

    def create(self) -> str:
        self.runs += 1
        self.name = f"{self.prefix}_{self.runs}"
        self.server.psql(f"CREATE DATABASE {self.name}")
        return self.name

    def drop(self) -> None:
        if self.name:
            self.server.psql(f"DROP DATABASE IF EXISTS {self.name} WITH (FORCE)")
            self.name = ""


class Ours(Peer):
    name = "ours"

    def state_dsn(self) -> str:
        return ""

    def prepare(self) -> None:
        self.config = write_config(
            self.work,
            guest_address=f"{GW}/16",
            pool_start=POOL[0],
            pool_end=POOL[1],
            relays=[RELAY],  # perfdhcp acts as a relay: trusted to vouch for chaddr
            state_dsn=self.state_dsn(),
        )

    def argv(self) -> list[str]:
        return [sys.executable, "-m", "appliance", "run", "--config", str(self.config), "dhcp"]

    def ready(self) -> bool:
        return self.proc is not None and "dhcp serving" in self.proc.output()


class OursPg(Ours):
    name = "ours postgresql"

    def __init__(self, topo: Topology, work: Path, pg: PostgresServer):
        super().__init__(topo, work)
        self.db = FreshDatabase(pg, "bench_ours")

    def state_dsn(self) -> str:
        return self.db.server.dsn_for(self.db.create())

    def stop(self) -> None:
        super().stop()
        self.db.drop()


class Kea(Peer):
    name = "kea-dhcp4 memfile"

    def lease_database(self) -> dict[str, object]:
        return {
            "type": "memfile",
            "persist": True,
            "name": str(self.work / "kea-leases4.csv"),
            "lfc-interval": 0,
        }

    def prepare(self) -> None:
        conf = {
            "Dhcp4": {
                "interfaces-config": {"interfaces": [f"guest0/{GW}"]},
                "lease-database": self.lease_database(),
                "valid-lifetime": 3600,
                "renew-timer": 1800,
                "rebind-timer": 3150,
                "subnet4": [
                    {
                        "id": 1,
                        "subnet": SUBNET,
                        "pools": [{"pool": f"{POOL[0]} - {POOL[1]}"}],
                        "option-data": [
                            {"name": "routers", "data": GW},
                            {"name": "domain-name-servers", "data": GW},
                            {"name": "domain-name", "data": "guest.example"},
                        ],
                    }
                ],
                "loggers": [
                    {
                        "name": "kea-dhcp4",
                        "output_options": [{"output": "stdout"}],
                        "severity": "WARN",
                    }
                ],
            }
        }
        (self.work / "kea.json").write_text(json.dumps(conf))

    def env(self) -> dict[str, str]:
        return {"KEA_PIDFILE_DIR": str(self.work), "KEA_LOCKFILE_DIR": str(self.work)}

    def argv(self) -> list[str]:
        return ["kea-dhcp4", "-c", str(self.work / "kea.json")]

    def ready(self) -> bool:
        out = self.topo["gw"].run("ss", "-H", "-uln", check=False).stdout
        return ":67 " in out or "%guest0:67" in out


class KeaPg(Kea):
    """kea-dhcp4 with its PostgreSQL lease backend (built into Debian's Kea 2.2: `-V`
    lists "PostgreSQL backend"), its schema loaded from Kea's own script.  Kea 2.2 runs
    single-threaded unless told otherwise, and so does this peer."""

    name = "kea-dhcp4 postgresql"

    def __init__(self, topo: Topology, work: Path, pg: PostgresServer):
        super().__init__(topo, work)
        self.db = FreshDatabase(pg, "bench_kea")

    def lease_database(self) -> dict[str, object]:
        name = self.db.create()
        pg = self.db.server
        done = subprocess.run(
            ["runuser", "-u", USER, "--", str(pg.bin / "psql"), "-X", "-q",
             "-v", "ON_ERROR_STOP=1", "-h", str(pg.dir), "-d", name,
             "-f", str(KEA_PGSQL_SCHEMA)],
            capture_output=True, text=True, check=False, timeout=60,
        )  # fmt: skip
        assert done.returncode == 0, f"Kea's schema: {done.stdout}{done.stderr}"
        return {"type": "postgresql", "name": name, "host": str(pg.dir), "user": USER}

    def stop(self) -> None:
        super().stop()
        self.db.drop()


class Dnsmasq(Peer):
    name = "dnsmasq"

    def argv(self) -> list[str]:
        return [
            "dnsmasq",
            "-k",
            "--conf-file=/dev/null",
            "--port=0",
            "--interface=guest0",
            "--bind-interfaces",
            f"--dhcp-range={POOL[0]},{POOL[1]},255.255.0.0,1h",
            "--dhcp-lease-max=70000",
            f"--dhcp-leasefile={self.work / 'dnsmasq.leases'}",
            f"--pid-file={self.work / 'dnsmasq.pid'}",
            "--no-ping",
            "--dhcp-authoritative",
            "--user=root",
            "--quiet-dhcp",
        ]

    def ready(self) -> bool:
        return ":67 " in self.topo["gw"].run("ss", "-H", "-uln", check=False).stdout


def _children_cpu() -> float:
    use = resource.getrusage(resource.RUSAGE_CHILDREN)
    return use.ru_utime + use.ru_stime


def perfdhcp(
    topo: Topology, rate: int | None, period: str = PERIOD, server: Process | None = None
) -> Run:
    """One perfdhcp run; with `server`, the CPU shares of both are noted in the Run."""
    cmd = ["perfdhcp", "-4", "-l", "eth0", "-R", "60000", "-p", period]
    if rate:
        cmd += ["-r", str(rate)]
    pids = tree(main_pid(server)) if server is not None else []
    t0, gen0, srv0 = time.monotonic(), _children_cpu(), cpu_seconds(pids)
    out = topo["guest1"].run(*cmd, check=False, timeout=float(period) + 60).stdout
    wall = time.monotonic() - t0
    run = parse(out, float(rate or 0))
    # (perfdhcp is the only child that ends meanwhile: `ip netns exec` execs it)
    run.generator_cpu = (_children_cpu() - gen0) / wall
    if pids:
        run.server_cpu = (cpu_seconds(pids) - srv0) / wall
    return run


def step(topo: Topology, peer: Peer, rate: int) -> Run:
    peer.start()
    try:
        run = perfdhcp(topo, rate, server=peer.proc)
    finally:
        peer.stop()
    print(
        f"  {peer.name:<20} offered {rate:>6}/s achieved {run.achieved:>8.0f}/s "
        f"drops {run.drops * 100:6.2f}%  "
        f"D-O {run.do_delay:7.2f} ms  R-A {run.ra_delay:7.2f} ms  "
        f"CPU perfdhcp {run.generator_cpu:4.2f} server {run.server_cpu:4.2f}",
        flush=True,
    )
    return run


def schedule() -> Iterator[int]:
    """RATES, then a tenth more each step (to the next hundred) up to MAX_RATE: the
    sustained figure is the last step under 1% drops, so the steps near the knee set
    how finely two servers can be told apart (a quarter let 8,000 stand for 8,000-9,999)."""
    yield from RATES
    rate = RATES[-1]
    while (rate := -(-rate * 11 // 1000) * 100) <= MAX_RATE:
        yield rate


def sweep(topo: Topology, peers: list[Peer]) -> dict[str, list[Run]]:
    """Every peer at each rate in turn, until each is past its knee."""
    runs: dict[str, list[Run]] = {p.name: [] for p in peers}
    active = list(peers)
    for rate in schedule():
        for peer in active:
            runs[peer.name].append(step(topo, peer, rate))
        active = [p for p in active if runs[p.name][-1].drops < KNEE]
        if not active:
            break
    for peer in active:
        print(f"  {peer.name:<20} still under {KNEE:.0%} drops at {MAX_RATE}/s", flush=True)
    return runs


def summary(topo: Topology, peer: Peer, runs: list[Run]) -> dict[str, object]:
    if not any(r.drops < 0.01 for r in runs):  # below the sweep: halve down to 25/s
        rate = RATES[0] // 2
        while rate >= 25:
            run = step(topo, peer, rate)
            runs.append(run)
            if run.drops < 0.01:
                break
            rate //= 2
    top = max(runs, key=lambda r: r.achieved)
    good = [r for r in runs if r.drops < 0.01]
    best = max(good, key=lambda r: r.offered) if good else Run(0, 0, 1, float("nan"), float("nan"))
    peer.start()
    try:
        flood = perfdhcp(topo, None)
        after = perfdhcp(topo, 500, "3")
    finally:
        peer.stop()
    print(
        f"  {peer.name:<20} flood: achieved {flood.achieved:.0f}/s, drops {flood.drops * 100:.1f}%;"
        f" then 500/s: drops {after.drops * 100:.2f}%",
        flush=True,
    )
    return {
        "sweep": [asdict(r) for r in runs],
        "sustained": best.offered,
        "achieved": best.achieved,
        "capacity": top.achieved,
        # near 1.0: at its capacity step perfdhcp itself was the limit, not the server
        "capacity_generator_cpu": top.generator_cpu,
        "capacity_server_cpu": top.server_cpu,
        "do_delay": best.do_delay,
        "ra_delay": best.ra_delay,
        "flood": flood.achieved,
        "flood_drops": flood.drops,
        "recovered": after.drops < 0.01,
        "past_knee": any(r.drops >= KNEE for r in runs),
    }


@pytest.fixture(autouse=True)
def _forked_children_exit_quietly() -> Iterator[None]:
    """pyroute2 forks for each namespace socket; the fork must not unwind pytest."""
    main = os.getpid()
    previous = signal.getsignal(signal.SIGTERM)

    def on_term(signum: int, frame: FrameType | None) -> None:
        if os.getpid() != main:
            os._exit(0)
        if callable(previous):
            previous(signum, frame)

    signal.signal(signal.SIGTERM, on_term)
    yield
    signal.signal(signal.SIGTERM, previous)


# DHCP_BENCH_PEERS names -> (peer class, its label in the artifact's rows)
PEERS: dict[str, tuple[type[Peer], str]] = {
    "ours": (Ours, "ours (SQLite)"),
    "kea": (Kea, "kea-dhcp4 memfile"),
    "ours-pg": (OursPg, "ours (PostgreSQL)"),
    "kea-pg": (KeaPg, "kea-dhcp4 PostgreSQL"),
    "dnsmasq": (Dnsmasq, "dnsmasq --no-ping"),
}
SUSTAINED = ("sustained 4-way exchanges/s (<1% drops)", "exchanges/s", "sustained")
CAPACITY = ("highest answered rate at any step (capacity)", "exchanges/s", "capacity")
FLOOD = ("unlimited flood: answered exchanges/s", "exchanges/s", "flood")
# (what is measured, ours, the peer, target): a row is written when both ran
ROWS: list[tuple[tuple[str, str, str], str, str, str]] = [
    (SUSTAINED, "ours", "kea", ">= 1.0x"),  # issue #14
    (SUSTAINED, "ours", "dnsmasq", ">= 10"),
    (("achieved rate at that step", "exchanges/s", "achieved"), "ours", "kea", ""),
    (CAPACITY, "ours", "kea", ""),
    (
        (
            "perfdhcp's CPU share (of a core) at the capacity step",
            "cores",
            "capacity_generator_cpu",
        ),
        "ours",
        "kea",
        "",
    ),
    (
        ("the server's CPU share at the capacity step", "cores", "capacity_server_cpu"),
        "ours",
        "kea",
        "",
    ),
    (("DISCOVER->OFFER avg delay at sustained rate", "ms", "do_delay"), "ours", "kea", ""),
    (("REQUEST->ACK avg delay at sustained rate", "ms", "ra_delay"), "ours", "kea", ""),
    (FLOOD, "ours", "kea", ""),
    # issue #18: on PostgreSQL against Kea on PostgreSQL, our SQLite figure beside it
    (SUSTAINED, "ours-pg", "kea-pg", ">= 1.0x"),
    (SUSTAINED, "ours", "kea-pg", ""),
    (CAPACITY, "ours-pg", "kea-pg", ""),
    (("REQUEST->ACK avg delay at sustained rate", "ms", "ra_delay"), "ours-pg", "kea-pg", ""),
    (FLOOD, "ours-pg", "kea-pg", ""),
]


def chosen() -> list[str]:
    """The peers DHCP_BENCH_PEERS names (comma-separated), in PEERS order; default all."""
    raw = os.environ.get("DHCP_BENCH_PEERS", "")
    names = {n.strip() for n in raw.split(",") if n.strip()} or set(PEERS)
    unknown = names - set(PEERS)
    assert not unknown, f"DHCP_BENCH_PEERS: unknown {sorted(unknown)}; known: {list(PEERS)}"
    return [n for n in PEERS if n in names]


def test_dhcp_throughput_against_kea_and_dnsmasq(
    make_topology: Callable[..., Topology], tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    names = chosen()
    topo = make_topology(guests=1)
    topo["gw"].run("ip", "addr", "add", f"{GW}/16", "dev", "guest0")
    topo["guest1"].run("ip", "addr", "add", f"{RELAY}/16", "dev", "eth0")
    peers: dict[str, Peer] = {}
    for key in names:
        cls = PEERS[key][0]
        work = tmp_path / key
        if cls in (OursPg, KeaPg):  # one PostgreSQL for both: the same settings (fsync on)
            pg: PostgresServer = request.getfixturevalue("postgres_server")
            peers[key] = cls(topo, work, pg)  # type: ignore[call-arg]
        else:
            peers[key] = cls(topo, work)
    print(f"\nsweep ({', '.join(names)}):", flush=True)
    runs = sweep(topo, list(peers.values()))
    results: dict[str, dict[str, object]] = {}
    for key, peer in peers.items():
        print(f"\n{peer.name}:", flush=True)
        results[key] = summary(topo, peer, runs[peer.name])

    def ratio(a: object, b: object) -> float:
        return float(a) / float(b) if float(b) else float("inf")  # type: ignore[arg-type]

    table = []
    for (metric, unit, field), ours_key, peer_key, target in ROWS:
        if ours_key not in results or peer_key not in results:
            continue
        ours, peer = results[ours_key], results[peer_key]
        table.append(
            {
                "metric": f"{metric}, {PEERS[ours_key][1]}",
                "unit": unit,
                "ours": float(ours[field]),  # type: ignore[arg-type]
                "peer": PEERS[peer_key][1],
                "peer_value": float(peer[field]),  # type: ignore[arg-type]
                "ratio": round(ratio(ours[field], peer[field]), 3),
                "target": target,
            }
        )
    print("\n| metric | unit | ours | peer | peer value | ratio | target |")
    print("|---|---|---|---|---|---|---|")
    for r in table:
        print(
            f"| {r['metric']} | {r['unit']} | {r['ours']:.2f} | {r['peer']} | "
            f"{r['peer_value']:.2f} | {r['ratio']} | {r['target']} |"
        )
    print("\n| server | sustained | achieved | capacity | flood | R-A ms | recovered |")
    print("|---|---|---|---|---|---|---|")
    for key, res in results.items():
        print(
            f"| {PEERS[key][1]} | {res['sustained']:.0f} | {res['achieved']:.0f} | "
            f"{res['capacity']:.0f} | {res['flood']:.0f} | {res['ra_delay']:.2f} | "
            f"{res['recovered']} |"
        )
    recovered = ", ".join(f"{PEERS[k][1]} {r['recovered']}" for k, r in results.items())
    ARTIFACT.parent.mkdir(parents=True, exist_ok=True)
    ARTIFACT.write_text(
        json.dumps(
            {
                "title": "DHCP: perfdhcp 4-way exchanges, ours vs kea-dhcp4 (memfile and "
                "PostgreSQL) and dnsmasq",
                "rows": table,
                "notes": (
                    f"servers in this run: {', '.join(PEERS[k][1] for k in names)}. "
                    f"perfdhcp -4 -l eth0 -R 60000 -p {PERIOD} -r RATE as a relay in a guest "
                    f"namespace; rates {RATES}, then +10% a step until every server drops "
                    f">= {KNEE:.0%} (max {MAX_RATE}/s), the servers in turn at each step; "
                    "fresh server and lease store (file, or PostgreSQL database) per run; "
                    "both PostgreSQL servers on one PostgreSQL 15 on a unix socket, fsync on, "
                    "kea-dhcp4 2.2 single-threaded (its default); "
                    "2-core machine shared with other work: noisy, compare within one run. "
                    f"recovered after flood: {recovered}. Raw sweeps: {json.dumps(results)}"
                ),
            },
            indent=2,
        )
    )
    for key in ("ours", "ours-pg"):
        if key in results:
            assert float(results[key]["sustained"]) > 0, key  # type: ignore[arg-type]
            assert results[key]["recovered"], key
    # a ratio against a peer the sweep never pushed past its knee would be a floor only
    for key in ("ours", "kea", "ours-pg", "kea-pg"):
        if key in results:
            assert results[key]["past_knee"], f"{key}: raise DHCP_BENCH_MAX"
