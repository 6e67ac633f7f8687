"""What net and dns need from the server-info table, as plain values.

The server-info table is owned by `appliance.server_info`; this module reads only
the two things the guest side needs from `servers.toml` (intercept port -> listen
port, and the guest names) so net and dns do not depend on that module.  The lead
may replace these two functions with calls into `appliance.server_info`.
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

from appliance.config import Config


def _services(path: Path) -> dict[str, Any]:
    try:
        with open(path, "rb") as f:
            doc = tomllib.load(f)
    except (OSError, tomllib.TOMLDecodeError):
        return {}
    services = doc.get("services", {})
    return services if isinstance(services, dict) else {}


def intercepts(config: Config) -> dict[int, int]:
    """Guest TCP port -> local proxy listener port, from `servers.toml`."""
    out: dict[int, int] = {}
    for svc in _services(config.policies.servers).values():
        if not isinstance(svc, dict):
            continue
        listen = svc.get("listen_port")
        for port in svc.get("intercept_ports", []):
            if isinstance(port, int) and isinstance(listen, int):
                out[port] = listen
    return out


def guest_names(config: Config) -> tuple[str, ...]:
    """Names guests may use for the appliance's services (under the guest domain)."""
    names: list[str] = []
    for svc in _services(config.policies.servers).values():
        if isinstance(svc, dict):
            names.extend(n for n in svc.get("guest_names", []) if isinstance(n, str))
    return tuple(names)
