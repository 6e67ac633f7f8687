"""The `authenticated` set as the session layer sees it: wait for the net role's receipt.

The portal calls `authorize` after it has written a session (which signs a grant
for it, see `members`), `SessionStore.end` calls `revoke` after it has ended one.
Neither touches nftables: the net role
follows the sessions in the store (a poll of 20 ms), puts the (IP, MAC) pairs of
the active ones into the set and writes a receipt (`members`); these calls wait
for that receipt, so a login answers "online" only once the kernel lets the guest
through, and the guest-facing roles need no CAP_NET_ADMIN.  Without a running net
role nothing is confirmed and `authorize` fails: the portal then ends the session
and says so (fail closed).  A pair is matched on IP *and* MAC, so a guest that
copies another guest's address gains nothing.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from appliance.core.config import Config
from appliance.net import members, nft
from appliance.net.setup import check_pair
from appliance.state import grants, schema, store
from appliance.state.sessions import SessionStore

SET = "authenticated"
WAIT = 3.0  # the net role confirms within a poll or two; this is for a loaded box


class NotConfirmed(RuntimeError):
    """The net role did not confirm the change in time (is appliance-net running?)."""


class Firewall:
    def __init__(self, config: Config, wait: float = WAIT) -> None:
        self.config = config
        self.wait = wait

    def _until(self, ip: str, mac: str, present: bool) -> None:
        conn = store.open_store(self.config.state)
        try:
            schema.upgrade(conn)
            deadline = time.monotonic() + self.wait
            delay = 0.002
            while grants.confirmed(conn, ip, mac) != present:
                if time.monotonic() >= deadline:
                    what = "put" if present else "taken out"
                    raise NotConfirmed(
                        f"the net role has not {what} {ip} {mac} in {SET} within "
                        f"{self.wait:.0f} s (is appliance-net running?)"
                    )
                time.sleep(delay)
                delay = min(delay * 2, 0.02)
        finally:
            conn.close()

    def authorize(self, ip: str, mac: str) -> None:
        """Grant the active session of (ip, mac), then wait until the net role let it in."""
        ip, mac = check_pair(ip, mac)
        conn = store.open_store(self.config.state)
        try:
            schema.upgrade(conn)
            sess = SessionStore(conn).lookup_ip(ip)
            if sess is None or sess.mac != mac:
                raise NotConfirmed(f"no active session of {ip} {mac} to let in")
            key = members.grant_key(self.config.state.directory)
            members.grant(conn, key, sess.id, ip, mac)
        finally:
            conn.close()
        self._until(ip, mac, present=True)

    def revoke(self, ip: str, mac: str) -> None:
        """Wait until the net role has taken the pair out (the caller ended its session)."""
        ip, mac = check_pair(ip, mac)
        self._until(ip, mac, present=False)

    def members(self) -> set[tuple[str, str]]:
        """What the kernel's set holds (needs CAP_NET_ADMIN, like any nftables read)."""
        return nft.set_elements(SET)


def revoker(config: Config) -> Callable[[str, str], None]:
    """What an ended session calls (`SessionStore.from_config(revoke=...)`): it returns
    once the net role has taken its (IP, MAC) out of the authenticated set."""

    def revoke(ip: str, mac: str) -> None:
        Firewall(config).revoke(ip, mac)

    return revoke
