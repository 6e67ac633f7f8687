"""The portal app through Flask's test client: captive answers, login, CSRF, limits, i18n."""

from __future__ import annotations

import re
import time
from pathlib import Path
from typing import Any

import pytest
from flask.testing import FlaskClient
from portal_conf import add_user, load, write_config

from appliance.core.config import CAPTIVE_API_PATH
from appliance.portal import gates, i18n
from appliance.portal.app import CLOSE_HEADER, CONNECTION_OPENED, ORIGINAL_DST, Deps, create_app
from appliance.portal.security import Csrf, RateLimiter
from appliance.state import leases, store
from appliance.state.leases import Lease
from appliance.state.sessions import SessionStore

pytestmark = pytest.mark.unit

IP, MAC = "192.168.1.100", "02:47:00:00:00:01"
ENV = {"REMOTE_ADDR": IP}


class Client(FlaskClient):
    """Requests go to the portal's own address unless a test names another Host."""

    def open(self, *args: Any, **kw: Any) -> Any:
        kw.setdefault("base_url", "http://192.168.1.1")
        return super().open(*args, **kw)


class Site:
    def __init__(self, tmp_path: Path) -> None:
        self.cfg = load(write_config(tmp_path))
        add_user(self.cfg, "alice", "correct horse", department="Sales 1")
        self.neigh: dict[str, str] = {IP: MAC}
        # the firewall and the access rights are recorded, never called for real here
        self.authorized: list[tuple[str, str]] = []
        self.revoked: list[tuple[str, str]] = []
        self.deps = Deps(
            mac_of=self.neigh.get,
            limiter=RateLimiter(limit=3, window=60),
            authorize=lambda ip, mac: self.authorized.append((ip, mac)),
            revoke=lambda ip, mac: self.revoked.append((ip, mac)),
            network_gate=lambda attrs: gates.Verdict(True, "test: everyone", "test"),
            service_list=lambda attrs: None,
        )
        self.app = create_app(self.cfg, self.deps)
        self.app.test_client_class = Client
        self.conn = store.connect(self.cfg.state.database)
        self.sessions = SessionStore(self.conn)
        leases.record(self.conn, "granted", Lease(IP, MAC, time.time() + 3600), time.time())

    def client(self) -> FlaskClient:
        c = self.app.test_client()
        c.environ_base.update(ENV)
        return c


@pytest.fixture
def site(tmp_path: Path) -> Site:
    return Site(tmp_path)


def csrf_of(page: str) -> str:
    m = re.search(r'name="csrf" value="([0-9a-f]+)"', page)
    assert m, page
    return m.group(1)


def login(c: FlaskClient, user: str, password: str, url: str = "", agent: str = "") -> object:
    page = c.get("/login").get_data(as_text=True)
    return c.post(
        "/login",
        data={
            "csrf": csrf_of(page),
            "user": user,
            "password": password,
            "url": url,
            "agent": agent,
        },
    )


def test_a_url_that_is_no_url_is_dropped_not_a_500(site: Site) -> None:
    c = site.client()
    r = c.get("/login?url=http://[x")
    assert r.status_code == 200 and "http://[x" not in r.get_data(as_text=True)
    r = login(c, "alice", "correct horse", url="http://[x")
    assert r.status_code == 303 and r.headers["Location"] == "/status"


def test_captive_answers_before_login(site: Site) -> None:
    c = site.client()
    r = c.get("/some/page?q=1", headers={"Host": "www.example.com", "Accept": "text/html"})
    assert r.status_code == 302
    assert r.headers["Location"] == (
        "http://192.168.1.1/login?url=http%3A%2F%2Fwww.example.com%2Fsome%2Fpage%3Fq%3D1"
    )
    # an intercepted connection is not kept alive: after login the browser must open a
    # new one (which the firewall then sends to the proxy, not here)
    assert r.headers[CLOSE_HEADER] == "1"
    r = c.get("/data.json", headers={"Host": "api.example.com", "Accept": "application/json"})
    assert r.status_code == 511 and "captive-portal" in r.headers["Link"]
    assert r.status == "511 Network Authentication Required"  # RFC 6585 section 6
    for path in ("/generate_204", "/hotspot-detect.html", "/connecttest.txt", "/ncsi.txt"):
        r = c.get(path, headers={"Host": "probe.example.net"})
        assert r.status_code == 302, path
    api = c.get(CAPTIVE_API_PATH, headers={"Host": "192.168.1.1"})
    assert api.mimetype == "application/captive+json"
    assert api.get_json() == {"captive": True, "user-portal-url": "http://192.168.1.1/login"}


