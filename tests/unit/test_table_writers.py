"""Every table writer goes through tomlkit: any text reads back, an admin's comments stay."""

from __future__ import annotations

import io
import tempfile
import tomllib
from pathlib import Path

import pytest
from agent_helpers import make_agent_dir
from hypothesis import given, settings
from hypothesis import strategies as st
from portal_conf import load, write_config

from appliance import cli as appliance_cli
from appliance.accounts import admins, site
from appliance.admin import grid
from appliance.agent import cli as agent_cli
from appliance.agent import tables
from appliance.core import tomledit
from appliance.core.tomlfile import TomlFile
from appliance.policy.access_rights import parse_access

pytestmark = pytest.mark.unit
HASH = "$argon2id$v=19$m=65536,t=3,p=4$c2FsdA$aGFzaA"
AWKWARD = 'del\x7f nul\x00 esc\x1b tab\t nl\n cr\r "quotes" \\back\\ é ß 😀 \u0085 \u2028'
TEXT = st.text(st.characters(blacklist_categories=("Cs",)), max_size=40)  # no lone surrogates
KEY = "A" * 43  # an appliance key: 43 base64url characters


@settings(max_examples=200, deadline=None)
@given(TEXT)
def test_any_text_reads_back_through_each_writer(value: str) -> None:
    """DEL, the other control characters, quotes, backslashes, non-ASCII: what was written
    is what tomllib and the validated readers read."""
    # the site's users table (an attribute value, and inside the hash)
    account = site.Account("bob", "$argon2id$" + value, {"note": value, "list": (value, "x")})
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "users.toml"
        path.write_text("# mine\n")
        site.save(path, {"bob": account})
        assert site.load(path) == {"bob": account}
    # the agent's users and appliances tables
    user = tables.User("bob", HASH, attributes={"note": value})
    back = tables.parse_users(TomlFile.parse(tables.dump_users(tables.UserTable({"bob": user}))))
    assert back.users == {"bob": user}
    entry = tables.ApplianceEntry(KEY, "allowed", value, "2026-01-01T00:00:00Z")
    text = tables.dump_appliances(tables.ApplianceTable({KEY: entry}))
    assert tables.parse_appliances(TomlFile.parse(text)).entries[KEY].name == value
    # the access-rights rules, from the admin grid (a rule's name is anything not blank)
    row = grid.Row("r" + value, "", {"smtp": "allow"})
    rule = tomllib.loads(grid.to_toml([row], "# mine\n"))["rules"][0]
    assert rule == {"name": "r" + value, "allow": ["smtp"]}


def test_awkward_text_in_keys_and_patterns_reads_back(tmp_path: Path) -> None:
    row = grid.Row(AWKWARD, f"org.unit={AWKWARD[:8]}|b; x-y=c*", {"smtp": "deny"})
    table = parse_access(TomlFile.parse(grid.to_toml([row], "")), ("smtp",))
    assert table.rules[0].name == AWKWARD
    assert dict(table.rules[0].raw_match) == {"org.unit": (AWKWARD[:8], "b"), "x-y": "c*"}
    path = tmp_path / "users.toml"
    site.save(path, {"o.b": site.Account("o.b", HASH, {"k": AWKWARD})})
    assert site.load(path)["o.b"].attributes == {"k": AWKWARD}


# -- the site's users: `appliance users add|del|passwd` -------------------------------

SITE_USERS = f"""\
# Site accounts, kept by hand and by `appliance users`.
# Ask Carla before you add anyone.

# alice runs the front desk
[users.alice]  # since 2024
password = "{HASH}"  # set at the desk
[users.alice.attributes]
department = "Sales 1"  # until the move

# bob is the boss
[users.bob]
password = "{HASH}"

# carol: a contractor until June
[users.carol]
password = "{HASH}"
[users.carol.attributes]
title = "contractor"
"""


def users_cli(cfg: Path, monkeypatch: pytest.MonkeyPatch, *argv: str) -> int:
    monkeypatch.setattr("sys.stdin", io.StringIO("a long pass phrase\n"))
    return appliance_cli.main(["users", argv[0], "-c", str(cfg), *argv[1:]])


