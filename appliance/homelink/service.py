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
        await stop.wait()
        return
    dialer = Dialer(cfg)
    await dialer.start()
    try:
        await stop.wait()
    finally:
        await dialer.close()
        log.info("counters: %s", json.dumps(dialer.stats()))


def main(config: Config) -> int:
    """Role entry point: serve the dialer's socket until SIGTERM (which removes it)."""
    asyncio.run(serve(config))
    return 0
