"""The agent's own configuration, `agent.toml`: read once into frozen objects.

Relative paths are taken from the file's directory; the users and appliances
tables live in their own files because the CLI edits them while the agent runs.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from pathlib import Path

from appliance.core import agent_protocol as wire
from appliance.core.tomlfile import ConfigError, Reader, TomlFile

DEFAULT_PATH = Path("/etc/personal-agent/agent.toml")


@dataclass(frozen=True)
class Limits:
    max_failures: int  # consecutive wrong passwords before a user is locked
    lockout: int  # seconds a locked user stays locked
    rate: int  # requests per minute per source address and per appliance key
    burst: int
    max_body: int
    workers: int  # concurrent password checks (argon2id is memory-hard)
    request_timeout: float  # a client has this long to send its request


@dataclass(frozen=True)
class AgentSettings:
    path: Path
    listen_address: str
    port: int
    state_directory: Path
    users_file: Path
    appliances_file: Path
    accept: str  # "listed": only allowed appliance keys; "any": every key not denied
    trusted: tuple[str, ...]
    tls_certificate: Path
    tls_key: Path
    tls_names: tuple[str, ...]
    limits: Limits

    @property
    def pending_file(self) -> Path:
        return self.state_directory / "pending-appliances.json"


def parse(doc: TomlFile) -> AgentSettings:
    top = doc.reader()
    listen = top.sub("listen")
    address = listen.text("address", "0.0.0.0")
    try:
        ipaddress.ip_address(address)
    except ValueError:
        raise listen.error("address", f"{address!r} is not an IP address") from None
    port = listen.port("port", wire.DEFAULT_PORT)
    listen.finish()

    state = top.sub("state")
    state_dir = state.filepath("directory", None) or Path("/var/lib/personal-agent")
    state.finish()

    users = top.sub("users")
    users_file = users.filepath("file", None) or state_dir / "users.toml"
    users.finish()

    appl = top.sub("appliances")
    appliances_file = appl.filepath("file", None) or state_dir / "appliances.toml"
    accept = appl.text("accept", "listed", choices=("listed", "any"))
    trusted = appl.text_list("trusted", ())
    for key in trusted:
        if not wire.valid_key_id(key):
            raise appl.error("trusted", f"{key!r} is not an appliance key (43 base64url chars)")
    appl.finish()

    tls = top.sub("tls")
    cert = tls.filepath("certificate", None) or state_dir / "agent-cert.pem"
    key = tls.filepath("key", None) or state_dir / "agent-key.pem"
    names = tls.text_list("names", ())
    if tls.has("certificate") != tls.has("key"):
        raise tls.error(
            "key" if tls.has("certificate") else "certificate", "certificate and key go together"
        )
    tls.finish()

    lim = top.sub("limits")
    limits = Limits(
        max_failures=lim.integer("max_failures", 5, 1, 1000),
        lockout=lim.integer("lockout", 900, 1, 30 * 86400),
        rate=lim.integer("rate", 60, 1, 100000),
        burst=lim.integer("burst", 20, 1, 100000),
        max_body=lim.integer("max_body", wire.MAX_REQUEST_BODY, 256, 65536),
        workers=lim.integer("workers", 2, 1, 64),
        request_timeout=_positive(lim, "request_timeout", 10.0),
    )
    lim.finish()
    top.finish()
    return AgentSettings(
        path=doc.path,
        listen_address=address,
        port=port,
        state_directory=state_dir,
        users_file=users_file,
        appliances_file=appliances_file,
        accept=accept,
        trusted=tuple(trusted),
        tls_certificate=cert,
        tls_key=key,
        tls_names=tuple(names),
        limits=limits,
    )


def _positive(r: Reader, key: str, default: float) -> float:
    value: float = r.number(key, default, lo=0.1)
    return value


def load(path: str | Path) -> AgentSettings:
    return parse(TomlFile.load(path))


__all__ = ["DEFAULT_PATH", "AgentSettings", "ConfigError", "Limits", "load", "parse"]
