"""The captive portal as a Flask app: captive answers, login, status, logout, RFC 8908 API.

A guest is identified by its source address and the MAC the kernel's neighbour
table has for it, which must match its bound DHCP lease; a session belongs to
that (IP, MAC) pair, not to a cookie, so every role of the appliance agrees on
who is online.  The only cookie is the CSRF one.

Requests whose Host is not the portal are captive traffic (the firewall sends
unauthenticated port 80 here): browsers get a 302 to the login page with the
original URL kept, other clients a 511 (RFC 6585), OS probes the portal before
login and their normal answers after it.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote, urlsplit

from flask import Flask, Response, redirect, request
from werkzeug.wrappers import Response as BaseResponse

from appliance.accounts import site as accounts
from appliance.core.attributes import Attributes
from appliance.core.config import CAPTIVE_API_PATH, Config
from appliance.core.neighbours import neighbour_mac
from appliance.portal import gates, i18n, pages
from appliance.portal.security import Csrf, InFlight, RateLimiter, ReturnUrls
from appliance.state import store
from appliance.state.sessions import Session, SessionStore

log = logging.getLogger("appliance.portal")
API_CACHE_SECONDS = 1.0
API_CACHE_MAX = 4096

MacLookup = Callable[[str], str | None]

AGENT_NOT_REACHED = frozenset(
    {"unreachable", "timeout", "bad_certificate", "bad_answer", "bad_address"}
)
"""Agent failures the visitor sees as one message: closed, filtered, not TLS, TLS but not
an agent, or an address the appliance will not contact.  Told apart, they made the login
form a port scanner of whatever the appliance reaches; the log keeps the real reason."""


@dataclass
class Deps:
    """What the app reaches outside itself; tests swap in their own.

    Left as None, the firewall, access-rights and neighbour calls are the real
    ones (`gates`): unit tests must pass theirs, so nothing ever touches the
    nftables of the namespace the tests run in.
    """

    mac_of: MacLookup | None = None
    limiter: RateLimiter = field(default_factory=RateLimiter)
    csrf: Csrf = field(default_factory=Csrf)
    return_urls: ReturnUrls = field(default_factory=ReturnUrls)
    agent_logins: InFlight | None = None  # None: the caps of config.portal
    clock: Callable[[], float] = time.time
    authorize: Callable[[str, str], None] | None = None
    revoke: Callable[[str, str], None] | None = None
    network_gate: Callable[[Attributes], gates.Verdict] | None = None
    service_list: Callable[[Attributes], list[tuple[str, gates.Verdict]]] | None = None
    logins: LoginCounts = field(default_factory=lambda: LoginCounts())


class LoginCounts:
    """Login attempts by source (site, agent) and result, for the metrics; the portal's
    threads share it, hence the lock (a login costs far more than taking it)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counts: Counter[tuple[str, str]] = Counter()

    def add(self, source: str, result: str) -> None:
        with self._lock:
            self._counts[(source, result)] += 1

    def snapshot(self) -> dict[tuple[str, str], int]:
        with self._lock:
            return dict(self._counts)


def real_deps(config: Config, deps: Deps | None = None) -> Deps:
    """Fill what a Deps leaves open with the real calls of `gates` and `sessions`."""
    from appliance.net.firewall import revoker

    d = deps or Deps()
    if d.agent_logins is None:
        d.agent_logins = InFlight(
            config.portal.agent_logins_per_guest, config.portal.agent_logins_total
        )
    if d.mac_of is None:
        d.mac_of = lambda ip: neighbour_mac(config.interfaces.guest, ip)
    if d.authorize is None:
        d.authorize = lambda ip, mac: gates.authorize(config, ip, mac)
    if d.revoke is None:
        d.revoke = revoker(config)
    if d.network_gate is None:
        d.network_gate = lambda attrs: gates.may_use_network(config, attrs)
    if d.service_list is None:
        d.service_list = lambda attrs: gates.services(config, attrs)
    return d


