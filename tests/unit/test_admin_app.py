"""The admin pages through flask's test client: login, CSRF, edits, conflicts, audit."""

from __future__ import annotations

import functools
import io
import re
import shutil
import tomllib
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pytest
from flask.testing import FlaskClient

from appliance.accounts import admins as accounts
from appliance.admin.app import create_app
from appliance.core.config import Config, load
from appliance.core.passwords import hash_password
from appliance.policy import Policy
from appliance.state import schema

pytestmark = pytest.mark.unit
ROOT = Path(__file__).resolve().parents[2]
PASSWORD = "correct horse battery"


class FormParser(HTMLParser):
    """What a browser would post: every input, selected option and textarea of a form."""

    def __init__(self, form_id: str | None = None, action: str | None = None):
        super().__init__()
        self.want_id, self.want_action = form_id, action
        self.inside = False
        self.fields: dict[str, str] = {}
        self._select: str | None = None
        self._textarea: str | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = {k: v or "" for k, v in attrs}
        if tag == "form":
            self.inside = (self.want_id is None or a.get("id") == self.want_id) and (
                self.want_action is None or a.get("action") == self.want_action
            )
        if not self.inside:
            return
        if tag == "input" and "name" in a:
            if a.get("type") == "checkbox" and "checked" not in a:
                return
            self.fields[a["name"]] = a.get("value", "")
        elif tag == "select":
            self._select = a["name"]
            self.fields.setdefault(a["name"], "")
        elif tag == "option" and self._select and "selected" in a:
            self.fields[self._select] = a.get("value", "")
        elif tag == "textarea":
            self._textarea = a["name"]
            self.fields[a["name"]] = ""

    def handle_data(self, data: str) -> None:
        if self._textarea:
            self.fields[self._textarea] += data

    def handle_endtag(self, tag: str) -> None:
        if tag == "form":
            self.inside = False
        elif tag == "select":
            self._select = None
        elif tag == "textarea":
            self._textarea = None


def form(
    client: FlaskClient, url: str, form_id: str | None = None, page_url: str | None = None
) -> dict[str, str]:
    page = client.get(page_url or url)
    assert page.status_code == 200, page.text
    p = FormParser(form_id, url if form_id is None else None)
    p.feed(page.text)
    return p.fields


@pytest.fixture
def site(tmp_path: Path) -> Config:
    for name in ("appliance.toml", "servers.toml", "access.toml"):
        shutil.copy(ROOT / "policies" / name, tmp_path / name)
    cfg = tmp_path / "appliance.toml"
    cfg.write_text(cfg.read_text().replace("/var/lib/appliance", str(tmp_path / "state")))
    config = load(cfg)
    config.policies.admins.write_text(admins_file())
    return config


@functools.cache
def admins_file() -> str:
    """alice and bob, hashed once per test run (argon2id is slow on purpose)."""
    return (
        f'[admins.alice]\npassword_hash = "{hash_password(PASSWORD)}"\n'
        f'[admins.bob]\npassword_hash = "{hash_password(PASSWORD + "!")}"\n'
    )


class FakeSessions:
    def __init__(self) -> None:
        from types import SimpleNamespace

        self.items = {
            "s1": SimpleNamespace(
                id="s1",
                user="carol",
                source="site",
                ip="192.168.1.100",
                mac="02:47:00:00:00:01",
                created=0.0,
                idle_expiry=1e12,
            )
        }
        self.ended: list[tuple[str, str]] = []

    def list(self) -> list[Any]:
        return list(self.items.values())

    def get(self, sid: str) -> Any:
        return self.items.get(sid)

    def end(self, sid: str, reason: str) -> bool:
        self.ended.append((sid, reason))
        return self.items.pop(sid, None) is not None


@pytest.fixture
def notified() -> list[Config]:
    return []


@pytest.fixture
def fake_sessions() -> FakeSessions:
    return FakeSessions()


