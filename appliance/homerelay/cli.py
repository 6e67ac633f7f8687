"""`home-relay --config PATH`: run the relay until SIGTERM (or SIGINT).

`home-relay --config PATH names` lists the claimed household names;
`home-relay --config PATH release NAME` frees one whose household lost the key it
claimed it with (and the kept identity a renewal would prove it by), so that its
next registration claims it anew.  Only while no relay holds the household's link:
whoever holds the key now would otherwise keep it.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import logging
import signal
import sys
from collections.abc import Sequence
from pathlib import Path

import uvloop

from appliance.core import metrics
from appliance.homelink.frames import HOUSEHOLD_RE
from appliance.homerelay import config as relay_config
from appliance.homerelay.server import RelayServer
from appliance.state.households import Households

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
    commands = parser.add_subparsers(dest="command", metavar="[names | release NAME]")
    commands.add_parser("names", help="list the claimed household names")
    release = commands.add_parser("release", help="free a name whose household lost its key")
    release.add_argument("name")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        cfg = relay_config.load(args.config)
    except relay_config.ConfigError as exc:
        print(f"home-relay: {exc}", file=sys.stderr)
        return 2
    if args.command is not None:
        return _names(cfg, args.command, getattr(args, "name", ""))
    try:
        # uvloop: besides its speed, its TLS read buffer is malloc'ed, not a zero-filled
        # 256 KiB bytearray per connection as asyncio's: an idle household costs a fifth
        uvloop.run(serve(cfg))
    except OSError as exc:  # the port, the certificate, the state directory
        print(f"home-relay: {exc}", file=sys.stderr)
        return 1
    return 0


def _when(t: float) -> str:
    return dt.datetime.fromtimestamp(t, dt.UTC).strftime("%Y-%m-%d %H:%M:%SZ")


def _names(cfg: relay_config.RelayConfig, command: str, name: str) -> int:
    """The operator's commands on the claims (the running relay asks the store at each
    registration, so a release holds at once)."""
    try:
        store = Households.open(cfg.state)
    except Exception as exc:  # (sqlite3 and psycopg errors share no base but this)
        print(f"home-relay: the state store: {exc}", file=sys.stderr)
        return 1
    try:
        if command == "names":
            for c in sorted(store.load(), key=lambda c: c.name):
                where = f"linked at {c.relay}" if c.relay else "offline"
                seen = f"last seen {_when(c.last_seen)}"
                print(f"{c.name}\t{c.key}\tclaimed {_when(c.claimed_at)}\t{seen}\t{where}")
            return 0
        if not HOUSEHOLD_RE.fullmatch(name):
            print(f"home-relay: {name!r} is not a household name", file=sys.stderr)
            return 2
        claim = store.claimed(name)
        if claim is None:
            print(f"home-relay: no household {name} is claimed here", file=sys.stderr)
            return 1
        if claim.relay or not store.release(name):
            print(
                f"home-relay: {name} is linked now (at {claim.relay or 'a relay'}): the key "
                "it was claimed with is in use; stop that agent, then release the name",
                file=sys.stderr,
            )
            return 1
        print(f"released {name} (it was claimed by {claim.key} on {_when(claim.claimed_at)})")
        return 0
    finally:
        store.conn.close()


if __name__ == "__main__":
    sys.exit(main())
