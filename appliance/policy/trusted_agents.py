"""Whose word the site takes: the trusted-agents table (`policies/agents.toml`).

Any visitor can run a personal agent and make it say anything about them, so an
agent's answer is not, by itself, a reason to grant anything.  This table names
the agents the site trusts, by the identity the appliance really verifies when it
logs in through one: the SHA-256 fingerprint of the agent's certificate, or a host
name whose certificate verified under the system CAs (no pin typed).  Each entry
lists the attribute keys that agent may assert.

A login through an agent is then reduced to what the site allows:

- trusted agent: its answer keeps only the listed keys;
- any other agent: its attributes are all dropped;

and the appliance adds `source = "agent"` and `agent = <id>` itself (no agent may
assert them), so a rule grants to untrusted agents only when it names them.  The
session's user id is `user@<id>`: the entry's name for a trusted agent, the host
as typed (with `:port` when not the default) otherwise.  Site accounts cannot hold
an `@`, so an agent login never shares a user id with a site account.

A login that names a trusted entry's name or domain but does not verify as that
entry is refused (it is someone else at that name, or the entry is out of date):
an untrusted login can never get the user id of a trusted one.
"""

from __future__ import annotations

import logging
import re
import threading
from dataclasses import dataclass
from pathlib import Path

from appliance.core import agent_protocol as wire
from appliance.core.attributes import Attributes, AttrValue, valid_key
from appliance.core.tomlfile import ConfigError, Reader, TomlFile

log = logging.getLogger("appliance.policy.trusted_agents")

APPLIANCE_KEYS = ("source", "agent")
"""Attributes the appliance sets on every agent login; no agent may assert them."""
SOURCE = "agent"

