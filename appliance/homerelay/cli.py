"""`home-relay --config PATH`: run the relay until SIGTERM (or SIGINT)."""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
from collections.abc import Sequence
from pathlib import Path

import uvloop

from appliance.core import metrics
from appliance.homerelay import config as relay_config
from appliance.homerelay.server import RelayServer

log = logging.getLogger("appliance.homerelay")


async def serve(cfg: relay_config.RelayConfig, ready: asyncio.Event | None = None) -> None:
    """Serve until SIGTERM or SIGINT; `ready` is set once the port is bound."""
    server = RelayServer(cfg)
    await server.start()
    if cfg.metrics_port:
        metrics.serve_on(cfg.metrics_listen, cfg.metrics_port, "home-relay", server.metric_families)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    if ready is not None:
        ready.set()
    try:
        await stop.wait()
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
        log.info("stopping")
        await server.close()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="home-relay", description="The home relay: households behind NAT link to it."
    )
    parser.add_argument("--config", type=Path, default=relay_config.DEFAULT_PATH)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        cfg = relay_config.load(args.config)
    except relay_config.ConfigError as exc:
        print(f"home-relay: {exc}", file=sys.stderr)
        return 2
    try:
        # uvloop: besides its speed, its TLS read buffer is malloc'ed, not a zero-filled
        # 256 KiB bytearray per connection as asyncio's: an idle household costs a fifth
        uvloop.run(serve(cfg))
    except OSError as exc:  # the port, the certificate, the state directory
        print(f"home-relay: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
