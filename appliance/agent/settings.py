"""The agent's own configuration, `agent.toml`: read once into frozen objects.

Relative paths are taken from the file's directory; the users and appliances
tables live in their own files because the CLI edits them while the agent runs.
"""

from __future__ import annotations

import ipaddress
import urllib.parse
from dataclasses import dataclass
from pathlib import Path

from appliance.core import agent_protocol as wire
from appliance.core.metrics import own_endpoint
from appliance.core.tomlfile import ConfigError, Reader, TomlFile
from appliance.homelink.frames import HOUSEHOLD_RE

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
class RelaySettings:
    """`[relay]`: the home relay this agent keeps a link to (docs/home-relay.md)."""

    url: str  # wss://HOST[:PORT]/path
    host: str
    port: int
    path: str
    household: str
    pin: str | None  # the relay certificate's sha256: fingerprint (no CA involved)
    ca: Path | None  # else the CA bundle the relay's certificate must verify under


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
    relay: RelaySettings | None = None
    metrics_listen: str = "127.0.0.1"  # Prometheus endpoint (port 0: off)
    metrics_port: int = 0

    @property
    def pending_file(self) -> Path:
        return self.state_directory / "pending-appliances.json"

    @property
    def status_file(self) -> Path:
        """What `personal-agent status` reads: the running agent's relay link, written by it."""
        return self.state_directory / "status.json"

    @property
    def relay_identity_file(self) -> Path:
        """The key and certificate the household's name at the relay was last registered
        with (0600): a renewed certificate proves with it that the name is its own."""
        return self.state_directory / "relay-identity.pem"

    @property
    def logins_file(self) -> Path:
        """Who logged in through which appliance key, so a restart keeps server streams open."""
        return self.state_directory / "logins.json"


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
    relay = _relay(top) if top.has("relay") else None
    metrics_listen, metrics_port = own_endpoint(top.sub("metrics"), port, "agent")
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
        relay=relay,
        metrics_listen=metrics_listen,
        metrics_port=metrics_port,
    )


def _relay(top: Reader) -> RelaySettings:
    r = top.sub("relay")
    url: str = r.text("url")
    parts = urllib.parse.urlsplit(url)
    if parts.scheme != "wss":
        raise r.error("url", f"{url!r}: the relay is reached as wss://HOST[:PORT]/path")
    if "@" in parts.netloc or not parts.netloc:
        raise r.error("url", f"{url!r}: expected wss://HOST[:PORT]/path")
    try:
        host, port = wire.parse_hostport(parts.netloc, 443)
    except ValueError as exc:
        raise r.error("url", str(exc)) from None
    if not parts.path.startswith("/") or parts.query or parts.fragment or "?" in url:
        raise r.error("url", f"{url!r}: expected wss://HOST[:PORT]/path (no query)")
    household: str = r.text("household")
    if not HOUSEHOLD_RE.fullmatch(household):
        raise r.error(
            "household", f"{household!r}: lower-case letters, digits and '-' (at most 63)"
        )
    pin_text: str | None = r.text("pin", None)
    pin = None
    if pin_text is not None:
        try:
            pin = wire.parse_fingerprint(pin_text)
        except ValueError as exc:
            raise r.error("pin", str(exc)) from None
    ca: Path | None = r.filepath("ca", None)
    if pin is not None and ca is not None:
        raise r.error("ca", "give the relay's pin or a CA, not both")
    if ca is not None and not ca.is_file():
        raise r.error("ca", f"{ca} is not a file")
    r.finish()
    return RelaySettings(url, host, port, parts.path, household, pin, ca)


def _positive(r: Reader, key: str, default: float) -> float:
    value: float = r.number(key, default, lo=0.1)
    return value


def load(path: str | Path) -> AgentSettings:
    return parse(TomlFile.load(path))


__all__ = [
    "DEFAULT_PATH",
    "AgentSettings",
    "ConfigError",
    "Limits",
    "RelaySettings",
    "load",
    "parse",
]
