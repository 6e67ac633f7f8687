"""The configuration file: the example passes, each kind of mistake gets its own message."""

from __future__ import annotations

import ipaddress
import subprocess
import sys
from pathlib import Path

import pytest

from appliance.core.config import ConfigError, _state, load
from appliance.core.tomlfile import TomlFile

pytestmark = pytest.mark.unit
ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "policies" / "appliance.toml"


def variant(tmp_path: Path, old: str, new: str) -> Path:
    """A copy of the example config, with one edit, beside copies of its tables."""
    text = EXAMPLE.read_text()
    assert old in text, old
    for name in ("servers.toml", "access.toml"):
        (tmp_path / name).write_text((ROOT / "policies" / name).read_text())
    path = tmp_path / "appliance.toml"
    path.write_text(text.replace(old, new, 1))
    return path


def test_example_matches_the_address_plan() -> None:
    cfg = load(EXAMPLE)
    assert cfg.interfaces.guest_address == ipaddress.IPv4Interface("192.168.1.1/24")
    assert cfg.dhcp.pool_start in cfg.interfaces.guest_subnet
    assert cfg.hidden(ipaddress.IPv4Address("198.51.100.3"))
    assert not cfg.hidden(ipaddress.IPv4Address("203.0.113.3"))
    assert cfg.dhcp.renewal_time == 1800 and cfg.dhcp.rebinding_time == 3150
    assert cfg.policies.servers == ROOT / "policies" / "servers.toml"


@pytest.mark.parametrize(
    ("old", "new", "key", "words"),
    [
        ("[dhcp]\n", "[dhcp]\npool_size = 3\n", "dhcp.pool_size", "unknown key"),
        (
            'pool_end = "192.168.1.250"',
            'pool_end = "192.168.2.20"',
            "dhcp.pool_end",
            "outside the guest subnet",
        ),
        (
            'hidden_networks = ["198.51.100.0/24"]',
            'hidden_networks = ["192.168.0.0/16"]',
            "interfaces.hidden_networks",
            "overlaps the guest subnet",
        ),
        (
            'hidden_networks = ["198.51.100.0/24"]',
            'hidden_networks = ["198.51.100.0/24", "2001:db8:5::1/48"]',
            "interfaces.hidden_networks",
            "'2001:db8:5::1/48' is not a network like 198.51.100.0/24 or 2001:db8:5::/48",
        ),
        (
            'hidden_networks = ["198.51.100.0/24"]',
            'hidden_networks = ["2001:db8::/129"]',
            "interfaces.hidden_networks",
            "is not a network",
        ),
        ("port = 8000", "port = 70000", "admin.port", "out of range"),
        (
            'servers = "servers.toml"',
            'servers = "missing.toml"',
            "policies.servers",
            "table file not found",
        ),
        ("lease_time = 3600", 'lease_time = "an hour"', "dhcp.lease_time", "expected an integer"),
        (
            'guest_address = "192.168.1.1/24"',
            'guest_address = "192.168.1.1"',
            "interfaces.guest_address",
            "needs a prefix length",
        ),
        (
            'pool_start = "192.168.1.100"',
            'pool_start = "192.168.1.1"',
            "dhcp.pool_start",
            "appliance's own guest address",
        ),
        (
            "explicit_http_port = 3128",
            "explicit_http_port = 80",
            "proxy.explicit_http_port",
            "already used by portal.http_port",
        ),
        (
            "connect_ports = [443]",
            "connect_ports = [443, 0]",
            "proxy.connect_ports",
            "expected an array of ports 1..65535, found 0",
        ),
        ("workers = 0 ", "workers = -1 ", "proxy.workers", "-1"),
        ("workers = 0 ", 'workers = "all" ', "proxy.workers", "expected an integer"),
        ("max_connections = 256 ", "max_connections = 0 ", "proxy.max_connections", "0"),
    ],
)
def test_each_mistake_names_file_line_and_key(
    tmp_path: Path, old: str, new: str, key: str, words: str
) -> None:
    path = variant(tmp_path, old, new)
    with pytest.raises(ConfigError) as err:
        load(path)
    e = err.value
    assert e.file == str(path)
    assert e.key == key
    assert words in e.reason
    lines = path.read_text().splitlines()
    assert e.line is not None
    # the line named is the one holding the key (or its table, for added keys)
    assert key.split(".")[-1] in lines[e.line - 1] or key.split(".")[0] in lines[e.line - 1]