@pytest.fixture
def app(site: Config, notified: list[Config], fake_sessions: FakeSessions) -> Any:
    a = create_app(site, sessions=lambda c: fake_sessions, notify=notified.append)
    a.testing = True
    return a


def login(client: FlaskClient, name: str = "alice", password: str = PASSWORD) -> Any:
    fields = form(client, "/login")
    return client.post("/login", data={**fields, "name": name, "password": password})


def test_pages_need_a_login(app: Any) -> None:
    c = app.test_client()
    for url in ("/access", "/servers", "/sessions", "/audit"):
        r = c.get(url)
        assert r.status_code == 302 and r.headers["Location"].endswith("/login")
    assert login(c, password="wrong password").status_code == 403
    assert login(c, name="mallory").status_code == 403
    r = login(c)
    assert r.status_code == 302 and r.headers["Location"].endswith("/access")
    cookie = r.headers["Set-Cookie"]
    assert "HttpOnly" in cookie and "SameSite=Strict" in cookie
    page = c.get("/access")
    assert page.status_code == 200 and "sales" in page.text
    assert page.headers["X-Frame-Options"] == "DENY"


def test_repeated_login_failures_are_slowed_down(app: Any) -> None:
    c = app.test_client()
    for _ in range(5):
        assert login(c, password="nope nope nope").status_code == 403
    assert login(c).status_code == 429


def test_a_post_without_the_csrf_token_is_refused(app: Any, site: Config) -> None:
    c = app.test_client()
    login(c)
    before = site.policies.access.read_text()
    fields = form(c, "/access", "grid")
    fields["cell-1-smtp"] = ""
    for bad in (
        {k: v for k, v in fields.items() if k != "csrf"},
        {**fields, "csrf": "forged"},
        {**fields, "csrf": "é"},  # not ASCII: still a clear refusal, not a 500
    ):
        r = c.post("/access", data=bad)
        assert r.status_code == 400 and "CSRF" in r.text
    assert site.policies.access.read_text() == before
    # and a login form from another site cannot log anyone in
    fresh = app.test_client()
    assert fresh.post("/login", data={"name": "alice", "password": PASSWORD}).status_code == 400


def test_toggle_a_cell_saves_validates_backs_up_audits_and_reloads(
    app: Any, site: Config, notified: list[Config]
) -> None:
    c = app.test_client()
    login(c)
    old = site.policies.access.read_text()
    fields = form(c, "/access", "grid")
    assert fields["name-1"] == "sales" and fields["cell-1-smtp"] == "allow"
    fields["cell-1-smtp"] = "deny"
    r = c.post("/access", data=fields)
    assert r.status_code == 302, r.text
    policy = Policy.load(site)
    d = policy.decide({"department": "Sales 1"}, "smtp")
    assert not d.allowed and d.rule == "sales"
    assert policy.decide({"department": "Sales 1"}, "http").allowed
    new = site.policies.access.read_text()
    assert new.startswith("# Access-rights table")  # the header comment is kept
    assert (site.policies.access.parent / "access.toml.bak").read_text() == old
    assert notified == [site]
    audit = c.get("/audit").text
    assert "alice" in audit and "edit access rights" in audit
    assert "+deny = [&#34;smtp&#34;]" in audit or '+deny = ["smtp"]' in audit


def test_a_change_the_audit_log_cannot_record_is_refused_and_not_made(
    app: Any, site: Config, notified: list[Config], monkeypatch: pytest.MonkeyPatch
) -> None:
    import sqlite3

    from appliance.admin import audit

    c = app.test_client()
    login(c)
    old = site.policies.access.read_text()
    fields = form(c, "/access", "grid")
    fields["cell-1-smtp"] = "deny"

    def unreachable(_config: Config) -> None:
        raise sqlite3.OperationalError("unable to open database file")

    monkeypatch.setattr(audit, "reachable", unreachable)
    r = c.post("/access", data=fields)
    assert r.status_code == 503 and "nothing changed" in r.text
    assert site.policies.access.read_text() == old and notified == []


