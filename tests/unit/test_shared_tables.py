"""Policy tables shared by several appliances through the store ([policies] shared).

Two boxes' configurations (their own directories and files) on one real PostgreSQL:
what an admin would check is each box's table files after the other box's edit, the
roles told on the box that took it, and that neither an invalid table nor a
simultaneous edit on the other box is ever taken silently.
"""

from __future__ import annotations

import logging
import re
import time
from pathlib import Path

import pytest

from appliance.admin import audit
from appliance.admin.app import create_app
from appliance.admin.mirror import Mirror, Step, decide
from appliance.core.config import Config, ConfigError, load
from appliance.core.passwords import hash_password
from appliance.state import appliances, policy_tables, postgres, store
from appliance.state.connection import Connection
from appliance.state.sessions import SessionStore, read_only
from dhcp.labconfig import write_config

pytestmark = pytest.mark.unit

RULE = '\n[[rules]]\nname = "night-shift"\nmatch = { shift = "night" }\nallow = ["http"]\n'


def test_what_the_mirror_does_for_each_three_versions() -> None:
    assert decide(None, "a", None) is Step.PUSH  # the first box seeds the store
    assert decide(None, None, None) is Step.NOTHING  # no file, no row (no agents table)
    assert decide(None, "a", "a") is Step.NOTHING
    assert decide("a", "b", "a") is Step.PUSH  # edited here only
    assert decide("a", "a", "b") is Step.PULL  # edited on another box
    assert decide("a", "b", "c") is Step.PULL  # both: the store wins
    assert decide(None, "b", "c") is Step.PULL  # a box's start: the store wins
    assert decide("a", None, "a") is Step.PULL  # the file went away here


def test_shared_tables_need_the_shared_store(tmp_path: Path) -> None:
    path = write_config(tmp_path)
    path.write_text(path.read_text().replace("[policies]\n", "[policies]\nshared = true\n"))
    with pytest.raises(ConfigError, match=r"appliance.toml:\d+: policies.shared: .*postgresql"):
        load(path)


def _box(directory: Path, dsn: str, guest_address: str = "192.168.1.1/24") -> Config:
    path = write_config(directory, state_dsn=dsn, guest_address=guest_address)
    path.write_text(path.read_text().replace("[policies]\n", "[policies]\nshared = true\n"))
    return load(path)


class Box:
    def __init__(self, directory: Path, dsn: str, guest_address: str = "192.168.1.1/24") -> None:
        self.config = _box(directory, dsn, guest_address)
        self.told = 0
        self.mirror = Mirror(self.config, self._notify)
        self.conn: Connection = store.open_store(self.config.state)

    def _notify(self, _config: Config) -> None:
        self.told += 1

    @property
    def access(self) -> Path:
        return self.config.policies.access

    def tick(self) -> list[str]:
        return self.mirror.tick(self.conn)


@pytest.fixture
def boxes(tmp_path: Path, pg_dsn: str) -> tuple[Box, Box]:
    a, b = Box(tmp_path / "a", pg_dsn), Box(tmp_path / "b", pg_dsn)
    yield a, b
    a.conn.close()
    b.conn.close()


def test_an_edit_on_one_box_is_in_force_on_the_other(boxes: tuple[Box, Box]) -> None:
    a, b = boxes
    assert a.tick() == []  # seeds the store with its tables
    rows = policy_tables.read_all(a.conn)
    assert set(rows) == {"servers", "access"} and rows["access"].by == "198.51.100.1"
    assert b.tick() == [] and b.told == 0  # the same tables: nothing to take
    before = b.access.read_text()
    a.access.write_text(a.access.read_text() + RULE)  # an admin saves on box a
    assert a.tick() == [] and a.told == 0
    assert b.tick() == ["access"] and b.told == 1
    assert b.access.read_text() == a.access.read_text()
    assert (b.access.parent / "access.toml.bak").read_text() == before
    assert b.tick() == [] and b.told == 1  # once


def test_two_admins_at_once_the_store_wins_and_the_other_text_is_kept(
    boxes: tuple[Box, Box], caplog: pytest.LogCaptureFixture
) -> None:
    a, b = boxes
    a.tick()
    b.tick()
    a.access.write_text(a.access.read_text() + RULE)
    mine = b.access.read_text() + RULE.replace("night", "day")
    b.access.write_text(mine)
    a.tick()  # a published first
    with caplog.at_level(logging.WARNING, logger="appliance.admin"):
        assert b.tick() == ["access"]
    assert b.access.read_text() == a.access.read_text()
    assert (b.access.parent / "access.toml.bak").read_text() == mine
    assert any("changed here and on 198.51.100.1" in r.getMessage() for r in caplog.records)


def test_an_invalid_table_is_neither_published_nor_taken(
    boxes: tuple[Box, Box], caplog: pytest.LogCaptureFixture
) -> None:
    a, b = boxes
    a.tick()
    b.tick()
    good = policy_tables.read_all(a.conn)["access"].version
    broken = a.access.read_text() + '\n[[rules]]\nname = "x"\nallow = ["no-such-service"]\n'
    a.access.write_text(broken)
    with caplog.at_level(logging.ERROR, logger="appliance.admin"):
        a.tick()
        a.tick()
    assert policy_tables.read_all(a.conn)["access"].version == good  # not published
    refusals = [r for r in caplog.records if "not taken" in r.getMessage()]
    assert len(refusals) == 1 and "no-such-service" in refusals[0].getMessage()
    # and a row someone wrote straight into the store that this box cannot load
    row = policy_tables.read_all(b.conn)["access"]
    bad = policy_tables.SharedTable("access", broken, "f" * 16, row.updated, "198.51.100.11")
    assert policy_tables.publish(b.conn, bad, row.version)
    kept = b.access.read_text()
    assert b.tick() == [] and b.told == 0
    assert b.access.read_text() == kept


