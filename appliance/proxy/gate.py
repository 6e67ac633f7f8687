"""Who may go where: the one place the relay meets sessions and policy.

The relay only knows the `Gate` protocol: `admit(src_ip, service)` returns an
`Admission` (user, rule, upstreams in order) or a `Refusal` (why, in words the
relay turns into protocol replies).  `StaticGate` is a table in memory, used by
tests and the lab; `PolicyGate` is the appliance's real gate over the shared
`SessionStore` and the reloadable `Policy`, imported lazily so the relay and
its tests stand alone while those modules are built in parallel.
"""

from __future__ import annotations

import functools
import ipaddress
import json
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Protocol

from appliance.agent.client import AgentError, parse_spec
from appliance.core import agent_protocol as wire
from appliance.core import reach
from appliance.core.config import Config, HomeRelayConfig, Interfaces
from appliance.core.neighbours import neighbour_mac
from appliance.homelink.dialer_client import relayed
from appliance.policy import Policy
from appliance.policy.server_info import Service
from appliance.proxy.upstream_tls import UpstreamTls
from appliance.state.sessions import Session, SessionEvent, SessionStore, read_only

if TYPE_CHECKING:  # (agent_stream imports tracked, which imports this module)
    from appliance.proxy.agent_stream import AgentStreams

log = logging.getLogger("appliance.proxy.gate")

RefusalKind = Literal["login", "denied", "limit", "unavailable", "quota"]


@dataclass(frozen=True)
class Upstream:
    """One server to try; `name` goes into logs and pages, never the address."""

    name: str
    host: str
    port: int
    tls: UpstreamTls | None = None  # the relay speaks TLS to it (servers.toml `tls = true`)
    # a household's own server reached through its agent behind a home relay: the agent
    # spec (USER@HOUSEHOLD.RELAY#PIN); host and port are then unused (agent_stream.py)
    agent: str = ""
    # a dotted IPv4 address, connectable as it is (else a name for the resolver); worked
    # out once here, not on every connection that the gate's cached answer serves
    numeric: bool = field(init=False, compare=False, repr=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "numeric", is_ipv4(self.host))


@functools.lru_cache(maxsize=4096)
def is_ipv4(host: str) -> bool:
    """A dotted IPv4 address, strictly (no octal or short forms: those go to the
    resolver, which reads them its own way); cached: the HTTP path asks three times a
    request, and parsing with ipaddress was a tenth of its Python time."""
    try:
        ipaddress.IPv4Address(host)
    except ValueError:
        return False
    return True


@dataclass(frozen=True)
class Listener:
    """One local listening port and the service behind it."""

    service: str
    protocol: str  # smtp | pop3 | imap | http | tls | tcp: how it is read and refused
    port: int
    explicit: bool = False  # an explicit HTTP proxy port (no SO_ORIGINAL_DST)


@dataclass(frozen=True)
class Admission:
    user: str
    rule: str | None
    # in order: the site's server, then its fallbacks; or the visitor's personal one alone
    upstreams: tuple[Upstream, ...]
    max_connections: int | None = None
    identity: str | None = None  # value of the identity header, when configured
    session: str | None = None  # the session id: its end closes the connection
    # tls services: "server" (the upstreams), "proxy" (the upstreams are web proxies asked
    # for a tunnel to the ClientHello's name), "direct" (the guest's own destination)
    route: str = "server"
    # the rule's bytes per day for this user and service (None: no quota; relay.over_quota)
    quota_bytes_per_day: int | None = None


@dataclass(frozen=True)
class Refusal:
    kind: RefusalKind
    reason: str
    portal_url: str
    user: str | None = None
    rule: str | None = None


# The relay's own reasons, in one place (they drifted apart when each path had its own).
# What a guest reads is worded per protocol in refusals.py from the kind; these go to
# the access log and the HTTP pages, and never carry an address.
OVER_LIMIT = "too many connections from you"
QUOTA_SPENT = "quota for today used up"
NO_UPSTREAM = "no upstream reachable"
NO_SUCH_HOST = "no such host"
HIDDEN = "that address is not reachable from the guest network"


def over_limit(who: Admission) -> Refusal:
    return Refusal("limit", OVER_LIMIT, "", who.user, who.rule)


def quota_spent(who: Admission) -> Refusal:
    return Refusal("quota", QUOTA_SPENT, "", who.user, who.rule)