def test_add_and_remove_rows(app: Any, site: Config) -> None:
    c = app.test_client()
    login(c)
    fields = form(c, "/access", "grid")
    fields.update(
        {
            "name-new": "research",
            "pattern-new": "department=Research|R&D; building=B*",
            "cell-new-pop3": "allow",
            "max-new": "2",
            "remove-0": "1",
        }
    )
    assert c.post("/access", data=fields).status_code == 302
    table = Policy.load(site).access
    assert [r.name for r in table.rules] == ["sales", "staff", "visitors", "research"]
    user = {"department": "R&D", "building": "B7"}
    assert table.decide(user, "pop3").allowed and table.decide(user, "pop3").max_connections == 2
    # a new row placed first takes precedence
    fields = form(c, "/access", "grid")
    fields.update({"name-new": "no-pop", "pattern-new": "", "cell-new-pop3": "deny"})
    fields["order-new"] = "0"
    assert c.post("/access", data=fields).status_code == 302
    table = Policy.load(site).access
    assert table.rules[0].name == "no-pop" and not table.decide(user, "pop3").allowed


def test_an_invalid_edit_is_refused_with_the_reason_and_changes_nothing(
    app: Any, site: Config, notified: list[Config]
) -> None:
    c = app.test_client()
    login(c)
    before = site.policies.access.read_text()
    for change, words in (
        ({"pattern-1": "department=Sales[1"}, "unparsable pattern"),
        ({"pattern-1": "department"}, "is not key=value"),
        ({"name-1": "staff"}, "duplicate rule name"),
        ({"max-1": "lots"}, "not a whole number"),
        ({"max-1": "²"}, "not a whole number"),
        ({"cell-1-smtp": "maybe"}, "allow, deny or empty"),
    ):
        fields = form(c, "/access", "grid")
        r = c.post("/access", data={**fields, **change})
        assert r.status_code == 400
        assert words in r.text
    assert site.policies.access.read_text() == before
    assert notified == []
    assert "edit" not in c.get("/audit").text.split("<h1>Audit log</h1>")[1]


def test_a_second_admin_editing_the_same_version_gets_a_conflict(app: Any, site: Config) -> None:
    alice, bob = app.test_client(), app.test_client()
    login(alice)
    login(bob, "bob", PASSWORD + "!")
    a_fields = form(alice, "/access", "grid")
    b_fields = form(bob, "/access", "grid")
    a_fields["cell-1-pop3"] = "allow"
    assert alice.post("/access", data=a_fields).status_code == 302
    after_alice = site.policies.access.read_text()
    b_fields["cell-0-http"] = "deny"
    r = bob.post("/access", data=b_fields)
    assert r.status_code == 409 and "Conflict" in r.text
    assert site.policies.access.read_text() == after_alice  # never a silent overwrite
    # bob reloads the page (new version) and redoes his change: both edits survive
    b_fields = form(bob, "/access", "grid")
    b_fields["cell-0-http"] = "deny"
    assert bob.post("/access", data=b_fields).status_code == 302
    table = Policy.load(site).access
    assert table.decide({"department": "Sales 1"}, "pop3").allowed
    assert not table.decide({"department": "Sales 1", "title": "contractor"}, "http").allowed


def test_server_info_editing(app: Any, site: Config) -> None:
    c = app.test_client()
    login(c)
    fields = form(c, "/servers")
    text = fields["text"]
    assert "[services.smtp]" in text
    assert "<td>198.51.100.3:25</td>" in c.get("/servers").text  # the parsed summary
    bad = {**fields, "text": text.replace("198.51.100.3:25", "192.168.1.50:25")}
    r = c.post("/servers", data=bad)
    assert r.status_code == 400 and "guest subnet" in r.text and "servers.toml:" in r.text
    drop_http = text.split("[services.http]")[0]
    r = c.post("/servers", data={**fields, "text": drop_http})
    assert r.status_code == 400 and "unknown service" in r.text
    good = {**fields, "text": text.replace("198.51.100.3:25", "198.51.100.5:25")}
    assert c.post("/servers", data=good).status_code == 302
    assert tomllib.loads(site.policies.servers.read_text())["services"]["smtp"]["upstream"] == (
        "198.51.100.5:25"
    )
    assert c.post("/servers", data=good).status_code == 409  # stale version
    assert "edit server info" in c.get("/audit").text


