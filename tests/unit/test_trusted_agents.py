"""The trusted-agents table: validation with file, line and key; what each agent may assert."""

from __future__ import annotations

from pathlib import Path

import pytest

from appliance.agent import wire
from appliance.tomlfile import ConfigError
from appliance.trusted_agents import LiveTable, NotThatAgent, no_longer_vouched, parse_text

pytestmark = pytest.mark.unit
CORP = wire.fingerprint(b"corp certificate")
OTHER = wire.fingerprint(b"someone else")
PINNED = f'[agents.x]\nfingerprints = ["{CORP}"]\n'
TABLE = f"""# the site's trusted agents
[agents."corp.example"]
fingerprints = ["{CORP}"]
domains = ["agent.corp.example"]
attributes = ["department", "role"]

[agents.partner]
domains = ["agent.partner.example"]
attributes = []
"""


def vouch(table_text: str, host: str, fp: str, verified: str = "", port: int = 8443) -> object:
    table = parse_text(table_text, "agents.toml")
    attrs = {"role": "staff", "department": "Sales 1", "title": "boss", "source": "site"}
    return table.vouch("carol", attrs, host, port, 8443, fp, verified)


def test_a_trusted_agent_asserts_its_listed_keys_only() -> None:
    v = vouch(TABLE, "203.0.113.1", CORP)
    assert v.user == "carol@corp.example" and v.trusted  # type: ignore[attr-defined]
    assert v.attributes == {  # type: ignore[attr-defined]
        "department": "Sales 1",
        "role": "staff",
        "source": "agent",
        "agent": "corp.example",
    }
    assert v.dropped == ("source", "title")  # type: ignore[attr-defined]
    # by domain: only when the certificate verified for that name under the CAs
    v = vouch(TABLE, "Agent.Partner.Example.", "", verified="Agent.Partner.Example.")
    assert v.user == "carol@partner"  # type: ignore[attr-defined]
    assert v.attributes == {"source": "agent", "agent": "partner"}  # type: ignore[attr-defined]


def test_any_other_agent_asserts_nothing_and_gets_its_own_user_ids() -> None:
    v = vouch(TABLE, "Evil.Example", OTHER, verified="evil.example")
    assert v.user == "carol@evil.example" and not v.trusted  # type: ignore[attr-defined]
    assert v.attributes == {"source": "agent", "agent": "evil.example"}  # type: ignore[attr-defined]
    assert vouch(TABLE, "203.0.113.7", OTHER, port=9443).user == "carol@203.0.113.7:9443"  # type: ignore[attr-defined]
    assert vouch(TABLE, "2001:db8::7", OTHER, port=9443).user == "carol@[2001:db8::7]:9443"  # type: ignore[attr-defined]
    assert vouch("", "corp.example", OTHER).user == "carol@corp.example"  # type: ignore[attr-defined]


def test_naming_a_trusted_agent_that_does_not_verify_as_it_is_refused() -> None:
    # its name, or one of its domains pinned to another certificate
    for host in ("corp.example", "agent.corp.example", "CORP.example."):
        with pytest.raises(NotThatAgent):
            vouch(TABLE, host, OTHER)
    # a domain-only entry typed with a pin: not CA-verified, so not that agent
    with pytest.raises(NotThatAgent):
        vouch(TABLE, "agent.partner.example", OTHER)


@pytest.mark.parametrize(
    ("text", "where"),
    [
        ('[agents.x]\nattributes = ["role"]\n', "agents.toml:1: agents.x: give the agent"),
        ('[agents.x]\nfingerprints = ["sha256:nope"]\n', "agents.toml:2: agents.x.fingerprints"),
        ('[agents.x]\ndomains = ["a b"]\n', "agents.toml:2: agents.x.domains"),
        (
            f'[agents.x]\nfingerprints = ["{CORP}"]\nattributes = ["source"]\n',
            ":3: agents.x.attributes",
        ),
        (
            f'[agents.x]\nfingerprints = ["{CORP}"]\nattributes = ["a b"]\n',
            ":3: agents.x.attributes",
        ),
        (
            f'[agents.x]\nfingerprints = ["{CORP}"]\nrole = "staff"\n',
            ":3: agents.x.role: unknown key",
        ),
        (f'[agents.X]\nfingerprints = ["{CORP}"]\n', ":1: agents.X"),
        (
            f'[agents.a]\nfingerprints = ["{CORP}"]\n[agents.b]\nfingerprints = ["{CORP}"]\n',
            ":4: agents.b.fingerprints: ",
        ),
        (
            f'[agents.a]\ndomains = ["b"]\n[agents.b]\nfingerprints = ["{CORP}"]\n',
            ":3: agents.b: b is already a domain of agent a",
        ),
        ("[agent.x]\n", "agents.toml: agent: unknown key"),
        ("[agents.x\n", "not valid TOML"),
    ],
)
def test_mistakes_name_file_line_and_key(text: str, where: str) -> None:
    with pytest.raises(ConfigError) as err:
        parse_text(text, "agents.toml")
    assert where in str(err.value), str(err.value)


def test_the_live_table_follows_the_file_and_keeps_the_last_good_one(tmp_path: Path) -> None:
    path = tmp_path / "agents.toml"
    live = LiveTable(path)
    assert live.current().agents == ()  # no file: nobody is trusted
    path.write_text(TABLE)
    assert [a.name for a in live.current().agents] == ["corp.example", "partner"]
    path.write_text(TABLE.replace("attributes = []", 'attributes = ["source"]'))
    assert [a.name for a in live.current().agents] == ["corp.example", "partner"]
    path.write_text(TABLE.split("[agents.partner]")[0])
    assert [a.name for a in live.current().agents] == ["corp.example"]
    path.unlink()
    assert live.current().agents == ()


def test_which_sessions_a_change_takes_trust_from() -> None:
    old = parse_text(TABLE, "agents.toml")
    fewer = parse_text(TABLE.replace('"department", "role"', '"role"'), "agents.toml")
    rotated = parse_text(TABLE.replace(CORP, OTHER), "agents.toml")
    mine = {"source": "agent", "agent": "corp.example"}
    dept = {**mine, "department": "Sales 1"}
    assert not no_longer_vouched(old, old, "agent:corp.example", dept)
    assert no_longer_vouched(old, fewer, "agent:corp.example", dept)
    assert not no_longer_vouched(old, fewer, "agent:corp.example", {**mine, "role": "staff"})
    assert no_longer_vouched(old, rotated, "agent:corp.example", mine)  # a replaced certificate
    assert no_longer_vouched(None, parse_text("", "x"), "agent:corp.example", dept)  # entry removed
    assert not no_longer_vouched(old, fewer, "agent:evil.example", {"source": "agent"})  # untrusted
    assert not no_longer_vouched(old, parse_text("", "x"), "site", {"department": "Sales 1"})
