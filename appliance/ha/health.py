"""Whether this box can serve guests: what keepalived asks before it holds the guest
address (its `vrrp_script`, appliance/ha/keepalived.py).

Without it, a box whose roles died (the supervisor stops them all when one exits)
keeps the address while keepalived lives, and every guest is cut off although the
standby is healthy.  With it, keepalived drops to FAULT, gives the address up, and
the other box takes it.  The roles a guest needs are those on the guest's path; the
admin pages and the relay dialer are not worth moving every guest's connections for.
"""

from __future__ import annotations

import argparse
import sys
import tomllib
from collections.abc import Sequence
from pathlib import Path

from appliance.core.config import Config, ConfigError, add_config_arg, load
from appliance.core.pidfiles import running_in, running_roles

GUEST_ROLES = ("net", "dhcp", "dns", "portal", "proxy")


def missing_roles(config: Config) -> list[str]:
    """The guest-facing roles with no live process (by their pid files)."""
    running = running_roles(config)
    return [role for role in GUEST_ROLES if role not in running]


def _state_directory(path: Path) -> Path | None:
    """[state] directory from the file as TOML, unvalidated (None: not even that)."""
    try:
        doc = tomllib.loads(path.read_text(encoding="utf-8"))
        directory = doc.get("state", {}).get("directory", "/var/lib/appliance")
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError, AttributeError):
        return None
    return Path(directory) if isinstance(directory, str) else None


def main(argv: Sequence[str] | None = None) -> int:
    """keepalived's check, `python -m appliance.ha.health --config PATH`: exit 0 when
    the guest-facing roles run.  Its own small entry point: keepalived runs it every
    second with a timeout, and the whole CLI takes most of a second just to import."""
    parser = argparse.ArgumentParser(prog="appliance ha check")
    add_config_arg(parser)
    args = parser.parse_args(argv)
    try:
        missing = missing_roles(load(args.config))
    except ConfigError as exc:
        # a bad edit of the file, not yet loaded by the roles, must not take the address
        # from both boxes at once: judge by the run directory the file still names
        print(f"appliance: {exc} (judging by the pid files)", file=sys.stderr)
        directory = _state_directory(args.config)
        if directory is None:
            return 2
        running = running_in(directory / "run")
        missing = [role for role in GUEST_ROLES if role not in running]
    if missing:
        print(f"appliance: not serving guests: {', '.join(missing)} not running", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

__all__ = ["GUEST_ROLES", "main", "missing_roles"]