class Portal:
    def __init__(self, config: Config, deps: Deps | None = None):
        self.config = config
        self.deps = real_deps(config, deps)
        self._local = threading.local()
        guest_ip = str(config.interfaces.guest_ip)
        port = config.portal.http_port
        self.base_url = config.portal.base_url(config.interfaces.guest_ip)
        self.guest_ip = guest_ip
        self.own_hosts = {guest_ip, config.portal.hostname.lower()}
        self.own_hosts |= {f"{h}:{port}" for h in list(self.own_hosts)}
        if config.portal.https_port:
            self.own_hosts |= {f"{h}:{config.portal.https_port}" for h in (guest_ip,)}
            self.own_hosts.add(f"{config.portal.hostname.lower()}:{config.portal.https_port}")
        secure = bool(config.portal.https_port and config.portal.tls_certificate)
        self.cookie_secure = secure
        self._api_cache: dict[str, tuple[float, Session | None]] = {}

    # -- per-thread store ------------------------------------------------------------
    def store(self) -> SessionStore:
        st: SessionStore | None = getattr(self._local, "store", None)
        if st is None:
            assert self.deps.revoke is not None
            st = SessionStore.from_config(
                self.config, store.open_store(self.config.state), revoke=self.deps.revoke
            )
            self._local.store = st
        return st

    def current(self, ip: str) -> Session | None:
        """The guest's session, only when its device (MAC) is the one the session is bound to."""
        sess = self.store().lookup_ip(ip, self.deps.clock())
        if sess is None:
            return None
        assert self.deps.mac_of is not None
        mac = self.deps.mac_of(ip)
        if mac is None or mac != sess.mac:
            return None
        return sess

    def current_for_api(self, ip: str) -> Session | None:
        """`current`, remembered for API_CACHE_SECONDS per guest address.

        OSes poll the RFC 8908 API, the portal's hot path: two SQLite queries and a
        neighbour-table read per poll were about 45% of its time.  The answer is only
        informational (nftables decides what a guest reaches); this portal forgets the
        address on its own logins and logouts, so only an end made by another process
        (admin, CLI, lease follower) shows up to a second late here."""
        now = time.monotonic()
        hit = self._api_cache.get(ip)
        if hit is not None and hit[0] > now:
            sess = hit[1]
            if sess is None or sess.expires() > self.deps.clock():
                return sess
        sess = self.current(ip)
        if len(self._api_cache) >= API_CACHE_MAX:
            self._api_cache.clear()
        self._api_cache[ip] = (now + API_CACHE_SECONDS, sess)
        return sess

    def forget(self, ip: str) -> None:
        self._api_cache.pop(ip, None)

    def device(self, ip: str) -> str | None:
        """The guest's MAC when it holds a bound lease for this address with that MAC."""
        assert self.deps.mac_of is not None
        mac = self.deps.mac_of(ip)
        if mac is None:
            return None
        lease = self.store().lease(ip, self.deps.clock())
        return mac if lease is not None and lease.mac == mac else None


def _lang() -> str:
    return i18n.pick(request.headers.get("Accept-Language"))


def _wants_html() -> bool:
    accept = request.headers.get("Accept", "")
    return "text/html" in accept or "application/xhtml+xml" in accept


def _safe_url(url: str | None) -> str:
    """Only absolute http(s) URLs go back into a redirect after login."""
    if not url or len(url) > 2000:
        return ""
    try:
        parts = urlsplit(url)
    except ValueError:  # e.g. "http://[x": not a URL we send anyone to
        return ""
    if parts.scheme not in ("http", "https") or not parts.netloc:
        return ""
    if any(c in url for c in "\r\n\t"):
        return ""
    return url


def _printable(text: str) -> bool:
    """No line breaks or other control characters: such a user id would forge log lines."""
    return text.isprintable()