def test_trusted_agents_editing(
    app: Any, site: Config, notified: list[Config], fake_sessions: FakeSessions
) -> None:
    from appliance.core import agent_protocol as wire
    from appliance.policy.trusted_agents import load as load_agents

    c = app.test_client()
    assert c.get("/agents").status_code == 302  # the admin login first
    login(c)
    fields = form(c, "/agents")
    assert 'id="none"' in c.get("/agents").text  # no table yet: nobody is trusted
    assert "[agents." in fields["text"]  # a commented example to start from
    pin = wire.fingerprint(b"corp agent")
    text = f'[agents."corp.example"]\nfingerprints = ["{pin}"]\nattributes = ["role"]\n'
    r = c.post("/agents", data={**fields, "text": text.replace('"role"', '"source"')})
    assert r.status_code == 400 and "agents.toml:3: agents.corp.example.attributes" in r.text
    assert not site.policies.agents.exists() and notified == []
    r = c.post("/agents", data={k: v for k, v in {**fields, "text": text}.items() if k != "csrf"})
    assert r.status_code == 400 and not site.policies.agents.exists()
    assert c.post("/agents", data={**fields, "text": text}).status_code == 302
    table = load_agents(site.policies.agents)
    assert [(a.name, set(a.attributes), set(a.fingerprints)) for a in table.agents] == [
        ("corp.example", {"role"}, {pin})
    ]
    assert notified == [site]
    page = c.get("/agents").text
    assert "<td>corp.example</td>" in page and "<td>role</td>" in page and pin in page
    assert c.post("/agents", data={**fields, "text": text}).status_code == 409  # stale version
    assert "edit trusted agents" in c.get("/audit").text

    # taking `role` away ends the sessions that hold a role from that agent, not others
    from types import SimpleNamespace

    def agent_session(sid: str, user: str, agent: str, **attrs: str) -> Any:
        return SimpleNamespace(
            id=sid,
            user=f"{user}@{agent}",
            source=f"agent:{agent}",
            attributes={**attrs, "source": "agent", "agent": agent},
            ip="192.168.1.101",
            mac="02:47:00:00:00:02",
            created=0.0,
            idle_expiry=1e12,
        )

    fake_sessions.items["s2"] = agent_session("s2", "dave", "corp.example", role="staff")
    fake_sessions.items["s3"] = agent_session("s3", "erin", "corp.example")
    fake_sessions.items["s4"] = agent_session("s4", "carol", "evil.example")
    fields = form(c, "/agents")
    assert c.post("/agents", data={**fields, "text": text.replace('"role"', "")}).status_code == 302
    assert [sid for sid, _ in fake_sessions.ended] == ["s2"]
    assert "trust in agent:corp.example changed" in fake_sessions.ended[0][1]
    # a replaced certificate (perhaps a stolen key) ends every session of that agent
    fields = form(c, "/agents")
    new_pin = wire.fingerprint(b"corp agent, new key")
    r = c.post("/agents", data={**fields, "text": fields["text"].replace(pin, new_pin)})
    assert r.status_code == 302 and [sid for sid, _ in fake_sessions.ended] == ["s2", "s3"]


def test_sessions_list_and_end(app: Any, fake_sessions: FakeSessions) -> None:
    c = app.test_client()
    login(c)
    page = c.get("/sessions").text
    assert "carol" in page and "192.168.1.100" in page
    fields = form(c, "/sessions/end", page_url="/sessions")
    assert fields["id"] == "s1"
    assert c.post("/sessions/end", data=fields).status_code == 302
    assert fake_sessions.ended == [("s1", "ended by admin alice")]
    assert "end session" in c.get("/audit").text
    assert c.post("/sessions/end", data=fields).status_code == 404