def test_login_status_probes_api_logout(site: Site) -> None:
    c = site.client()
    c.get("/x", headers={"Host": "www.example.com", "Accept": "text/html"})  # captured there
    r = login(c, "alice", "correct horse", url="http://www.example.com/x")
    assert r.status_code == 303 and r.headers["Location"] == "http://www.example.com/x"
    sess = site.sessions.lookup_ip(IP)
    assert sess is not None and sess.user == "alice" and sess.mac == MAC
    assert sess.attributes == {"department": "Sales 1"}
    assert site.authorized == [(IP, MAC)] and site.revoked == []
    page = c.get("/status").get_data(as_text=True)
    assert 'id="who">alice<' in page and "site account" in page
    assert (
        c.get("/generate_204", headers={"Host": "connectivitycheck.gstatic.com"}).status_code == 204
    )
    r = c.get("/hotspot-detect.html", headers={"Host": "captive.apple.com"})
    assert "Success" in r.get_data(as_text=True)
    assert c.get("/ncsi.txt", headers={"Host": "www.msftncsi.com"}).data == b"Microsoft NCSI"
    api = c.get(CAPTIVE_API_PATH).get_json()
    assert api["captive"] is False and 1700 < api["seconds-remaining"] <= 1800  # idle limit first
    assert api["can-extend-session"] is False
    r = c.post("/logout", data={"csrf": csrf_of(page)})
    assert "logged out" in r.get_data(as_text=True)
    assert site.sessions.lookup_ip(IP) is None
    assert site.revoked == [(IP, MAC)]
    assert c.get("/status").status_code == 302


def test_a_connection_redirected_before_login_is_sent_back_to_its_url(site: Site) -> None:
    c = site.client()
    login(c, "alice", "correct horse")
    # a browser's socket to www.example.com opened before login still lands here:
    # it is closed and the browser sent to the same URL (a new connection: the proxy)
    stale = {ORIGINAL_DST: "203.0.113.80:80", CONNECTION_OPENED: 1.0}
    r = c.get("/a?b=1", headers={"Host": "www.example.com"}, environ_overrides=stale)
    assert r.status_code == 302 and r.headers["Location"] == "http://www.example.com/a?b=1"
    assert r.headers[CLOSE_HEADER] == "1"
    # addressed to the appliance itself, opened after the login (the firewall lacks the
    # entry: a redirect would loop), or unknown: the "you are online" page
    later = time.time() + 3600
    for env in (
        {ORIGINAL_DST: "192.168.1.1:80", CONNECTION_OPENED: 1.0},
        {ORIGINAL_DST: "203.0.113.80:80", CONNECTION_OPENED: later},
        {ORIGINAL_DST: "203.0.113.80:80"},
        {},
    ):
        r = c.get("/", headers={"Host": "proxy.guest.example"}, environ_overrides=env)
        assert r.status_code == 200 and "online" in r.get_data(as_text=True)