def create_app(config: Config, deps: Deps | None = None) -> Flask:
    portal = Portal(config, deps)
    d = portal.deps
    app = Flask("appliance.portal")
    app.config["MAX_CONTENT_LENGTH"] = 16 * 1024
    app.extensions["portal"] = portal

    # compiled once: Flask's render_template_string would compile on every request
    compiled = {src: app.jinja_env.from_string(src) for src in pages.TEMPLATES}

    def render(template: str, status: int = 200, **kw: Any) -> Response:
        lang = _lang()
        cookie = request.cookies.get(Csrf.COOKIE)
        new_cookie = None
        if not cookie or len(cookie) > 64:
            cookie = new_cookie = Csrf.new_cookie()
        body = compiled[template].render(
            lang=lang,
            t=lambda key, **a: i18n.text(lang, key, **a),
            csrf=d.csrf.token(cookie),
            **kw,
        )
        resp = Response(body, status=status, mimetype="text/html")
        if new_cookie:
            resp.set_cookie(
                Csrf.COOKIE,
                new_cookie,
                httponly=True,
                samesite="Strict",
                secure=portal.cookie_secure,
                path="/",
            )
        return resp

    def csrf_ok() -> bool:
        return d.csrf.check(request.cookies.get(Csrf.COOKIE), request.form.get("csrf"))

    def login_url(original: str) -> str:
        url = portal.base_url + "/login"
        return url + ("?url=" + quote(original, safe="") if original else "")

    @app.after_request
    def headers(resp: Response) -> Response:
        resp.headers.setdefault("Cache-Control", "no-store")
        resp.headers["X-Frame-Options"] = "DENY"
        resp.headers["X-Content-Type-Options"] = "nosniff"
        resp.headers["Referrer-Policy"] = "no-referrer"
        resp.headers["Content-Security-Policy"] = (
            "default-src 'none'; style-src 'unsafe-inline'; frame-ancestors 'none'"
        )
        resp.headers["Vary"] = "Accept-Language, Accept"
        return resp

    @app.before_request
    def captive() -> BaseResponse | None:
        host = (request.host or "").lower()
        if host in portal.own_hosts:
            if portal.cookie_secure and request.scheme == "http":
                # HTTPS is configured: the plain listener only points there
                return redirect(portal.base_url + request.full_path.rstrip("?"), 302)
            return None
        # Someone else's host: the firewall sent this guest's port 80 here.  The answer
        # closes the connection: the redirect holds only for the connection's lifetime
        # (nftables NATs per connection), so a browser that kept it alive would send
        # the page it opens after login down this same socket, to us, not the web.
        resp = _foreign_host()
        resp.headers[CLOSE_HEADER] = "1"  # WSGI apps may not send Connection: the server does
        return resp

    def _foreign_host() -> BaseResponse:
        ip = request.remote_addr or ""
        sess = portal.current(ip)
        original = _safe_url(request.url)
        probe = pages.PROBE_ANSWERS.get(request.path)
        if sess is not None:
            if probe:
                code, text, ctype = probe
                return Response(text, status=code, mimetype=ctype)
            dst = request.environ.get(ORIGINAL_DST, "")
            opened = request.environ.get(CONNECTION_OPENED)
            if (
                dst
                and dst.rsplit(":", 1)[0] != portal.guest_ip
                and opened is not None
                and opened < sess.created
            ):
                # a connection nftables sent here before login (a browser's kept-alive or
                # preconnected socket): this one closes, the same URL again opens a new
                # connection, which now goes where the guest meant
                log.info("%s: stale captive connection (to %s), sent back to its URL", ip, dst)
                return redirect(original, 302)
            return render(
                pages.MESSAGE,
                heading=i18n.text(_lang(), "online_heading"),
                message=i18n.text(_lang(), "online_text"),
                link=portal.base_url + "/status",
                link_text=i18n.text(_lang(), "status_heading"),
            )
        if original:
            d.return_urls.remember(ip, original)
        if probe or _wants_html():
            return redirect(login_url(original), 302)
        body = render(
            pages.MESSAGE,
            511,
            heading=i18n.text(_lang(), "title"),
            message=i18n.text(_lang(), "login_needed"),
            link=login_url(original),
            link_text=i18n.text(_lang(), "login"),
        )
        body.status = "511 Network Authentication Required"  # RFC 6585's words, not werkzeug's
        body.headers["Link"] = f'<{portal.base_url}{CAPTIVE_API_PATH}>; rel="captive-portal"'
        return body

    @app.get("/")
    def index() -> BaseResponse:
        ip = request.remote_addr or ""
        return redirect("/status" if portal.current(ip) else "/login", 302)

    def return_url(url: str | None) -> str:
        """`url` when this guest was captured on it (see `ReturnUrls`), else ""."""
        url = _safe_url(url)
        return url if url and d.return_urls.allowed(request.remote_addr or "", url) else ""

    @app.get("/login")
    def login_form() -> BaseResponse:
        url = return_url(request.args.get("url"))
        if portal.current(request.remote_addr or ""):
            return redirect("/status" + ("?url=" + quote(url, safe="") if url else ""), 302)
        return render(pages.LOGIN, url=url, user="", agent="", error=None, notice=None)

    @app.post("/login")
    def login() -> BaseResponse:
        lang = _lang()
        ip = request.remote_addr or ""
        user = request.form.get("user", "").strip()[:128]
        password = request.form.get("password", "")[:1024]
        agent = request.form.get("agent", "").strip()[:256]
        url = return_url(request.form.get("url"))
        kind = "agent" if agent else "site"  # the metrics' source label (no names)

        def refuse(key: str, status: int, **kw: object) -> Response:
            d.logins.add(kind, key.removeprefix("err_"))
            return render(
                pages.LOGIN,
                status,
                url=url,
                user=user,
                agent=agent,
                error=i18n.text(lang, key, **kw),
                notice=None,
            )

        if not csrf_ok():
            return refuse("err_csrf", 400)
        if not user or not password:
            return refuse("err_missing", 400)
        if not (_printable(user) and _printable(agent)):
            log.warning("login from %s refused: control characters in the user or agent field", ip)
            user, agent = "", ""  # not echoed back either
            return refuse("err_characters", 400)
        # per user id: an agent login's failures count for user@agent, never for the site
        # account of the same name (which a visitor's own agent could otherwise lock out)
        agent_host = agent.rpartition("@")[2].split("#")[0].lower().rstrip(".")
        keys = (f"ip:{ip}", f"user:{user.lower()}" + (f"@{agent_host}" if agent else ""))
        wait = max(d.limiter.retry_after(k) for k in keys)
        if wait:
            log.warning("login from %s as %s refused: rate limit (%d s)", ip, user, wait)
            return refuse("err_rate", 429, seconds=wait)
        mac = portal.device(ip)
        if mac is None:
            log.warning("login from %s refused: no neighbour entry matching a bound lease", ip)
            return refuse("err_device", 403)

        def failed(reason: str) -> Response:
            for k in keys:
                d.limiter.fail(k)
            log.warning("login from %s (%s) as %s failed: %s", ip, mac, user, reason)
            return refuse("err_credentials", 401)

        personal: dict[str, str] = {}
        if not agent:
            account = accounts.authenticate(config.policies.users, user, password)
            if account is None:
                return failed("wrong user id or password (site account)")
            who, source, attrs = account.user, "site", dict(account.attributes)
        else:
            # The agent is named in the agent field only ("home.example" or, as
            # docs/design.md shows, "alice@home.example"), so the session names the agent that
            # really vouched for the user.
            if "@" in agent:
                agent_user, agent = agent.rsplit("@", 1)
                if user and user != agent_user:
                    return refuse("err_credentials", 400)
                user = agent_user
            if "@" in user or not agent:
                return refuse("err_credentials", 400)
            spec = f"{user}@{agent}"
            assert d.agent_logins is not None
            if not d.agent_logins.take(ip):
                # each one waits on the network holding a worker thread: a guest naming a
                # tarpit again and again would otherwise hold every thread of the portal
                log.warning(
                    "login from %s as %s via agent %s refused: too many agent logins in progress",
                    ip,
                    user,
                    agent,
                )
                return refuse("err_busy", 429)
            try:
                ans = gates.agent_authenticate(config, spec, password)
            except gates.AgentFailure as exc:
                for k in keys:  # every failure counts, or the form scans the network unthrottled
                    d.limiter.fail(k)
                log.warning(
                    "login from %s as %s via agent %s failed: %s", ip, user, agent, exc.code
                )
                key, status = _agent_refusal(exc.code)
                if exc.code == "appliance_not_allowed":  # the household's next step, key and all
                    return refuse(key, status, command=gates.allow_command(config))
                return refuse(key, status)
            finally:
                d.agent_logins.release(ip)
            # ans.user is "user@agent" and ans.attributes only what the site takes from
            # this agent (gates / trusted_agents)
            who, source, attrs, personal = (
                ans.user,
                f"agent:{ans.agent}",
                dict(ans.attributes),
                dict(ans.servers),
            )
        assert d.network_gate is not None and d.authorize is not None
        verdict = d.network_gate(attrs)
        if not verdict.allowed:
            log.warning(
                "login from %s as %s refused by the access rights: %s", ip, who, verdict.reason
            )
            return refuse("err_policy", 403, reason=verdict.reason)
        for k in keys:
            d.limiter.reset(k)
        st = portal.store()
        sess = st.create(
            user=who,
            source=source,
            attributes=attrs,
            ip=ip,
            mac=mac,
            personal_servers=personal,
            now=d.clock(),
            max_seconds=verdict.session_max,
        )
        portal.forget(ip)
        try:
            d.authorize(ip, mac)
        except Exception:  # a login the firewall cannot enforce is no login
            log.exception("firewall authorize for %s %s failed", ip, mac)
            st.end(sess.id, "firewall authorize failed")
            portal.forget(ip)
            return refuse("err_firewall", 500)
        d.logins.add(kind, "ok")
        log.info(
            "login from %s (%s) as %s via %s: allowed by %s", ip, mac, who, source, verdict.rule
        )
        return redirect(url or "/status", 303)

    @app.get("/status")
    def status() -> BaseResponse:
        lang = _lang()
        sess = portal.current(request.remote_addr or "")
        if sess is None:
            return redirect("/login", 302)
        now = d.clock()
        if now - sess.last_seen > 30:
            portal.store().touch(sess.id, now)
        via = (
            i18n.text(lang, "via_site")
            if sess.source == "site"
            else i18n.text(lang, "via_agent", host=sess.source.removeprefix("agent:"))
        )
        return render(
            pages.STATUS,
            s=sess,
            via=via,
            left=i18n.duration(lang, sess.seconds_remaining(now)),
            services=d.service_list(sess.attributes) if d.service_list else None,
            url=return_url(request.args.get("url")),
            notice=None,
        )

    @app.post("/logout")
    def logout() -> BaseResponse:
        lang = _lang()
        if not csrf_ok():
            return render(
                pages.MESSAGE,
                400,
                heading=i18n.text(lang, "title"),
                message=i18n.text(lang, "err_csrf"),
                link="/status",
                link_text=i18n.text(lang, "status_heading"),
            )
        sess = portal.current(request.remote_addr or "")
        if sess is not None:
            portal.store().end(sess.id, "logged out")
            portal.forget(sess.ip)
        return render(
            pages.MESSAGE,
            heading=i18n.text(lang, "logged_out"),
            message=i18n.text(lang, "logged_out"),
            link="/login",
            link_text=i18n.text(lang, "login"),
        )

    app.wsgi_app = CaptiveApi(app.wsgi_app, portal)  # type: ignore[method-assign]
    return app


