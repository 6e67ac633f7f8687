"""An active/standby pair: the [ha] section, keepalived's configuration (checked by the
real keepalived), who is active, and the DHCP role of a standby box."""

from __future__ import annotations

import dataclasses
import errno
import logging
import secrets
import shutil
import socket
import sqlite3
import subprocess
import sys
import time
from ipaddress import IPv4Address
from pathlib import Path

import psycopg
import pytest
from pyroute2.netlink.exceptions import NetlinkError

from appliance.agent import client
from appliance.agent.client import forbidden_address
from appliance.core.config import ConfigError, load
from appliance.ha import keepalived
from appliance.ha.holder import Holder
from appliance.state import leases, postgres, schema, store, takeover
from appliance.state.leases import Lease
from dhcp.labconfig import write_config
from dhcp.service import Service

pytestmark = pytest.mark.unit

PG = 'backend = "postgresql"\ndsn = "host=/run/postgresql dbname=appliance"\n'


def _config(tmp_path: Path, ha: str, state: str = PG) -> Path:
    path = write_config(tmp_path / "cfg")
    text = path.read_text()
    if state:
        text = text.replace("[state]\n", "[state]\n" + state, 1)
    path.write_text(text + "\n[ha]\n" + ha)
    return path


def test_a_pair_is_off_by_default_and_needs_the_shared_store(tmp_path: Path) -> None:
    assert not load(write_config(tmp_path / "plain")).ha.enabled
    with pytest.raises(ConfigError) as err:
        load(_config(tmp_path, 'enabled = true\npeers = ["198.51.100.11"]\n', state=""))
    assert "[ha] enabled" in str(err.value) or "ha.enabled" in str(err.value), err.value
    assert "postgresql" in str(err.value) and "appliance.toml" in str(err.value)


@pytest.mark.parametrize(
    ("body", "key", "says"),
    [
        ("enabled = true\n", "peers", "other box"),
        ('enabled = true\npeers = ["x"]\n', "peers", "not an IPv4 address"),
        ('enabled = true\npeers = ["198.51.100.11"]\ninterface = "guest0"\n', "interface", "forge"),
        ('enabled = true\npeers = ["198.51.100.11"]\ninterface = "mgmt0"\n', "interface", "uplink"),
        ('enabled = true\npeers = ["198.51.100.1"]\n', "peers", "other box"),
        ('enabled = true\npeers = ["198.51.100.11"]\npriority = 255\n', "priority", "range"),
        ('enabled = true\npeers = ["198.51.100.11"]\nadvert_interval = 50\n', "advert", "40.95"),
        ('enabled = true\npeers = ["198.51.100.11"]\nstate = "MASTER"\n', "state", "unknown"),
    ],
)
def test_ha_config_errors_name_the_key(tmp_path: Path, body: str, key: str, says: str) -> None:
    with pytest.raises(ConfigError) as err:
        load(_config(tmp_path, body))
    text = str(err.value)
    assert key in text and says in text, text
    assert ":" in text.split("appliance.toml", 1)[1][:8], text  # file:line


def test_keepalived_conf_vrrp_on_the_segment_guest_address_on_the_guest_side(
    tmp_path: Path,
) -> None:
    cfg = load(
        _config(
            tmp_path,
            'enabled = true\npeers = ["198.51.100.11"]\npriority = 150\nadvert_interval = 0.5\n',
        )
    )
    assert cfg.ha.interface == "seg0" and cfg.ha.priority == 150
    text = keepalived.render(cfg)
    for line in (
        "interface seg0",
        "unicast_src_ip 198.51.100.1",
        "198.51.100.11",
        "192.168.1.1/24 dev guest0",
        "nopreempt",
        "state BACKUP",
        "advert_int 0.5",
        "priority 150",
        "vrrp_version 3",
    ):
        assert line in text, (line, text)
    if shutil.which("keepalived") is None:
        pytest.fail("keepalived is not installed (.ci/apt-packages lists it)")
    conf = tmp_path / "keepalived.conf"
    conf.write_text(text)
    checked = subprocess.run(
        ["keepalived", "--config-test", "-f", str(conf)], capture_output=True, text=True
    )
    # this namespace has no seg0 or guest0: that is all keepalived may find wrong
    said = [line for line in (checked.stdout + checked.stderr).splitlines() if line.strip()]
    others = [x for x in said if "doesn't exist" not in x and "Non-existent interface" not in x]
    assert not others, said
    with pytest.raises(keepalived.HaDisabled):
        keepalived.render(load(write_config(tmp_path / "single")))


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_the_holder_reports_each_flip_once_and_a_standby_looks_again_when_asked() -> None:
    answers = [False]
    asks = []

    def check() -> bool:
        asks.append(1)
        return answers[0]

    clock = Clock()
    h = Holder(check, every=0.2, clock=clock)
    assert not h.active and not h.changed()
    answers[0] = True
    assert not h.refresh()  # not due yet, nobody asking
    assert h.refresh(asked=True)  # a guest waits: looked again at once
    assert h.changed() and not h.changed()
    n = len(asks)
    h.refresh(asked=True)  # active: no extra look however often asked
    assert len(asks) == n
    answers[0] = False
    clock.now = 0.3
    assert not h.refresh() and h.changed()


