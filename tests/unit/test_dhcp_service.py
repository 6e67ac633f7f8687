"""The dhcp role around the pure server: sweeps, warnings, flood guard, and `appliance leases`."""

from __future__ import annotations

import json
import logging
import socket
from pathlib import Path

import pytest

from appliance.cli import main as cli_main
from appliance.core.config import load
from appliance.state import leases, schema, store
from appliance.state.leases import Lease
from dhcp.labconfig import write_config
from dhcp.service import FloodGuard, Service

pytestmark = pytest.mark.unit


@pytest.fixture
def config_path(tmp_path: Path) -> Path:
    return write_config(tmp_path / "cfg", pool_start="192.168.1.100", pool_end="192.168.1.120")


def service(config_path: Path) -> Service:
    # an unbound socket and a socket pair for the link: these tests never touch the network
    link, _ = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    return Service(
        load(config_path), sock=socket.socket(socket.AF_INET, socket.SOCK_DGRAM), link=link
    )


def test_sweep_writes_expired_events_once(config_path: Path) -> None:
    cfg = load(config_path)
    conn = store.connect(cfg.state.database)
    schema.upgrade(conn)
    leases.record(conn, "granted", Lease("192.168.1.100", "02:47:00:00:00:01", 1000.0), 900.0)
    leases.record(conn, "granted", Lease("192.168.1.101", "02:47:00:00:00:02", 5000.0), 900.0)
    svc = service(config_path)
    assert svc.sweep(now=2000.0) == 1
    assert svc.sweep(now=2001.0) == 0  # written once, not on every sweep
    kinds = [(e.kind, e.ip) for e in leases.events_since(conn, 0)]
    assert kinds[-1] == ("expired", "192.168.1.100")
    assert leases.lookup_ip(conn, "192.168.1.101", 2000.0) is not None


def test_another_segments_leases_in_a_shared_store_are_left_to_its_own_appliance(
    config_path: Path,
) -> None:
    # two appliances of two segments on one store: 10.20.0.0/24 is the other's
    cfg = load(config_path)
    conn = store.connect(cfg.state.database)
    schema.upgrade(conn)
    leases.record(conn, "granted", Lease("10.20.0.7", "02:47:00:00:00:07", 1000.0), 900.0)
    leases.record(conn, "granted", Lease("192.168.1.100", "02:47:00:00:00:01", 1000.0), 900.0)
    svc = service(config_path)
    assert "10.20.0.7" not in svc.index.by_ip
    assert svc.sweep(now=2000.0) == 1  # its own lapsed lease only
    expired = [e.ip for e in leases.events_since(conn, 0) if e.kind == "expired"]
    assert expired == ["192.168.1.100"]


def test_pool_exhausted_warning_at_most_once_a_minute(
    config_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    svc = service(config_path)
    with caplog.at_level(logging.WARNING, logger="appliance.dhcp"):
        for i in range(500):
            svc._dropped("pool_exhausted", 1000.0 + i * 0.1)  # 50 s of DISCOVERs
        svc._dropped("pool_exhausted", 1061.0)
    warnings = [r for r in caplog.records if "exhausted" in r.getMessage()]
    assert len(warnings) == 2
    assert "500 DISCOVER(s)" in warnings[1].getMessage()
    assert svc.drops["pool_exhausted"] == 501


def test_flood_guard_lets_a_burst_through_then_the_rate() -> None:
    g = FloodGuard(rate=10, burst=30)
    assert sum(g.allow(b"a", 100.0) for _ in range(100)) == 30
    assert g.allow(b"b", 100.0)  # another client is not affected
    assert sum(g.allow(b"a", 100.0 + i / 100) for i in range(100)) in range(9, 12)


def test_leases_command_table_and_json(
    config_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = load(config_path)
    conn = store.connect(cfg.state.database)
    schema.upgrade(conn)
    far = 4_000_000_000.0
    leases.record(conn, "granted", Lease("192.168.1.100", "02:47:00:00:00:01", far), 1.0)
    leases.record(conn, "granted", Lease("192.168.1.101", "02:47:00:00:00:02", far), 1.0)
    leases.record(conn, "released", Lease("192.168.1.101", "02:47:00:00:00:02", 2.0), 2.0)
    assert cli_main(["leases", "--config", str(config_path)]) == 0
    out = capsys.readouterr().out
    assert "192.168.1.100" in out and "02:47:00:00:00:01" in out and "1 lease(s)" in out
    assert "192.168.1.101" not in out
    assert cli_main(["leases", "--config", str(config_path), "--json", "--all"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert [(x["ip"], x["state"]) for x in doc["leases"]] == [
        ("192.168.1.100", "bound"),
        ("192.168.1.101", "released"),
    ]