def _agent_refusal(code: str) -> tuple[str, int]:
    """The message key and HTTP status a visitor gets for an agent failure `code`."""
    if code in ("unknown_user", "bad_password"):
        return f"agent_{code}", 401
    if code in AGENT_NOT_REACHED:
        return "agent_not_reached", 502
    if code == "appliance_not_allowed":
        return "agent_appliance_not_allowed", 403
    key = f"agent_{code}"
    return (key if key in i18n.MESSAGES else "agent_other"), 502


_API_HEADERS = [
    ("Content-Type", "application/captive+json"),
    ("Cache-Control", "private, no-store"),
    ("X-Content-Type-Options", "nosniff"),
    ("Referrer-Policy", "no-referrer"),
]


ORIGINAL_DST = "appliance.original_dst"
"""environ key: "ip:port" the guest's connection was meant for before nftables redirected
it (SO_ORIGINAL_DST), set by the portal's server (`service.ClosingTask`); absent or ""
when unknown."""
CONNECTION_OPENED = "appliance.connection_opened"
"""environ key: when (epoch seconds) the request's connection was accepted; only a
connection from before the login is sent back to its URL (a later one reaching us would
mean the firewall lacks the entry: a redirect would loop)."""
CLOSE_HEADER = "X-Appliance-Close"
"""A response with this header is sent with `Connection: close` and its connection is
closed (the header itself is dropped): see `service.ClosingChannel`."""


