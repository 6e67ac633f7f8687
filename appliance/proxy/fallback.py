"""A connection's upstreams, tried in order until one answers: the fallback rule, once.

Both relay paths connect to upstreams their own way (raw.py's `Connector`: a
non-blocking connect in the relay's epoll; relay.py's `Link`: asyncio's
`create_connection`, TLS, or a stream through a household's agent), and both
follow one rule, which lives here, sans-IO: the candidates in the server
table's order, each failure recorded (`upstream_failed`: the log line and the
metric) with its reason, and, when none answered, the guest refused as "no
upstream", with what an agent said appended for the access log.  Written once
so that the two paths cannot drift apart in what they try or count.
"""

from __future__ import annotations

from dataclasses import replace

from appliance.proxy.gate import Refusal, Upstream, no_upstream
from appliance.proxy.tracked import upstream_failed


class Fallback:
    """The upstreams of one connection in the order to try them: `next()` gives the next
    one (None: all are spent, `refusal()` says so to the guest), `failed()` records why
    one could not be used."""

    __slots__ = ("detail", "i", "service", "ups")

    def __init__(self, service: str, ups: tuple[Upstream, ...] = ()) -> None:
        self.service = service
        self.ups = ups
        self.i = 0
        self.detail = ""  # appended to the refusal's reason: what agents answered

    def add(self, up: Upstream) -> None:
        """One more candidate, after the others (an upstream's name, once resolved)."""
        self.ups += (up,)

    def next(self) -> Upstream | None:
        """The next upstream to try; None when every one has been tried."""
        if self.i >= len(self.ups):
            return None
        up = self.ups[self.i]
        self.i += 1
        return up

    def failed(self, up: Upstream, why: str, agent: str | None = None) -> None:
        """This upstream could not be used, for this reason (logged with its name, counted
        per service); `agent`: the code a household's agent gave, kept for the refusal."""
        upstream_failed(self.service, up, why)
        if agent is not None:
            self.detail += f" (the agent: {agent})"

    def refusal(self, user: str | None, rule: str | None) -> Refusal:
        """No upstream answered: the guest's refusal, with every agent's code in its reason."""
        r = no_upstream(user, rule)
        return replace(r, reason=r.reason + self.detail) if self.detail else r
