"""`home-relay --config PATH`: run the relay until SIGTERM (or SIGINT).

`home-relay --config PATH names` lists the claimed household names;
`home-relay --config PATH release NAME --to FINGERPRINT` gives one whose household
lost the key it claimed it with (and the kept identity a renewal would prove it
by) to its new agent's key (`personal-agent fingerprint`); without `--to` the name
is freed, for whichever key registers it first.  Only while no relay holds the
household's link: whoever holds the old key now would otherwise keep it.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import logging
import os
import signal
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import uvloop

from appliance.core import metrics
from appliance.core.agent_protocol import parse_fingerprint
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
    release.add_argument("--to", default="", help="the new agent's certificate fingerprint")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        cfg = relay_config.load(args.config)
    except relay_config.ConfigError as exc:
        print(f"home-relay: {exc}", file=sys.stderr)
        return 2
    if args.command is not None:
        return _names(cfg, args.command, getattr(args, "name", ""), getattr(args, "to", ""))
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


def _names(cfg: relay_config.RelayConfig, command: str, name: str, to: str) -> int:
    """The operator's commands on the claims (the running relay asks the store at each
    registration, so a release holds at once)."""
    if command == "release" and not HOUSEHOLD_RE.fullmatch(name):
        print(f"home-relay: {name!r} is not a household name", file=sys.stderr)
        return 2
    try:
        key = parse_fingerprint(to) if to else ""
    except ValueError:
        print(f"home-relay: --to {to!r} is not a certificate fingerprint", file=sys.stderr)
        return 2
    try:
        refusal = _as_store_owner(cfg)
    except FileNotFoundError:
        refusal = f"no households store at {cfg.state.database}"
    if refusal is None and not cfg.state.made:  # (the relay makes it, owner and mode)
        refusal = f"no households store at {cfg.state.database}"
    if refusal is not None:
        print(f"home-relay: {refusal}", file=sys.stderr)
        return 1
    try:
        store = Households.open(cfg.state)
        try:
            return _on_store(store, command, name, key)
        finally:
            store.conn.close()
    except Exception as exc:  # (sqlite3 and psycopg errors share no base but this)
        print(f"home-relay: the households store: {exc}", file=sys.stderr)
        return 1


def _as_store_owner(cfg: relay_config.RelayConfig) -> str | None:
    """Work on a SQLite store as the user that owns it (the relay's, `User=` in its
    unit): root's SQLite would leave root-owned -wal and -shm files beside it, which
    the relay could then not open.  Root becomes that user; anyone else must be it."""
    if cfg.state.backend != "sqlite":
        return None
    owner = cfg.state.directory.stat()
    if os.geteuid() == owner.st_uid:
        return None
    if os.geteuid() != 0:
        return f"run this as the owner of {cfg.state.directory} (uid {owner.st_uid})"
    os.setgroups([])
    os.setgid(owner.st_gid)
    os.setuid(owner.st_uid)
    return None


def _on_store(store: Households, command: str, name: str, key: str) -> int:
    if command == "names":
        for c in sorted(store.load(), key=lambda c: c.name):
            where = f"linked at {c.relay}" if c.relay else "offline"
            seen = f"last seen {_when(c.last_seen)}"
            print(f"{c.name}\t{c.key}\tclaimed {_when(c.claimed_at)}\t{seen}\t{where}")
        return 0
    claim = store.claimed(name)
    if claim is None and not key:
        print(f"home-relay: no household {name} is claimed here", file=sys.stderr)
        return 1
    linked = claim is not None and claim.relay
    if linked or not (store.give(name, key, time.time()) if key else store.release(name)):
        where = f"at {claim.relay}" if claim is not None and claim.relay else "meanwhile"
        print(
            f"home-relay: {name} is linked now ({where}): the key it was claimed with is "
            "in use; stop that agent, then release the name",
            file=sys.stderr,
        )
        return 1
    was = f" (it was claimed by {claim.key} on {_when(claim.claimed_at)})" if claim else ""
    print(f"gave {name} to {key}{was}" if key else f"released {name}{was}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
