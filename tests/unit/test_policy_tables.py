"""The policy tables: what the example decides, each kind of bad input, live reload."""

from __future__ import annotations

import ipaddress
import os
import shutil
from pathlib import Path

import pytest

from appliance.core.config import load
from appliance.core.tomlfile import ConfigError, TomlFile
from appliance.policy.access_rights import parse_access
from appliance.policy.server_info import Endpoint, load_servers, parse_servers
from appliance.policy.tables import Policy, check_texts

pytestmark = pytest.mark.unit
ROOT = Path(__file__).resolve().parents[2]
POLICIES = ROOT / "policies"
GUEST = ipaddress.IPv4Network("192.168.1.0/24")
SERVICES = ("smtp", "pop3", "http", "nntp")


def access(text: str, services: tuple[str, ...] = SERVICES):  # type: ignore[no-untyped-def]
    return parse_access(TomlFile.parse(text, "access.toml"), services)


def servers(text: str):  # type: ignore[no-untyped-def]
    return parse_servers(TomlFile.parse(text, "servers.toml"), GUEST)


@pytest.fixture
def site(tmp_path: Path) -> Path:
    """A copy of the example config and its tables, to edit."""
    for name in ("appliance.toml", "servers.toml", "access.toml"):
        shutil.copy(POLICIES / name, tmp_path / name)
    cfg = tmp_path / "appliance.toml"
    cfg.write_text(cfg.read_text().replace("/var/lib/appliance", str(tmp_path / "state")))
    return cfg


# -- the example tables -----------------------------------------------------


def test_example_server_table() -> None:
    table = load_servers(POLICIES / "servers.toml", GUEST)
    assert set(table.services) == {
        *("smtp", "submission", "smtps", "pop3", "pop3s", "imap", "imaps", "http", "https")
    }
    https = table.services["https"]
    assert (https.protocol, https.route, https.intercept_ports) == ("tls", "proxy", (443,))
    smtp = table.services["smtp"]
    assert smtp.upstreams == (Endpoint("198.51.100.3", 25),)
    assert smtp.intercept_ports == (25,) and smtp.listen_port == 2525
    assert table.by_listen_port(1110) is table.services["pop3"]
    assert table.by_listen_port(9) is None


def test_personal_servers_override_only_personal_allowed_services() -> None:
    table = load_servers(
        POLICIES / "servers.toml", GUEST, [ipaddress.IPv4Network("198.51.100.0/24")]
    )
    personal = {"pop3": "203.0.113.3:110", "smtp": "203.0.113.3:25"}
    assert table.upstreams_for("pop3", personal) == (Endpoint("203.0.113.3", 110),)
    # smtp is not personal_allowed: the site's relay, whatever the agent says
    assert table.upstreams_for("smtp", personal) == (Endpoint("198.51.100.3", 25),)
    # a personal entry pointing at the guest side or the hidden segment is ignored
    for bad in ("192.168.1.7:110", "198.51.100.2:110", "nonsense"):
        assert table.upstreams_for("pop3", {"pop3": bad}) == (Endpoint("198.51.100.3", 110),)
    assert table.upstreams_for("nntp", personal) == ()


def test_personal_allowed_defaults_and_admin_override() -> None:
    t = servers(
        """
[services.nntp]
listen_port = 1119
[services.smtp]
listen_port = 2525
upstream = "198.51.100.3:25"
fallbacks = ["198.51.100.5:25", "relay.example:587"]
[services.smtp2]
protocol = "smtp"
listen_port = 2526
upstream = "198.51.100.3:25"
personal_allowed = true
"""
    )
    assert t.services["nntp"].personal_allowed and t.services["nntp"].upstreams == ()
    assert t.services["nntp"].protocol == "tcp"
    assert not t.services["smtp"].personal_allowed
    assert [str(e) for e in t.services["smtp"].upstreams] == [
        "198.51.100.3:25",
        "198.51.100.5:25",
        "relay.example:587",
    ]
    assert t.services["smtp2"].personal_allowed
    assert t.upstreams_for("smtp2", {"smtp2": "203.0.113.3:25"}) == (Endpoint("203.0.113.3", 25),)