def test_logout(app: Any) -> None:
    c = app.test_client()
    login(c)
    html = c.get("/access").text
    token = re.search(r'name="csrf" value="([^"]+)"', html)
    assert token
    assert c.post("/logout", data={"csrf": token.group(1)}).status_code == 302
    assert c.get("/access").status_code == 302


def test_a_cookie_copied_before_logout_is_dead_after_it(app: Any) -> None:
    c = app.test_client()
    login(c)
    stolen = c.get_cookie("appliance_admin")
    assert stolen is not None
    token = re.search(r'name="csrf" value="([^"]+)"', c.get("/access").text)
    assert token
    c.post("/logout", data={"csrf": token.group(1)})
    replay = app.test_client()
    replay.set_cookie("appliance_admin", stolen.value)
    r = replay.get("/access")
    assert r.status_code == 302 and r.headers["Location"].endswith("/login")


def test_a_new_password_ends_the_admins_open_logins(
    app: Any, site: Config, monkeypatch: pytest.MonkeyPatch, capsys: Any
) -> None:
    from appliance.cli import main

    alice, bob = app.test_client(), app.test_client()
    login(alice)
    login(bob, "bob", PASSWORD + "!")
    monkeypatch.setattr("sys.stdin", io.StringIO("a brand new password\n"))
    cfg = ["--config", str(site.path)]
    assert main(["admins", "passwd", *cfg, "alice", "--password-stdin"]) == 0
    assert "ended 1 open admin login(s) of alice" in capsys.readouterr().out
    assert alice.get("/access").status_code == 302
    assert bob.get("/access").status_code == 200


def test_admins_cli(site: Config, monkeypatch: pytest.MonkeyPatch, capsys: Any) -> None:
    from appliance.cli import main

    cfg = ["--config", str(site.path)]
    monkeypatch.setattr("sys.stdin", io.StringIO("a long enough password\n"))
    assert main(["admins", "add", *cfg, "carol", "--password-stdin"]) == 0
    assert accounts.check_login(site.policies.admins, "carol", "a long enough password")
    assert oct(site.policies.admins.stat().st_mode & 0o777) == "0o600"
    monkeypatch.setattr("sys.stdin", io.StringIO("short\n"))
    assert main(["admins", "passwd", *cfg, "carol", "--password-stdin"]) == 2
    monkeypatch.setattr("sys.stdin", io.StringIO("another long password\n"))
    assert main(["admins", "passwd", *cfg, "carol", "--password-stdin"]) == 0
    assert not accounts.check_login(site.policies.admins, "carol", "a long enough password")
    # before the first start there is no store, and the CLI (root) does not make one
    assert not site.state.database.exists()
    capsys.readouterr()
    assert main(["admins", "list", *cfg]) == 0
    assert capsys.readouterr().out.split() == ["alice", "bob", "carol"]
    assert main(["admins", "del", *cfg, "carol"]) == 0
    assert main(["admins", "del", *cfg, "carol"]) == 2
    assert "argon2id" in site.policies.admins.read_text()
    from appliance.admin import audit

    log = [(e.action, e.target) for e in audit.tail(site)]
    assert log[:2] == [("admins del", "carol"), ("admins passwd", "carol")]
    assert not any("argon2" in repr(e) for e in audit.tail(site))  # never the hash


