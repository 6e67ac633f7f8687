"""Property tests of the decision function: default deny, first match wins, explain agrees."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from appliance.core.tomlfile import TomlFile
from appliance.policy.access_rights import AccessTable, Decision, parse_access

pytestmark = pytest.mark.unit
SERVICES = ("smtp", "pop3", "http", "nntp")
KEYS = ("department", "title", "groups", "site")
VALUES = ("a", "b", "ab", "ba", "c")
PATTERNS = st.one_of(
    st.sampled_from(VALUES),
    st.sampled_from(("a*", "*b", "?", "[ab]*", "*")),
    st.lists(st.sampled_from(VALUES), min_size=1, max_size=3, unique=True),
)
RULE = st.fixed_dictionaries(
    {
        "match": st.dictionaries(st.sampled_from(KEYS), PATTERNS, max_size=3),
        "verdicts": st.dictionaries(st.sampled_from(SERVICES), st.booleans(), max_size=4),
    }
)
ATTRS = st.dictionaries(
    st.sampled_from(KEYS),
    st.one_of(
        st.sampled_from(VALUES),
        st.lists(st.sampled_from(VALUES), max_size=3).map(tuple),
    ),
    max_size=4,
)


def meaning(value: object) -> object:
    """What the parser compares to find duplicate rules."""
    if isinstance(value, list):
        return frozenset(value)
    if isinstance(value, str) and not any(c in value for c in "*?["):
        return frozenset({value})
    return value


def build(rules: list[dict[str, dict[str, object]]]) -> AccessTable:
    """Rules -> TOML text -> table (through the real parser); duplicate matches dropped."""
    parts, seen = [], set()
    for i, r in enumerate(rules):
        sig = frozenset((k, meaning(v)) for k, v in r["match"].items())
        if sig in seen:
            continue
        seen.add(sig)
        match = ", ".join(f"{k} = {json.dumps(v)}" for k, v in r["match"].items())
        allow = [s for s, ok in r["verdicts"].items() if ok]
        deny = [s for s, ok in r["verdicts"].items() if not ok]
        parts.append(
            f'[[rules]]\nname = "r{i}"\nmatch = {{ {match} }}\n'
            f"allow = {json.dumps(allow)}\ndeny = {json.dumps(deny)}\n"
        )
    return parse_access(TomlFile.parse("\n".join(parts), "access.toml"), SERVICES)


@settings(max_examples=300, deadline=None)
@given(st.lists(RULE, max_size=8), ATTRS, st.sampled_from(SERVICES))
def test_decide_agrees_with_a_linear_scan_and_with_explain(
    rules: list[dict[str, dict[str, object]]], attrs: dict[str, object], service: str
) -> None:
    table = build(rules)
    d = table.decide(attrs, service)  # type: ignore[arg-type]
    assert d == table.naive_decide(attrs, service)  # type: ignore[arg-type]
    assert d == table.decide(attrs, service)  # type: ignore[arg-type]  # memo hit, same answer
    _, explained = table.explain(attrs, service)  # type: ignore[arg-type]
    assert explained == d


@settings(max_examples=300, deadline=None)
@given(st.lists(RULE, max_size=8), ATTRS, st.sampled_from(SERVICES))
def test_first_matching_rule_that_names_the_service_decides_else_deny(
    rules: list[dict[str, dict[str, object]]], attrs: dict[str, object], service: str
) -> None:
    table = build(rules)
    from appliance.policy.access_rights import normalize

    norm = normalize(attrs)
    deciding = [r for r in table.rules if r.matches(norm) and r.verdict(service) is not None]
    d = table.decide(attrs, service)  # type: ignore[arg-type]
    if not deciding:
        assert not d.allowed and d.rule is None  # default deny
    else:
        assert d.rule == deciding[0].name
        assert d.allowed == (service in deciding[0].allow)
    # network use: exactly when some rule matches
    assert table.may_use_network(attrs).allowed == any(r.matches(norm) for r in table.rules)  # type: ignore[arg-type]
    # a user matching no rule is refused every service
    if not table.may_use_network(attrs).allowed:  # type: ignore[arg-type]
        assert not any(table.decide(attrs, s).allowed for s in SERVICES)  # type: ignore[arg-type]


@given(ATTRS, st.sampled_from(SERVICES))
def test_the_empty_table_denies_everything(attrs: dict[str, object], service: str) -> None:
    table = build([])
    assert not table.decide(attrs, service).allowed  # type: ignore[arg-type]
    assert not table.may_use_network(attrs).allowed  # type: ignore[arg-type]


@settings(max_examples=150, deadline=None)
@given(st.lists(RULE, max_size=6), st.lists(ATTRS, min_size=1, max_size=5))
def test_the_admin_grid_round_trips_every_table(
    rules: list[dict[str, dict[str, object]]], users: list[dict[str, object]]
) -> None:
    """Table -> grid rows -> TOML -> table: no decision changes (what a no-op save does)."""
    from appliance.admin import grid

    before = build(rules)
    text = grid.to_toml(grid.rows_of(before), "# header\n")
    after = parse_access(TomlFile.parse(text, "access.toml"), SERVICES)

    def same(a: Decision, b: Decision) -> bool:
        # the reason's wording may change ("in {a}" becomes "= a"), nothing else
        return (a.allowed, a.rule, a.max_connections, a.session_max) == (
            b.allowed,
            b.rule,
            b.max_connections,
            b.session_max,
        )

    for attrs in users:
        assert same(after.may_use_network(attrs), before.may_use_network(attrs))  # type: ignore[arg-type]
        for s in SERVICES:
            assert same(after.decide(attrs, s), before.decide(attrs, s))  # type: ignore[arg-type]
