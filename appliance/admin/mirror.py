"""Policy tables shared by several appliances: each box's files kept in step with the
store (`[policies] shared = true`), so a table edited once applies on every box.

The files stay what every role reads (and what `appliance reload` and the admin pages
work on); the admin role of each box runs a `Mirror` that looks every second:

- a table changed here only (the admin pages, or an edit by hand) is published to the
  store, over the version it replaces;
- a table changed in the store (another box published it) is written here, the old
  text kept as NAME.bak, and this box's roles get SIGHUP;
- both changed (two admins on two boxes at once): the store wins, this box's text is
  kept in NAME.bak, and the conflict is logged.  At a box's start the store wins too
  (it cannot tell its own old edits from the store's newer ones).

A table is published only when it is valid here, and written here only when it is
valid with this box's configuration (its subnets, its ports): an invalid one is logged
once and the tables in force stay.  The first box whose mirror finds no row seeds it.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from enum import Enum
from pathlib import Path

from appliance.admin.files import read_versioned
from appliance.core.atomic_file import locked, write_atomically
from appliance.core.config import Config
from appliance.core.tomlfile import ConfigError
from appliance.policy import trusted_agents
from appliance.policy.tables import check_texts
from appliance.state import policy_tables, store
from appliance.state.connection import STORE_ERRORS, Connection
from appliance.state.policy_tables import SharedTable

log = logging.getLogger("appliance.admin")

EVERY = 1.0  # seconds between looks
KINDS = ("servers", "access", "agents")  # the shared tables, by [policies] key


class Step(Enum):
    NOTHING = "nothing"
    PUSH = "push"  # publish this box's text
    PULL = "pull"  # write the store's text here


def decide(last: str | None, local: str | None, remote: str | None) -> Step:
    """What to do with one table, from three versions: the one both sides had at the
    last sync here (None: none since this mirror started), this box's file (None: no
    file) and the store's row (None: no row)."""
    if remote is None:
        return Step.PUSH if local is not None else Step.NOTHING
    if local == remote:
        return Step.NOTHING
    if local is not None and last is not None and remote == last:
        return Step.PUSH  # only this box's file changed since the last sync
    return Step.PULL  # the store changed (or both did, or this is the first look)


class Mirror:
    """One box's side of the shared tables; `tick(conn)` is one look."""

    def __init__(self, config: Config, notify: Callable[[Config], object]) -> None:
        self.config = config
        self.notify = notify
        self.me = str(config.interfaces.management_address)
        self.synced: dict[str, str] = {}  # kind -> the version both sides had
        self._said: set[tuple[str, str]] = set()  # (kind, version) refusals logged once

    def path(self, kind: str) -> Path:
        p: Path = getattr(self.config.policies, kind)
        return p

    def tick(self, conn: Connection) -> list[str]:
        """Publish what changed here, take what changed in the store; returns the kinds
        written here (the roles were told)."""
        remote = policy_tables.read_all(conn)
        local: dict[str, tuple[str, str] | None] = {}
        steps: dict[str, Step] = {}
        for kind in KINDS:
            path = self.path(kind)
            local[kind] = read_versioned(path) if path.exists() else None
            here = local[kind]
            there = remote.get(kind)
            steps[kind] = decide(
                self.synced.get(kind),
                here[1] if here else None,
                there.version if there else None,
            )
            if steps[kind] is Step.NOTHING and here is not None and there is not None:
                self.synced[kind] = there.version
        if all(step is Step.NOTHING for step in steps.values()):
            return []
        # what this box's tables would be: the store's text where it wins, else its own
        candidate = {
            kind: (remote[kind].text if steps[kind] is Step.PULL else (local[kind] or ("", ""))[0])
            for kind in KINDS
        }
        pulled: list[str] = []
        for group in (("servers", "access"), ("agents",)):
            if all(steps[k] is Step.NOTHING for k in group):
                continue
            error = self._invalid(group, candidate)
            if error is not None:
                self._once(group, candidate, error)
                continue
            self._push(conn, group, steps, local, remote)
            for kind in group:
                if steps[kind] is Step.PULL and self._pull(kind, local[kind], remote[kind]):
                    pulled.append(kind)
        if pulled:
            self.notify(self.config)
        return pulled

    def _invalid(self, group: tuple[str, ...], candidate: dict[str, str]) -> str | None:
        try:
            if group == ("agents",):
                trusted_agents.parse_text(candidate["agents"], self.path("agents"))
            else:
                check_texts(self.config, candidate["servers"], candidate["access"])
        except ConfigError as exc:
            return str(exc)
        return None

    def _once(self, group: tuple[str, ...], candidate: dict[str, str], error: str) -> None:
        key = (",".join(group), str(hash(tuple(candidate[k] for k in group))))
        if key not in self._said:
            self._said.add(key)
            log.error("shared tables: %s not taken, the tables in force stay: %s", group, error)

    def _push(
        self,
        conn: Connection,
        group: tuple[str, ...],
        steps: dict[str, Step],
        local: dict[str, tuple[str, str] | None],
        remote: dict[str, SharedTable],
    ) -> None:
        """Publish this box's changed tables of `group` in one write, over the store's
        versions of the whole group (those checked with them)."""
        tables = []
        for kind in group:
            here = local[kind]
            if steps[kind] is Step.PUSH and here is not None:
                tables.append(SharedTable(kind, here[0], here[1], time.time(), self.me))
        if not tables:
            return
        expected = {k: (remote[k].version if k in remote else None) for k in group}
        if policy_tables.publish_group(conn, tables, expected):
            for table in tables:
                self.synced[table.name] = table.version
                log.info("shared tables: %s published (version %s)", table.name, table.version)
        # else: another box published first; the next look takes its text

    def _pull(self, kind: str, here: tuple[str, str] | None, there: SharedTable) -> bool:
        path = self.path(kind)
        with locked(path):  # as an admin's save holds it: check and write as one
            now = read_versioned(path) if path.exists() else None
            if now != here:
                return False  # saved here meanwhile: look again next time
            if here is not None:
                write_atomically(path.with_name(path.name + ".bak"), here[0], None)
                last = self.synced.get(kind)
                if last is not None and here[1] != last:  # an edit here the store's beat
                    log.warning(
                        "shared tables: %s was changed here and on %s at once; the store's "
                        "version stands, this box's text is in %s.bak",
                        kind,
                        there.by,
                        path.name,
                    )
            write_atomically(path, there.text, None)
        self.synced[kind] = there.version
        log.info("shared tables: %s taken from %s (version %s)", kind, there.by, there.version)
        return True

    def run(self, stop: threading.Event, connect: Callable[[], Connection] | None = None) -> None:
        """Look every EVERY seconds until `stop` is set; store errors are logged once per
        distinct message and retried."""
        open_store = connect or (lambda: store.open_store(self.config.state))
        conn: Connection | None = None
        last_error = ""
        while not stop.is_set():
            try:
                if conn is None:
                    conn = open_store()
                self.tick(conn)
                last_error = ""
            except STORE_ERRORS as exc:
                if str(exc) != last_error:
                    log.error("shared tables: the store failed, trying again: %s", exc)
                    last_error = str(exc)
                if conn is not None:
                    conn.close()
                conn = None
            except Exception as exc:  # a file it cannot read or write: said, looked at again
                if str(exc) != last_error:
                    log.exception("shared tables: a look failed, trying again")
                    last_error = str(exc)
            stop.wait(EVERY)
        if conn is not None:
            conn.close()


__all__ = ["EVERY", "KINDS", "Mirror", "Step", "decide"]