def test_example_access_decisions() -> None:
    cfg = load(POLICIES / "appliance.toml")
    a = Policy.load(cfg).access
    sales = {"department": "Sales 1"}
    assert a.decide(sales, "smtp").allowed and a.decide(sales, "http").allowed
    assert not a.decide(sales, "pop3").allowed
    contractor = {"department": "Sales 1", "title": "contractor (extern)"}
    d = a.decide(contractor, "smtp")
    assert not d.allowed and d.rule == "contractors"
    assert a.decide(contractor, "http").max_connections == 4
    staff = {"role": ("guest", "manager")}  # multi-valued: any value may match
    assert a.decide(staff, "pop3").allowed
    assert a.may_use_network(staff).session_max == 28800
    stranger = {"department": "Accounting"}
    assert not a.may_use_network(stranger).allowed
    assert "no rule matches" in a.may_use_network(stranger).reason
    assert not a.decide(stranger, "http").allowed
    assert not a.decide(sales, "gopher").allowed


# -- precedence -------------------------------------------------------------

PRECEDENCE = """
[[rules]]
name = "no-mail-for-interns"
match = { title = "intern" }
deny = ["smtp"]

[[rules]]
name = "network-only"
match = { department = "R*" }

[[rules]]
name = "research"
match = { department = "Research" }
allow = ["smtp", "http"]

[[rules]]
name = "research-again"
match = { department = "Research", building = "B" }
deny = ["http"]
"""


def test_first_match_wins_per_service() -> None:
    a = access(PRECEDENCE)
    intern = {"department": "Research", "title": "intern"}
    assert a.decide(intern, "smtp").rule == "no-mail-for-interns"
    assert not a.decide(intern, "smtp").allowed
    # the first rule says nothing about http, so the next matching rule decides it
    assert a.decide(intern, "http").allowed and a.decide(intern, "http").rule == "research"
    # a later deny does not override an earlier allow (first match, not deny-overrides)
    assert a.decide({"department": "Research", "building": "B"}, "http").allowed
    # a rule with no services still grants network use, and nothing else
    rx = {"department": "Rx"}
    assert a.may_use_network(rx).allowed and a.may_use_network(rx).rule == "network-only"
    assert not a.decide(rx, "smtp").allowed and a.decide(rx, "smtp").rule is None


def test_explain_names_the_deciding_rule() -> None:
    a = access(PRECEDENCE)
    lines, d = a.explain({"department": "Research", "title": "intern"}, "http")
    assert d == a.decide({"department": "Research", "title": "intern"}, "http")
    assert "no-mail-for-interns: matches, says nothing about http" in lines[0]
    assert "research: matches, allow http  <- decides" in lines[-1]
    lines, d = a.explain({"department": "Sales"}, "smtp")
    assert not d.allowed and "user has Sales" in lines[1]


# -- bad input --------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "line", "key", "words"),
    [
        (
            '[[rules]]\nname = "a"\nallow = ["smtp", "gopher"]\n',
            3,
            "rules[0].allow",
            "unknown service 'gopher'",
        ),
        (
            '[[rules]]\nname = "a"\nmatch = { d = "x" }\n'
            '[[rules]]\nname = "a"\nmatch = { d = "y" }\n',
            5,
            "rules[1].name",
            "duplicate rule name",
        ),
        (
            '[[rules]]\nname = "a"\nmatch = { d = "x" }\n\n'
            '[[rules]]\nname = "b"\nmatch = { d = "x" }\n',
            7,
            "rules[1].match",
            "duplicate rule",
        ),
        (
            '[[rules]]\nname = "a"\nmatch = { d = "Sales[1" }\n',
            3,
            "rules[0].match.d",
            "unparsable pattern",
        ),
        (
            '[[rules]]\nname = "a"\nmatch = { d = [] }\n',
            3,
            "rules[0].match.d",
            "unparsable pattern",
        ),
        ('[[rules]]\nname = "a"\nmatch = { d = 3 }\n', 3, "rules[0].match.d", "unparsable pattern"),
        (
            '[[rules]]\nname = "a"\nmatch = { d = ["x*"] }\n',
            3,
            "rules[0].match.d",
            "globs are not allowed",
        ),
        (
            '[[rules]]\nname = "a"\nallow = ["smtp"]\ndeny = ["smtp"]\n',
            4,
            "rules[0].deny",
            "both allowed and denied",
        ),
        (
            '[[rules]]\nname = "a"\nmax_connections = 0\n',
            3,
            "rules[0].max_connections",
            "out of range",
        ),
        (
            '[[rules]]\nname = "a"\nquota_bytes_per_day = 0\n',
            3,
            "rules[0].quota_bytes_per_day",
            "out of range",
        ),
        (
            '[[rules]]\nname = "a"\nallow = ["smtp"]\nquota_bytes_per_day = "1G"\n',
            4,
            "rules[0].quota_bytes_per_day",
            "",
        ),
        ('[[rules]]\nname = "a"\nalow = ["smtp"]\n', 3, "rules[0].alow", "unknown key"),
        (
            '[[rules]]\nname = "a"\nmatch = { d = ["x", "y"] }\n'
            '[[rules]]\nname = "b"\nmatch = { d = ["y", "x"] }\n',
            6,
            "rules[1].match",
            "duplicate rule",
        ),
    ],
)
def test_bad_access_tables_name_file_line_and_key(
    text: str, line: int, key: str, words: str
) -> None:
    with pytest.raises(ConfigError) as err:
        access(text)
    assert err.value.file == "access.toml"
    assert err.value.key == key
    assert err.value.line == line
    assert words in err.value.reason


