"""Pid files of running roles, so `appliance reload` can find them.

`appliance run ROLE` (each role runs in its own process, supervised or under
systemd) writes `<state.directory>/run/ROLE.pid` while it runs and removes it
when it ends.  `signal_roles` sends SIGHUP to every role whose pid file names a
live process that is still an appliance role (a stale file after a crash, or a
pid reused by another program, is skipped).
"""

from __future__ import annotations

import contextlib
import os
import signal
from collections.abc import Iterator
from pathlib import Path

from appliance.core.config import Config


def run_dir(config: Config) -> Path:
    return config.state.directory / "run"


@contextlib.contextmanager
def pidfile(config: Config, role: str) -> Iterator[Path]:
    """Write ROLE.pid for the duration of the block (best effort: a read-only state dir
    must not stop a role from serving)."""
    path = run_dir(config) / f"{role}.pid"
    written = False
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".pid.tmp")
        tmp.write_text(f"{os.getpid()}\n")
        os.replace(tmp, path)
        written = True
    except OSError:
        pass
    try:
        yield path
    finally:
        if written:
            with contextlib.suppress(OSError):
                if path.read_text().strip() == str(os.getpid()):
                    path.unlink()


def _is_role(pid: int) -> bool:
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    return any(b"appliance" in part for part in cmdline) and b"run" in cmdline


def running_roles(config: Config) -> dict[str, int]:
    """role -> pid of the roles that run now (by their pid files)."""
    return running_in(run_dir(config))


def running_in(directory: Path) -> dict[str, int]:
    """running_roles by the run directory alone (`<state.directory>/run`)."""
    out: dict[str, int] = {}
    if not directory.is_dir():
        return out
    for path in sorted(directory.glob("*.pid")):
        try:
            pid = int(path.read_text().strip())
        except (OSError, ValueError):
            continue
        if _is_role(pid):
            out[path.stem] = pid
    return out


def signal_roles(config: Config, sig: int = signal.SIGHUP) -> dict[str, int]:
    """Send `sig` to every running role; returns the ones reached."""
    reached = {}
    for role, pid in running_roles(config).items():
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, sig)
            reached[role] = pid
    return reached
