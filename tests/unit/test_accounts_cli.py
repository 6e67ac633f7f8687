"""`appliance users ...` and `appliance sessions ...`: the table file and the store, end to end."""

from __future__ import annotations

import io
import json
import stat
import time
from pathlib import Path

import pytest
from portal_conf import load, write_config

from appliance import cli
from appliance.accounts import site as accounts
from appliance.core.tomlfile import ConfigError
from appliance.state import leases, store
from appliance.state.leases import Lease
from appliance.state.sessions import SessionStore

pytestmark = pytest.mark.unit


def run(monkeypatch: pytest.MonkeyPatch, *argv: str, stdin: str = "") -> int:
    monkeypatch.setattr("sys.stdin", io.StringIO(stdin))
    return cli.main(list(argv))


def test_users_add_list_passwd_del(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg_path = write_config(tmp_path)
    c = ["--config", str(cfg_path)]
    assert (
        run(
            monkeypatch,
            "users",
            "add",
            *c,
            "alice",
            "--attr",
            "department=Sales 1",
            "--attr",
            "roles=staff,sales",
            "--password-stdin",
            stdin="first secret\n",
        )
        == 0
    )
    users = load(cfg_path).policies.users
    assert stat.S_IMODE(users.stat().st_mode) == 0o600
    text = users.read_text()
    assert "first secret" not in text and "$argon2id$" in text
    assert accounts.authenticate(users, "alice", "first secret") is not None
    assert accounts.authenticate(users, "alice", "wrong") is None
    assert accounts.load(users)["alice"].attributes == {
        "department": "Sales 1",
        "roles": ("staff", "sales"),
    }
    assert run(monkeypatch, "users", "add", *c, "alice", "--password-stdin", stdin="x" * 9) == 1
    assert run(monkeypatch, "users", "add", *c, "bob", "--password-stdin", stdin="short\n") == 2
    capsys.readouterr()
    assert run(monkeypatch, "users", "list", *c, "--json") == 0
    out = capsys.readouterr().out
    assert json.loads(out) == {"alice": {"department": "Sales 1", "roles": ["staff", "sales"]}}
    assert "argon2" not in out
    assert (
        run(
            monkeypatch, "users", "passwd", *c, "alice", "--password-stdin", stdin="second secret\n"
        )
        == 0
    )
    assert accounts.authenticate(users, "alice", "second secret") is not None
    assert accounts.authenticate(users, "alice", "first secret") is None
    assert run(monkeypatch, "users", "del", *c, "alice") == 0
    assert accounts.load(users) == {}
    assert run(monkeypatch, "users", "del", *c, "alice") == 1


def test_a_broken_user_table_names_file_line_and_key(tmp_path: Path) -> None:
    path = tmp_path / "users.toml"
    path.write_text('[users.alice]\npassword = "plain"\n')
    with pytest.raises(ConfigError) as err:
        accounts.load(path)
    assert str(err.value).startswith(f"{path}:2: users.alice.password:")
    path.write_text('[users.alice]\npassword = "$argon2id$x"\ncolour = "red"\n')
    with pytest.raises(ConfigError, match=r":3: users.alice.colour: unknown key"):
        accounts.load(path)


def test_sessions_list_show_end(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    revoked: list[tuple[str, str]] = []
    # never the real firewall from a unit test (it would run nft where the tests run)
    monkeypatch.setattr(
        "appliance.portal.cli.revoker",
        lambda config: lambda ip, mac: revoked.append((ip, mac)),
    )
    cfg_path = write_config(tmp_path)
    cfg = load(cfg_path)
    conn = store.connect(cfg.state.database)
    st = SessionStore(conn)
    now = time.time()
    leases.record(conn, "granted", Lease("192.168.1.100", "02:47:00:00:00:01", now + 60), now)
    s = st.create(
        user="alice",
        source="site",
        attributes={"department": "Sales 1"},
        ip="192.168.1.100",
        mac="02:47:00:00:00:01",
    )
    c = ["--config", str(cfg_path)]
    assert run(monkeypatch, "sessions", "list", *c) == 0
    out = capsys.readouterr().out
    assert s.id in out and "alice" in out and "192.168.1.100" in out
    assert run(monkeypatch, "sessions", "show", *c, s.id) == 0
    assert "department" in capsys.readouterr().out
    assert run(monkeypatch, "sessions", "end", *c, s.id, "--reason", "test") == 0
    assert st.lookup_ip("192.168.1.100") is None
    assert revoked == [("192.168.1.100", "02:47:00:00:00:01")]
    assert st.get(s.id).end_reason == "test"  # type: ignore[union-attr]
    assert run(monkeypatch, "sessions", "end", *c, s.id) == 1
    assert run(monkeypatch, "sessions", "list", *c, "--json") == 0
    capsys.readouterr()
