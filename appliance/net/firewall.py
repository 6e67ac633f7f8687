"""The `authenticated` set: who may use the service proxies, as (IP, MAC) pairs.

The session layer calls `authorize` on login and `revoke` on logout or expiry.
Each call is one nftables transaction, through libnftables in-process (about a
millisecond; `nft` as a subprocess when the library is missing), so a session
change reaches the kernel well within 100 ms.  Create the object in the network
namespace of the rules (the library's netlink socket stays in it).  A pair is
matched on IP *and* MAC, so a guest that copies another guest's address gains nothing.
"""

from __future__ import annotations

from collections.abc import Callable

from appliance.core.config import Config
from appliance.net import nft
from appliance.net.setup import check_pair

SET = "authenticated"


class Firewall:
    def __init__(self, config: Config) -> None:
        self.config = config
        self._lib = nft.runner()

    def _run(self, script: str) -> None:
        if self._lib is not None:
            self._lib.run(script)
        else:
            nft.run(script)

    def authorize(self, ip: str, mac: str) -> None:
        """Add the pair (idempotent: adding a present element is not an error)."""
        ip, mac = check_pair(ip, mac)
        self._run(f"add element inet {nft.TABLE} {SET} {{ {ip} . {mac} }}\n")

    def revoke(self, ip: str, mac: str) -> None:
        """Remove the pair; add-then-delete in one transaction makes it idempotent."""
        ip, mac = check_pair(ip, mac)
        elem = f"inet {nft.TABLE} {SET} {{ {ip} . {mac} }}"
        self._run(f"add element {elem}\ndelete element {elem}\n")

    def members(self) -> set[tuple[str, str]]:
        return nft.set_elements(SET)


def revoker(config: Config) -> Callable[[str, str], None]:
    """What an ended session calls (`SessionStore.from_config(revoke=...)`): its (IP, MAC)
    leaves the authenticated set, in the namespace of the calling process."""

    def revoke(ip: str, mac: str) -> None:
        Firewall(config).revoke(ip, mac)

    return revoke
