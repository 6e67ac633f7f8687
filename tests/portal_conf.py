"""A complete appliance config for portal tests (the lab's address plan), written to a dir."""

from __future__ import annotations

import sys
import time
from functools import cache
from pathlib import Path

from appliance.accounts import site as accounts
from appliance.core import config, passwords
from appliance.core.config import Config
from appliance.lab.topology import Node

ROOT = Path(__file__).resolve().parent.parent


def apply_ruleset(gw: Node, cfg_path: Path) -> None:
    """The net role inside gw (never in the namespace pytest runs in): the ruleset, the
    leased set, and the sessions followed into `authenticated` (a login waits for it)."""
    proc = gw.start(sys.executable, "-m", "appliance", "run", "--config", str(cfg_path), "net",
                    name="net")  # fmt: skip
    deadline = time.monotonic() + 20
    while "appliance.net.follower" not in proc.output():  # its first full load is logged
        if not proc.alive() or time.monotonic() > deadline:
            raise RuntimeError(f"the net role did not start:\n{proc.output()}")
        time.sleep(0.1)


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
