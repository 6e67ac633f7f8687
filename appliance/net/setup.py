"""Install and remove the appliance's nftables table (`inet appliance`) as one transaction.

The rules are kept as readable text in `ruleset.nft`; this module only fills in the
interface, addresses, ports and the generated per-port lines, then replaces the
whole table atomically: there is never a moment with half a ruleset.  Members of
the `authenticated` and `leased` sets survive a re-apply (a reload must not log
everyone out or cut guests off).
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Mapping
from importlib import resources
from string import Template

from appliance.core.config import STAND_IN, Config
from appliance.net import nft

_IFNAME = re.compile(r"^[A-Za-z0-9_.@-]{1,15}$")
_MAC = re.compile(r"^[0-9a-f]{2}(:[0-9a-f]{2}){5}$")


def _port(p: int) -> int:
    if not isinstance(p, int) or not 1 <= p <= 65535:
        raise ValueError(f"bad port {p!r}")
    return p


def check_pair(ip: str, mac: str) -> tuple[str, str]:
    """Validate an (ip, mac) pair before it goes into nft text; returns the normal form."""
    addr = ipaddress.IPv4Address(ip)
    mac = mac.lower().replace("-", ":")
    if not _MAC.match(mac):
        raise ValueError(f"{mac!r} is not a MAC address")
    return str(addr), mac


def _guest_if(config: Config) -> str:
    guest_if = config.interfaces.guest
    if not _IFNAME.match(guest_if):
        raise ValueError(f"bad interface name {guest_if!r}")
    return guest_if


def portal_ports(config: Config) -> list[int]:
    ports = [config.portal.http_port]
    if config.portal.https_port:
        ports.append(config.portal.https_port)
    return ports


def render(
    config: Config,
    intercepts: Mapping[int, int],
    authenticated: set[tuple[str, str]] | None = None,
    leased: set[tuple[str, str]] | None = None,
) -> str:
    """The table as nft text; `intercepts` maps guest TCP port -> local listener port."""
    guest_if = _guest_if(config)
    gip = str(config.interfaces.guest_ip)
    listen: list[int] = []
    intercept_lines = []
    for port, local in sorted(intercepts.items()):
        _port(port)
        _port(local)
        listen.append(local)
        intercept_lines.append(
            f"        ip saddr . ether saddr @authenticated tcp dport {port} "
            f"dnat ip to {gip}:{local}"
        )
    if config.proxy.explicit_http_port:
        listen.append(config.proxy.explicit_http_port)
    member_lines = []
    if listen:
        ports = ", ".join(str(p) for p in sorted(set(listen)))
        member_lines.append(
            f"        ip saddr . ether saddr @authenticated ip daddr {gip} "
            f"tcp dport {{ {ports} }} accept"
        )
    blocks = {
        "intercept_rules": intercept_lines,
        "member_rules": member_lines,
        "authenticated_elements": _elements(authenticated),
        "leased_elements": _elements(leased),
    }
    text = resources.files("appliance.net").joinpath("ruleset.nft").read_text()
    out = []
    for line in text.splitlines():
        if line.startswith("# @"):
            out.extend(blocks[line[3:].strip()])
        else:
            out.append(line)
    return Template("\n".join(out) + "\n").substitute(
        guest_if=guest_if,
        guest_ip=gip,
        dns_port=_port(config.dns.port),
        portal_http=_port(config.portal.http_port),
        portal_ports=", ".join(str(_port(p)) for p in portal_ports(config)),
        portal_conn_cap=int(config.portal.connections_per_guest),
        proxy_conn_cap=int(config.proxy.connections_per_guest),
        stand_in=STAND_IN,
    )


def _elements(pairs: set[tuple[str, str]] | None) -> list[str]:
    if not pairs:
        return []
    checked = {check_pair(ip, mac) for ip, mac in pairs}
    return [f"        elements = {{ {nft.elements_text(checked)} }}"]


def apply(config: Config, intercepts: Mapping[int, int]) -> None:
    """Replace our table in one transaction, keeping the members of both sets."""
    keep_auth = nft.set_elements("authenticated")
    keep_leased = nft.set_elements("leased")
    body = render(config, intercepts, keep_auth, keep_leased)
    # `table` first makes the delete valid when the table does not exist yet
    nft.run(f"table inet {nft.TABLE}\ndelete table inet {nft.TABLE}\n{body}")


def render_closed(config: Config) -> str:
    """The drop-everything table (closed.nft) for the guest interface."""
    text = resources.files("appliance.net").joinpath("closed.nft").read_text()
    return Template(text).substitute(guest_if=_guest_if(config))


def close(config: Config) -> None:
    """Replace our table with the drop-everything one, in one transaction; idempotent.

    What the net role leaves when it stops: the guest side is never open without it."""
    body = render_closed(config)
    nft.run(f"table inet {nft.TABLE}\ndelete table inet {nft.TABLE}\n{body}")


def is_closed() -> bool:
    """Whether the loaded table is the drop-everything one."""
    return nft.query("list", "counter", "inet", nft.TABLE, "guest_closed") is not None


def remove(config: Config) -> None:
    """Remove our table (and with it every rule and set); idempotent."""
    nft.run(f"table inet {nft.TABLE}\ndelete table inet {nft.TABLE}\n")
