"""The admin audit log: one JSON line per change, with admin, time, what and the diff.

It lives at `<state.directory>/audit.log`, append-only; the admin pages show its
tail.  Passwords and cookies never go in it (admin account changes are logged by
name only).
"""

from __future__ import annotations

import difflib
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

from appliance.core.config import Config

log = logging.getLogger("appliance.admin.audit")


@dataclass(frozen=True)
class Entry:
    time: float
    admin: str
    action: str
    target: str
    diff: str

    @property
    def when(self) -> str:
        return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(self.time))


def path_of(config: Config) -> Path:
    return config.state.directory / "audit.log"


def diff(old: str, new: str, name: str) -> str:
    return "".join(
        difflib.unified_diff(
            old.splitlines(keepends=True), new.splitlines(keepends=True), f"a/{name}", f"b/{name}"
        )
    )


def record(config: Config, admin: str, action: str, target: str, change: str = "") -> Entry:
    entry = Entry(time.time(), admin, action, target, change)
    path = path_of(config)
    path.parent.mkdir(parents=True, exist_ok=True)
    line = json.dumps(
        {"time": entry.time, "admin": admin, "action": action, "target": target, "diff": change}
    )
    with open(path, "a", encoding="utf-8") as fh:
        fh.write(line + "\n")
    log.info("audit: %s %s %s", admin, action, target)
    return entry


def tail(config: Config, limit: int = 200) -> list[Entry]:
    """The newest entries first."""
    try:
        lines = path_of(config).read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        return []
    out = []
    for line in reversed(lines[-limit:]):
        try:
            d = json.loads(line)
            out.append(Entry(d["time"], d["admin"], d["action"], d["target"], d.get("diff", "")))
        except (ValueError, KeyError, TypeError):
            continue
    return out