def test_a_table_missing_here_is_written_from_the_store(boxes: tuple[Box, Box]) -> None:
    a, b = boxes
    agents = a.config.policies.agents
    agents.write_text(
        '[agents."corp.example"]\nfingerprints = []\ndomains = ["agent.corp.example"]\n'
    )
    a.tick()
    assert not b.config.policies.agents.exists()
    assert b.tick() == ["agents"]
    assert b.config.policies.agents.read_text() == agents.read_text()


def test_the_mirror_survives_the_store_going_away(tmp_path: Path, pg_dsn: str) -> None:
    import threading

    box = Box(tmp_path / "c", pg_dsn)
    box.conn.close()
    stop = threading.Event()
    calls = []

    def broken() -> Connection:
        calls.append(1)
        if len(calls) >= 3:
            stop.set()
        return postgres.connect("host=/nonexistent dbname=nothing")

    box.mirror.run(stop, connect=broken)  # returns once stopped: errors logged, retried
    assert len(calls) >= 3


def test_one_admin_view_shows_every_boxs_sessions_and_audit(tmp_path: Path, pg_dsn: str) -> None:
    # box a serves 192.168.1.0/24, box b (another segment) 10.20.0.0/24, one store
    a = Box(tmp_path / "a", pg_dsn)
    b = Box(tmp_path / "b", pg_dsn, guest_address="10.20.0.1/24")
    try:
        SessionStore.from_config(b.config, revoke=read_only).create(
            user="dave", source="site", attributes={}, ip="10.20.0.7", mac="02:47:00:00:00:07"
        )
        audit.record(b.config, "erin", "end session", "someone 10.20.0.9")
        a.config.policies.admins.write_text(
            f'[admins.root]\npassword_hash = "{hash_password("a long admin pass")}"\n'
        )
        app = create_app(a.config, notify=lambda _c: None)
        app.testing = True
        c = app.test_client()
        token = re.search(r'name="csrf" value="([^"]+)"', c.get("/login").text)
        assert token is not None
        done = c.post(
            "/login", data={"csrf": token.group(1), "name": "root", "password": "a long admin pass"}
        )
        assert done.status_code == 302
        sessions = c.get("/sessions").text
        assert "dave" in sessions and "10.20.0.7" in sessions
        # the DHCP roles registered both boxes: the page says which box dave is on
        for box in (a, b):
            ifs = box.config.interfaces
            appliances.register(box.conn, f"box-{box.config.path.parent.name}",
                                ifs.guest_subnet, time.time())  # fmt: skip
        assert re.search(r"dave</td><td>site</td><td>box-b</td>", c.get("/sessions").text)
        log = c.get("/audit").text
        assert "erin" in log and "someone 10.20.0.9" in log
    finally:
        a.conn.close()
        b.conn.close()


def test_a_pair_of_tables_is_published_only_over_the_versions_it_was_checked_with(
    boxes: tuple[Box, Box],
) -> None:
    # box a's servers.toml was checked with access at version v0; box b published a new
    # access meanwhile: a's servers must not land beside b's access unchecked
    a, b = boxes
    a.tick()
    rows = policy_tables.read_all(a.conn)
    v0 = rows["access"].version
    newer = policy_tables.SharedTable("access", rows["access"].text + RULE, "b" * 16, 1.0, "b")
    assert policy_tables.publish(b.conn, newer, v0)
    servers = policy_tables.SharedTable("servers", rows["servers"].text, "c" * 16, 2.0, "a")
    expected = {"servers": rows["servers"].version, "access": v0}
    assert not policy_tables.publish_group(a.conn, [servers], expected)
    assert policy_tables.read_all(a.conn)["servers"].version == rows["servers"].version


def test_a_box_refuses_a_guest_subnet_another_box_serves_from_the_same_store(
    tmp_path: Path, pg_dsn: str
) -> None:
    import socket

    from dhcp.service import Service, SubnetTaken

    def service(config: Config) -> Service:
        link, _ = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
        return Service(config, sock=socket.socket(socket.AF_INET, socket.SOCK_DGRAM), link=link)

    first = service(_box(tmp_path / "a", pg_dsn))
    # another segment's box with its own subnet: fine; one with the same subnet: refused
    other = _box(tmp_path / "b", pg_dsn, guest_address="10.20.0.1/24")
    path = other.path
    path.write_text(path.read_text().replace('"198.51.100.1', '"198.51.100.21'))
    service(load(path))
    clash = tmp_path / "c"
    same = write_config(clash, state_dsn=pg_dsn)
    same.write_text(same.read_text().replace('"198.51.100.1', '"198.51.100.31'))
    with pytest.raises(SubnetTaken, match=r"198.51.100.1 serves 192.168.1.0/24"):
        service(load(same))
    assert {a.name for a in appliances.listed(first.conn)} == {"198.51.100.1", "198.51.100.21"}
