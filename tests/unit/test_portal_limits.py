"""What keeps one guest from taking the portal down or misusing it (issue #14).

Agent logins in progress are capped, every failed one counts toward the rate limit,
a login returns only to the URL the guest was captured on, and a user id cannot
forge log lines.  The nftables side (connections per guest) is tests/netns/test_portal.py.
"""

from __future__ import annotations

import logging
import re
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from portal_conf import load, write_config
from test_portal_app import IP, FakeAgentError, Site, csrf_of, fake_agent, login

from appliance.core.logs import JournalFormatter
from appliance.core.tomlfile import ConfigError
from appliance.portal.security import InFlight, RateLimiter, ReturnUrls

pytestmark = pytest.mark.unit


@pytest.fixture
def site(tmp_path: Path) -> Site:
    return Site(tmp_path)


def test_the_caps_are_config_keys_with_defaults_checked_at_load(tmp_path: Path) -> None:
    cfg = load(write_config(tmp_path / "a"))
    assert cfg.portal.connections_per_guest == 32
    assert (cfg.portal.agent_logins_per_guest, cfg.portal.agent_logins_total) == (2, 4)
    assert cfg.proxy.connections_per_guest == 256
    cfg = load(
        write_config(
            tmp_path / "b",
            extra="connections_per_guest = 8\nagent_logins_per_guest = 1\n"
            "agent_logins_total = 7\n[proxy]\nconnections_per_guest = 64",
        )
    )
    assert (cfg.portal.connections_per_guest, cfg.portal.agent_logins_total) == (8, 7)
    assert cfg.proxy.connections_per_guest == 64
    for i, (extra, key) in enumerate(
        [
            ("connections_per_guest = 0", "portal.connections_per_guest"),
            ('connections_per_guest = "many"', "portal.connections_per_guest"),
            ("agent_logins_total = 8", "portal.agent_logins_total"),  # the portal has 8 threads
            ("agent_logins_per_guest = 3\nagent_logins_total = 2", "portal.agent_logins_per_guest"),
            ("[proxy]\nconnections_per_guest = 1", "proxy.connections_per_guest"),
        ]
    ):
        path = write_config(tmp_path / f"bad{i}", extra=extra)
        with pytest.raises(ConfigError) as err:
            load(path)
        text = str(err.value)  # file:line: key: why
        assert re.match(rf"{re.escape(str(path))}:\d+: {re.escape(key)}: ", text), text


def test_a_login_returns_only_to_the_url_the_guest_was_captured_on(site: Site) -> None:
    c = site.client()
    r = c.get("/news?id=7", headers={"Host": "www.example.com", "Accept": "text/html"})
    assert r.status_code == 302
    captured = "http://www.example.com/news?id=7"
    # a link someone sent: the portal's own login page with a return URL to another site
    page = c.get("/login?url=http%3A%2F%2Fevil.example%2Fphish").get_data(as_text=True)
    assert "evil.example" not in page
    r = login(c, "alice", "correct horse", url="http://evil.example/phish")
    assert r.status_code == 303 and r.headers["Location"] == "/status"
    page = c.get("/status?url=http%3A%2F%2Fevil.example%2Fphish").get_data(as_text=True)
    assert "evil.example" not in page
    # the URL it was captured on is still followed (and offered on the status page)
    assert captured in c.get("/status?url=" + captured.replace("?", "%3F")).get_data(as_text=True)
    site.sessions.end(site.sessions.lookup_ip(IP).id, "test")  # type: ignore[union-attr]
    page = c.get("/login?url=http%3A%2F%2Fwww.example.com%2Fnews%3Fid%3D7").get_data(as_text=True)
    assert 'name="url" value="http://www.example.com/news?id=7"' in page
    r = login(c, "alice", "correct horse", url=captured)
    assert r.status_code == 303 and r.headers["Location"] == captured
    # another guest's captured URL is not this guest's
    urls = ReturnUrls(per_key=2, ttl=10)
    urls.remember("a", "http://x/1", now=0)
    assert urls.allowed("a", "http://x/1", now=5) and not urls.allowed("b", "http://x/1", now=5)
    assert not urls.allowed("a", "http://x/1", now=11)  # and not forever
    urls.remember("a", "http://x/2", now=0)
    urls.remember("a", "http://x/3", now=0)
    assert not urls.allowed("a", "http://x/1", now=1)  # only the last per_key