def no_upstream(user: str | None, rule: str | None) -> Refusal:
    return Refusal("unavailable", NO_UPSTREAM, "", user, rule)


class Gate(Protocol):
    # how the relay reaches an upstream with `agent` set (None: no home relay here)
    agent_streams: AgentStreams | None

    def listeners(self) -> tuple[Listener, ...]: ...

    def admit(self, src_ip: str, service: str) -> Admission | Refusal: ...

    def subscribe(self, callback: Callable[[], None]) -> None:
        """Call back after every table change (the relay re-checks open connections)."""

    def reload(self) -> None: ...

    def ended_after(self, last_id: int, limit: int) -> Sequence[SessionEvent]:
        """Ends of sessions after the event `last_id`, oldest first (the relay's follower)."""
        ...

    def last_session_event(self) -> int:
        """The newest session event's id: where the relay's follower starts."""
        ...


@dataclass
class StaticGate:
    """A gate from a small table: users by IP, their allowed services, servers per service.

    `table` = {"portal_url": str, "listeners": [{"service", "protocol", "port", "explicit"}],
    "servers": {service: ["host:port", ...]}, "users": {ip: {"user", "allow": [service],
    "rule", "max_connections", "personal": {service: "host:port"}}},
    "personal_allowed": [service], "routes": {service: route}}.  `path` makes it
    reloadable (SIGHUP in the runner).  A personal server "agent:USER@HOUSEHOLD.RELAY#PIN"
    is admitted only with `agent_streams` (its home relay settings) listing that relay.
    Answers are kept per (address, service) until `reload()`, as PolicyGate keeps
    them (so the relay benchmark pays what the appliance's gate costs, not a table
    walk per connection): whoever changes `table` calls `reload()`.
    """

    table: dict[str, Any]
    path: Path | None = None
    _subscribers: list[Callable[[], None]] = field(default_factory=list)
    ended: list[tuple[str, str, float]] = field(default_factory=list)
    _answers: dict[tuple[str, str], Admission | Refusal] = field(default_factory=dict)
    agent_streams: AgentStreams | None = None

    @classmethod
    def load(cls, path: Path) -> StaticGate:
        return cls(json.loads(path.read_text()), path)

    def listeners(self) -> tuple[Listener, ...]:
        return tuple(
            Listener(d["service"], d["protocol"], int(d["port"]), bool(d.get("explicit", False)))
            for d in self.table["listeners"]
        )

    def admit(self, src_ip: str, service: str) -> Admission | Refusal:
        key = (src_ip, service)
        answer = self._answers.get(key)
        if answer is None:
            if len(self._answers) > 10000:
                self._answers.clear()
            answer = self._answers[key] = self._decide(src_ip, service)
        return answer

    def _decide(self, src_ip: str, service: str) -> Admission | Refusal:
        portal = str(self.table.get("portal_url", "http://192.168.1.1/"))
        user = self.table["users"].get(src_ip)
        if user is None:
            return Refusal("login", "not logged in", portal)
        name = str(user["user"])
        rule = user.get("rule")
        if service not in user.get("allow", ()):
            return Refusal("denied", f"no rule allows {service}", portal, name, rule)
        ups: list[Upstream] = []
        personal = user.get("personal", {})
        if service in personal and service in self.table.get("personal_allowed", ()):
            text = str(personal[service])
            if wire.relayed_server_spec(text) is not None:
                protocol = next(
                    (d["protocol"] for d in self.table["listeners"] if d["service"] == service),
                    "tcp",
                )
                home = self.agent_streams.home_relay if self.agent_streams else None
                return _relayed_admission(
                    text, home, service, protocol, portal, name, rule, user.get("session"),
                    user.get("max_connections"), user.get("identity", name),
                )  # fmt: skip
            why = personal_problem(text)
            if why is not None:
                return Refusal("denied", f"your personal {service} server {why}", portal, name)
            where, _, pin = str(personal[service]).partition("#")
            host, port = _split(where)
            how = UpstreamTls.pinned(pin) if pin else None
            return Admission(
                name,
                rule,
                (Upstream(f"{service}/personal", host, port, how),),
                user.get("max_connections"),
                user.get("identity", name),
                user.get("session"),
            )
        tls = self.table.get("tls", {}).get(service)
        for i, spec in enumerate(self.table.get("servers", {}).get(service, ())):
            host, port = _split(spec)
            how = None
            if tls is not None:
                how = UpstreamTls(tls.get("name", host), tls.get("ca", ""), tls.get("pin", ""))
            ups.append(Upstream(f"{service}/site" + (f"#{i + 1}" if i else ""), host, port, how))
        return Admission(
            name,
            rule,
            tuple(ups),
            user.get("max_connections"),
            user.get("identity", name),
            user.get("session"),
            str(self.table.get("routes", {}).get(service, "server")),
            user.get("quota_bytes_per_day"),
        )

    def ended_after(self, last_id: int, limit: int) -> Sequence[SessionEvent]:
        """Sessions ended in this table: tests append (id, ip, time) to `ended` (and drop
        the user); the n-th entry is event n."""
        rows = [
            SessionEvent(n, t, "ended", sid, ip, "")
            for n, (sid, ip, t) in enumerate(self.ended, start=1)
        ][last_id : last_id + limit]
        if rows:
            self._answers.clear()
        return rows

    def last_session_event(self) -> int:
        return len(self.ended)

    def subscribe(self, callback: Callable[[], None]) -> None:
        self._subscribers.append(callback)

    def reload(self) -> None:
        if self.path is not None:
            self.table = json.loads(self.path.read_text())
        self._answers.clear()
        for cb in self._subscribers:
            cb()


