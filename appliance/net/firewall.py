"""The `authenticated` set: who may use the service proxies, as (IP, MAC) pairs.

The session layer calls `authorize` on login and `revoke` on logout or expiry.
Each call is one `nft` transaction (a few milliseconds), so a session change
reaches the kernel well within 100 ms.  A pair is matched on IP *and* MAC, so a
guest that copies another guest's address gains nothing.
"""

from __future__ import annotations

from appliance.config import Config
from appliance.net import nft
from appliance.net.setup import check_pair

SET = "authenticated"


class Firewall:
    def __init__(self, config: Config) -> None:
        self.config = config

    def authorize(self, ip: str, mac: str) -> None:
        """Add the pair (idempotent: adding a present element is not an error)."""
        ip, mac = check_pair(ip, mac)
        nft.run(f"add element inet {nft.TABLE} {SET} {{ {ip} . {mac} }}\n")

    def revoke(self, ip: str, mac: str) -> None:
        """Remove the pair; add-then-delete in one transaction makes it idempotent."""
        ip, mac = check_pair(ip, mac)
        elem = f"inet {nft.TABLE} {SET} {{ {ip} . {mac} }}"
        nft.run(f"add element {elem}\ndelete element {elem}\n")

    def members(self) -> set[tuple[str, str]]:
        return nft.set_elements(SET)
