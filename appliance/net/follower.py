"""Keep `leased` equal to the bound DHCP leases and `authenticated` equal to the sessions.

Anti-spoofing needs to know which (IP, MAC) pairs DHCP handed out.  The DHCP role
writes every lease change and an event row in one transaction; this loop tails the
events by id and applies them to nftables in batches (one `nft` transaction per
poll, however many events arrived).  On start it loads the whole lease table, so a
restart never leaves a stale set.  When a lease ends its pair also leaves
`authenticated`: a session never outlives the address it was bound to.

`authenticated` is rebuilt from the active sessions at start and whenever the store
changes (`store.data_version`, a cheap read, tells when another process committed):
logins and logouts reach the kernel through here, and a restart of the net role
keeps every guest that is online online (see `members`).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from functools import partial

from appliance.core.config import Config
from appliance.net import members, nft
from appliance.net.setup import check_pair
from appliance.state import grants, leases, schema, store
from appliance.state.connection import STORE_ERRORS, Connection
from appliance.state.follow import BATCH, Cursor

log = logging.getLogger("appliance.net.follower")

POLL = 0.02  # one PRAGMA per poll; the event queries run only after a change
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
    conn: Connection, now: float, execute: Callable[[str], None], key: bytes
) -> tuple[int, set[members.Pair], float | None]:
    """Make `leased` exactly the bound leases and `authenticated` exactly the sessions that
    hold, in one transaction; returns the last event id it covers, the pairs it put into
    `authenticated` and when that next changes by the clock."""
    last, rows = leases.snapshot(conn, now)
    bound = set()
    for lease in rows:
        try:
            bound.add(check_pair(lease.ip, lease.mac))
        except ValueError:  # never let one odd row take the guest side's rules down
            log.warning("ignoring a lease with a bad address: %r %r", lease.ip, lease.mac)
    auth, due = members.wanted(conn, now, key)
    table = f"inet {nft.TABLE}"
    script = f"flush set {table} leased\nflush set {table} authenticated\n"
    if bound:
        script += f"add element {table} leased {{ {nft.elements_text(bound)} }}\n"
    if auth:
        script += f"add element {table} authenticated {{ {nft.elements_text(auth)} }}\n"
    execute(script)
    grants.record(conn, auth, set(), replace=True)
    grants.prune_grants(conn)
    log.info(
        "sets loaded: %d bound leases (events up to %d), %d authenticated",
        len(bound),
        last,
        len(auth),
    )
    return last, auth, due


def sync_authenticated(
    conn: Connection,
    now: float,
    have: set[members.Pair],
    execute: Callable[[str], None],
    key: bytes,
) -> tuple[set[members.Pair], float | None]:
    """Bring `authenticated` from `have` to what the sessions say, in one transaction."""
    want, due = members.wanted(conn, now, key)
    adds, dels = want - have, have - want
    if adds or dels:
        execute(_auth_script(adds, dels))
        grants.record(conn, adds, dels)
        if dels:
            grants.prune_grants(conn)
        log.debug("authenticated: +%d -%d", len(adds), len(dels))
    return want, due


def _auth_script(adds: set[members.Pair], dels: set[members.Pair]) -> str:
    table = f"inet {nft.TABLE} authenticated"
    lines = []
    if dels:  # add first: deleting a pair the kernel lacks would fail the transaction
        text = nft.elements_text(dels)
        lines += [f"add element {table} {{ {text} }}", f"delete element {table} {{ {text} }}"]
    if adds:
        lines.append(f"add element {table} {{ {nft.elements_text(adds)} }}")
    return "\n".join(lines) + "\n"


def load(config: Config) -> int:
    """One full load of both sets from the store (before the roles start)."""
    conn = store.open_store(config.state)
    try:
        schema.upgrade(conn)
        key = members.grant_key(config.state.directory)
        return full_sync(conn, time.time(), nft.run, key)[0]
    finally:
        conn.close()


def apply_events(
    events: list[leases.LeaseEvent], execute: Callable[[str], None] = nft.run
) -> set[tuple[str, str]]:
    """Fold a batch of events into one transaction: for `leased` the last event of a pair
    wins; any end of a binding in the batch takes the pair out of `authenticated`, even
    when the same guest is granted again at once (it must log in again).  Returns the
    pairs taken out of `authenticated`."""
    final: dict[tuple[str, str], bool] = {}
    ended: set[tuple[str, str]] = set()
    for ev in events:
        try:
            pair = check_pair(ev.ip, ev.mac)
        except ValueError:
            log.warning("ignoring lease event %d with a bad address: %r %r", ev.id, ev.ip, ev.mac)
            continue
        final[pair] = ev.kind in leases.BINDING_KINDS
        if not final[pair]:
            ended.add(pair)
    adds = {p for p, on in final.items() if on}
    dels = {p for p, on in final.items() if not on}
    if adds or dels or ended:
        execute(_script(adds, dels, ended))
    return ended


# what the loop logs and retries after a pause (anything else is logged with its trace)
_RETRIED: tuple[type[Exception], ...] = (*STORE_ERRORS, nft.NftError)


def run(config: Config, stop: threading.Event, poll: float = POLL) -> None:
    """Follow the lease events and the sessions until `stop` is set (the `net` role)."""
    conn = store.open_store(config.state)
    schema.upgrade(conn)
    lib = nft.runner()  # in-process libnftables when present: no fork per batch
    execute = lib.run if lib is not None else nft.run
    key = members.grant_key(config.state.directory)
    last, auth, due = full_sync(conn, time.time(), execute, key)
    cursor = Cursor(partial(leases.events_since, conn), last)
    next_sync = time.monotonic() + RESYNC
    version = None
    dirty = False  # the store changed since the last session sync
    not_before = 0.0  # a session sync costs ~5 ms per 1000 guests: at most ~20% of the time
    while not stop.is_set():
        try:
            if time.monotonic() >= next_sync:
                last, auth, due = full_sync(conn, time.time(), execute, key)
                cursor = Cursor(partial(leases.events_since, conn), last)
                next_sync = time.monotonic() + RESYNC
            seen = store.data_version(conn)
            if seen != version:
                version, dirty = seen, True
                events = cursor.poll()
                if events:
                    auth -= apply_events(events, execute)  # taken out of the kernel's set
                    log.debug("applied %d lease events (up to %d)", len(events), cursor.last)
                    if len(events) >= BATCH:
                        version = None  # more to read: look again at once
            expired = due is not None and time.time() >= due
            if (dirty or expired) and time.monotonic() >= not_before:
                t0 = time.monotonic()
                auth, due = sync_authenticated(conn, time.time(), auth, execute, key)
                dirty = False
                not_before = time.monotonic() + 4 * (time.monotonic() - t0)
            if version is None:
                continue
        except _RETRIED as exc:
            log.error("lease follower: %s (retrying)", exc)
            version = None
            stop.wait(1.0)
        except Exception:  # fail closed: the rules stay, the follower keeps going
            log.exception("lease follower: unexpected error (retrying)")
            version = None
            stop.wait(1.0)
        stop.wait(poll)
    conn.close()  # the nft runner is shared by the process and stays open