def _split(spec: str) -> tuple[str, int]:
    host, _, port = spec.rpartition(":")
    return host, int(port)


RELAY_NOT_USED = "is behind a relay this appliance does not use"


def relayed_problem(text: str, home_relay: HomeRelayConfig | None, protocol: str) -> str | None:
    """Why a personal server "agent:USER@HOUSEHOLD.RELAY#PIN" (a visitor whose agent sits
    behind a home relay) cannot be reached through its agent, as words for the visitor;
    None: it can.  Refused, like any unusable personal server, never replaced by the
    site's.  The relay must be one this appliance lists and the agent pinned: the relay
    forwards bytes it cannot read, the pin is the whole proof of who answers."""
    spec_text = wire.relayed_server_spec(text)
    if spec_text is None:
        return "is not reached through an agent"
    if home_relay is None or not home_relay.enabled:
        return RELAY_NOT_USED
    try:
        spec = parse_spec(spec_text)
    except AgentError:
        return "names its agent in a form this appliance cannot read"
    if relayed(home_relay, spec.host) is None:
        return RELAY_NOT_USED
    if not spec.fingerprint:
        return "names an agent behind a relay without its certificate fingerprint"
    if protocol in ("http", "tls"):
        return "is reached through its agent, and this service's TLS is the guest's own"
    return None


def _relayed_admission(
    text: str,
    home_relay: HomeRelayConfig | None,
    service: str,
    protocol: str,
    portal: str,
    user: str,
    rule: str | None,
    session: str | None,
    max_connections: int | None,
    identity: str | None,
) -> Admission | Refusal:
    """A relayed personal server: the one upstream, through the agent, or a refusal."""
    why = relayed_problem(text, home_relay, protocol)
    if why is not None:
        log.warning("personal %s server of %s refused, the site's not used instead: %s",
                    service, user, why)  # fmt: skip
        return Refusal("denied", f"your personal {service} server {why}", portal, user, rule)
    agent = wire.relayed_server_spec(text) or ""
    ups = (Upstream(f"{service}/personal", "", 0, agent=agent),)
    return Admission(user, rule, ups, max_connections, identity, session)


def personal_problem(text: str, interfaces: Interfaces | None = None) -> str | None:
    """Why the relay cannot use a personal server "address:port[#sha256:pin]" (from the
    visitor's agent), as words for the visitor without the address; None: it can.  Such a server
    is refused, never replaced by the site's: that would hand the visitor's home
    credentials to the site.  `interfaces` (config.interfaces) adds appliance.core.reach's
    verdict; the agent client checked it at login, this is the seam's own check.
    The relayed form ("agent:...") is no address: see relayed_problem."""
    if wire.relayed_server_spec(text) is not None:
        return "is reached through its agent, not at an address"
    text, hashed, pin = text.partition("#")
    if hashed:
        try:
            wire.parse_fingerprint(pin)
        except ValueError:
            return "has a certificate pin that is not a sha256 fingerprint"
    host, sep, port = text.rpartition(":")
    if host.startswith("[") or ":" in host:
        return "is an IPv6 server, and this appliance relays to IPv4 servers only"
    if not sep or not port.isdigit() or not 1 <= int(port) <= 65535:
        return "is not address:port"
    if not is_ipv4(host):
        return "is not an IPv4 address (a name is resolved at login, not later)"
    why = reach.forbidden(interfaces, host) if interfaces is not None else None
    return None if why is None else f"may not be used here (it is {why})"


