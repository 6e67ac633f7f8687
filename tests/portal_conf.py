"""A complete appliance config for portal tests (the lab's address plan), written to a dir."""

from __future__ import annotations

import sys
from functools import cache
from pathlib import Path

from appliance.accounts import site as accounts
from appliance.core import config, passwords
from appliance.core.config import Config
from appliance.lab.topology import Node

ROOT = Path(__file__).resolve().parent.parent


APPLY_RULESET = """
import sys
from appliance.core import config
from appliance.net import follower, setup
cfg = config.load(sys.argv[1])
setup.apply(cfg, {25: 2525, 110: 1110, 80: 8081})
follower.load(cfg)
"""


def apply_ruleset(gw: Node, cfg_path: Path) -> None:
    """The appliance's ruleset, applied inside gw (never in the namespace pytest runs in),
    and the leased set loaded from the store, as the net role does before it starts."""
    gw.run(sys.executable, "-c", APPLY_RULESET, str(cfg_path))


def write_config(directory: Path, http_port: int = 80, extra: str = "") -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    for table in ("servers.toml", "access.toml"):
        (directory / table).write_text((ROOT / "policies" / table).read_text())
    path = directory / "appliance.toml"
    path.write_text(
        f"""
[interfaces]
guest = "guest0"
guest_address = "192.168.1.1/24"
uplink = "seg0"
uplink_address = "198.51.100.1/24"
management_address = "198.51.100.1"

[portal]
http_port = {http_port}
hostname = "portal.guest.example"
session_idle = 1800
session_max = 7200
{extra}

[policies]
servers = "servers.toml"
access = "access.toml"
users = "users.toml"
admins = "admins.toml"

[state]
directory = "{directory / "state"}"
"""
    )
    return path


@cache
def _hash(password: str) -> str:
    # a real argon2id hash, made once per password per run (each costs ~1 s on a busy box)
    return passwords.hash_password(password)


def add_user(cfg: Config, user: str, password: str, **attrs: str) -> None:
    table = accounts.load(cfg.policies.users)
    table[user] = accounts.Account(user, _hash(password), attrs)
    accounts.save(cfg.policies.users, table)


def load(path: Path) -> Config:
    return config.load(path)