@pytest.mark.parametrize(
    ("user", "agent"),
    [
        ("alice\nWARNING appliance.portal: login from 192.168.1.7 as root: allowed", ""),
        ("alice\r\n<4>appliance.portal: forged", ""),
        ("alice", "home.example\nINFO forged"),
        ("alice\u2028forged", ""),
    ],
)
def test_a_user_or_agent_field_cannot_split_a_log_line(
    site: Site, caplog: pytest.LogCaptureFixture, user: str, agent: str
) -> None:
    caplog.set_level(logging.INFO)
    c = site.client()
    r = login(c, user, "wrong password", agent=agent)
    assert r.status_code == 400 and "characters that are not allowed" in r.get_data(as_text=True)
    assert "forged" not in r.get_data(as_text=True)
    lines = [JournalFormatter("%(message)s").format(rec) for rec in caplog.records]
    assert lines and all("\n" not in x and "\r" not in x and "\u2028" not in x for x in lines)
    assert not any("forged" in x or "root" in x for x in lines), lines
    assert any("control characters in the user or agent field" in x for x in lines), lines
    assert site.sessions.lookup_ip(IP) is None


def test_every_failed_agent_login_counts_toward_the_rate_limit(
    site: Site, monkeypatch: pytest.MonkeyPatch
) -> None:
    codes = iter(["unreachable", "timeout", "bad_answer", "never_reached"])

    def refuse(spec: str, password: str) -> object:
        raise FakeAgentError(next(codes), "detail")

    seen = fake_agent(monkeypatch, refuse)
    c = site.client()  # the site's limiter allows 3 failures a minute
    for _ in range(3):
        assert login(c, "alice", "pw", agent="203.0.113.9:7").status_code == 502
    r = login(c, "alice", "pw", agent="203.0.113.9:7")
    assert r.status_code == 429 and "Too many failed logins" in r.get_data(as_text=True)
    assert len(seen) == 3  # the fourth never went out


def test_agent_logins_in_progress_are_capped_per_guest_and_in_all(
    site: Site, monkeypatch: pytest.MonkeyPatch
) -> None:
    site.deps.limiter = RateLimiter(limit=100, window=60)
    site.deps.agent_logins = InFlight(per_key=2, total=3)
    release = threading.Event()
    entered = threading.Semaphore(0)

    def tarpit(spec: str, password: str) -> object:
        entered.release()
        release.wait(10)
        raise FakeAgentError("timeout", "no answer")

    fake_agent(monkeypatch, tarpit)
    results: dict[str, list[int]] = {}

    def attempt(ip: str, form: dict[str, str], cookie: Any) -> None:
        c = site.app.test_client()
        c.environ_base["REMOTE_ADDR"] = ip
        c.set_cookie(cookie.key, cookie.value, domain=cookie.domain)
        r = c.post("/login", data=form, base_url="http://192.168.1.1")
        results.setdefault(ip, []).append(r.status_code)

    def form_for(ip: str) -> tuple[dict[str, str], Any]:
        c = site.app.test_client()
        c.environ_base["REMOTE_ADDR"] = ip
        page = c.get("/login", base_url="http://192.168.1.1").get_data(as_text=True)
        data = {"csrf": csrf_of(page), "user": "alice", "password": "pw", "agent": "203.0.113.9"}
        return data, c.get_cookie("gg_csrf", domain="192.168.1.1")

    other = "192.168.1.101"
    site.neigh[other] = "02:47:00:00:00:02"
    from appliance.state import leases
    from appliance.state.leases import Lease

    leases.record(site.conn, "granted", Lease(other, site.neigh[other], time.time() + 60), 0)
    held = [threading.Thread(target=attempt, args=(IP, *form_for(IP))) for _ in range(2)]
    for t in held:
        t.start()
    for _ in held:
        assert entered.acquire(timeout=5)
    # a third from the same guest is turned away at once, without asking the agent
    started = time.monotonic()
    attempt(IP, *form_for(IP))
    assert results[IP] == [429] and time.monotonic() - started < 1
    # another guest still gets one (the total is 3), a second one of its own does not
    t3 = threading.Thread(target=attempt, args=(other, *form_for(other)))
    t3.start()
    assert entered.acquire(timeout=5)
    attempt(other, *form_for(other))
    assert results[other] == [429]
    release.set()
    for t in (*held, t3):
        t.join(10)
    assert sorted(results[IP]) == [429, 502, 502] and sorted(results[other]) == [429, 502]
    # and once they are done the slots are free again
    assert site.deps.agent_logins.take(IP) and site.deps.agent_logins.take(IP)
    assert not site.deps.agent_logins.take(IP)


def test_the_portal_raises_a_low_open_files_limit_above_its_connection_limit() -> None:
    """systemd's default soft limit (1024) is below what 1000 connections need."""
    import resource
    import subprocess
    import sys

    from appliance.portal.service import CONNECTION_LIMIT

    def low() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (1024, 4096))

    code = (
        "import resource\nfrom appliance.portal.service import room_for_connections\n"
        "room_for_connections()\nprint(resource.getrlimit(resource.RLIMIT_NOFILE)[0])"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], preexec_fn=low, capture_output=True, text=True, check=True
    )
    assert CONNECTION_LIMIT + 100 < int(out.stdout) <= 4096, out
