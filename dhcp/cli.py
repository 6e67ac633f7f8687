"""`appliance leases`: the current leases from the shared store (table or JSON).

Reads the store read-only, so it works while the dhcp role runs; `--stats` adds the
running server's counters (replies sent, drops per reason) from its stats file.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

from appliance.core.config import load
from appliance.state import leases, store


def _cmd_leases(args: argparse.Namespace) -> int:
    config = load(args.config)
    now = time.time()
    rows: list[leases.Lease] = []
    if config.state.made:
        conn = store.open_store(config.state, readonly=True)
        try:
            rows = leases.all_leases(conn)
        finally:
            conn.close()
    if not args.all:
        rows = [r for r in rows if r.state == "bound" and r.expires > now]
    stats = None
    stats_path = config.state.directory / "dhcp-stats.json"
    if args.stats and stats_path.exists():
        stats = json.loads(stats_path.read_text())
    if args.json:
        doc: dict[str, object] = {
            "leases": [
                {
                    "ip": r.ip,
                    "mac": r.mac,
                    "state": r.state,
                    "expires": r.expires,
                    "remaining": max(0, round(r.expires - now)),
                    "hostname": r.hostname,
                    "client_id": r.client_id.hex() if r.client_id else None,
                }
                for r in rows
            ]
        }
        if args.stats:
            doc["stats"] = stats
        json.dump(doc, sys.stdout, indent=2)
        print()
        return 0
    print(f"{'IP':<16} {'MAC':<18} {'STATE':<9} {'REMAINING':>9}  HOSTNAME")
    for r in rows:
        left = max(0, int(r.expires - now))
        print(f"{r.ip:<16} {r.mac:<18} {r.state:<9} {left:>8}s  {r.hostname or '-'}")
    print(f"{len(rows)} lease(s)")
    if args.stats:
        if stats is None:
            print("no stats file (is the dhcp role running?)")
        else:
            print("counts: " + ", ".join(f"{k}={v}" for k, v in sorted(stats["counts"].items())))
            print("drops:  " + ", ".join(f"{k}={v}" for k, v in sorted(stats["drops"].items())))
    return 0


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    from appliance.core.config import add_config_arg

    p = sub.add_parser("leases", help="list current DHCP leases")
    add_config_arg(p)
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("--all", action="store_true", help="also released, expired, declined")
    p.add_argument("--stats", action="store_true", help="the running server's counters")
    p.set_defaults(func=_cmd_leases)