class CaptiveApi:
    """The RFC 8908 API as plain WSGI in front of Flask.

    OSes poll this URI, so it is the portal's hot path; answering it without
    Flask's request and response objects is several times cheaper (measured in
    tests/bench).  Anything else, including the API path under a foreign Host
    (captive traffic), goes on to the Flask app.
    """

    def __init__(self, app: Any, portal: Portal):
        self.app = app
        self.portal = portal

    def __call__(self, environ: dict[str, Any], start_response: Any) -> Any:
        if (
            environ.get("PATH_INFO") != CAPTIVE_API_PATH
            or (self.portal.cookie_secure and environ.get("wsgi.url_scheme") != "https")
            or environ.get("REQUEST_METHOD") not in ("GET", "HEAD")
            or environ.get("HTTP_HOST", "").lower() not in self.portal.own_hosts
        ):
            return self.app(environ, start_response)
        sess = self.portal.current_for_api(environ.get("REMOTE_ADDR", ""))
        base = self.portal.base_url
        if sess is None:
            body = {"captive": True, "user-portal-url": base + "/login"}
        else:
            body = {
                "captive": False,
                "user-portal-url": base + "/status",
                "seconds-remaining": sess.seconds_remaining(self.portal.deps.clock()),
                "can-extend-session": False,
            }
        data = json.dumps(body).encode()
        start_response("200 OK", [*_API_HEADERS, ("Content-Length", str(len(data)))])
        return [b""] if environ["REQUEST_METHOD"] == "HEAD" else [data]
