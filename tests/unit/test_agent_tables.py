"""The agent's files: agent.toml errors, table round trips, and the CLI that edits them."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
from agent_helpers import make_agent_dir

from appliance import passwords
from appliance.agent import cli, tables, wire
from appliance.agent.settings import load
from appliance.tomlfile import ConfigError, TomlFile

pytestmark = pytest.mark.unit


@pytest.mark.parametrize(
    ("extra", "key", "words"),
    [
        ("[limits]\nmax_fail = 3\n", "limits.max_fail", "unknown key"),
        ('[appliances]\naccept = "some"\n', "appliances.accept", "expected one of"),
        ('[appliances]\ntrusted = ["abc"]\n', "appliances.trusted", "not an appliance key"),
        ('[tls]\ncertificate = "c.pem"\n', "tls.key", "go together"),
    ],
)
def test_agent_toml_errors_name_file_line_key(
    tmp_path: Path, extra: str, key: str, words: str
) -> None:
    (tmp_path / "agent.toml").write_text(f"[listen]\nport = 8443\n{extra}")
    with pytest.raises(ConfigError) as err:
        load(tmp_path / "agent.toml")
    assert err.value.key == key and words in err.value.reason and err.value.line


def test_users_round_trip_with_awkward_text(tmp_path: Path) -> None:
    user = tables.User(
        "o.brien+x",
        "$argon2id$v=19$m=65536,t=3,p=4$c2FsdA$aGFzaA",
        locked=True,
        attributes={"title": 'Head "of" \\ sales ü', "groups": ("a", "b c")},
        servers={"pop3": "[2001:db8::3]:110", "nntp": "news.home.example:119"},
    )
    text = tables.dump_users(tables.UserTable({user.name: user}))
    back = tables.parse_users(TomlFile.parse(text, tmp_path / "users.toml"))
    assert back.users == {user.name: user}


def test_broken_users_edit_keeps_the_last_good_table(tmp_path: Path) -> None:
    s = make_agent_dir(tmp_path, users={"alice": ("pw", {}, {})})
    watched = tables.Watched(s.users_file, tables.load_users)
    assert "alice" in watched.get().users
    s.users_file.write_text("[users.alice]\npassword = 3\n")
    assert "alice" in watched.get().users and watched.error is not None
    assert "users.alice.password" in str(watched.error)


def run(capsys: pytest.CaptureFixture[str], s_path: Path, *argv: str) -> tuple[int, str]:
    rc = cli.main([*argv, "--config", str(s_path)])
    return rc, capsys.readouterr().out


def test_cli_edits_users_servers_and_appliances(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    s = make_agent_dir(tmp_path)
    cfg = s.path
    monkeypatch.setattr("sys.stdin", io.StringIO("pw-1\n"))
    assert (
        run(
            capsys,
            cfg,
            "users",
            "add",
            "alice",
            "--attr",
            "department=Sales 1",
            "--attr",
            "groups=a,b",
            "--password-stdin",
        )[0]
        == 0
    )
    assert run(capsys, cfg, "servers", "set", "alice", "pop3", "203.0.113.3:110")[0] == 0
    assert run(capsys, cfg, "servers", "set", "alice", "imap", "not a host")[0] == 2
    _, out = run(capsys, cfg, "users", "list")
    assert "alice  department=Sales 1, groups=a,b" in out
    u = tables.load_users(s.users_file).users["alice"]
    assert u.servers == {"pop3": "203.0.113.3:110"} and u.attributes["groups"] == ("a", "b")
    assert "pw-1" not in s.users_file.read_text()
    assert s.users_file.stat().st_mode & 0o077 == 0
    old_hash = tables.load_users(s.users_file).users["alice"].password_hash
    monkeypatch.setattr("sys.stdin", io.StringIO("pw-2\n"))
    assert run(capsys, cfg, "users", "passwd", "alice", "--password-stdin")[0] == 0
    new = tables.load_users(s.users_file).users["alice"]
    assert new.password_hash != old_hash and passwords.verify_password(new.password_hash, "pw-2")
    assert new.servers == {"pop3": "203.0.113.3:110"}  # a new password keeps the rest
    assert (
        run(capsys, cfg, "users", "attr", "alice", "--attr", "title=boss", "--unset", "groups")[0]
        == 0
    )
    assert tables.load_users(s.users_file).users["alice"].attributes == {
        "department": "Sales 1",
        "title": "boss",
    }
    assert run(capsys, cfg, "users", "lock", "alice")[0] == 0
    assert tables.load_users(s.users_file).users["alice"].locked
    assert run(capsys, cfg, "users", "del", "nobody")[0] == 2

    # a pending appliance is allowed by its key, or a prefix of at least 128 bits
    key = wire.b64(bytes(range(32)))
    s.pending_file.write_text(json.dumps({key: {"last_seen": 0, "address": "192.0.2.7"}}))
    _, out = run(capsys, cfg, "appliances", "list")
    assert f"{key}  pending" in out and "192.0.2.7" in out
    assert run(capsys, cfg, "appliances", "allow", key[:22], "--name", "hotel")[0] == 0
    assert tables.load_appliances(s.appliances_file).status(key) == "allowed"
    assert run(capsys, cfg, "appliances", "deny", key)[0] == 0
    assert tables.load_appliances(s.appliances_file).status(key) == "denied"
    assert run(capsys, cfg, "appliances", "allow", "zz")[0] == 2


@pytest.mark.parametrize("length", [6, 8, 21])
def test_a_short_prefix_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], length: int
) -> None:
    """A key is chosen by whoever asks: a short prefix can be ground to match a new key."""
    s = make_agent_dir(tmp_path)
    key = wire.b64(bytes(range(32)))
    s.pending_file.write_text(json.dumps({key: {"last_seen": 0, "address": "192.0.2.7"}}))
    for action in ("allow", "deny"):
        assert cli.main(["appliances", action, "--config", str(s.path), key[:length]]) == 2
        err = capsys.readouterr().err
        assert "whole key (43 characters)" in err and "at least 22" in err
    assert tables.load_appliances(s.appliances_file).status(key) is None


def test_a_long_prefix_must_be_base64url_and_match_one_key(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    s = make_agent_dir(tmp_path)
    a, b = wire.b64(bytes(32)), wire.b64(bytes(31) + b"\x01")  # the same first 42 characters
    s.pending_file.write_text(json.dumps({a: {"last_seen": 0}, b: {"last_seen": 0}}))
    assert cli.main(["appliances", "allow", "--config", str(s.path), a[:30]]) == 2
    assert "matches 2 known keys" in capsys.readouterr().err
    assert cli.main(["appliances", "allow", "--config", str(s.path), "A" * 21 + "!"]) == 2
    assert "base64url" in capsys.readouterr().err
    assert cli.main(["appliances", "allow", "--config", str(s.path), "B" * 22]) == 2
    assert "matches 0 known keys" in capsys.readouterr().err
    assert tables.load_appliances(s.appliances_file).entries == {}


def test_a_key_that_starts_with_a_dash_is_allowed_by_the_suggested_command(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    s = make_agent_dir(tmp_path)
    key = wire.b64(b"\xf9" + bytes(31))  # base64url: "-" first
    assert key.startswith("-")
    command = wire.allow_command(key)  # what the portal and the agent tell the household
    assert command == f"personal-agent appliances allow -- {key}"
    words = command.split()[1:]
    assert cli.main([*words[:2], "--config", str(s.path), *words[2:]]) == 0
    assert tables.load_appliances(s.appliances_file).status(key) == "allowed"
    assert wire.allow_command("abc") == "personal-agent appliances allow abc"


def test_example_agent_toml_loads() -> None:
    s = load(Path(cli.__file__).with_name("agent.example.toml"))
    assert s.port == wire.DEFAULT_PORT and s.accept == "listed"
    assert s.users_file == Path("/var/lib/personal-agent/users.toml")
