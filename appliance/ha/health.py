"""Whether this box can serve guests: what keepalived asks before it holds the guest
address (its `vrrp_script`, appliance/ha/keepalived.py).

Without it, a box whose roles died (the supervisor stops them all when one exits)
keeps the address while keepalived lives, and every guest is cut off although the
standby is healthy.  With it, keepalived drops to FAULT, gives the address up, and
the other box takes it.  The roles a guest needs are those on the guest's path; the
admin pages and the relay dialer are not worth moving every guest's connections for.
"""

from __future__ import annotations

from appliance.core.config import Config
from appliance.core.pidfiles import running_roles

GUEST_ROLES = ("net", "dhcp", "dns", "portal", "proxy")


def missing_roles(config: Config) -> list[str]:
    """The guest-facing roles with no live process (by their pid files)."""
    running = running_roles(config)
    return [role for role in GUEST_ROLES if role not in running]


__all__ = ["GUEST_ROLES", "missing_roles"]
