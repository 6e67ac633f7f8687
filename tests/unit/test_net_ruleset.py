"""The ruleset text: what goes into the table, and what input is refused."""

from __future__ import annotations

from pathlib import Path

import pytest

from appliance.core.config import load
from appliance.net import setup

pytestmark = pytest.mark.unit
ROOT = Path(__file__).resolve().parents[2]


def config(tmp_path: Path) -> Path:
    text = (ROOT / "policies" / "appliance.toml").read_text()
    text = text.replace('"servers.toml"', f'"{ROOT / "policies" / "servers.toml"}"')
    text = text.replace('"access.toml"', f'"{ROOT / "policies" / "access.toml"}"')
    p = tmp_path / "a.toml"
    p.write_text(text)
    return p


def test_render_intercepts_members_and_portal(tmp_path: Path) -> None:
    cfg = load(config(tmp_path))
    text = setup.render(
        cfg, {25: 2525, 110: 1110, 80: 8081}, {("192.168.1.100", "02:47:00:00:00:01")}
    )
    assert "table inet appliance {" in text
    assert "tcp dport 25 dnat ip to 192.168.1.1:2525" in text
    assert "tcp dport 80 dnat ip to 192.168.1.1:8081" in text
    # non-members' port 80 goes to the portal, after the members' rules
    assert text.index("dnat ip to 192.168.1.1:8081") < text.index(
        "tcp dport 80 dnat ip to 192.168.1.1:80\n"
    )
    assert "elements = { 192.168.1.100 . 02:47:00:00:00:01 }" in text
    assert 'iifname "guest0" counter name guest_forward drop' in text
    rules = [line for line in text.splitlines() if not line.lstrip().startswith("#")]
    assert not any("$" in line for line in rules)


@pytest.mark.parametrize(
    ("intercepts", "pair"),
    [
        ({25: 70000}, None),
        ({0: 25}, None),
        ({25: 2525}, ("192.168.1.300", "02:47:00:00:00:01")),
        ({25: 2525}, ("192.168.1.3", "02:47:00:00:00:01 } ; flush ruleset")),
    ],
)
def test_render_refuses_bad_values(
    tmp_path: Path, intercepts: dict[int, int], pair: tuple[str, str] | None
) -> None:
    cfg = load(config(tmp_path))
    with pytest.raises(ValueError):
        setup.render(cfg, intercepts, {pair} if pair else None)


def test_one_nft_runner_per_namespace_not_per_call() -> None:
    """A Firewall per login must not open a new libnftables context (fd) each time."""
    from appliance.net import nft

    first = nft.runner()
    if first is None:
        pytest.skip("libnftables is not installed")
    assert all(nft.runner() is first for _ in range(50))
