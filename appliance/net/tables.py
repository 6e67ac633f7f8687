"""What net and dns need from the server-info table, as plain values.

The guest side needs two things from `servers.toml`: which guest ports are
intercepted to which local listener, and the names guests may use for the
appliance's services.  Read through `appliance.policy.server_info`, so a broken table
is refused with its file, line and key instead of being half-applied.
"""

from __future__ import annotations

from appliance.core.config import Config
from appliance.policy.server_info import ServerTable, load_servers


def _table(config: Config) -> ServerTable:
    return load_servers(
        config.policies.servers,
        guest_subnet=config.interfaces.guest_subnet,
        hidden_networks=config.interfaces.hidden_networks,
    )


def intercepts(config: Config) -> dict[int, int]:
    """Guest TCP port -> local proxy listener port."""
    return {
        port: svc.listen_port
        for svc in _table(config).services.values()
        for port in svc.intercept_ports
    }


def guest_names(config: Config) -> tuple[str, ...]:
    """Names guests may use for the appliance's services (under the guest domain)."""
    return tuple(name for svc in _table(config).services.values() for name in svc.guest_names)