def test_wrong_password_refused_without_session_then_rate_limited(site: Site) -> None:
    c = site.client()
    r = login(c, "<script>x</script>", "wrong password")
    assert "&lt;script&gt;" in r.get_data(as_text=True)  # echoed back, escaped
    assert "<script>" not in r.get_data(as_text=True)
    site.deps.limiter.reset("ip:" + IP)
    for _ in range(3):
        r = login(c, "alice", "wrong password")
        assert r.status_code == 401
        assert "Wrong user ID or password." in r.get_data(as_text=True)
    r = login(c, "alice", "correct horse")
    assert r.status_code == 429
    assert re.search(r"Try again in \d+ s\.", r.get_data(as_text=True))
    assert site.sessions.lookup_ip(IP) is None
    # another guest may still try other user ids; the user id itself stays locked
    other_ip, other_mac = "192.168.1.101", "02:47:00:00:00:02"
    site.neigh[other_ip] = other_mac
    leases.record(site.conn, "granted", Lease(other_ip, other_mac, time.time() + 60), time.time())
    c2 = site.app.test_client()
    c2.environ_base["REMOTE_ADDR"] = other_ip
    assert login(c2, "alice", "correct horse").status_code == 429
    add_user(site.cfg, "bob", "another secret")
    assert login(c2, "bob", "another secret").status_code == 303


def test_csrf_is_required_and_cookie_is_httponly_samesite(site: Site) -> None:
    c = site.client()
    r = c.get("/login")
    cookie = r.headers["Set-Cookie"]
    assert "HttpOnly" in cookie and "SameSite=Strict" in cookie
    r = c.post("/login", data={"user": "alice", "password": "correct horse"})
    assert r.status_code == 400 and site.sessions.lookup_ip(IP) is None
    r = c.post("/login", data={"csrf": "0" * 64, "user": "alice", "password": "correct horse"})
    assert r.status_code == 400 and site.sessions.lookup_ip(IP) is None
    fresh = site.app.test_client()  # a token from another browser's cookie does not work
    fresh.environ_base.update(ENV)
    token = csrf_of(c.get("/login").get_data(as_text=True))
    r = fresh.post("/login", data={"csrf": token, "user": "alice", "password": "correct horse"})
    assert r.status_code == 400


def test_device_without_matching_lease_cannot_log_in(site: Site) -> None:
    c = site.client()
    site.neigh[IP] = "02:47:00:00:00:99"  # someone took the address by hand
    r = login(c, "alice", "correct horse")
    assert r.status_code == 403 and site.sessions.lookup_ip(IP) is None
    site.neigh[IP] = MAC
    assert login(c, "alice", "correct horse").status_code == 303
    site.neigh[IP] = "02:47:00:00:00:99"  # the impostor does not see or end the session
    assert c.get("/status").status_code == 302
    assert c.get(CAPTIVE_API_PATH).get_json()["captive"] is True


def test_japanese_by_accept_language(site: Site) -> None:
    c = site.client()
    page = c.get("/login", headers={"Accept-Language": "ja,en;q=0.5"}).get_data(as_text=True)
    assert 'lang="ja"' in page and "パスワード" in page
    page = c.get("/login", headers={"Accept-Language": "fr, en;q=0.8"}).get_data(as_text=True)
    assert 'lang="en"' in page and "Password" in page


def test_agent_login_to_an_agent_that_is_not_there_is_a_clear_refusal(site: Site) -> None:
    c = site.client()
    r = login(c, "alice", "pw-for-home", agent="home.example")
    body = r.get_data(as_text=True)
    assert r.status_code in (401, 502) and 'class="error"' in body
    assert site.sessions.lookup_ip(IP) is None


def test_language_pick_and_rate_limiter_units() -> None:
    assert i18n.pick("ja-JP,ja;q=0.9,en;q=0.8") == "ja"
    assert i18n.pick("en-US,en;q=0.9,ja;q=0.8") == "en"
    assert i18n.pick("de, ja;q=0.1") == "ja"
    assert i18n.pick("ja;q=0, en") == "en"
    assert i18n.pick(None) == "en"
    rl = RateLimiter(limit=2, window=10)
    assert rl.retry_after("k", now=0) == 0
    rl.fail("k", now=0)
    rl.fail("k", now=4)
    assert rl.retry_after("k", now=5) == 5
    assert rl.retry_after("k", now=10.5) == 0
    rl.reset("k")
    assert rl.retry_after("k", now=5) == 0
    csrf = Csrf(b"s" * 32)
    assert csrf.check("cookie", csrf.token("cookie"))
    assert not csrf.check("cookie", csrf.token("other")) and not csrf.check(None, "x")


