"""The admin audit log in the shared store: entries kept in order, root's entries from
before the first start taken in exactly once, no entry lost or doubled."""

from __future__ import annotations

from pathlib import Path

import pytest

from appliance.admin import audit
from appliance.core.config import Config, load
from appliance.lab.site import write_config
from appliance.state import store

pytestmark = pytest.mark.unit


@pytest.fixture
def site(tmp_path: Path) -> Config:
    """The example site, its state in tmp (as the lab writes it)."""
    return load(write_config(tmp_path))


def test_entries_come_back_newest_first_with_their_diff(site: Config) -> None:
    store.connect(site.state.database).close()  # a role has started
    audit.record(site, "alice", "edit access rights", "access.toml", "-a\n+b\n")
    audit.record(site, "bob", "end session", "carol 192.168.1.100")
    got = audit.tail(site)
    assert [(e.admin, e.action) for e in got] == [
        ("bob", "end session"),
        ("alice", "edit access rights"),
    ]
    assert got[1].diff == "-a\n+b\n" and got[1].when.endswith("UTC")
    assert not (site.state.directory / "audit.log").exists()  # all in the store


def test_before_the_first_start_entries_wait_in_a_file_then_move_into_the_store_once(
    site: Config,
) -> None:
    audit.record(site, "cli:root", "admins add", "carol")
    audit.record(site, "cli:root", "admins passwd", "carol")
    assert not site.state.database.exists()  # root's CLI makes no store
    assert [e.action for e in audit.tail(site)] == ["admins passwd", "admins add"]
    store.connect(site.state.database).close()  # the first start
    audit.record(site, "alice", "edit server info", "servers.toml")
    for _ in range(2):  # opened again: nothing doubled
        assert [e.action for e in audit.tail(site)] == [
            "edit server info",
            "admins passwd",
            "admins add",
        ]
    assert not (site.state.directory / "audit.log").exists()
    assert (site.state.directory / "audit.log.imported").exists()


def test_a_broken_line_in_the_pending_file_is_skipped_not_fatal(site: Config) -> None:
    site.state.directory.mkdir(parents=True)
    (site.state.directory / "audit.log").write_text(
        '{"time": 1, "admin": "a", "action": "x", "target": "t"}\nnot json\n{"time": 2}\n'
    )
    store.connect(site.state.database).close()
    assert [(e.admin, e.action, e.diff) for e in audit.tail(site)] == [("a", "x", "")]


def test_an_admin_change_the_audit_log_cannot_record_is_not_made(
    site: Config,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    import io

    from appliance.cli import main

    text = site.path.read_text().replace(
        f'directory = "{site.state.directory}"',
        f'directory = "{site.state.directory}"\nbackend = "postgresql"\n'
        f'dsn = "host={tmp_path / "no-such-server"} dbname=appliance connect_timeout=2"',
    )
    assert 'backend = "postgresql"' in text
    site.path.write_text(text)
    before = site.policies.admins.read_text() if site.policies.admins.exists() else None
    monkeypatch.setattr("sys.stdin", io.StringIO("a long enough password\n"))
    assert main(["admins", "add", "--config", str(site.path), "dora", "--password-stdin"]) == 1
    assert "nothing changed" in capsys.readouterr().err
    after = site.policies.admins.read_text() if site.policies.admins.exists() else None
    assert after == before


def test_entries_a_failed_take_in_could_not_store_wait_for_the_next_one(
    site: Config, monkeypatch: pytest.MonkeyPatch
) -> None:
    import sqlite3

    from appliance.state import audit as audit_table

    audit.record(site, "cli:root", "admins add", "carol")  # before the first start
    store.connect(site.state.database).close()
    real = audit_table.append

    def locked(*_a: object) -> None:
        raise sqlite3.OperationalError("database is locked")

    monkeypatch.setattr(audit_table, "append", locked)
    with pytest.raises(sqlite3.OperationalError):
        audit.tail(site)
    assert (site.state.directory / "audit.log").exists()  # given back, not stranded
    monkeypatch.setattr(audit_table, "append", real)
    assert [e.action for e in audit.tail(site)] == ["admins add"]


def test_a_take_in_that_died_half_way_is_given_back(site: Config) -> None:
    store.connect(site.state.database).close()
    left = site.state.directory / "audit.log.taking-999999999"  # no such process
    left.write_text('{"time": 5, "admin": "a", "action": "admins add", "target": "x"}\n')
    audit.record(site, "alice", "end session", "carol")
    assert [(e.action, e.time) for e in audit.tail(site)][-1] == ("admins add", 5.0)
    assert not left.exists()