SMTP = '[services.smtp]\nlisten_port = 2525\nupstream = "198.51.100.3:25"\n'


@pytest.mark.parametrize(
    ("text", "line", "key", "words"),
    [
        (SMTP.replace("2525", "70000"), 2, "services.smtp.listen_port", "out of range"),
        (SMTP.replace(':25"', ':0"'), 3, "services.smtp.upstream", "out of range"),
        (SMTP.replace("198.51.100.3", "192.168.1.20"), 3, "services.smtp.upstream", "guest subnet"),
        (SMTP.replace("198.51.100.3:25", "198.51.100.3"), 3, "services.smtp.upstream", "host:port"),
        (SMTP + 'fallbacks = ["192.168.1.1:25"]\n', 4, "services.smtp.fallbacks", "guest subnet"),
        (
            SMTP + "intercept_ports = [25, 99999]\n",
            4,
            "services.smtp.intercept_ports",
            "out of range",
        ),
        (
            SMTP + "[services.pop3]\nlisten_port = 2525\n",
            5,
            "services.pop3.listen_port",
            "already used",
        ),
        (SMTP + 'protocol = "gopher"\n', 4, "services.smtp.protocol", "expected one of"),
        (SMTP + 'tls_name = "a.example"\n', 4, "services.smtp.tls_name", "only with tls"),
        (SMTP + 'protocol = "tls"\ntls = true\n', 5, "services.smtp.tls", "guest's own"),
        (SMTP + "tls = true\npersonal_allowed = true\n", 4, "services.smtp.tls", "personal"),
        (
            SMTP + 'tls = true\ntls_fingerprint = "md5:00"\n',
            5,
            "services.smtp.tls_fingerprint",
            "64 hex",
        ),
        (
            SMTP + 'tls = true\ntls_ca = "/nonexistent/ca.pem"\n',
            5,
            "services.smtp.tls_ca",
            "cannot load",
        ),
        (SMTP + 'guest_names = ["Mail Server"]\n', 4, "services.smtp.guest_names", "DNS label"),
        (SMTP + 'route = "proxy"\n', 4, "services.smtp.route", "for tls services"),
        (SMTP + 'protocol = "tls"\nroute = "via"\n', 5, "services.smtp.route", "expected one of"),
        (
            SMTP + 'protocol = "tls"\nroute = "direct"\n',
            3,
            "services.smtp.upstream",
            "where the guest connected",
        ),
        ("[services.smtp]\nlisten_port = 2525\n", 1, "services.smtp.upstream", "missing"),
        ('[services."Bad Name"]\nlisten_port = 2525\n', 1, "services.Bad Name", "service name"),
        ("", None, "services", "no services"),
    ],
)
def test_bad_server_tables_name_file_line_and_key(
    text: str, line: int | None, key: str, words: str
) -> None:
    with pytest.raises(ConfigError) as err:
        servers(text)
    assert err.value.file == "servers.toml"
    assert err.value.key == key
    assert err.value.line == line
    assert words in err.value.reason


def test_check_config_refuses_a_bad_table(site: Path) -> None:
    from appliance.policy import files as policy_files

    cfg = load(site)
    assert len(policy_files.check(cfg)) == 2
    (site.parent / "access.toml").write_text('[[rules]]\nname = "x"\nallow = ["telnet"]\n')
    with pytest.raises(ConfigError, match=r"access.toml:3: rules\[0\].allow: unknown service"):
        policy_files.check(cfg)


# -- reload -----------------------------------------------------------------


def test_reload_applies_a_valid_change_and_notifies(site: Path) -> None:
    policy = Policy.load(load(site))
    seen: list[Policy] = []
    policy.subscribe(seen.append)
    assert not policy.reload() and seen == []  # nothing changed, nobody is bothered
    sales = {"department": "Sales 1"}
    assert policy.decide(sales, "smtp").allowed
    path = site.parent / "access.toml"
    text = path.read_text()
    old = 'allow = ["smtp", "submission", "smtps", "http", "https"]'
    assert old in text
    path.write_text(text.replace(old, 'allow = ["http"]'))
    assert policy.reload()
    assert seen == [policy]
    assert not policy.decide(sales, "smtp").allowed


