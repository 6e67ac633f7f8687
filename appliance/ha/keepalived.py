"""keepalived's configuration for one box of an active/standby pair, from [ha].

VRRP runs on the segment side (`[ha] interface`, the uplink by default) by unicast to
the other box: guests never see an advert, and cannot forge one to take the guest
address or to make both boxes stand down.  The virtual address is the guest address,
placed on the guest interface of whichever box is active; keepalived sends gratuitous
ARP there, so guests move to the new box's MAC at once.

A box holds the address only while its guest-facing roles run: keepalived runs
`appliance ha check` (as `python -m appliance.ha.health`, which starts in a fifth of a
second) every second (`vrrp_script`), and two failures in a row put the
instance in FAULT, which gives the address up (appliance/ha/health.py).

Both boxes start as BACKUP with `nopreempt`: a box that comes back after a failure
stays standby instead of taking the address back (each move resets the guests' open
TCP connections), and the priority only decides who goes first when both start.
"""

from __future__ import annotations

import shlex
import sys

from appliance.core.config import Config


class HaDisabled(ValueError):
    pass


def render(config: Config) -> str:
    """The whole keepalived.conf text for this box."""
    ha, ifs = config.ha, config.interfaces
    if not ha.enabled or ifs.uplink_address is None:
        raise HaDisabled(f"{config.path}: [ha] enabled is false")
    peers = "\n".join(f"        {p}" for p in ha.peers)
    # through sh, with stdio on /dev/null: run directly by keepalived 2.2, the check
    # exited 1 before it reached its own code (keepalived's stdio for scripts)
    inner = shlex.join([sys.executable, "-m", "appliance.ha.health", "--config", str(config.path)])
    if "'" in inner:
        raise ValueError(f"{config.path}: a path with a quote cannot go into keepalived.conf")
    check = f"/bin/sh -c 'exec {inner} </dev/null >/dev/null 2>&1'"
    return f"""\
# keepalived.conf for an appliance of an active/standby pair: written by
# `appliance ha keepalived-conf` from {config.path}; edit that file, not this one.
global_defs {{
    router_id appliance-{ifs.uplink_address.ip}
    vrrp_version 3
    enable_script_security
    script_user root
}}

vrrp_script roles {{
    script "{check}"
    interval 1
    timeout 3
    fall 2
    rise 2
}}

vrrp_instance guest {{
    state BACKUP
    nopreempt
    interface {ha.interface}
    virtual_router_id {ha.router_id}
    priority {ha.priority}
    advert_int {ha.advert_interval:g}
    unicast_src_ip {ifs.uplink_address.ip}
    unicast_peer {{
{peers}
    }}
    virtual_ipaddress {{
        {ifs.guest_address} dev {ifs.guest}
    }}
    track_interface {{
        {ifs.guest}
    }}
    track_script {{
        roles
    }}
    garp_master_delay 1
    garp_master_repeat 3
    garp_master_refresh 60
}}
"""