def _standby_service(tmp_path: Path, active: list[bool]) -> tuple[Service, socket.socket]:
    """A box of a pair (on SQLite here: the pair's logic, not the shared store's)."""
    link, peer = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    link.setblocking(False)  # as the role's packet socket is
    cfg = load(write_config(tmp_path / "cfg", pool_start="192.168.1.100", pool_end="192.168.1.120"))
    ha = dataclasses.replace(cfg.ha, enabled=True, peers=(IPv4Address("198.51.100.11"),))
    cfg = dataclasses.replace(cfg, ha=ha)
    holder = Holder(lambda: active[0], every=1000.0)
    svc = Service(cfg, sock=socket.socket(socket.AF_INET, socket.SOCK_DGRAM), link=link,
                  holder=holder)  # fmt: skip
    return svc, peer


def test_a_standby_answers_no_one_and_serves_from_the_store_once_it_takes_over(
    tmp_path: Path,
) -> None:
    active = [False]
    svc, peer = _standby_service(tmp_path, active)
    peer.send(b"a DISCOVER the standby must not answer")
    assert svc.pump() == 1
    assert svc.drops["standby"] == 1 and not svc.counts
    # meanwhile the active box grants a lease in the shared store
    conn = store.connect(svc.config.state.database)
    schema.upgrade(conn)
    leases.record(conn, "granted", Lease("192.168.1.105", "02:47:00:00:00:09", 4e9), 1.0)
    assert "192.168.1.105" not in svc.index.by_ip
    active[0] = True  # keepalived moved the guest address here
    assert svc.serving(asked=True)
    assert svc.index.by_ip["192.168.1.105"].mac == "02:47:00:00:00:09"  # reloaded first
    active[0] = False  # and away again
    assert isinstance(svc.holder, Holder)
    svc.holder._next = 0  # due
    assert not svc.serving()


def test_an_address_of_this_host_is_known_by_its_route_not_by_a_bind(tmp_path: Path) -> None:
    # a box of a pair binds any address (ip_nonlocal_bind), so a bind proves nothing
    cfg = load(write_config(tmp_path / "cfg"))
    assert forbidden_address(cfg, "203.0.113.1") is None
    assert forbidden_address(cfg, "127.0.0.1") is not None


def test_an_ipv4_mapped_address_is_judged_as_the_ipv4_address_it_carries(
    tmp_path: Path,
) -> None:
    # asked as IPv6, the kernel calls ::ffff:127.0.0.1 an ordinary (unicast) route
    assert client._is_local("127.0.0.1") and client._is_local("::ffff:127.0.0.1")
    assert not client._is_local("::ffff:203.0.113.1")
    assert not client._is_local("203.0.113.1")


class FakeIPRoute:
    """pyroute2's IPRoute as _is_local uses it: each `route("get")` recorded, answered
    with `routes` or raised `error`."""

    def __init__(self, routes: list[dict[str, int]], error: Exception | None = None) -> None:
        self.routes, self.error = routes, error
        self.asked: list[tuple[str, int]] = []

    def __call__(self) -> FakeIPRoute:
        return self

    def __enter__(self) -> FakeIPRoute:
        return self

    def __exit__(self, *_: object) -> None:
        pass

    def route(self, command: str, *, dst: str, family: int) -> list[dict[str, int]]:
        assert command == "get"
        self.asked.append((dst, family))
        if self.error is not None:
            raise self.error
        return self.routes