class PolicyGate:
    """The appliance's gate: `SessionStore.lookup_ip` + `Policy` (access.decide, upstreams_for).

    Wiring point for the lead: the imports below are the only places the relay
    touches the session and policy modules.
    """

    TOUCH_EVERY = 60.0  # seconds between session touches (relay traffic keeps a session alive)
    # A session found for an address is reused this long without asking the store
    # again (connection rate: the lookup is two SQLite queries and a JSON decode, the
    # MAC check reads /proc/net/arp).  An ended session leaves the cache at once
    # through `ended_after` (the relay polls it several times a second); what the
    # cache can miss for CACHE_TTL is a lease lapse not yet turned into an end.
    CACHE_TTL = 1.0

    def __init__(
        self,
        config: Config,
        policy: Policy | None = None,
        sessions: SessionStore | None = None,
        neighbour: Callable[[str], str | None] | None = None,
    ) -> None:
        self.config = config
        # the MAC behind a guest address (None: no complete entry on the guest interface)
        self.neighbour = neighbour or functools.partial(neighbour_mac, config.interfaces.guest)
        self.policy = policy or Policy.load(config)
        self.sessions = sessions or SessionStore.from_config(config, revoke=read_only)
        self._subscribers: list[Callable[[], None]] = []
        self._touched: dict[str, float] = {}
        # ip -> (until, session, mac, answers per service)
        self._cache: dict[
            str, tuple[float, Session, str | None, dict[str, Admission | Refusal]]
        ] = {}
        self.policy.subscribe(lambda _p: self._changed())
        self.agent_streams: AgentStreams | None = None
        if config.home_relay.enabled:
            from appliance.proxy.agent_stream import AgentStreams

            self.agent_streams = AgentStreams.from_config(config)

    @staticmethod
    def check(config: Config) -> None:
        """Load the tables once and drop them: their errors, before workers are forked."""
        Policy.load(config)

    def _changed(self) -> None:
        self._cache.clear()  # answers depend on the tables
        for cb in self._subscribers:
            cb()

    def listeners(self) -> tuple[Listener, ...]:
        out = [
            Listener(s.name, s.protocol, s.listen_port)
            for s in self.policy.servers.services.values()
        ]
        port = self.config.proxy.explicit_http_port
        if port and "http" in self.policy.servers.services:
            out.append(Listener("http", "http", port, explicit=True))
        return tuple(out)

    def portal_url(self) -> str:
        return str(self.config.portal.base_url(self.config.interfaces.guest_ip)) + "/"

    def admit(self, src_ip: str, service: str) -> Admission | Refusal:
        session, mac, answers = self._lookup(src_ip)
        if session is None:
            return Refusal("login", "not logged in", self.portal_url())
        if mac is None or mac != session.mac.lower():
            # no neighbour entry is no proof either: the session binds (IP, MAC), not IP
            log.warning("session of %s is bound to another MAC (or none seen); refused", src_ip)
            return Refusal("login", "address not bound to this device", self.portal_url())
        self._touch(session.id)
        answer = answers.get(service)
        if answer is None:  # the decision is a function of session and tables: cached with it
            answer = answers[service] = self._decide(session, service)
        return answer

    def _decide(self, session: Session, service: str) -> Admission | Refusal:
        portal = self.portal_url()
        services: Mapping[str, Service] = self.policy.servers.services
        # a tunnel is decided by the `connect` service when the table has one, else by
        # `https` (what a tunnel to port 443 is), else by `http`
        checked = service
        if service == "connect" and service not in services:
            checked = "https" if "https" in services else "http"
        decision = self.policy.access.decide(session.attributes, checked)
        if not decision.allowed:
            return Refusal("denied", decision.reason, portal, session.user, decision.rule)
        name = "http" if service == "connect" else service
        personal = session.personal_servers.get(name)
        svc = services.get(name)
        if personal is not None and svc is not None and svc.personal_allowed:
            if wire.relayed_server_spec(personal) is not None:  # through the agent, or nothing
                return _relayed_admission(
                    personal, self.config.home_relay, name, svc.protocol, portal, session.user,
                    decision.rule, session.id, decision.max_connections,
                    session.user if self.config.proxy.identity_header else None,
                )  # fmt: skip
            # the visitor's own server or nothing: never the site's in its place
            why = personal_problem(personal, self.config.interfaces)
            if why is None and "#" in personal and svc.protocol in ("http", "tls"):
                why = "has a certificate pin, and this service's TLS is the guest's own"
            if why is None:
                endpoints = self.policy.servers.upstreams_for(name, session.personal_servers)
                if [f"{ep.host}:{ep.port}" for ep in endpoints] != [personal.partition("#")[0]]:
                    why = "is not accepted by the server table"
            if why is not None:
                log.warning(
                    "session %s: personal %s server refused, the site's not used instead: %s",
                    session.id[:8],
                    name,
                    why,
                )
                return Refusal("denied", f"your personal {name} server {why}", portal, session.user)
        else:
            endpoints = self.policy.servers.upstreams_for(name, session.personal_servers)
        ups = []
        mine, _, pin = (personal or "").partition("#")
        for i, ep in enumerate(endpoints):
            where = "personal" if mine == f"{ep.host}:{ep.port}" else "site"
            tls = None
            if where == "personal" and pin:  # the household's own server, by its pin
                tls = UpstreamTls.pinned(pin)
            elif svc is not None and svc.tls:  # (site servers: servers.toml allows no other)
                tls = UpstreamTls(svc.tls_name or ep.host, svc.tls_ca, svc.tls_fingerprint)
            label = f"{name}/{where}" + (f"#{i + 1}" if i else "")
            ups.append(Upstream(label, ep.host, ep.port, tls))
        header = self.config.proxy.identity_header
        return Admission(
            session.user,
            decision.rule,
            tuple(ups),
            decision.max_connections,
            session.user if header else None,
            session.id,
            svc.route if svc is not None else "server",
            decision.quota_bytes_per_day,
        )

    def _lookup(self, ip: str) -> tuple[Session | None, str | None, dict[str, Admission | Refusal]]:
        """The session of an address, the MAC the kernel sees for it and the answers
        given to it per service (all cached together, briefly)."""
        now = time.monotonic()
        hit = self._cache.get(ip)
        if hit is not None and hit[0] > now:
            sess = hit[1]
            wall = time.time()
            if sess.idle_expiry > wall and sess.absolute_expiry > wall:
                return hit[1], hit[2], hit[3]
        session = self.sessions.lookup_ip(ip)
        if session is None:
            self._cache.pop(ip, None)
            return None, None, {}
        mac = self.neighbour(ip)
        if len(self._cache) > 10000:
            self._cache.clear()
        answers: dict[str, Admission | Refusal] = {}
        self._cache[ip] = (now + self.CACHE_TTL, session, mac, answers)
        return session, mac, answers

    def ended_after(self, last_id: int, limit: int) -> Sequence[SessionEvent]:
        """Sessions ended after event `last_id` in the shared store; their addresses leave
        the cache."""
        rows = self.sessions.ended_after(last_id, limit)
        for ev in rows:
            self._cache.pop(ev.ip, None)
        return rows

    def last_session_event(self) -> int:
        return self.sessions.last_event()

    def _touch(self, session_id: str) -> None:
        """Relayed use keeps a session from idling out; at most one write a minute each."""
        now = time.monotonic()
        if now - self._touched.get(session_id, -1e9) < self.TOUCH_EVERY:
            return
        self._touched[session_id] = now
        if len(self._touched) > 10000:
            self._touched.clear()
        try:
            self.sessions.touch(session_id)
        except Exception as exc:  # a busy store must not refuse the connection
            log.warning("session touch failed: %s", exc)

    def subscribe(self, callback: Callable[[], None]) -> None:
        self._subscribers.append(callback)

    def reload(self) -> None:
        self._cache.clear()
        self.policy.reload()  # subscribers run through the policy's own subscription
