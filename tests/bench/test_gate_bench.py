"""The gate's cost per new connection: PolicyGate.admit over the real SessionStore and Policy.

What the relay pays before it connects upstream, measured in-process (no network):
the session lookup (two SQLite queries and a JSON decode), the MAC read from
/proc/net/arp, the access decision and the upstream list.  The peer is the same
gate with its per-address cache disabled (CACHE_TTL = 0: every connection asks
the store), in the same run.  A shared, loaded machine: read the ratio.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import pytest

from appliance.core.config import load
from appliance.core.neighbours import neighbour_mac
from appliance.policy import Policy
from appliance.proxy.gate import Admission, PolicyGate
from appliance.state import leases, store
from appliance.state.sessions import SessionStore

pytestmark = pytest.mark.bench
ROOT = Path(__file__).resolve().parents[2]
N = 20000


def per_admit_us(gate: PolicyGate, ips: list[str]) -> float:
    best = float("inf")
    for _ in range(3):
        t0 = time.perf_counter()
        for i in range(N):
            gate.admit(ips[i % len(ips)], "smtp")
        best = min(best, (time.perf_counter() - t0) / N * 1e6)
    return best


def test_gate_admit_cost_with_and_without_the_session_cache(tmp_path: Path) -> None:
    for name in ("appliance.toml", "servers.toml", "access.toml"):
        shutil.copy(ROOT / "policies" / name, tmp_path / name)
    cfg = tmp_path / "appliance.toml"
    cfg.write_text(cfg.read_text().replace("/var/lib/appliance", str(tmp_path / "state")))
    config = load(cfg)
    st = SessionStore(store.connect(config.state.database))
    now = time.time()
    ips = [f"192.168.1.{100 + n}" for n in range(64)]  # 64 guests, like wrk -c64
    for n, ip in enumerate(ips):
        mac = f"02:47:00:00:01:{n:02x}"
        leases.record(st.conn, "granted", leases.Lease(ip, mac, now + 3600), now - 1)
        st.create(user=f"u{n}", source="site", attributes={"role": "staff"}, ip=ip, mac=mac)
    policy = Policy.load(config)
    macs = {s.ip: s.mac for s in st.list()}

    def neighbour(ip: str) -> str | None:  # the read the appliance pays, the bench's MACs
        neighbour_mac(config.interfaces.guest, ip)
        return macs.get(ip)

    cached = PolicyGate(config, policy, st, neighbour=neighbour)
    uncached = PolicyGate(config, policy, st, neighbour=neighbour)
    uncached.CACHE_TTL = 0.0
    assert isinstance(cached.admit(ips[0], "smtp"), Admission)
    ours, peer = per_admit_us(cached, ips), per_admit_us(uncached, ips)
    row = {
        "metric": "PolicyGate.admit per new connection (64 guests)",
        "unit": "us",
        "ours": ours,
        "peer": "same gate, no cache (store asked every time)",
        "peer_value": peer,
        "ratio": ours / peer,
        "target": "report",
    }
    notes = (
        f"best of 3 x {N} admits, in-process; SQLite store in WAL mode on local disk; "
        "shared loaded 2-core machine."
    )
    out = ROOT / "tests" / "artifacts" / "bench"
    out.mkdir(parents=True, exist_ok=True)
    report = {"title": "Relay gate cost", "rows": [row], "notes": notes}
    (out / "relay_gate.json").write_text(json.dumps(report, indent=1))
    print(f"\nadmit: {ours:.2f} us cached, {peer:.2f} us uncached (ratio {ours / peer:.3f})")
    assert ours < peer
