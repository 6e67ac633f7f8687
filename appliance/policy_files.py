"""Validation of the table files a config names (used by `appliance check-config`).

The policy tables go through their real loaders (the same code the roles run), so
check-config refuses exactly what a reload would refuse.  The account tables
(users, admins) are only checked to be valid TOML here when they exist; their
own modules validate their content.
"""

from __future__ import annotations

from appliance.config import Config
from appliance.policy import Policy
from appliance.tomlfile import TomlFile


def check(config: Config) -> list[str]:
    """Validate every table the config points to; raise ConfigError on the first fault."""
    Policy.load(config)
    checked = [str(config.policies.servers), str(config.policies.access)]
    for path in (config.policies.users, config.policies.admins):
        if path.exists():
            TomlFile.load(path)
            checked.append(str(path))
    return checked
