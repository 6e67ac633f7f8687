"""Both policy tables together, reloadable while the roles run.

`Policy.load(config)` reads servers.toml and access.toml; `reload()` reads them
again, validates both, and only then swaps them in, so an invalid edit is
refused with its error and the tables in force stay.  Subscribers (the proxies,
the portal) are called after a valid change, to close what is no longer
allowed.  Readers just use `policy.servers` / `policy.access`: each swap
replaces whole immutable objects, so a reader never sees half a table.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import signal
import threading
from collections.abc import Callable
from pathlib import Path

from appliance.core.attributes import Attributes
from appliance.core.config import Config
from appliance.core.tomlfile import ConfigError, TomlFile
from appliance.policy.access_rights import AccessTable, Decision, parse_access
from appliance.policy.server_info import ServerTable, parse_servers

log = logging.getLogger("appliance.policy")


def _parse(
    config: Config, servers_text: str, access_text: str, servers_path: Path, access_path: Path
) -> tuple[ServerTable, AccessTable]:
    doc = TomlFile.parse(servers_text, servers_path)
    servers = parse_servers(doc, config.interfaces.guest_subnet, config.interfaces.hidden_networks)
    taken = {
        config.portal.http_port: "portal.http_port",
        config.admin.port: "admin.port",
        config.dns.port: "dns.port",
    }
    if config.portal.https_port:
        taken[config.portal.https_port] = "portal.https_port"
    if config.proxy.explicit_http_port:
        taken[config.proxy.explicit_http_port] = "proxy.explicit_http_port"
    for svc in servers.services.values():
        if svc.listen_port in taken:
            raise doc.error(
                ("services", svc.name, "listen_port"),
                f"port {svc.listen_port} is the appliance's {taken[svc.listen_port]}",
            )
    access = parse_access(TomlFile.parse(access_text, access_path), servers.services)
    return servers, access


def _read(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(path, "", "file not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(path, "", f"cannot read: {exc}") from None


def check_texts(
    config: Config, servers_text: str | None = None, access_text: str | None = None
) -> tuple[ServerTable, AccessTable]:
    """Validate candidate texts (None: the file on disk) as if they were the files.

    Errors name the real file paths, so an admin editing a page reads the same
    message `appliance policy check` would print after saving.
    """
    sp, ap = config.policies.servers, config.policies.access
    return _parse(
        config,
        _read(sp) if servers_text is None else servers_text,
        _read(ap) if access_text is None else access_text,
        sp,
        ap,
    )


class Policy:
    """The site's server-info and access-rights tables, as one reloadable unit."""

    def __init__(self, config: Config, servers: ServerTable, access: AccessTable, digest: str):
        self.config = config
        self.servers = servers
        self.access = access
        self.digest = digest
        self._subscribers: list[Callable[[Policy], None]] = []
        self._lock = threading.Lock()

    @staticmethod
    def _load(config: Config) -> tuple[ServerTable, AccessTable, str]:
        sp, ap = config.policies.servers, config.policies.access
        st, at = _read(sp), _read(ap)
        servers, access = _parse(config, st, at, sp, ap)
        digest = hashlib.sha256(f"{st}\0{at}".encode()).hexdigest()
        return servers, access, digest

    @classmethod
    def load(cls, config: Config) -> Policy:
        """Read and validate both tables; raises ConfigError naming file, line and key."""
        servers, access, digest = cls._load(config)
        return cls(config, servers, access, digest)

    def reload(self) -> bool:
        """Re-read both tables; True when they changed (subscribers were called).

        On an invalid table ConfigError is raised and the tables in force stay.
        """
        with self._lock:
            servers, access, digest = self._load(self.config)
            if digest == self.digest:
                return False
            self.servers, self.access, self.digest = servers, access, digest
            subscribers = list(self._subscribers)
        log.info(
            "policy tables reloaded (%d rules, %d services)",
            len(access.rules),
            len(servers.services),
        )
        for callback in subscribers:
            try:
                callback(self)
            except Exception:
                log.exception("policy subscriber %r failed", callback)
        return True

    def reload_logged(self) -> bool:
        """reload() for signal handlers: an invalid table is logged, never raised."""
        try:
            return self.reload()
        except ConfigError as exc:
            log.error("policy reload refused, the previous tables stay in force: %s", exc)
            return False

    def subscribe(self, callback: Callable[[Policy], None]) -> None:
        """Call `callback(policy)` after every valid change (from the reloading thread)."""
        with self._lock:
            self._subscribers.append(callback)

    def reload_on_sighup(self, loop: asyncio.AbstractEventLoop | None = None) -> None:
        """Reload on SIGHUP: inside the asyncio loop when given, else a plain handler."""
        if loop is not None:
            loop.add_signal_handler(signal.SIGHUP, self.reload_logged)
        else:
            signal.signal(signal.SIGHUP, lambda _s, _f: self.reload_logged())

    # conveniences for callers holding a Policy
    def decide(self, attributes: Attributes, service: str) -> Decision:
        return self.access.decide(attributes, service)

    def may_use_network(self, attributes: Attributes) -> Decision:
        return self.access.may_use_network(attributes)


__all__ = ["ConfigError", "Policy", "check_texts"]