def test_a_mapped_address_is_looked_up_as_ipv4(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake = FakeIPRoute([{"type": 2}])  # RTN_LOCAL
    monkeypatch.setattr(client, "IPRoute", fake)
    assert client._is_local("::ffff:192.0.2.2")
    assert fake.asked == [("192.0.2.2", socket.AF_INET)]
    cfg = load(write_config(tmp_path / "cfg"))
    assert forbidden_address(cfg, "::ffff:192.0.2.2") == "::ffff:192.0.2.2 is the appliance itself"
    fake.asked.clear()
    # NAT64 and 6to4 carry an IPv4 address too, but are IPv6 addresses as well: both asked
    assert client._is_local("2002:c000:202::1")
    fake.routes = [{"type": 1}]  # RTN_UNICAST
    assert not client._is_local("2002:c000:202::1")
    assert ("2002:c000:202::1", socket.AF_INET6) in fake.asked
    assert ("192.0.2.2", socket.AF_INET) in fake.asked


@pytest.mark.parametrize(
    ("code", "local"),
    [
        (errno.ENETUNREACH, False),  # no route: not an address of this host
        (errno.EHOSTUNREACH, False),
        (errno.EACCES, True),  # a prohibit route: proves nothing, refused
        (errno.EINVAL, True),  # a blackhole route, or a question the kernel will not answer
        (errno.EAFNOSUPPORT, True),  # no IPv6 here
    ],
)
def test_only_no_route_means_not_local_every_other_error_fails_closed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, code: int, local: bool
) -> None:
    monkeypatch.setattr(client, "IPRoute", FakeIPRoute([], NetlinkError(code)))
    assert client._is_local("203.0.113.1") is local
    assert client._is_local("2001:db8::1") is local
    cfg = load(write_config(tmp_path / "cfg"))
    assert (forbidden_address(cfg, "203.0.113.1") is not None) is local


def _pair_store(tmp_path: Path) -> sqlite3.Connection:
    conn = store.connect(tmp_path / "state.sqlite")
    schema.upgrade(conn)
    return conn


def test_a_fenced_commit_never_takes_an_address_another_client_holds(tmp_path: Path) -> None:
    # both boxes active at once (split brain): the second grant of .105 must not land
    conn = _pair_store(tmp_path)
    epoch = leases.claim_epoch(conn, "198.51.100.1")
    a, b = "02:47:00:00:00:0a", "02:47:00:00:00:0b"
    leases.write_rows(conn, [("granted", "192.168.1.105", a, None, None, 5000.0)], 100.0)
    rows: list[leases.Row] = [
        ("granted", "192.168.1.106", b, None, None, 5000.0),
        ("granted", "192.168.1.105", b, None, None, 5000.0),
    ]
    assert leases.write_fenced(conn, rows, 200.0, epoch) == {"192.168.1.105"}
    assert leases.lookup_ip(conn, "192.168.1.105", 300.0).mac == a  # type: ignore[union-attr]
    # the rest of the batch landed: one conflict withholds only its own reply
    assert leases.lookup_ip(conn, "192.168.1.106", 300.0).mac == b  # type: ignore[union-attr]
    # its own renewal, and an address whose lease ran out, go through
    renew: list[leases.Row] = [("renewed", "192.168.1.105", a, None, None, 9000.0)]
    assert leases.write_fenced(conn, renew, 300.0, epoch) == set()
    late: list[leases.Row] = [("granted", "192.168.1.105", b, None, None, 20000.0)]
    assert leases.write_fenced(conn, late, 9500.0, epoch) == set()
    assert leases.lookup_ip(conn, "192.168.1.105", 9600.0).mac == b  # type: ignore[union-attr]


def test_a_fenced_end_never_ends_another_clients_or_a_renewed_lease(tmp_path: Path) -> None:
    # the other box granted .3 to :09 for an hour; this box's stale index still has
    # .3 for :03, and would write its expiry, or a forged RELEASE of it
    conn = _pair_store(tmp_path)
    epoch = leases.claim_epoch(conn, "198.51.100.1")
    live, stale = "02:47:00:00:00:09", "02:47:00:00:00:03"
    leases.write_rows(conn, [("granted", "192.168.1.3", live, None, None, 3700.0)], 100.0)
    for kind in ("expired", "released", "declined"):
        row: list[leases.Row] = [(kind, "192.168.1.3", stale, None, None, 90.0)]
        assert leases.write_fenced(conn, row, 200.0, epoch) == {"192.168.1.3"}, kind
    # an expiry of the live lease itself, renewed by the other box since this one's index
    mine: list[leases.Row] = [("expired", "192.168.1.3", live, None, None, 150.0)]
    assert leases.write_fenced(conn, mine, 200.0, epoch) == {"192.168.1.3"}
    steal: list[leases.Row] = [("granted", "192.168.1.3", stale, None, None, 9000.0)]
    assert leases.write_fenced(conn, steal, 200.0, epoch) == {"192.168.1.3"}
    assert leases.lookup_ip(conn, "192.168.1.3", 300.0).mac == live  # type: ignore[union-attr]
    # the client's own release goes through
    own: list[leases.Row] = [("released", "192.168.1.3", live, None, None, 300.0)]
    assert leases.write_fenced(conn, own, 300.0, epoch) == set()
    assert leases.lookup_ip(conn, "192.168.1.3", 400.0) is None


