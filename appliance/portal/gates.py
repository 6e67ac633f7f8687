"""The portal's calls into the other parts: policy, firewall, personal agent.

Each is one small function, so the portal's tests can put their own in its
`Deps`.  Every part is required: a missing or failing one raises, and the login
it was for is refused (nothing here pretends a firewall entry or a policy
decision exists when it does not).
"""

from __future__ import annotations

import logging
import socket
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

from appliance.core import agent_protocol as wire
from appliance.core.attributes import Attributes
from appliance.core.config import Config
from appliance.homelink import dialer_client
from appliance.policy import trusted_agents

if TYPE_CHECKING:
    from appliance.policy import Policy

log = logging.getLogger("appliance.portal")


@dataclass(frozen=True)
class Verdict:
    allowed: bool
    reason: str
    rule: str | None = None
    session_max: int | None = None  # the deciding rule's, in seconds (None: the portal's)


# -- access rights -------------------------------------------------------------------
_policy: Policy | None = None
_policy_lock = threading.Lock()


def policy(config: Config) -> Policy:
    """The access-rights and server tables, loaded once (a broken table raises)."""
    global _policy
    with _policy_lock:
        if _policy is None:
            # imported here: tests put their own tables in sys.modules
            from appliance.policy import Policy

            _policy = Policy.load(config)
        return _policy


def reload_policy() -> None:
    """SIGHUP: reload the tables; on error the old ones stay (Policy.reload's contract)."""
    if _policy is not None:
        try:
            _policy.reload()
            log.info("access-rights and server tables reloaded")
        except Exception as exc:
            log.error("table reload failed, keeping the old tables: %s", exc)


def may_use_network(config: Config, attributes: Attributes) -> Verdict:
    """Login gate: may these attributes use the network at all?"""
    d = policy(config).access.may_use_network(attributes)
    return Verdict(bool(d.allowed), str(d.reason), d.rule, d.session_max)


def services(config: Config, attributes: Attributes) -> list[tuple[str, Verdict]]:
    """Each service of the server table with the decision for these attributes."""
    pol = policy(config)
    out = []
    for name in sorted(pol.servers.services):
        d = pol.access.decide(attributes, name)
        out.append((name, Verdict(bool(d.allowed), str(d.reason), d.rule)))
    return out


# -- firewall --------------------------------------------------------------------------
def authorize(config: Config, ip: str, mac: str) -> None:
    """Open the network for (ip, mac) in nftables; raises when it cannot."""
    from appliance.net.firewall import Firewall

    Firewall(config).authorize(ip, mac)


# -- personal agent ----------------------------------------------------------------------
@dataclass(frozen=True)
class AgentResult:
    user: str  # "user@agent": the agent's word is never taken for a site user id
    attributes: Attributes  # what the trusted-agents table lets this agent assert, + source/agent
    servers: Mapping[str, str]
    agent: str = ""  # the agent's id: its trusted-agents entry, or the host as typed
    trusted: bool = False


class AgentFailure(Exception):
    def __init__(self, code: str, message: str):
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


_trust: trusted_agents.LiveTable | None = None
_trust_lock = threading.Lock()


def trust_table(config: Config) -> trusted_agents.AgentTable:
    """The trusted-agents table in force (re-read when its file changes)."""
    global _trust
    with _trust_lock:
        if _trust is None or _trust.path != config.policies.agents:
            _trust = trusted_agents.LiveTable(config.policies.agents)
        live = _trust
    return live.current()


def agent_authenticate(config: Config, spec: str, password: str) -> AgentResult:
    """Ask the visitor's personal agent; AgentFailure(code) on any refusal or fault.

    The answer is then cut down to what the site takes from that agent (see
    appliance.policy.trusted_agents): the user id becomes user@agent, and attributes only
    pass from an agent the trusted-agents table names, and only its listed keys."""
    from appliance.agent import client  # here: tests put a fake agent in sys.modules

    sock = _through_relay(config, spec)
    try:
        if sock is None:
            ans = client.authenticate(config, spec, password)
        else:
            ans = client.authenticate(config, spec, password, sock=sock, relayed=True)
    except client.AgentError as exc:
        raise AgentFailure(str(exc.code), str(exc.message)) from None
    where = str(getattr(ans, "agent", "") or spec.split("#")[0].rpartition("@")[2])
    try:
        host, port = wire.parse_hostport(where, config.agent.default_port)
    except ValueError:
        raise AgentFailure("bad_address", f"not an agent address: {where}") from None
    try:
        v = trust_table(config).vouch(
            str(ans.user),
            dict(ans.attributes),
            host,
            port,
            config.agent.default_port,
            str(getattr(ans, "fingerprint", "") or ""),
            str(getattr(ans, "verified_name", "") or ""),
        )
    except trusted_agents.NotThatAgent as exc:
        log.warning("agent login refused: %s", exc)
        raise AgentFailure("bad_certificate", str(exc)) from None
    if v.dropped:
        log.info(
            "agent %s (%s): attributes not taken from it: %s",
            v.agent,
            "trusted" if v.trusted else "not trusted",
            ", ".join(v.dropped),
        )
    return AgentResult(v.user, v.attributes, dict(ans.servers), v.agent, v.trusted)


# the dialer's refusals as the portal's agent failure codes (portal/app.py _agent_refusal)
_DIALER_FAILURES = {"offline": "offline", "limit": "rate_limited", "timeout": "timeout"}


def _through_relay(config: Config, spec: str) -> socket.socket | None:
    """A stream to the agent when `spec` names a household behind a relay the site
    lists (USER@HOUSEHOLD.RELAY#PIN), else None (the agent is dialled directly)."""
    if not config.home_relay.enabled:
        return None
    where, _, pin = spec.strip().partition("#")
    try:
        host, _port = wire.parse_hostport(where.rpartition("@")[2], config.agent.default_port)
    except ValueError:
        return None  # authenticate says what is wrong with it
    hop = dialer_client.relayed(config.home_relay, host)
    if hop is None:
        return None
    try:
        wire.parse_fingerprint(pin)
    except ValueError:  # checked before a stream is opened for it
        raise AgentFailure(
            "bad_address",
            "a household behind a relay is named with its fingerprint:"
            " user@household.relay#sha256:...",
        ) from None
    try:
        return dialer_client.dial(config.home_relay, *hop, config.agent.timeout)
    except dialer_client.DialerError as exc:
        log.warning("agent login via relay %s for %s: %s", hop[0], hop[1], exc)
        raise AgentFailure(_DIALER_FAILURES.get(exc.code, "unreachable"), exc.message) from None


def allow_command(config: Config) -> str:
    """What a household runs at home to allow this appliance (the portal shows it to the
    visitor whose agent refused it as not yet allowed)."""
    from appliance.agent import client
    from appliance.core import agent_protocol as wire

    return wire.allow_command(client.appliance_key_id(config))