def test_reload_refuses_an_invalid_table_and_keeps_the_old(site: Path) -> None:
    policy = Policy.load(load(site))
    old_access, old_servers = policy.access, policy.servers
    seen: list[Policy] = []
    policy.subscribe(seen.append)
    (site.parent / "servers.toml").write_text(SMTP.replace("198.51.100.3", "192.168.1.9"))
    with pytest.raises(ConfigError, match="guest subnet"):
        policy.reload()
    assert not policy.reload_logged()
    assert policy.access is old_access and policy.servers is old_servers and seen == []
    # a valid servers table that drops a service the rules still name is refused too
    (site.parent / "servers.toml").write_text(SMTP)
    with pytest.raises(ConfigError, match="unknown service 'http'"):
        policy.reload()
    assert policy.access is old_access


def test_reload_on_sighup(site: Path) -> None:
    import signal

    policy = Policy.load(load(site))
    old = signal.getsignal(signal.SIGHUP)
    try:
        policy.reload_on_sighup()
        path = site.parent / "access.toml"
        path.write_text(path.read_text().replace('"Sales 1" }\nallow', '"Sales 2" }\nallow'))
        os.kill(os.getpid(), signal.SIGHUP)
        assert policy.decide({"department": "Sales 2"}, "smtp").allowed
    finally:
        signal.signal(signal.SIGHUP, old)


def test_a_listen_port_the_appliance_uses_is_refused(site: Path) -> None:
    cfg = load(site)
    text = (
        (site.parent / "servers.toml")
        .read_text()
        .replace("listen_port = 8081", "listen_port = 8000")
    )
    with pytest.raises(ConfigError) as err:
        check_texts(cfg, servers_text=text)
    assert err.value.key == "services.http.listen_port" and "admin.port" in err.value.reason
    assert err.value.line == text.splitlines().index("listen_port = 8000") + 1


def test_check_texts_names_the_real_file(site: Path) -> None:
    cfg = load(site)
    with pytest.raises(ConfigError) as err:
        check_texts(cfg, access_text='[[rules]]\nname = "a"\ndeny = ["nntp"]\n')
    assert err.value.file == str(cfg.policies.access) and err.value.line == 3


def test_check_config_validates_the_admins_table(site: Path) -> None:
    from appliance.policy import files as policy_files

    cfg = load(site)
    (site.parent / "admins.toml").write_text('[admins.root]\npassword_hash = "plain"\n')
    with pytest.raises(ConfigError, match=r"admins.toml:2: admins.root.password_hash: not an arg"):
        policy_files.check(cfg)


def test_tls_services_by_name_and_a_direct_route_without_servers() -> None:
    table = servers(
        '[services.https]\nroute = "direct"\nlisten_port = 1443\nintercept_ports = [443]\n'
        '[services.imaps]\nlisten_port = 1993\nupstream = "198.51.100.3:993"\n'
    )
    https, imaps = table.services["https"], table.services["imaps"]
    assert (https.protocol, https.route, https.upstreams, https.personal_allowed) == (
        "tls",
        "direct",
        (),
        False,
    )
    assert (imaps.protocol, imaps.route, imaps.personal_allowed) == ("tls", "server", True)


def test_tls_to_an_upstream_with_a_pin() -> None:
    pin = ":".join(["AB"] * 32)
    table = servers(SMTP + f'tls = true\ntls_fingerprint = "sha256:{pin}"\n')
    smtp = table.services["smtp"]
    assert (smtp.tls, smtp.tls_fingerprint, smtp.tls_ca) == (True, "ab" * 32, "")


def test_a_quota_is_per_rule_for_the_services_it_allows_and_absent_by_default() -> None:
    a = access(
        '[[rules]]\nname = "metered"\nmatch = { d = "guest" }\nallow = ["http", "smtp"]\n'
        'deny = ["pop3"]\nquota_bytes_per_day = 1000000\n'
        '[[rules]]\nname = "free"\nallow = ["http"]\n'
    )
    assert a.decide({"d": "guest"}, "http").quota_bytes_per_day == 1_000_000
    assert a.decide({"d": "guest"}, "pop3").quota_bytes_per_day is None  # denied anyway
    assert a.decide({"d": "staff"}, "http").quota_bytes_per_day is None