class FakeAgentError(Exception):
    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def fake_agent(monkeypatch: pytest.MonkeyPatch, behaviour: Any) -> list[str]:
    """A stand-in for appliance.agent.client (the contract's shape), recording specs."""
    import sys
    import types

    seen: list[str] = []

    def authenticate(config: object, spec: str, password: str) -> object:
        seen.append(spec)
        return behaviour(spec, password)

    mod = types.ModuleType("appliance.agent.client")
    mod.AgentError = FakeAgentError  # type: ignore[attr-defined]
    mod.authenticate = authenticate  # type: ignore[attr-defined]
    pkg = types.ModuleType("appliance.agent")
    pkg.client = mod  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "appliance.agent", pkg)
    monkeypatch.setitem(sys.modules, "appliance.agent.client", mod)
    return seen


@pytest.mark.parametrize(
    ("code", "words"),
    [
        ("unknown_user", "does not know this user ID"),
        ("bad_password", "refused the password"),
        ("locked", "locked"),
        ("refused_servers", "servers this site does not allow"),
        ("something_new", "could not log you in"),
        # told apart, these made the form a port scanner (issue #14): one message
        ("unreachable", "No home agent answered at this address."),
        ("timeout", "No home agent answered at this address."),
        ("bad_certificate", "No home agent answered at this address."),
        ("bad_answer", "No home agent answered at this address."),
        ("bad_address", "No home agent answered at this address."),
    ],
)
def test_each_agent_error_has_its_own_message(
    site: Site, monkeypatch: pytest.MonkeyPatch, code: str, words: str
) -> None:
    def refuse(spec: str, password: str) -> object:
        raise FakeAgentError(code, "detail")

    seen = fake_agent(monkeypatch, refuse)
    r = login(site.client(), "alice", "home password", agent="home.example")
    assert words in r.get_data(as_text=True)
    assert seen == ["alice@home.example"]
    assert site.sessions.lookup_ip(IP) is None


def test_agent_login_creates_a_session_with_personal_servers(
    site: Site, monkeypatch: pytest.MonkeyPatch
) -> None:
    from types import SimpleNamespace

    fake_agent(
        monkeypatch,
        lambda spec, pw: SimpleNamespace(
            user="alice", attributes={"role": "staff"}, servers={"pop3": "203.0.113.3:110"}
        ),
    )
    c = site.client()
    r = login(c, "alice", "home password", agent="203.0.113.1#sha256:ab")
    assert r.status_code == 303
    sess = site.sessions.lookup_ip(IP)
    assert sess is not None and sess.source == "agent:203.0.113.1"
    assert sess.personal_servers == {"pop3": "203.0.113.3:110"}
    assert "personal agent 203.0.113.1" in c.get("/status").get_data(as_text=True)


def test_access_rights_gate_the_login_and_explain_the_services(
    site: Site, monkeypatch: pytest.MonkeyPatch
) -> None:
    import sys
    import types
    from types import SimpleNamespace

    site.deps.network_gate = lambda attrs: gates.may_use_network(site.cfg, attrs)
    site.deps.service_list = lambda attrs: gates.services(site.cfg, attrs)

    class Access:
        def may_use_network(self, attrs: Any) -> Any:
            ok = attrs.get("department") == "Sales 1"
            return SimpleNamespace(
                allowed=ok,
                rule="sales" if ok else None,
                reason="rule sales" if ok else "no rule matches",
                max_connections=None,
                session_max=None,
            )

        def decide(self, attrs: Any, service: str) -> Any:
            ok = service in ("smtp", "http")
            return SimpleNamespace(
                allowed=ok,
                rule="sales",
                reason=f"rule sales {'allows' if ok else 'omits'} it",
                max_connections=None,
                session_max=None,
            )

    pol = SimpleNamespace(
        access=Access(), servers=SimpleNamespace(services={"smtp": 1, "pop3": 2, "http": 3})
    )
    mod = types.ModuleType("appliance.policy")
    mod.Policy = SimpleNamespace(load=lambda config: pol)  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "appliance.policy", mod)
    monkeypatch.setattr(gates, "_policy", None)
    add_user(site.cfg, "carol", "another secret", department="Accounting")
    c = site.client()
    r = login(c, "carol", "another secret")
    assert r.status_code == 403 and "no rule matches" in r.get_data(as_text=True)
    assert site.sessions.lookup_ip(IP) is None
    assert login(c, "alice", "correct horse").status_code == 303
    page = c.get("/status").get_data(as_text=True)
    assert "<strong>pop3</strong>" in page and "rule sales omits it" in page
    assert "rule sales allows it" in page