def test_a_release_and_a_grant_of_one_address_in_one_batch_both_land(tmp_path: Path) -> None:
    conn = _pair_store(tmp_path)
    epoch = leases.claim_epoch(conn, "198.51.100.1")
    first, second = "02:47:00:00:00:01", "02:47:00:00:00:02"
    leases.write_rows(conn, [("granted", "192.168.1.9", first, None, None, 3700.0)], 100.0)
    batch: list[leases.Row] = [
        ("released", "192.168.1.9", first, None, None, 200.0),
        ("granted", "192.168.1.9", second, None, None, 3800.0),
    ]
    assert leases.write_fenced(conn, batch, 200.0, epoch) == set()
    assert leases.lookup_ip(conn, "192.168.1.9", 300.0).mac == second  # type: ignore[union-attr]


def test_a_box_whose_epoch_is_old_writes_nothing(tmp_path: Path) -> None:
    # A became active, then lost the address while it waited; B became active after it
    conn = _pair_store(tmp_path)
    a = leases.claim_epoch(conn, "198.51.100.1")
    b = leases.claim_epoch(conn, "198.51.100.11")
    assert b == a + 1
    rows: list[leases.Row] = [("granted", "192.168.1.7", "02:47:00:00:00:07", None, None, 9e3)]
    with pytest.raises(leases.Superseded):
        leases.write_fenced(conn, rows, 100.0, a)
    assert leases.lookup_ip(conn, "192.168.1.7", 200.0) is None
    assert leases.write_fenced(conn, rows, 100.0, b) == set()


