"""User attributes: one key grammar, one set of value rules, one `--attr` syntax everywhere."""

from __future__ import annotations

import io
import tempfile
from pathlib import Path

import pytest
from agent_helpers import make_agent_dir
from hypothesis import given, settings
from hypothesis import strategies as st
from portal_conf import load, write_config

from appliance import cli as appliance_cli
from appliance.accounts import site as accounts
from appliance.agent import cli as agent_cli
from appliance.agent import tables
from appliance.core.attributes import (
    MAX_KEYS,
    MAX_LIST,
    MAX_VALUE_LEN,
    BadAttribute,
    check_attributes,
    parse_attribute_args,
)
from appliance.core.tomlfile import ConfigError, TomlFile
from appliance.policy.access_rights import compile_pattern

pytestmark = pytest.mark.unit
HASH = "$argon2id$v=19$m=65536,t=3,p=4$c2FsdA$aGFzaA"


@pytest.mark.parametrize("key", ["department", "title", "org.unit", "home-site", "x_1", "A" * 64])
def test_keys_accepted(key: str) -> None:
    assert check_attributes({key: "v"}) == {key: "v"}
    compile_pattern(key, "v")  # a key an attribute may have is one a rule may match on


@pytest.mark.parametrize("key", ["", "1st", "_x", "-x", ".x", "a:b", "a b", "dé", "A" * 65])
def test_keys_refused(key: str) -> None:
    with pytest.raises(BadAttribute) as err:
        check_attributes({key: "v"})
    assert err.value.key == key and "letter" in err.value.reason
    with pytest.raises(ValueError):
        compile_pattern(key, "v")


def test_values_strings_and_lists_of_strings() -> None:
    assert check_attributes({"a": "", "b": ["x", "y"], "c": ("z",), "d": []}) == {
        "a": "",
        "b": ("x", "y"),
        "c": ("z",),
        "d": (),
    }
    assert check_attributes({"a": "x" * MAX_VALUE_LEN, "b": ["y"] * MAX_LIST})


@pytest.mark.parametrize(
    ("value", "words"),
    [
        (3, "string or a list"),
        (["a", 3], "string or a list"),
        ({"x": "y"}, "string or a list"),
        (None, "string or a list"),
        ("x" * (MAX_VALUE_LEN + 1), f"at most {MAX_VALUE_LEN} characters"),
        (["ok", "x" * (MAX_VALUE_LEN + 1)], f"at most {MAX_VALUE_LEN} characters"),
        (["v"] * (MAX_LIST + 1), f"at most {MAX_LIST} values"),
        ("\ud800", "valid Unicode"),
    ],
)
def test_values_refused(value: object, words: str) -> None:
    with pytest.raises(BadAttribute) as err:
        check_attributes({"k": value})
    assert err.value.key == "k" and words in err.value.reason


def test_too_many_attributes_or_not_a_table() -> None:
    check_attributes({f"k{i}": "v" for i in range(MAX_KEYS)})
    with pytest.raises(BadAttribute, match=f"at most {MAX_KEYS} attributes"):
        check_attributes({f"k{i}": "v" for i in range(MAX_KEYS + 1)})
    with pytest.raises(BadAttribute, match="table"):
        check_attributes(["k", "v"])


def test_cli_syntax() -> None:
    assert parse_attribute_args(
        ["department=Sales 1", "roles=staff,sales", " title = boss ", "note=a=b"]
    ) == {"department": "Sales 1", "roles": ("staff", "sales"), "title": "boss", "note": "a=b"}
    # a key given again adds to the list: the same as a comma
    assert parse_attribute_args(["roles=staff", "roles=sales"]) == {"roles": ("staff", "sales")}
    assert parse_attribute_args(["roles=a,b", "roles=c"]) == {"roles": ("a", "b", "c")}
    assert parse_attribute_args(["roles= a , b "]) == {"roles": ("a", "b")}
    assert parse_attribute_args(["empty="]) == {"empty": ""}
    assert parse_attribute_args([]) == {}


@pytest.mark.parametrize(
    ("item", "words"),
    [
        ("department", "expected key=value"),
        ("=x", "attribute name"),
        ("1a=x", "attribute name"),
        ("a:b=x", "attribute name"),
        ("k=" + "x" * (MAX_VALUE_LEN + 1), "characters"),
    ],
)
def test_cli_syntax_refused(item: str, words: str) -> None:
    with pytest.raises(BadAttribute, match=words):
        parse_attribute_args([item])


