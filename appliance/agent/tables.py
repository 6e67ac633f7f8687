"""The agent's editable tables: users (hash, attributes, own servers) and appliance keys.

Both are TOML files the CLI rewrites atomically (temporary file, fsync, rename,
under a lock file) while the agent runs; the agent re-reads a file when its
stat changes, so an edit applies to the next request without a restart.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from appliance.core import agent_protocol as wire
from appliance.core import tomledit
from appliance.core.attributes import Attributes, as_json, read_attributes
from appliance.core.tomlfile import ConfigError, Reader, TomlFile

log = logging.getLogger("appliance.agent")


@dataclass(frozen=True)
class User:
    name: str
    password_hash: str
    locked: bool = False
    attributes: Attributes = field(default_factory=dict)
    servers: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class UserTable:
    users: Mapping[str, User]

    def get(self, name: str) -> User | None:
        return self.users.get(name)


@dataclass(frozen=True)
class ApplianceEntry:
    key: str
    status: str  # allowed | denied
    name: str = ""
    since: str = ""


@dataclass(frozen=True)
class ApplianceTable:
    entries: Mapping[str, ApplianceEntry]

    def status(self, key: str) -> str | None:
        entry = self.entries.get(key)
        return entry.status if entry else None


# -- reading -------------------------------------------------------------------------


def _servers(r: Reader) -> dict[str, str]:
    out: dict[str, str] = {}
    for key in list(r.keys()):
        if not wire.SERVICE_RE.fullmatch(key):
            raise r.error(key, "service names are lower-case letters, digits, '_', '-'")
        value = r.text(key)
        try:
            wire.parse_server(value)
        except ValueError as exc:
            raise r.error(key, str(exc)) from None
        out[key] = value
    return out


def parse_users(doc: TomlFile) -> UserTable:
    top = doc.reader()
    users_r = top.sub("users")
    users: dict[str, User] = {}
    for name in list(users_r.keys()):
        if not wire.USER_RE.fullmatch(name):
            raise users_r.error(name, "user ids are letters, digits and . _ + - (at most 64)")
        r = users_r.sub(name)
        user = User(
            name=name,
            password_hash=r.text("password"),
            locked=r.boolean("locked", False),
            attributes=read_attributes(r.sub("attributes")),
            servers=_servers(r.sub("servers")),
        )
        if not user.password_hash.startswith("$argon2id$"):
            raise r.error("password", "expected an argon2id hash (use `personal-agent users`)")
        r.finish()
        users[name] = user
    top.finish()
    return UserTable(users)


def load_users(path: Path) -> UserTable:
    if not path.exists():
        return UserTable({})
    return parse_users(TomlFile.load(path))


def parse_appliances(doc: TomlFile) -> ApplianceTable:
    top = doc.reader()
    entries: dict[str, ApplianceEntry] = {}
    tab = top.sub("appliances")
    for key in list(tab.keys()):
        if not wire.valid_key_id(key):
            raise tab.error(key, "not an appliance key (43 base64url characters)")
        r = tab.sub(key)
        entries[key] = ApplianceEntry(
            key=key,
            status=r.text("status", choices=("allowed", "denied")),
            name=r.text("name", ""),
            since=r.text("since", ""),
        )
        r.finish()
    top.finish()
    return ApplianceTable(entries)


def load_appliances(path: Path) -> ApplianceTable:
    if not path.exists():
        return ApplianceTable({})
    return parse_appliances(TomlFile.load(path))


# -- writing -------------------------------------------------------------------------


USERS_HEADER = "Personal agent users: edit with `personal-agent users` and `servers`."
APPLIANCES_HEADER = "Appliances this agent answers: edit with `personal-agent appliances`."


def dump_users(table: UserTable, text: str = "") -> str:
    """The users table, edited from `text` (the file as it is): an admin's comments stay."""
    users: dict[str, Any] = {}
    for name in sorted(table.users):
        u = table.users[name]
        entry: dict[str, Any] = {"password": u.password_hash}
        if u.locked:
            entry["locked"] = True
        entry["attributes"] = as_json(dict(sorted(u.attributes.items())))
        entry["servers"] = dict(sorted(u.servers.items()))
        users[name] = entry
    return tomledit.updated(text, {"users": users}, header=USERS_HEADER)


def dump_appliances(table: ApplianceTable, text: str = "") -> str:
    """The appliance keys, edited from `text` (the file as it is): comments stay."""
    entries: dict[str, Any] = {}
    for key in sorted(table.entries):
        e = table.entries[key]
        entry = {"status": e.status}
        if e.name:
            entry["name"] = e.name
        if e.since:
            entry["since"] = e.since
        entries[key] = entry
    return tomledit.updated(text, {"appliances": entries}, header=APPLIANCES_HEADER)


class Watched:
    """A table re-read when its file changes; a broken edit keeps the last good table."""

    def __init__(self, path: Path, loader: Any) -> None:
        self.path = path
        self._loader = loader
        self._stamp: tuple[int, int, int] | None = None
        self._value: Any = loader(path)
        self._stamp = self._stat()
        self.error: ConfigError | None = None

    def _stat(self) -> tuple[int, int, int] | None:
        try:
            st = self.path.stat()
        except FileNotFoundError:
            return None
        return (st.st_ino, st.st_mtime_ns, st.st_size)

    def get(self) -> Any:
        stamp = self._stat()
        if stamp != self._stamp:
            try:
                self._value = self._loader(self.path)
                self.error = None
            except ConfigError as exc:
                if self.error is None or str(exc) != str(self.error):
                    log.error("keeping the last good table: %s", exc)
                self.error = exc
            self._stamp = stamp
        return self._value

    def force(self) -> None:
        """Re-read on the next get(), changed or not."""
        self._stamp = (-1, -1, -1)
        self.get()