def test_a_box_active_from_its_start_takes_the_store_over_before_its_first_answer(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ended: list[object] = []
    monkeypatch.setattr(takeover, "end_peer_sessions", lambda conn, peers: ended.append(peers))
    svc, _ = _standby_service(tmp_path, [True])
    assert not svc.index_fresh
    assert svc.serving(asked=True)
    assert ended == [svc.config.ha.peers] and svc.epoch == 1


def test_ending_the_other_boxs_store_sessions(tmp_path: Path, pg_dsn: str) -> None:
    # SQLite: one box, nothing to end; PostgreSQL: the query runs as the store's role
    # (over the unix socket no session has a client address, so none matches here, and
    # none holds the write lock; tests/netns/test_failover.py and the failover benchmark
    # end real ones over TCP)
    lite = store.connect(tmp_path / "state.sqlite")
    assert takeover.end_peer_sessions(lite, [IPv4Address("198.51.100.11")]) == 0
    pg = postgres.connect(pg_dsn)
    other = postgres.connect(pg_dsn)
    try:
        assert takeover.end_peer_sessions(pg, []) == 0
        assert takeover.end_peer_sessions(pg, [IPv4Address("198.51.100.11")]) == 0
        assert other.execute("SELECT 1").fetchone() == (1,)  # untouched
    finally:
        pg.close()
        other.close()


def _holds_write_lock(dsn: str) -> psycopg.Connection:
    """Another session over the unix socket (no client address, the same as ours) that
    holds the store's write lock in an open transaction, as a writer of a box that died
    in the middle of a group commit would."""
    holder = psycopg.connect(dsn)
    holder.execute("SELECT pg_advisory_xact_lock(%s)", (postgres.WRITE_LOCK,))
    assert holder.info.transaction_status == psycopg.pq.TransactionStatus.INTRANS
    return holder


def _alive(conn: postgres.PgConnection, pid: int) -> bool:
    found = conn.execute("SELECT count(*) FROM pg_stat_activity WHERE pid = ?", (pid,))
    return bool(found.fetchone()[0])


def test_a_session_holding_the_write_lock_is_ended_whatever_its_address(pg_dsn: str) -> None:
    pg = postgres.connect(pg_dsn)
    bystander = postgres.connect(pg_dsn)  # this box's other role: no lock, not a peer
    reader = postgres.connect(pg_dsn)
    holder = _holds_write_lock(pg_dsn)
    try:
        reader.execute("BEGIN")  # an open reader's transaction holds no write lock either
        reader.execute("SELECT 1")
        pid = holder.info.backend_pid
        assert takeover.end_peer_sessions(pg, [IPv4Address("198.51.100.11")]) == 1
        assert not _alive(pg, pid)  # gone when the call returns, not merely signalled
        with pytest.raises(psycopg.OperationalError):
            holder.execute("SELECT 1")
        assert bystander.execute("SELECT 1").fetchone() == (1,)  # untouched
        assert reader.execute("SELECT 1").fetchone() == (1,)
        reader.execute("COMMIT")
        # and the lock is free: a writer of the new active box gets it at once
        pg.execute("SET lock_timeout = '1s'")
        pg.execute("BEGIN IMMEDIATE")
        pg.execute("COMMIT")
        # nothing left to end: nothing ended, nothing said
        assert takeover.end_peer_sessions(pg, [IPv4Address("198.51.100.11")]) == 0
    finally:
        for conn in (pg, bystander, reader):
            conn.close()
        holder.close()


def test_a_write_lock_that_cannot_be_let_go_is_logged(
    pg_dsn: str, caplog: pytest.LogCaptureFixture
) -> None:
    # the store's role may not end a superuser's session: nothing ends, and it is said
    role = f"t_{secrets.token_hex(6)}"
    admin = postgres.connect(pg_dsn)
    admin.execute(f"CREATE ROLE {role} LOGIN")
    holder = _holds_write_lock(pg_dsn)  # as the superuser
    pg = postgres.connect(f"{pg_dsn} user={role}")
    try:
        with caplog.at_level(logging.WARNING, logger="appliance.state.takeover"):
            assert takeover.end_peer_sessions(pg, [IPv4Address("198.51.100.11")]) == 0
        said = " ".join(r.getMessage() for r in caplog.records)
        assert f"could not end store session {holder.info.backend_pid}" in said, said
        assert "write lock is held by" in said and str(holder.info.backend_pid) in said, said
        assert holder.execute("SELECT 1").fetchone() == (1,)  # still there
        caplog.clear()
        holder.rollback()  # lock let go: nothing to say
        with caplog.at_level(logging.WARNING, logger="appliance.state.takeover"):
            assert takeover.end_peer_sessions(pg, [IPv4Address("198.51.100.11")]) == 0
        assert not caplog.records, caplog.records
    finally:
        pg.close()
        holder.close()
        admin.execute(f"DROP ROLE IF EXISTS {role}")
        admin.close()


def test_a_takeover_serves_even_when_the_other_boxs_sessions_cannot_be_ended(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def refused(*_: object) -> int:
        raise sqlite3.OperationalError("permission denied to terminate process")

    monkeypatch.setattr(takeover, "end_peer_sessions", refused)
    active = [False]
    svc, _ = _standby_service(tmp_path, active)
    active[0] = True
    assert svc.serving(asked=True)  # logged, not fatal
    # and tried again while the box serves, until it works
    calls: list[int] = []
    monkeypatch.setattr(takeover, "end_peer_sessions", lambda *_: calls.append(1) or 1)
    assert svc.serving(asked=True) and calls == []  # not before TAKEOVER_RETRY
    svc._next_takeover = time.monotonic()
    assert svc.serving(asked=True) and calls == [1]
    svc._next_takeover = time.monotonic()
    assert svc.serving(asked=True) and calls == [1]  # ended: not again


def test_the_check_judges_by_pid_files_even_when_the_config_was_broken_since(
    tmp_path: Path,
) -> None:
    from appliance.ha import health

    path = write_config(tmp_path / "cfg")
    run = load(path).state.directory / "run"
    run.mkdir(parents=True)
    role = subprocess.Popen(  # a process that looks like a role: `... appliance ... run`
        [sys.executable, "-c", "import time; time.sleep(60)", "appliance", "run"]
    )
    try:
        deadline = time.monotonic() + 10  # until the child is that program, not our fork
        while b"run" not in Path(f"/proc/{role.pid}/cmdline").read_bytes().split(b"\0"):
            assert time.monotonic() < deadline
            time.sleep(0.01)
        for name in health.GUEST_ROLES:
            (run / f"{name}.pid").write_text(f"{role.pid}\n")
        assert health.main(["--config", str(path)]) == 0
        # a typo in the file (not yet loaded by the running roles): still serving
        path.write_text(path.read_text().replace("http_port = 80", "http_port = 80\nnot_a_key = 1"))
        assert health.main(["--config", str(path)]) == 0
        (run / "dhcp.pid").unlink()
        assert health.main(["--config", str(path)]) == 1
    finally:
        role.kill()
        role.wait()