def test_the_session_names_the_agent_that_was_asked(
    site: Site, monkeypatch: pytest.MonkeyPatch
) -> None:
    """user@agent in the agent field works; an agent smuggled into the user field does not."""
    from types import SimpleNamespace

    asked: list[str] = []

    def agent(spec: str, pw: str) -> Any:
        asked.append(spec)
        return SimpleNamespace(user="alice", attributes={"role": "staff"}, servers={})

    fake_agent(monkeypatch, agent)
    r = login(site.client(), "alice@evil.example", "pw", agent="home.example")
    assert r.status_code == 400 and asked == []
    r = login(site.client(), "alice", "pw", agent="alice@home.example#sha256:ab")
    assert r.status_code == 303 and asked == ["alice@home.example#sha256:ab"]
    sess = site.sessions.lookup_ip(IP)
    assert sess is not None and sess.source == "agent:home.example"


def test_a_visitors_own_agent_is_not_taken_at_its_word(
    site: Site, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Issue 14/2: carol runs her own agent and has it answer role = staff.  The site's
    example tables give role = staff smtp, pop3 and http; an agent the trusted-agents
    table does not name asserts nothing, and her user id is carol@<agent>, not the site
    account carol's (whose limits, identity header and log lines stay her own)."""
    from types import SimpleNamespace

    from appliance.proxy.counts import LocalCounts
    from appliance.proxy.gate import Admission, PolicyGate

    site.deps.network_gate = lambda attrs: gates.may_use_network(site.cfg, attrs)
    site.deps.service_list = lambda attrs: gates.services(site.cfg, attrs)
    monkeypatch.setattr(gates, "_policy", None)
    fake_agent(
        monkeypatch,
        lambda spec, pw: SimpleNamespace(
            user="carol",
            attributes={"role": "staff", "department": "Sales 1", "source": "site"},
            servers={"pop3": "203.0.113.3:110"},
            agent="evil.example:8443",
            fingerprint="sha256:" + "A" * 42 + "E",
            verified_name="",
        ),
    )
    c = site.client()
    assert login(c, "carol", "pw", agent="evil.example#sha256:ab").status_code == 303
    sess = site.sessions.lookup_ip(IP)
    assert sess is not None and sess.user == "carol@evil.example"
    assert dict(sess.attributes) == {"source": "agent", "agent": "evil.example"}
    page = c.get("/status").get_data(as_text=True)
    allowed = re.findall(r'<strong>(\w+)</strong>:\s*<span class="ok">', page)
    # the example's "visitors" rule: their own mail only
    assert allowed == ["imap", "imaps", "pop3", "pop3s"], page
    assert 'id="who">carol@evil.example<' in page

    # the site's own carol on another device: a different user everywhere the proxy looks
    other_ip, other_mac = "192.168.1.101", "02:47:00:00:00:02"
    site.neigh[other_ip] = other_mac
    leases.record(site.conn, "granted", Lease(other_ip, other_mac, time.time() + 60), time.time())
    add_user(site.cfg, "carol", "site secret", role="staff")
    c2 = site.app.test_client()
    c2.environ_base["REMOTE_ADDR"] = other_ip
    assert login(c2, "carol", "site secret").status_code == 303
    cfg = SimpleNamespace(
        home_relay=site.cfg.home_relay,
        proxy=SimpleNamespace(explicit_http_port=None, identity_header="X-Guest-User"),
        portal=site.cfg.portal,
        interfaces=site.cfg.interfaces,
    )
    macs = {IP: MAC, other_ip: other_mac}  # the kernel's neighbour table, as the gate reads it
    gate = PolicyGate(cfg, gates.policy(site.cfg), site.sessions, neighbour=macs.get)
    visitor, own = gate.admit(IP, "pop3"), gate.admit(other_ip, "pop3")
    assert isinstance(visitor, Admission) and isinstance(own, Admission)
    assert (visitor.user, visitor.identity) == ("carol@evil.example", "carol@evil.example")
    assert (own.user, own.identity) == ("carol", "carol")
    counts = LocalCounts()  # a limit of one connection each: carol@evil does not use carol's
    assert counts.take(visitor.user, "pop3", 1) and counts.take(own.user, "pop3", 1)
    assert not isinstance(gate.admit(IP, "smtp"), Admission)
    assert isinstance(gate.admit(other_ip, "smtp"), Admission)


def test_a_trusted_agent_asserts_only_its_listed_keys(
    site: Site, monkeypatch: pytest.MonkeyPatch
) -> None:
    from types import SimpleNamespace

    from appliance.core import agent_protocol as wire

    pin = wire.fingerprint(b"corp agent certificate")
    site.cfg.policies.agents.write_text(
        f'[agents."corp.example"]\nfingerprints = ["{pin}"]\nattributes = ["role"]\n'
    )
    answer = {"fingerprint": pin}
    fake_agent(
        monkeypatch,
        lambda spec, pw: SimpleNamespace(
            user="dave",
            attributes={"role": "staff", "department": "Sales 1", "agent": "forged"},
            servers={},
            agent=spec.split("#")[0].rpartition("@")[2] + ":8443",
            fingerprint=answer["fingerprint"],
            verified_name="",
        ),
    )
    c = site.client()
    assert login(c, "dave", "pw", agent="203.0.113.9#" + pin).status_code == 303
    sess = site.sessions.lookup_ip(IP)
    assert sess is not None and sess.user == "dave@corp.example"
    assert sess.source == "agent:corp.example"
    assert dict(sess.attributes) == {"role": "staff", "source": "agent", "agent": "corp.example"}
    site.sessions.end(sess.id, "test")
    # someone else's agent answering at the trusted agent's name is refused outright
    answer["fingerprint"] = wire.fingerprint(b"another certificate")
    r = login(c, "dave", "pw", agent="corp.example")
    assert r.status_code == 502 and site.sessions.lookup_ip(IP) is None


def test_failures_through_an_agent_do_not_lock_the_site_account_of_that_name(
    site: Site, monkeypatch: pytest.MonkeyPatch
) -> None:
    """carol@evil.example's wrong passwords are carol@evil.example's: the site's carol
    (another device) can still log in."""

    def refuse(spec: str, password: str) -> object:
        raise FakeAgentError("bad_password", "wrong password")

    fake_agent(monkeypatch, refuse)
    c = site.client()
    for _ in range(3):
        assert login(c, "carol", "guess", agent="evil.example").status_code == 401
    assert login(c, "carol", "guess", agent="evil.example").status_code == 429
    other_ip, other_mac = "192.168.1.101", "02:47:00:00:00:02"
    site.neigh[other_ip] = other_mac
    leases.record(site.conn, "granted", Lease(other_ip, other_mac, time.time() + 60), time.time())
    add_user(site.cfg, "carol", "site secret")
    c2 = site.app.test_client()
    c2.environ_base["REMOTE_ADDR"] = other_ip
    assert login(c2, "carol", "site secret").status_code == 303


def test_a_login_the_firewall_cannot_enforce_is_refused(site: Site) -> None:
    """No nftables entry, no login: the session it made is ended, the guest is told."""

    def broken(ip: str, mac: str) -> None:
        raise OSError("netlink: operation not permitted")

    site.deps.authorize = broken
    r = login(site.client(), "alice", "correct horse")
    assert r.status_code == 500 and 'class="error"' in r.get_data(as_text=True)
    assert site.sessions.lookup_ip(IP) is None
