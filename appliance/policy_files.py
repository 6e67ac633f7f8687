"""Validation of the table files a config names (used by `appliance check-config`).

The policy tables go through their real loaders (the same code the roles run), so
check-config refuses exactly what a reload would refuse.  The account tables
are checked when they exist: the admins table by its loader, the users table
only as TOML (its own module, the site accounts, validates its content).
"""

from __future__ import annotations

from appliance import trusted_agents
from appliance.config import Config
from appliance.policy import Policy
from appliance.tomlfile import TomlFile


def check(config: Config) -> list[str]:
    """Validate every table the config points to; raise ConfigError on the first fault."""
    Policy.load(config)
    checked = [str(config.policies.servers), str(config.policies.access)]
    if config.policies.agents.exists():
        trusted_agents.load(config.policies.agents)
        checked.append(str(config.policies.agents))
    if config.policies.users.exists():
        TomlFile.load(config.policies.users)
        checked.append(str(config.policies.users))
    if config.policies.admins.exists():
        from appliance.admin.accounts import load_admins

        load_admins(config.policies.admins)
        checked.append(str(config.policies.admins))
    return checked
