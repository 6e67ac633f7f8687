"""The `homelink` role: the dialer (dialer.py) until SIGTERM.

With no relays in `[home_relay]` (the default) the role is off but stays up doing
nothing, as the admin role does when disabled: under `appliance run` a role that
exits stops the others, and systemd would start it again and again.
"""

from __future__ import annotations

import asyncio
import json
import logging
import signal
from collections.abc import Iterator
from typing import Any

import uvloop
from prometheus_client.core import Metric

from appliance.core import metrics as core_metrics
from appliance.core.config import Config
from appliance.homelink.dialer import Dialer

log = logging.getLogger("appliance.homelink")


async def serve(config: Config) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    # `appliance reload` signals every role; the relays are read at start only
    loop.add_signal_handler(signal.SIGHUP, lambda: log.info("reload: restart to change relays"))
    cfg = config.home_relay
    if not cfg.enabled:
        log.info("home relay off: no [home_relay] relays in %s", config.path)
        core_metrics.serve(config, "homelink")  # up, with the process's own metrics only
        await stop.wait()
        return
    dialer = Dialer(cfg)
    await dialer.start()
    core_metrics.serve(config, "homelink", lambda: metric_families(dialer.stats()))
    try:
        await stop.wait()
    finally:
        await dialer.close()
        log.info("counters: %s", json.dumps(dialer.stats()))


FAILURES = ("busy", "bad_requests", "unreachable", "offline", "limit", "refused", "timeout")


def metric_families(stats: dict[str, Any]) -> Iterator[Metric]:
    """The dialer's counters and each relay link's (labelled by the relay's configured
    name, an admin's word, never a household's)."""
    dialer: dict[str, int] = stats["dialer"]
    yield core_metrics.one_counter(
        "homelink_clients", "Local clients (the proxy) that asked for a stream.", dialer["clients"]
    )
    yield core_metrics.one_counter(
        "homelink_streams", "Streams opened through a home relay.", dialer["streams_opened"]
    )
    yield core_metrics.counter(
        "homelink_stream_failures",
        "Streams asked for and not opened, by reason.",
        ("reason",),
        {(k,): dialer[k] for k in (*FAILURES, "protocol", "errors") if k in dialer},
    )
    links: dict[tuple[str, ...], float] = {}
    for relay, counters in stats["links"].items():
        for event, n in counters.items():
            links[(relay, event)] = n
    yield core_metrics.counter(
        "homelink_link_events",
        "Per relay link: links made (registrations), failures, bad frames, expired streams.",
        ("relay", "event"),
        links,
    )


def main(config: Config) -> int:
    """Role entry point: serve the dialer's socket until SIGTERM (which removes it)."""
    uvloop.run(serve(config))  # as the proxy: the streams' bytes cross it twice
    return 0