def test_the_grid_round_trips_a_table_without_changing_any_decision() -> None:
    from appliance.admin import grid
    from appliance.core.tomlfile import TomlFile
    from appliance.policy.access_rights import parse_access

    services = ("smtp", "pop3", "http")
    text = (
        '# header\n\n[[rules]]\nname = "a b"\nmatch = { "org.unit" = "R&D*", role = ["x", "y"] }\n'
        'allow = ["smtp"]\ndeny = ["http"]\nmax_connections = 3\nsession_max = 600\n\n'
        '[[rules]]\nname = "everyone"\nallow = ["http"]\n'
    )
    before = parse_access(TomlFile.parse(text, "a.toml"), services)
    again = grid.to_toml(grid.rows_of(before), text)
    after = parse_access(TomlFile.parse(again, "a.toml"), services)
    assert again.startswith("# header\n")
    for attrs in (
        {"org.unit": "R&D 4", "role": "y"},
        {"org.unit": "R&D", "role": ("z", "x")},
        {"role": "x"},
        {},
    ):
        for s in services:
            assert after.decide(attrs, s) == before.decide(attrs, s)  # type: ignore[arg-type]
        assert after.may_use_network(attrs) == before.may_use_network(attrs)  # type: ignore[arg-type]


def test_session_store_is_built_with_the_firewall_revoke(site: Config) -> None:
    from appliance.admin.app import session_store
    from appliance.state.sessions import SessionStore, _no_revoke

    store = session_store(site)
    assert isinstance(store, SessionStore)
    assert store.revoke is not _no_revoke  # ending a session takes it out of nftables


def _usage_rows(site: Config) -> None:
    from appliance.state import store, usage

    conn = store.connect(site.state.database)
    schema.upgrade(conn)
    today, week_ago = usage.day_of(), usage.days_back(7)[0]
    usage.add(
        conn,
        [
            usage.Entry(today, "carol", "pop3", "s1", 3, 120, 1_500_000),
            usage.Entry(today, "carol", "smtp", "s1", 2, 40_000, 300, 2),
            usage.Entry(today, "=cmd|x", "http", None, 1, 1, 1),
            usage.Entry(week_ago, "dave", "http", None, 5, 10, 2048),
        ],
    )
    conn.close()


def test_usage_page_shows_each_users_bytes_per_service_and_a_plot(app: Any, site: Config) -> None:
    c = app.test_client()
    assert c.get("/usage").status_code == 302  # a login first, as every page
    login(c)
    empty = c.get("/usage?period=1")
    assert empty.status_code == 200 and 'id="none"' in empty.text
    _usage_rows(site)
    today = c.get("/usage?period=1").text
    assert 'data-user="carol" data-service="pop3"' in today
    assert 'data-bytes="1500000">1.4 MiB<' in today and 'data-bytes="40000"' in today
    assert "dave" not in today  # a week ago is not today
    assert '<td class="num messages">2</td>' in today  # carol's SMTP messages
    assert today.count('<td class="num messages"></td>') == 2  # pop3 and http: none
    assert today.count('<svg class="plot" data-user="carol"') == 1
    assert re.search(r'<rect x="[\d.]+" y="[\d.]+" width="[\d.]+" height="46.0"><title>', today)
    week = c.get("/usage?period=7").text
    assert 'data-user="dave" data-service="http"' in week and "2.0 KiB" in week
    assert c.get("/usage?period=bogus").text == week  # an unknown period: the default one
    assert c.post("/usage").status_code in (400, 405)  # GET only (and no CSRF token here)


def test_usage_csv_export(app: Any, site: Config) -> None:
    import csv

    c = app.test_client()
    login(c)
    _usage_rows(site)
    r = c.get("/usage.csv?period=30")
    assert r.status_code == 200 and r.mimetype == "text/csv"
    assert r.headers["Content-Disposition"].startswith('attachment; filename="usage-')
    rows = list(csv.reader(io.StringIO(r.text)))
    assert rows[0] == [
        "day",
        "user",
        "service",
        "connections",
        "bytes_up",
        "bytes_down",
        "messages",
    ]
    assert [r[1:] for r in rows[1:] if r[1] == "carol"] == [
        ["carol", "pop3", "3", "120", "1500000", "0"],
        ["carol", "smtp", "2", "40000", "300", "2"],
    ]
    assert any(r[1:3] == ["'=cmd|x", "http"] for r in rows)  # a formula stays text
    assert len(rows) == 5
    today_only = list(csv.reader(io.StringIO(c.get("/usage.csv?period=1").text)))
    assert len(today_only) == 4
