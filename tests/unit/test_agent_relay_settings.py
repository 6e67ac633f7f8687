"""`[relay]` in agent.toml: typed, optional, and wrong values named by file, line and key."""

from __future__ import annotations

from pathlib import Path

import pytest

from appliance.agent.settings import ConfigError, RelaySettings, load

pytestmark = pytest.mark.unit
FP = "sha256:" + "A" * 43


def write(tmp_path: Path, relay: str) -> Path:
    path = tmp_path / "agent.toml"
    path.write_text(f'[state]\ndirectory = "state"\n{relay}')
    return path


def test_no_section_no_relay(tmp_path: Path) -> None:
    assert load(write(tmp_path, "")).relay is None


def test_a_relay_with_a_pin(tmp_path: Path) -> None:
    s = load(
        write(
            tmp_path,
            '[relay]\nurl = "wss://relay.example:8443/v1/agent"\n'
            f'household = "smiths"\npin = "{FP}"\n',
        )
    )
    assert s.relay == RelaySettings(
        "wss://relay.example:8443/v1/agent", "relay.example", 8443, "/v1/agent", "smiths", FP, None
    )


def test_a_relay_with_a_ca(tmp_path: Path) -> None:
    (tmp_path / "ca.pem").write_text("x")
    s = load(
        write(tmp_path, '[relay]\nurl = "wss://r.example/a"\nhousehold = "h1"\nca = "ca.pem"\n')
    )
    assert s.relay is not None and s.relay.port == 443 and s.relay.ca == tmp_path / "ca.pem"


@pytest.mark.parametrize(
    ("lines", "key", "line"),
    [
        ('url = "https://r.example/a"\nhousehold = "h"', "relay.url", 2),
        ('url = "wss://r.example"\nhousehold = "h"', "relay.url", 2),
        ('url = "wss://u@r.example/a"\nhousehold = "h"', "relay.url", 2),
        ('url = "wss://r.example/a?x=1"\nhousehold = "h"', "relay.url", 2),
        ('url = "wss://r.example:0/a"\nhousehold = "h"', "relay.url", 2),
        ('url = "wss://r.example/a"\nhousehold = "Smiths!"', "relay.household", 3),
        ('url = "wss://r.example/a"\nhousehold = "h"\npin = "sha256:short"', "relay.pin", 4),
        ('url = "wss://r.example/a"\nhousehold = "h"\nca = "missing.pem"', "relay.ca", 4),
        (f'url = "wss://r.example/a"\nhousehold = "h"\npin = "{FP}"\nca = "x.pem"', "relay.ca", 5),
        ('url = "wss://r.example/a"\nhousehold = "h"\nport = 1', "relay.port", 4),
    ],
)
def test_errors_name_file_line_and_key(tmp_path: Path, lines: str, key: str, line: int) -> None:
    path = write(tmp_path, "[relay]\n" + lines + "\n")
    with pytest.raises(ConfigError) as err:
        load(path)
    assert err.value.key == key and err.value.line == line + 2
    assert str(err.value).startswith(f"{path}:{line + 2}: {key}: ")


def test_a_missing_household_is_named(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as err:
        load(write(tmp_path, '[relay]\nurl = "wss://r.example/a"\n'))
    assert err.value.key == "relay.household" and "missing" in str(err.value)
