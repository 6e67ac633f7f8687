"""The `net` role: guest interface and ruleset up, follow leases and sessions, closed on stop.

`up`/`close`/`down` are also what `appliance net up|close|down`, the unit's
ExecStartPre=/ExecStopPost= and the supervisor call, so the guest side is closed
before any guest-facing role listens, and stays closed (drop everything) when the
role stops or dies while the others still run.  Only `down` removes the table.
"""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Mapping

from prometheus_client.core import Metric

from appliance.core import metrics
from appliance.core.config import Config
from appliance.net import follower, interface, nft, setup, tables
from appliance.state import grants, schema, store
from appliance.state.connection import STORE_ERRORS

log = logging.getLogger("appliance.net")


def up(config: Config, intercepts: Mapping[int, int] | None = None) -> None:
    """Interface up (idempotent), uplink checked, ruleset replaced atomically."""
    interface.guest_up(config)
    try:
        interface.check_uplink(config)
    except interface.InterfaceError as exc:
        log.warning("%s", exc)
    if intercepts is None:
        intercepts = tables.intercepts(config)
    setup.apply(config, intercepts)
    follower.load(config)  # guests with a lease keep working across a restart
    log.info(
        "guest side closed on %s; intercepting %s",
        config.interfaces.guest,
        ", ".join(f"{p}->{lp}" for p, lp in sorted(intercepts.items())) or "nothing",
    )


def _no_receipts(config: Config) -> None:
    """Nobody confirmed: a login waits for the net role again (after the kernel change,
    so a failing store never keeps the guest side open)."""
    try:
        conn = store.open_store(config.state)
        try:
            schema.upgrade(conn)
            grants.clear(conn)
        finally:
            conn.close()
    except STORE_ERRORS as exc:
        log.error("could not clear the firewall receipts in the store: %s", exc)


def close(config: Config) -> None:
    """The drop-everything table in place of the ruleset; no login is confirmed any more."""
    setup.close(config)
    _no_receipts(config)
    log.info(
        "guest side shut on %s: nothing in or out without the net role", config.interfaces.guest
    )


def down(config: Config) -> None:
    """Remove the table altogether: the guest side is then unfiltered (an admin's choice)."""
    setup.remove(config)
    _no_receipts(config)
    log.info("nftables table inet appliance removed")


def _nft_families() -> list[Metric]:
    """The ruleset's named counters (guest_dropped, guest_spoofed, ...), read with
    `nft -j` at scrape time: the kernel counts, the role does nothing per packet."""
    try:
        found = nft.counters()
    except (OSError, ValueError, nft.NftError) as exc:
        log.warning("nftables counters for the metrics: %s", exc)
        found = {}
    return [
        metrics.counter(
            "net_guest_packets_total",
            "Guest-side packets the ruleset dropped, refused or capped, by counter",
            ["counter"],
            {(name,): float(p) for name, (p, _b) in found.items()},
        ),
        metrics.counter(
            "net_guest_bytes_total",
            "Bytes of those packets, by counter",
            ["counter"],
            {(name,): float(b) for name, (_p, b) in found.items()},
        ),
    ]


def main(config: Config, intercepts: Mapping[int, int] | None = None) -> int:
    """Serve until SIGTERM: rules in place, leases and sessions followed; closed on stop."""
    stop = threading.Event()

    def on_signal(signum: int, _frame: object) -> None:
        if signum == signal.SIGHUP:
            up(config, intercepts)  # re-apply with the current tables; sets are kept
            return
        stop.set()

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, on_signal)
    up(config, intercepts)
    metrics.serve(config, "net", _nft_families)  # up, with the ruleset's drop counters
    try:
        follower.run(config, stop)
    finally:
        close(config)
    return 0
