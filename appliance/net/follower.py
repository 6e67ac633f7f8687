"""Keep the `leased` set equal to the bound DHCP leases, by following the lease events.

Anti-spoofing needs to know which (IP, MAC) pairs DHCP handed out.  The DHCP role
writes every lease change and an event row in one transaction; this loop tails the
events by id and applies them to nftables in batches (one `nft` transaction per
poll, however many events arrived).  On start it loads the whole lease table, so a
restart never leaves a stale set.  When a lease ends its pair also leaves
`authenticated`: a session never outlives the address it was bound to.
"""

from __future__ import annotations

import logging
import sqlite3
import threading
import time
from collections.abc import Callable

from appliance.core.config import Config
from appliance.net import nft
from appliance.net.setup import check_pair
from appliance.state import store
from dhcp import leases

log = logging.getLogger("appliance.net.follower")

ADD_KINDS = ("granted", "renewed")
POLL = 0.05
RESYNC = 30.0  # expiries are written lazily; a periodic full load catches them anyway


def _script(
    adds: set[tuple[str, str]], dels: set[tuple[str, str]], ended: set[tuple[str, str]]
) -> str:
    lines = []
    table = f"inet {nft.TABLE}"
    for name, pairs in (("leased", dels), ("authenticated", ended)):
        if pairs:
            text = nft.elements_text(pairs)
            lines.append(f"add element {table} {name} {{ {text} }}")
            lines.append(f"delete element {table} {name} {{ {text} }}")
    if adds:
        lines.append(f"add element {table} leased {{ {nft.elements_text(adds)} }}")
    return "\n".join(lines) + "\n"


def full_sync(
    conn: sqlite3.Connection, now: float, execute: Callable[[str], None] = nft.run
) -> int:
    """Make `leased` exactly the bound leases; returns the last event id it covers."""
    conn.execute("BEGIN")  # one snapshot: the id and the leases agree
    try:
        row = conn.execute("SELECT COALESCE(MAX(id), 0) FROM lease_events").fetchone()
        last = int(row[0])
        rows = leases.all_leases(conn)
    finally:
        conn.execute("COMMIT")
    bound = set()
    for lease in rows:
        if lease.state == "bound" and lease.expires > now:
            try:
                bound.add(check_pair(lease.ip, lease.mac))
            except ValueError:  # never let one odd row take the guest side's rules down
                log.warning("ignoring a lease with a bad address: %r %r", lease.ip, lease.mac)
    script = f"flush set inet {nft.TABLE} leased\n"
    if bound:
        script += f"add element inet {nft.TABLE} leased {{ {nft.elements_text(bound)} }}\n"
    execute(script)
    log.info("leased set loaded: %d bound leases (events up to %d)", len(bound), last)
    return last


def load(config: Config) -> int:
    """One full load of the leased set from the store (before the roles start)."""
    conn = store.connect(config.state.database)
    try:
        leases.create_schema(conn)
        return full_sync(conn, time.time())
    finally:
        conn.close()


def apply_events(events: list[leases.LeaseEvent], execute: Callable[[str], None] = nft.run) -> None:
    """Fold a batch of events into one transaction: for `leased` the last event of a pair
    wins; any end of a binding in the batch takes the pair out of `authenticated`, even
    when the same guest is granted again at once (it must log in again)."""
    final: dict[tuple[str, str], bool] = {}
    ended: set[tuple[str, str]] = set()
    for ev in events:
        try:
            pair = check_pair(ev.ip, ev.mac)
        except ValueError:
            log.warning("ignoring lease event %d with a bad address: %r %r", ev.id, ev.ip, ev.mac)
            continue
        final[pair] = ev.kind in ADD_KINDS
        if not final[pair]:
            ended.add(pair)
    adds = {p for p, on in final.items() if on}
    dels = {p for p, on in final.items() if not on}
    if adds or dels or ended:
        execute(_script(adds, dels, ended))


def run(config: Config, stop: threading.Event, poll: float = POLL) -> None:
    """Follow the lease events until `stop` is set (the `net` role runs this)."""
    conn = store.connect(config.state.database)
    leases.create_schema(conn)
    lib = nft.runner()  # in-process libnftables when present: no fork per batch
    execute = lib.run if lib is not None else nft.run
    last = full_sync(conn, time.time(), execute)
    next_sync = time.monotonic() + RESYNC
    while not stop.is_set():
        try:
            if time.monotonic() >= next_sync:
                last = full_sync(conn, time.time(), execute)
                next_sync = time.monotonic() + RESYNC
            events = leases.events_since(conn, last)
            if events:
                apply_events(events, execute)
                last = events[-1].id
                log.debug("applied %d lease events (up to %d)", len(events), last)
                if len(events) >= 1000:
                    continue
        except (sqlite3.Error, nft.NftError) as exc:
            log.error("lease follower: %s (retrying)", exc)
            stop.wait(1.0)
        except Exception:  # fail closed: the rules stay, the follower keeps going
            log.exception("lease follower: unexpected error (retrying)")
            stop.wait(1.0)
        stop.wait(poll)
    conn.close()  # the nft runner is shared by the process and stays open
