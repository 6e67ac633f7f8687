"""Validation of the table files a config names (used by `appliance check-config`)."""

from __future__ import annotations

from appliance.config import Config
from appliance.tomlfile import TomlFile


def check(config: Config) -> list[str]:
    """Validate every table the config points to; raise ConfigError on the first fault."""
    checked = []
    for path in (config.policies.servers, config.policies.access):
        TomlFile.load(path)
        checked.append(str(path))
    for path in (config.policies.users, config.policies.admins):
        if path.exists():
            TomlFile.load(path)
            checked.append(str(path))
    return checked
