"""The admin audit log: who changed what, when, and the diff; kept in the shared store
(appliance/state/audit.py).

Before the first start there is no store, and root's CLI must not make one (the roles'
own user could not write it): `appliance admins` then appends its entries to
`<state.directory>/audit.log` (JSON lines, as older versions kept the whole log), which
the store takes in the first time the log is opened after, renamed `audit.log.imported`.
"""

from __future__ import annotations

import difflib
import json
import logging
import os
import time
from pathlib import Path

from appliance.core.config import Config
from appliance.state import audit, store
from appliance.state.audit import Entry
from appliance.state.connection import Connection

log = logging.getLogger("appliance.admin.audit")


def diff(old: str, new: str, name: str) -> str:
    return "".join(
        difflib.unified_diff(
            old.splitlines(keepends=True), new.splitlines(keepends=True), f"a/{name}", f"b/{name}"
        )
    )


def _pending(config: Config) -> Path:
    return config.state.directory / "audit.log"


def _open(config: Config) -> Connection:
    conn = store.open_store(config.state)
    try:
        _reclaim(config)
        if _pending(config).exists():
            _take_in(conn, _pending(config))
    except BaseException:
        conn.close()
        raise
    return conn


def _reclaim(config: Config) -> None:
    """A take-in whose process died half-way left its claimed file: given back."""
    for left in config.state.directory.glob("audit.log.taking-*"):
        pid = left.name.rsplit("-", 1)[-1]
        if pid.isdigit() and Path(f"/proc/{pid}").exists():
            continue  # still at it
        with open(_pending(config), "a", encoding="utf-8") as fh:
            fh.write(left.read_text(encoding="utf-8"))
        left.unlink()


def _take_in(conn: Connection, path: Path) -> None:
    """The pending JSON lines, oldest first, into the store: claimed by a rename first, so
    of two roles opening the log at once only one takes them in."""
    claimed = path.with_name(f"audit.log.taking-{os.getpid()}")
    try:
        path.rename(claimed)
    except FileNotFoundError:  # another process took it
        return
    entries = _read(claimed)
    try:
        audit.append(conn, entries)
    except BaseException:  # given back, after whatever was added meanwhile: tried again
        with open(path, "a", encoding="utf-8") as fh:
            fh.write(claimed.read_text(encoding="utf-8"))
        claimed.unlink()
        raise
    claimed.rename(path.with_name("audit.log.imported"))
    log.info("audit: %d entries of %s taken into the store", len(entries), path)


def _read(path: Path) -> list[Entry]:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return []
    entries = []
    for line in text.splitlines():
        try:
            d = json.loads(line)
            entries.append(
                Entry(
                    float(d["time"]),
                    str(d["admin"]),
                    str(d["action"]),
                    str(d["target"]),
                    str(d.get("diff", "")),
                )
            )
        except (ValueError, KeyError, TypeError):
            continue
    return entries


def reachable(config: Config) -> None:
    """Raises the store's error when an entry could not be recorded now."""
    if config.state.made:
        _open(config).close()


def record(config: Config, admin: str, action: str, target: str, change: str = "") -> Entry:
    entry = Entry(time.time(), admin, action, target, change)
    if config.state.made:
        conn = _open(config)
        try:
            audit.append(conn, [entry])
        finally:
            conn.close()
    else:  # before the first start (see above)
        _pending(config).parent.mkdir(parents=True, exist_ok=True)
        line = {"time": entry.time, "admin": admin, "action": action, "target": target}
        with open(_pending(config), "a", encoding="utf-8") as fh:
            fh.write(json.dumps(line | {"diff": change}) + "\n")
    log.info("audit: %s %s %s", admin, action, target)
    return entry


def tail(config: Config, limit: int = 200) -> list[Entry]:
    """The newest entries first (none before the first start but those pending)."""
    if not config.state.made:
        return list(reversed(_read(_pending(config))))[:limit]
    conn = _open(config)
    try:
        return audit.newest(conn, limit)
    finally:
        conn.close()