def test_the_three_clis_read_attr_alike(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """appliance users add, personal-agent users add and policy explain: same syntax, same list."""

    cfg = write_config(tmp_path / "site")
    argv = ["--attr", "roles=staff", "--attr", "roles=sales", "--attr", "dept=R,D"]
    monkeypatch.setattr("sys.stdin", io.StringIO("a long pass phrase\n"))
    assert (
        appliance_cli.main(["users", "add", "-c", str(cfg), "bob", *argv, "--password-stdin"]) == 0
    )
    site = accounts.load(load(cfg).policies.users)["bob"].attributes
    s = make_agent_dir(tmp_path / "agent")
    monkeypatch.setattr("sys.stdin", io.StringIO("a long pass phrase\n"))
    assert (
        agent_cli.main(["users", "add", "bob", *argv, "--password-stdin", "--config", str(s.path)])
        == 0
    )
    home = tables.load_users(s.users_file).users["bob"].attributes
    assert site == home == {"roles": ("staff", "sales"), "dept": ("R", "D")}
    capsys.readouterr()
    appliance_cli.main(["policy", "explain", "-c", str(cfg), "x", "network", *argv])
    assert "roles=staff|sales" in capsys.readouterr().out
    # and each refuses a bad key with a usage error
    monkeypatch.setattr("sys.stdin", io.StringIO("a long pass phrase\n"))
    rc = appliance_cli.main(["users", "add", "-c", str(cfg), "eve", "--attr", "a:b=1"])
    assert rc == 2 and "attribute name" in capsys.readouterr().err
    monkeypatch.setattr("sys.stdin", io.StringIO("a long pass phrase\n"))
    rc = agent_cli.main(["users", "add", "eve", "--attr", "a:b=1", "--config", str(s.path)])
    assert rc == 2 and "attribute name" in capsys.readouterr().err
    rc = appliance_cli.main(
        ["policy", "explain", "-c", str(cfg), "x", "network", "--attr", "a:b=1"]
    )
    assert rc == 2 and "attribute name" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("line", "key", "words"),
    [
        ('"a:b" = "x"', "a:b", "attribute name"),
        ("n = 3", "n", "string or a list"),
        (f'n = "{"x" * (MAX_VALUE_LEN + 1)}"', "n", "characters"),
    ],
)
def test_tables_refuse_what_the_rules_refuse(
    tmp_path: Path, line: str, key: str, words: str
) -> None:
    """Both users tables name the file, the line and the key of a broken attribute."""
    site = tmp_path / "users.toml"
    site.write_text(f'[users.bob]\npassword = "{HASH}"\n[users.bob.attributes]\n{line}\n')
    with pytest.raises(ConfigError) as err:
        accounts.load(site)
    assert err.value.key == f"users.bob.attributes.{key}" and words in err.value.reason
    assert err.value.line == 4
    with pytest.raises(ConfigError) as err:
        tables.load_users(site)
    assert err.value.key == f"users.bob.attributes.{key}" and words in err.value.reason


TEXT = st.text(max_size=MAX_VALUE_LEN // 8) | st.text(st.characters(), max_size=8)
RAW = st.dictionaries(
    st.from_regex(r"\A[A-Za-z][A-Za-z0-9_.-]{0,63}\Z") | st.text(max_size=6),
    TEXT | st.lists(TEXT, max_size=4) | st.integers(),
    max_size=6,
)


@settings(max_examples=150, deadline=None)
@given(RAW)
def test_what_check_accepts_round_trips_through_both_users_tables(raw: dict[str, object]) -> None:
    try:
        attrs = check_attributes(raw)
    except BadAttribute:
        return
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "users.toml"
        accounts.save(path, {"bob": accounts.Account("bob", HASH, attrs)})
        assert accounts.load(path)["bob"].attributes == attrs
    home = tables.dump_users(tables.UserTable({"bob": tables.User("bob", HASH, attributes=attrs)}))
    assert tables.parse_users(TomlFile.parse(home)).users["bob"].attributes == attrs
