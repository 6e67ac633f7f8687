"""The proxy role's `hidden` check (what the web proxy refuses to reach), IPv6 included."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from agent_helpers import appliance_config

from appliance import config as config_mod
from appliance.proxy import service

pytestmark = pytest.mark.unit


@pytest.fixture(scope="module")
def hidden(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], bool]:
    """The `hidden` that the proxy role's main() hands to the relay (run() is stubbed)."""
    d = tmp_path_factory.mktemp("appliance6")
    appliance_config(d)
    path = d / "appliance.toml"
    text = path.read_text()
    old = 'hidden_networks = ["198.51.100.0/24"]'
    assert old in text
    path.write_text(text.replace(old, 'hidden_networks = ["198.51.100.0/24", "2001:db8:5::/48"]'))
    config = config_mod.load(path)
    seen: dict[str, Any] = {}

    def fake_run(make_gate: Any, workers: int, **options: Any) -> int:
        seen.update(options)
        return 0

    mp = pytest.MonkeyPatch()
    mp.setattr(service, "run", fake_run)
    try:
        assert service.main(config) == 0
    finally:
        mp.undo()
    check: Callable[[str], bool] = seen["hidden"]
    return check


@pytest.mark.parametrize(
    ("address", "is_hidden"),
    [
        ("203.0.113.80", False),
        ("198.51.100.4", True),
        ("192.168.1.1", True),
        ("127.0.0.1", True),
        ("2001:db8:113::80", False),
        ("2001:db8:5::4", True),  # the listed IPv6 segment prefix
        ("::1", True),
        ("::", True),
        ("fe80::1", True),
        ("ff02::1", True),
        ("::ffff:198.51.100.4", True),
        ("::ffff:203.0.113.80", False),
        ("64:ff9b::198.51.100.4", True),
        ("2002:c633:6404::", True),
        ("www.example.com", True),  # not an address: never judged as a harmless one
        ("", True),
    ],
)
def test_hidden_knows_ipv6(hidden: Callable[[str], bool], address: str, is_hidden: bool) -> None:
    assert hidden(address) is is_hidden


def test_static_relay_hidden_networks_take_ipv6(tmp_path: Path) -> None:
    """`python -m appliance.proxy --hidden CIDR`: the lab's relay reads IPv6 ones too."""
    seen: dict[str, Any] = {}

    def fake_run(make_gate: Any, workers: int, *args: Any, **options: Any) -> int:
        seen.update(options)
        return 0

    table = tmp_path / "t.json"
    table.write_text('{"listeners": [], "users": {}}')
    mp = pytest.MonkeyPatch()
    mp.setattr(service, "run", fake_run)
    try:
        argv = [str(table), "--hidden", "198.51.100.0/24", "--hidden", "2001:db8:5::/48"]
        assert service.static_main(argv) == 0
    finally:
        mp.undo()
    h = seen["hidden"]
    assert h("198.51.100.4") and h("2001:db8:5::4") and h("::ffff:198.51.100.4")
    assert not h("203.0.113.80") and not h("2001:db8:113::80")