def test_ipv6_hidden_networks(tmp_path: Path) -> None:
    path = variant(
        tmp_path,
        'hidden_networks = ["198.51.100.0/24"]',
        'hidden_networks = ["198.51.100.0/24", "2001:db8:5::/48", "fc00::/7"]',
    )
    cfg = load(path)
    ifs = cfg.interfaces
    assert ifs.hidden_networks == (ipaddress.IPv4Network("198.51.100.0/24"),)
    assert ifs.hidden_networks6 == (
        ipaddress.IPv6Network("2001:db8:5::/48"),
        ipaddress.IPv6Network("fc00::/7"),
    )
    assert cfg.hidden(ipaddress.IPv6Address("2001:db8:5::3"))
    assert cfg.hidden(ipaddress.IPv6Address("fd00::1"))
    assert not cfg.hidden(ipaddress.IPv6Address("2001:db8:113::3"))
    assert cfg.hidden(ipaddress.IPv4Address("198.51.100.3"))


def test_broken_toml_names_the_line(tmp_path: Path) -> None:
    path = variant(tmp_path, "[dns]\n", "[dns\n")
    with pytest.raises(ConfigError) as err:
        load(path)
    assert "not valid TOML" in str(err.value)
    assert err.value.line == path.read_text().splitlines().index("[dns") + 1


def test_missing_config_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="file not found"):
        load(tmp_path / "nope.toml")


def test_reservation_mac_checked(tmp_path: Path) -> None:
    path = variant(
        tmp_path,
        '# [[dhcp.reservations]]\n# mac = "02:00:00:00:01:01"\n# address = "192.168.1.10"',
        '[[dhcp.reservations]]\nmac = "02:00:00:00:01:01"\naddress = "192.168.1.10"'
        '\n[[dhcp.reservations]]\nmac = "zz:00"\naddress = "192.168.1.11"',
    )
    with pytest.raises(ConfigError) as err:
        load(path)
    assert err.value.key == "dhcp.reservations[1].mac"
    assert 'mac = "zz:00"' in path.read_text().splitlines()[err.value.line - 1]  # type: ignore[operator]


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "appliance", *args], capture_output=True, text=True, check=False
    )


def test_check_config_accepts_the_example() -> None:
    proc = run_cli("check-config", str(EXAMPLE))
    assert proc.returncode == 0, proc.stderr
    assert "servers.toml: ok" in proc.stdout


def test_check_config_rejects_with_exit_2_and_no_traceback(tmp_path: Path) -> None:
    path = variant(tmp_path, "port = 8000", "port = 0")
    proc = run_cli("check-config", str(path))
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    line = next(
        i for i, t in enumerate(path.read_text().splitlines(), 1) if t.startswith("port = 0 ")
    )
    assert f"{path}:{line}: admin.port: 0 is out of range 1..65535" in proc.stderr


def test_check_config_with_default_table_paths(tmp_path: Path) -> None:
    """[policies] without users/admins: the defaults, beside the config file."""
    text = variant(tmp_path, 'users = "users.toml"', "").read_text()
    path = tmp_path / "appliance.toml"
    path.write_text(text.replace('admins = "admins.toml"', "", 1))
    proc = run_cli("check-config", str(path))
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    cfg = load(path)
    assert cfg.policies.users == tmp_path / "users.toml"
    assert cfg.policies.admins == tmp_path / "admins.toml"


@pytest.mark.parametrize(
    "dsn",
    [
        "host=db password=x",
        "host=db password\t=x",
        "host=db PASSWORD = x",
        "postgresql://app:secret@db/appliance",
        "postgresql://db/appliance?pass%77ord=x",
        "postgresql://app:abc%2Fdef@db/appliance",
    ],
)
def test_a_state_dsn_with_a_password_is_refused(tmp_path: Path, dsn: str) -> None:
    """Every role reads appliance.toml: a password there would be every role's."""
    text = f'[state]\ndirectory = "{tmp_path}"\nbackend = "postgresql"\ndsn = "{dsn}"\n'
    with pytest.raises(ConfigError) as err:
        _state(TomlFile.parse(text, tmp_path / "a.toml").reader().sub("state"))
    assert err.value.key == "state.dsn" and "no password" in str(err.value)


def test_a_state_dsn_with_a_passfile_is_taken(tmp_path: Path) -> None:
    dsn = "host=198.51.100.6 dbname=appliance user=appliance passfile=/var/lib/appliance/pgpass"
    text = f'[state]\ndirectory = "{tmp_path}"\nbackend = "postgresql"\ndsn = "{dsn}"\n'
    got = _state(TomlFile.parse(text, tmp_path / "a.toml").reader().sub("state"))
    assert (got.backend, got.dsn, got.made) == ("postgresql", dsn, True)
