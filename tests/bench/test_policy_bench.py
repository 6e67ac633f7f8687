"""Benchmark: access decisions per second with 10,000 rules, against a naive linear scan.

The table is realistic in shape: most rules match a department (equality), some a
group (set membership) and some an e-mail glob; users are drawn from 2,000 distinct
attribute sets.  Three figures, all measured in this run on the same table:

- ours, steady state: what the proxy pays per connection once a user's attribute set
  has been seen (the memoised per-user decision table: one dict lookup);
- ours, first decision for an attribute set (memo cleared before each one: the index
  walk over the candidate rules);
- the peer: a naive linear scan of all 10,000 rules for every decision.

The machine is shared (2 cores, several engineers): figures are noisy.
"""

from __future__ import annotations

import json
import os
import random
import time
from pathlib import Path

import pytest

from appliance.core.tomlfile import TomlFile
from appliance.policy.access_rights import AccessTable, parse_access

pytestmark = pytest.mark.bench
ARTIFACTS = Path(__file__).resolve().parents[1] / "artifacts" / "bench"
SERVICES = ("smtp", "pop3", "http", "imap", "nntp")
RULES = 10_000


def table_text(n: int, rng: random.Random) -> str:
    parts = []
    for i in range(n):
        allow = rng.sample(SERVICES, rng.randint(1, 3))
        deny = [s for s in SERVICES if s not in allow and rng.random() < 0.2]
        kind = i % 100
        if kind < 90:
            match = f'department = "dept-{i}"'
            if i % 3 == 0:
                match += f', title = "title-{i % 7}"'
        elif kind < 99:
            match = f'groups = ["grp-{i}", "grp-{i + 1}"]'
        else:
            match = f'email = "*@site-{i}.example"'
        parts.append(
            f'[[rules]]\nname = "r{i}"\nmatch = {{ {match} }}\n'
            f"allow = {json.dumps(allow)}\ndeny = {json.dumps(deny)}\n"
        )
    return "\n".join(parts)


def users(n: int, rng: random.Random) -> list[dict[str, str | tuple[str, ...]]]:
    out: list[dict[str, str | tuple[str, ...]]] = []
    for _ in range(n):
        i = rng.randrange(RULES + 2000)  # some match no rule at all
        out.append(
            {
                "department": f"dept-{i}",
                "title": f"title-{rng.randrange(7)}",
                "groups": (f"grp-{rng.randrange(RULES)}", f"grp-{rng.randrange(RULES)}"),
                "email": f"u{i}@site-{rng.randrange(RULES)}.example",
            }
        )
    return out


def per_decision(fn, calls: list[tuple[dict[str, str | tuple[str, ...]], str]]) -> float:  # type: ignore[no-untyped-def]
    start = time.perf_counter()
    for attrs, svc in calls:
        fn(attrs, svc)
    return (time.perf_counter() - start) / len(calls)


def test_policy_decisions_with_10000_rules() -> None:
    rng = random.Random(6)
    text = table_text(RULES, rng)
    t0 = time.perf_counter()
    table: AccessTable = parse_access(TomlFile.parse(text, "bench.toml"), SERVICES)
    load_s = time.perf_counter() - t0
    population = users(2000, rng)
    calls = [(rng.choice(population), rng.choice(SERVICES)) for _ in range(200_000)]

    # correctness first: every way agrees on a sample
    for attrs, svc in calls[:300]:
        assert table.decide(attrs, svc) == table.naive_decide(attrs, svc)

    per_decision(table.decide, calls[:20_000])  # warm every attribute set
    # interleaved rounds, best of each: the machine is shared, so both sides see the
    # same moments of load as far as possible
    hots, colds, naives = [], [], []
    for r in range(5):
        hots.append(per_decision(table.decide, calls[r * 40_000 : (r + 1) * 40_000]))
        start = time.perf_counter()
        cold_calls = calls[r * 600 : (r + 1) * 600]
        for attrs, svc in cold_calls:
            table._memo.clear()
            table.decide(attrs, svc)
        colds.append((time.perf_counter() - start) / len(cold_calls))
        naives.append(per_decision(table.naive_decide, calls[r * 60 : (r + 1) * 60]))
    hot, cold, naive = min(hots), min(colds), min(naives)
    allowed = sum(table.decide(a, s).allowed for a, s in calls[:20_000]) / 20_000

    rows = [
        {
            "metric": "decision, steady state (10,000 rules)",
            "unit": "µs",
            "ours": round(hot * 1e6, 3),
            "peer": "naive linear scan",
            "peer_value": round(naive * 1e6, 1),
            "ratio": round(naive / hot, 1),
            "target": "< 5 µs",
        },
        {
            "metric": "decision, first for an attribute set",
            "unit": "µs",
            "ours": round(cold * 1e6, 2),
            "peer": "naive linear scan",
            "peer_value": round(naive * 1e6, 1),
            "ratio": round(naive / cold, 1),
            "target": "-",
        },
        {
            "metric": "decisions per second, steady state",
            "unit": "1/s",
            "ours": round(1 / hot),
            "peer": "naive linear scan",
            "peer_value": round(1 / naive),
            "ratio": round(naive / hot, 1),
            "target": "> 200,000",
        },
    ]
    notes = (
        f"{RULES} rules (90% department equality, 9% group sets, 1% e-mail globs), "
        f"2,000 distinct users, {len(calls)} decisions, {allowed:.0%} allowed; table "
        f"parse+compile {load_s:.2f} s. Shared 2-core machine (load "
        f"{os.getloadavg()[0]:.1f}): noisy figures; best of 5 interleaved rounds."
    )
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    (ARTIFACTS / "policy.json").write_text(
        json.dumps({"title": "Access decisions", "rows": rows, "notes": notes}, indent=2)
    )
    print()
    print(f"{'metric':<42} {'ours':>10} {'peer':>12} {'ratio':>8}  target")
    for r in rows:
        m, ours, peer, ratio = r["metric"], r["ours"], r["peer_value"], r["ratio"]
        print(f"{m:<42} {ours:>10} {peer:>12} {ratio:>7}x  {r['target']}")
    print(notes)
    assert naive / hot > 100
    load = os.getloadavg()[0] / (os.cpu_count() or 1)
    if load > 1.5:
        print(f"target not checked: load {load:.1f} per core (others are running)")
    else:
        assert hot < 5e-6, f"{hot * 1e6:.2f} µs per decision"