_NAME_RE = re.compile(
    r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?(\.[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?)*$"
)


@dataclass(frozen=True)
class TrustedAgent:
    name: str
    fingerprints: frozenset[str]
    domains: frozenset[str]
    attributes: frozenset[str]


@dataclass(frozen=True)
class Vouched:
    """What the appliance makes of an agent's answer."""

    user: str  # "user@agent": the session's user id
    agent: str  # the agent's id: a trusted entry's name, or the host as typed
    trusted: bool
    attributes: dict[str, AttrValue]
    dropped: tuple[str, ...]  # the asserted keys not taken (for the log; values never logged)


class NotThatAgent(Exception):
    """The visitor named a trusted agent, but the agent that answered is not it."""


@dataclass(frozen=True)
class AgentTable:
    agents: tuple[TrustedAgent, ...] = ()

    def match(self, fingerprint: str, verified_name: str) -> TrustedAgent | None:
        """The entry this agent verifiably is: by certificate fingerprint, or by a name
        its certificate verified for under the CAs ("" when it was pinned instead)."""
        name = _norm_host(verified_name) if verified_name else ""
        for entry in self.agents:
            if fingerprint and fingerprint in entry.fingerprints:
                return entry
            if name and name in entry.domains:
                return entry
        return None

    def claimed(self, host: str) -> TrustedAgent | None:
        """The entry whose name or domain the visitor typed, if any."""
        h = _norm_host(host)
        for entry in self.agents:
            if h == entry.name or h in entry.domains:
                return entry
        return None

    def vouch(
        self,
        user: str,
        attributes: Attributes,
        host: str,
        port: int,
        default_port: int,
        fingerprint: str,
        verified_name: str,
    ) -> Vouched:
        """The session identity for an agent's answer; NotThatAgent when the visitor named
        a trusted agent and another one answered."""
        entry = self.match(fingerprint, verified_name)
        if entry is None:
            claimed = self.claimed(host)
            if claimed is not None:
                raise NotThatAgent(
                    f"the agent at {host} is not the one this site trusts under the name"
                    f" {claimed.name}"
                )
            agent_id = _agent_id(host, port, default_port)
            kept: dict[str, AttrValue] = {}
        else:
            agent_id = entry.name
            kept = {
                k: v
                for k, v in attributes.items()
                if k in entry.attributes and k not in APPLIANCE_KEYS
            }
        dropped = tuple(sorted(k for k in attributes if k not in kept))
        attrs = {**kept, "source": SOURCE, "agent": agent_id}
        return Vouched(f"{user}@{agent_id}", agent_id, entry is not None, attrs, dropped)


def no_longer_vouched(
    old: AgentTable | None, new: AgentTable, source: str, attributes: Attributes
) -> bool:
    """Does a session (its `source` and attributes) hold more than `new` would give it?

    True when its agent asserted keys the new table no longer lets it assert, or when
    the entry's identity lost a fingerprint or domain (a replaced, perhaps compromised,
    certificate); `old` None: the table before was unreadable, only the first applies."""
    if not source.startswith("agent:"):
        return False
    name = source.removeprefix("agent:")
    entry = next((a for a in new.agents if a.name == name), None)
    asserted = set(attributes) - set(APPLIANCE_KEYS)
    if asserted - (entry.attributes if entry else frozenset()):
        return True
    before = next((a for a in old.agents if a.name == name), None) if old else None
    if before is None or entry is None:
        return False
    return not (before.fingerprints <= entry.fingerprints and before.domains <= entry.domains)


def _norm_host(host: str) -> str:
    return host.strip().strip("[]").lower().rstrip(".")


def _agent_id(host: str, port: int, default_port: int) -> str:
    h = _norm_host(host)
    if port == default_port:
        return h
    return f"[{h}]:{port}" if ":" in h else f"{h}:{port}"


# -- the table file ------------------------------------------------------------------


def parse_agents(doc: TomlFile) -> AgentTable:
    """Validate a parsed agents.toml; ConfigError naming file, line and key."""
    top = doc.reader()
    table = top.sub("agents")
    entries: list[TrustedAgent] = []
    by_fingerprint: dict[str, str] = {}
    by_name: dict[str, str] = {}  # names and domains: each names one entry
    names = list(table.keys())
    for name in names:
        if not _NAME_RE.fullmatch(name):
            raise table.error(name, "an agent's name is a lower-case host name, like corp.example")
        r = table.sub(name)
        fingerprints = _fingerprints(r, by_fingerprint, name)
        domains = _domains(r, by_name, name)
        keys = r.text_list("attributes", ())
        for key in keys:
            if not valid_key(key):
                raise r.error("attributes", f"{key!r} is not an attribute name")
            if key in APPLIANCE_KEYS:
                raise r.error("attributes", f"{key!r} is set by the appliance, no agent asserts it")
        if len(set(keys)) != len(keys):
            raise r.error("attributes", "an attribute is listed twice")
        r.finish()
        if not fingerprints and not domains:
            raise r.error(None, "give the agent's fingerprints or domains (how to recognise it)")
        if by_name.get(name, name) != name:
            raise table.error(name, f"{name} is already a domain of agent {by_name[name]}")
        by_name[name] = name
        entries.append(TrustedAgent(name, fingerprints, domains, frozenset(keys)))
    top.finish()
    return AgentTable(tuple(entries))


def _fingerprints(r: Reader, seen: dict[str, str], name: str) -> frozenset[str]:
    out = set()
    for text in r.text_list("fingerprints", ()):
        try:
            fp = wire.parse_fingerprint(text)
        except ValueError as exc:
            raise r.error("fingerprints", str(exc)) from None
        if fp in seen:
            raise r.error("fingerprints", f"{fp} is already agent {seen[fp]}'s")
        seen[fp] = name
        out.add(fp)
    return frozenset(out)


def _domains(r: Reader, seen: dict[str, str], name: str) -> frozenset[str]:
    out = set()
    for text in r.text_list("domains", ()):
        domain = text.lower().rstrip(".")
        if not _NAME_RE.fullmatch(domain):
            raise r.error("domains", f"{text!r} is not a host name")
        if seen.get(domain, name) != name:
            raise r.error("domains", f"{domain} already names agent {seen[domain]}")
        seen[domain] = name
        out.add(domain)
    return frozenset(out)


def parse_text(text: str, path: str | Path) -> AgentTable:
    return parse_agents(TomlFile.parse(text, path))


def load(path: Path) -> AgentTable:
    """The table at `path`; a missing file is an empty table (no agent is trusted)."""
    if not path.exists():
        return AgentTable()
    return parse_agents(TomlFile.load(path))


class LiveTable:
    """The table as the portal uses it: read again at each login (a small file; it is only
    parsed when its bytes changed), so an edit applies at the next login without a restart
    or a signal; an invalid edit is logged and the last good table stays in force.
    Before any good table was read, nobody is trusted."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._seen: bytes | None = None  # the bytes last read (good or bad); None: no file
        self._table = AgentTable()
        self._started = False

    def current(self) -> AgentTable:
        try:
            data: bytes | None = self.path.read_bytes()
        except FileNotFoundError:
            data = None
        except OSError as exc:
            log.error(
                "trusted-agents table %s unreadable, the previous one stays: %s", self.path, exc
            )
            return self._table
        with self._lock:
            if self._started and data == self._seen:
                return self._table
            self._started, self._seen = True, data
            if data is None:
                log.warning(
                    "no trusted-agents table at %s: agent logins carry only source and agent",
                    self.path,
                )
                self._table = AgentTable()
                return self._table
            try:
                table = parse_text(data.decode("utf-8"), self.path)
            except UnicodeDecodeError as exc:
                log.error("trusted-agents table refused, the previous one stays: %s", exc)
                return self._table
            except ConfigError as exc:
                log.error("trusted-agents table refused, the previous one stays: %s", exc)
                return self._table
            self._table = table
            log.info("trusted-agents table read: %d agents", len(table.agents))
            return table


__all__ = [
    "APPLIANCE_KEYS",
    "AgentTable",
    "LiveTable",
    "NotThatAgent",
    "TrustedAgent",
    "Vouched",
    "load",
    "no_longer_vouched",
    "parse_agents",
    "parse_text",
]