def test_site_users_cli_keeps_comments(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = write_config(tmp_path)
    path = load(cfg).policies.users
    path.write_text(SITE_USERS)
    assert (
        users_cli(cfg, monkeypatch, "add", "dave", "--attr", "role=staff", "--password-stdin") == 0
    )
    assert users_cli(cfg, monkeypatch, "passwd", "alice", "--password-stdin") == 0
    text = path.read_text()
    for comment in (
        "# Site accounts, kept by hand and by `appliance users`.\n# Ask Carla",
        "# alice runs the front desk\n[users.alice]  # since 2024\n",
        "  # set at the desk\n",  # the new hash keeps the old line's comment
        'department = "Sales 1"  # until the move\n',
        "# bob is the boss\n[users.bob]\n",
        "# carol: a contractor until June\n[users.carol]\n",
    ):
        assert comment in text
    table = site.load(path)
    assert sorted(table) == ["alice", "bob", "carol", "dave"]
    assert table["alice"].password_hash != HASH and table["bob"].password_hash == HASH
    assert table["dave"].attributes == {"role": "staff"}
    assert table["carol"].attributes == {"title": "contractor"}

    # removing alice (the first) takes her comments; bob's and the header stay
    assert users_cli(cfg, monkeypatch, "del", "alice") == 0
    text = path.read_text()
    assert "alice" not in text and "front desk" not in text and "until the move" not in text
    assert text.startswith("# Site accounts, kept by hand and by `appliance users`.\n# Ask")
    assert "# bob is the boss\n[users.bob]\n" in text
    assert "# carol: a contractor until June\n[users.carol]\n" in text
    # removing bob (in the middle) keeps carol's comment above carol
    assert users_cli(cfg, monkeypatch, "del", "bob") == 0
    text = path.read_text()
    assert "boss" not in text and "# carol: a contractor until June\n[users.carol]\n" in text
    assert sorted(site.load(path)) == ["carol", "dave"]


def test_a_fresh_users_table_is_made_by_the_cli(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = write_config(tmp_path)
    path = load(cfg).policies.users
    path.unlink(missing_ok=True)
    assert users_cli(cfg, monkeypatch, "add", "eve", "--attr", "k=a,b", "--password-stdin") == 0
    assert path.read_text().startswith("# Site accounts")
    assert site.load(path)["eve"].attributes == {"k": ("a", "b")}
    assert oct(path.stat().st_mode & 0o777) == "0o600"


# -- the admins table: `appliance admins add|del` ------------------------------------


def test_admins_cli_keeps_comments(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "admins.toml"
    path.write_text(
        f'# the admins\n\n# alice: IT\n[admins.alice]\npassword_hash = "{HASH}"  # 2025\n'
        f'\n# bob: the deputy\n[admins.bob]\npassword_hash = "{HASH}"\n'
    )
    admins.set_password(path, "carol", "a long enough password", create=True)
    admins.delete(path, "alice")
    text = path.read_text()
    assert text.startswith("# the admins\n") and "IT" not in text
    assert "# bob: the deputy\n[admins.bob]\n" in text
    assert sorted(admins.load_admins(path)) == ["bob", "carol"]
    assert admins.check_login(path, "carol", "a long enough password")


# -- the agent's tables: `personal-agent users|servers|appliances` -------------------


def agent(cfg: Path, monkeypatch: pytest.MonkeyPatch, *argv: str) -> int:
    monkeypatch.setattr("sys.stdin", io.StringIO("pw-1\n"))
    return agent_cli.main([*argv, "--config", str(cfg)])


def test_agent_cli_keeps_comments(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    s = make_agent_dir(tmp_path)
    s.users_file.write_text(
        "# my household\n\n"
        f'# me\n[users."ann"]\npassword = "{HASH}"  # the old one\n'
        '[users."ann".attributes]\nrole = "parent"  # says who\n'
        '[users."ann".servers]\npop3 = "mail.home.example:110"  # the old box\n\n'
        f'# the kid\n[users."kim"]\npassword = "{HASH}"\n'
        f'\n# granny\n[users."gran"]\npassword = "{HASH}"\n'
    )
    assert agent(s.path, monkeypatch, "users", "lock", "ann") == 0
    assert agent(s.path, monkeypatch, "servers", "set", "ann", "imap", "mail.home.example:143") == 0
    assert agent(s.path, monkeypatch, "users", "attr", "ann", "--attr", "team=blue") == 0
    assert agent(s.path, monkeypatch, "users", "passwd", "--password-stdin", "kim") == 0
    text = s.users_file.read_text()
    for comment in ("# my household\n", "# me\n[users.", "  # the old one\n", "  # says who\n",
                    "  # the old box\n", "# the kid\n[users.", "# granny\n[users."):  # fmt: skip
        assert comment in text
    users = tables.load_users(s.users_file).users
    assert users["ann"].locked and users["ann"].attributes == {"role": "parent", "team": "blue"}
    assert dict(users["ann"].servers) == {
        "pop3": "mail.home.example:110",
        "imap": "mail.home.example:143",
    }
    assert users["kim"].password_hash != HASH and not users["kim"].locked
    assert agent(s.path, monkeypatch, "users", "del", "kim") == 0
    text = s.users_file.read_text()
    assert "kid" not in text and "# granny\n[users." in text and "# me\n[users." in text
    assert sorted(tables.load_users(s.users_file).users) == ["ann", "gran"]

    s.appliances_file.write_text(
        f'# hotels we stay at\n\n# the seaside one\n[appliances."{KEY}"]\nstatus = "denied"\n'
    )
    assert agent(s.path, monkeypatch, "appliances", "allow", "--name", "sea", KEY) == 0
    text = s.appliances_file.read_text()
    assert text.startswith("# hotels we stay at\n") and "# the seaside one\n[appliances." in text
    entry = tables.load_appliances(s.appliances_file).entries[KEY]
    assert (entry.status, entry.name) == ("allowed", "sea")


# -- the access rights, from the admin grid -----------------------------------------

SERVICES = ("smtp", "pop3", "http")
ACCESS = """\
# Access rights of the hotel: first match wins.

# the staff: everything
[[rules]]
name = "staff"  # ask HR
match = { role = "staff" }  # from the users table
allow = ["smtp", "pop3", "http"]

# guests: the web only
# (the desk asked for it)
[[rules]]
name = "guests"
allow = ["http"]
deny = ["smtp"]  # spam

# contractors: mail only
[[rules]]
name = "contractors"
match = { title = "contractor*" }
allow = ["pop3"]
# (end of the table)
"""


def save(rows: list[grid.Row], text: str = ACCESS) -> str:
    """What the admin page's save does with the posted rows: text, then the real loader."""
    new = grid.to_toml(rows, text)
    parse_access(TomlFile.parse(new, "access.toml"), SERVICES)
    return new


def posted(text: str, **changes: str) -> list[grid.Row]:
    """The form a browser posts for `text`'s grid, with `changes` made by the admin."""
    rows = grid.rows_of(parse_access(TomlFile.parse(text, "access.toml"), SERVICES))
    form: dict[str, str] = {"name-new": ""}
    for i, r in enumerate(rows):
        form |= {f"name-{i}": r.name, f"pattern-{i}": r.pattern, f"order-{i}": str(i + 1)}
        form |= {f"cell-{i}-{s}": v for s, v in r.cells.items()}
        form |= {f"max-{i}": r.max_connections, f"session-{i}": r.session_max}
    return grid.rows_from_form(form | changes, SERVICES)


def test_a_grid_save_that_changes_nothing_changes_no_byte() -> None:
    assert save(posted(ACCESS)) == ACCESS


def test_a_grid_edit_keeps_the_comments_of_every_rule() -> None:
    new = save(posted(ACCESS, **{"cell-1-pop3": "allow", "name-1": "visitors", "max-2": "3"}))
    for comment in (
        "# Access rights of the hotel: first match wins.\n\n# the staff: everything\n[[rules]]",
        'name = "staff"  # ask HR\n',
        "  # from the users table\n",
        '# guests: the web only\n# (the desk asked for it)\n[[rules]]\nname = "visitors"\n',
        "  # spam\n",
        "# contractors: mail only\n[[rules]]\n",
        "# (end of the table)\n",
    ):
        assert comment in new
    rules = parse_access(TomlFile.parse(new), SERVICES).rules
    assert [r.name for r in rules] == ["staff", "visitors", "contractors"]
    assert rules[1].allow == {"http", "pop3"} and rules[2].max_connections == 3


def test_reordered_rules_take_their_comments_along() -> None:
    new = save(posted(ACCESS, **{"order-2": "0"}))  # contractors first
    assert new.startswith(
        "# Access rights of the hotel: first match wins.\n\n# contractors: mail only\n[[rules]]\n"
        'name = "contractors"\n'
    )
    assert '\n# the staff: everything\n[[rules]]\nname = "staff"  # ask HR\n' in new
    assert "\n# guests: the web only\n# (the desk asked for it)\n[[rules]]\n" in new
    assert [r.name for r in parse_access(TomlFile.parse(new), SERVICES).rules] == [
        "contractors",
        "staff",
        "guests",
    ]


def test_removing_a_rule_removes_it_and_its_comments_only() -> None:
    new = save(posted(ACCESS, **{"remove-0": "1"}))
    assert "staff" not in new and "ask HR" not in new and "everything" not in new
    assert new.startswith("# Access rights of the hotel: first match wins.\n")
    assert "# guests: the web only\n# (the desk asked for it)\n[[rules]]\n" in new
    assert "# contractors: mail only\n[[rules]]\n" in new
    changes = {"remove-1": "1", "name-new": "web", "pattern-new": "a=b", "cell-new-http": "allow"}
    new = save(posted(new, **changes), new)
    assert "contractor" not in new and "# guests: the web only\n" in new and "  # spam\n" in new
    assert [r.name for r in parse_access(TomlFile.parse(new), SERVICES).rules] == ["guests", "web"]


def test_the_admin_page_saves_through_tomlkit(tmp_path: Path) -> None:
    """The shipped access table, one cell changed on the page: its comments all stay."""
    from test_admin_app import form, login  # the same browser the admin page tests use

    from appliance.admin.app import create_app
    from appliance.core.config import load as load_config
    from appliance.core.passwords import hash_password
    from appliance.lab.site import write_config

    config = load_config(write_config(tmp_path))  # the example site, state in tmp
    password = "correct horse battery"
    config.policies.admins.write_text(
        f'[admins.alice]\npassword_hash = "{hash_password(password)}"\n'
    )
    app = create_app(config, sessions=lambda c: None, notify=lambda c: None)
    app.testing = True
    c = app.test_client()
    login(c, "alice", password)
    old = config.policies.access.read_text()
    fields = form(c, "/access", "grid")
    fields["cell-1-pop3"] = "allow"
    assert c.post("/access", data=fields).status_code == 302
    new = config.policies.access.read_text()
    old_comments = [line for line in old.splitlines() if line.lstrip().startswith("#")]
    assert old_comments and all(line in new.splitlines() for line in old_comments)
    assert len(new.splitlines()) == len(old.splitlines())  # one line changed, none added


# -- the edit primitive itself ------------------------------------------------------


def test_an_emptied_table_file_keeps_its_header() -> None:
    text = tomledit.updated("# keep me\n\n[users.a]\npassword = 'x'\n", {"users": {}})
    assert text.startswith("# keep me\n") and tomllib.loads(text).get("users", {}) == {}


def test_an_unreadable_file_is_a_config_error() -> None:
    from appliance.core.tomlfile import ConfigError

    with pytest.raises(ConfigError, match=r"users\.toml"):
        tomledit.updated("[users\n", {"users": {}}, path="users.toml")


def test_a_site_users_file_written_by_hand_survives_many_edits() -> None:
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "users.toml"
        path.write_text(SITE_USERS)
        table = site.load(path)
        for n in range(5):
            table[f"u{n}"] = site.Account(f"u{n}", HASH, {"n": str(n)})
            site.save(path, table)
            del table["bob" if n == 0 else f"u{n - 1}"]
            site.save(path, table)
        assert site.load(path) == table
        assert "# carol: a contractor until June\n[users.carol]\n" in path.read_text()


def test_a_table_that_would_not_read_back_as_edited_is_not_written(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from appliance.core.tomlfile import ConfigError

    monkeypatch.setattr(tomledit.tomlkit, "dumps", lambda doc: "# lost\n")
    with pytest.raises(ConfigError, match="not saved"):
        tomledit.updated("", {"users": {"a": {"password": "x"}}}, path="users.toml")
