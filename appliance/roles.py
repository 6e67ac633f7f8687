"""The roles `appliance run` can start, and how several of them run side by side.

A role is a function `main(config) -> int` that serves until SIGTERM.  One role
runs in the calling process (that is what each systemd unit does); several run
as one child process each, supervised here, so a crash in one never takes the
others down with it and each keeps its own event loop.
"""

from __future__ import annotations

import importlib
import logging
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from appliance.core.config import Config

log = logging.getLogger("appliance.run")

# role name -> "module:function"; each issue that builds a role fills in its line.
ROLES: dict[str, str] = {
    "net": "appliance.net.service:main",
    "dhcp": "dhcp.service:main",
    "dns": "appliance.dns.service:main",
    "portal": "appliance.portal.service:main",
    "proxy": "appliance.proxy.service:main",
    "admin": "appliance.admin.service:main",
    "homelink": "appliance.homelink.service:main",
}


class RoleUnavailable(Exception):
    pass


def resolve(role: str) -> Callable[[Config], int]:
    target = ROLES.get(role)
    if target is None:
        raise RoleUnavailable(f"unknown role {role!r}; roles are {', '.join(ROLES)}")
    module, func = target.split(":")
    try:
        mod = importlib.import_module(module)
    except ModuleNotFoundError as exc:
        if exc.name and module.startswith(exc.name):
            raise RoleUnavailable(f"role {role!r} is not part of this build ({module})") from None
        raise
    fn: Callable[[Config], int] = getattr(mod, func)
    return fn


def run_one(role: str, config: Config) -> int:
    from appliance.core.pidfiles import pidfile  # so `appliance reload` finds the role

    main = resolve(role)
    with pidfile(config, role):
        return main(config)


def supervise(roles: list[str], config_path: Path, log_level: str) -> int:
    """Start one child per role; stop them all on SIGTERM/SIGINT, pass SIGHUP on (reload)."""
    for role in roles:
        resolve(role)  # fail early, before anything starts
    net_config = None
    if "net" in roles:  # the guest side is closed before any guest-facing role listens
        from appliance.core.config import load
        from appliance.net import service as net

        net_config = load(config_path)
        net.up(net_config)
    children: dict[str, subprocess.Popen[bytes]] = {}
    for role in roles:
        argv = [
            sys.executable,
            "-m",
            "appliance",
            "--log-level",
            log_level,
            "run",
            "--config",
            str(config_path),
            role,
        ]
        children[role] = subprocess.Popen(argv)
        log.info("started role %s (pid %d)", role, children[role].pid)

    stopping = False

    def on_signal(signum: int, _frame: object) -> None:
        nonlocal stopping
        if signum == signal.SIGHUP:
            for child in children.values():
                child.send_signal(signal.SIGHUP)
            return
        stopping = True

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, on_signal)
    status = 0
    while not stopping:
        for role, child in children.items():
            rc = child.poll()
            if rc is not None:
                log.error("role %s exited with %d; stopping the others", role, rc)
                status = rc or 1
                stopping = True
        time.sleep(0.2)
    for child in children.values():
        if child.poll() is None:
            child.terminate()
    for child in children.values():
        try:
            child.wait(10)
        except subprocess.TimeoutExpired:
            child.kill()
    if net_config is not None:  # even when the net role itself died: the guest side stays shut
        net.close(net_config)
    return status
