"""The `net` role: guest interface and ruleset up, follow the leases, ruleset off on stop.

`up`/`down` are also what `appliance net up|down` and the supervisor call, so the
guest side is closed before any guest-facing role listens and is left clean on stop.
"""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Mapping

from appliance.core.config import Config
from appliance.net import follower, interface, setup, tables

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


def down(config: Config) -> None:
    setup.remove(config)
    log.info("nftables table inet appliance removed")


def main(config: Config, intercepts: Mapping[int, int] | None = None) -> int:
    """Serve until SIGTERM: rules in place, leases followed; on stop the table goes."""
    stop = threading.Event()

    def on_signal(signum: int, _frame: object) -> None:
        if signum == signal.SIGHUP:
            up(config, intercepts)  # re-apply with the current tables; sets are kept
            return
        stop.set()

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, on_signal)
    up(config, intercepts)
    try:
        follower.run(config, stop)
    finally:
        down(config)
    return 0
