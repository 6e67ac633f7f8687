"""The access-rights table (`policies/access.toml`): which user attributes may use which services.

Seed 001's table 23B: attribute -> per-service rights.  Each `[[rules]]` entry has a
`match` (attribute key -> pattern; several keys are ANDed), `allow` and `deny` lists
of service names, and optional limits (`max_connections` per user per service,
`session_max` in seconds, `quota_bytes_per_day`: bytes both ways per user per
service per UTC day, refused at the next connection once spent).

Precedence, documented and tested: **first match wins, per service**.  For a
service, the first rule (in file order) whose match fits the user's attributes
*and* that names the service in `allow` or `deny` decides.  No such rule: deny.
A user whose attributes match no rule at all may not use the network
(`may_use_network`), even a rule with empty `allow` grants network use.

Patterns: a string is equality, or a glob when it holds `*`, `?` or `[...]`
(case-sensitive, fnmatch syntax); an array of strings is set membership.  A
multi-valued attribute (a tuple, e.g. groups) satisfies a pattern when any of
its values does.

Speed: `decide` is precompiled.  The first decision for an attribute set walks an
index (rules bucketed by one of their equality conditions, or by the literal part
of a `prefix*` / `*suffix` glob, plus the few rules that have neither) and
stores every service's decision for that attribute set; later decisions are one
dict lookup.  The table is immutable, so a reload simply
builds a new one and the memo goes with the old.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from fnmatch import translate
from pathlib import Path

from appliance.core.attributes import KEY_RULE, Attributes, valid_key
from appliance.core.tomlfile import ConfigError, Reader, TomlFile

_GLOB_CHARS = re.compile(r"[*?\[]")
_MEMO_LIMIT = 100_000


@dataclass(frozen=True)
class Decision:
    allowed: bool
    rule: str | None
    reason: str
    max_connections: int | None = None
    session_max: int | None = None
    quota_bytes_per_day: int | None = None


@dataclass(frozen=True)
class Condition:
    """One attribute test: kind is 'eq', 'in' or 'glob'."""

    key: str
    kind: str
    values: frozenset[str]
    pattern: str  # the text as written (for show/explain)
    regex: re.Pattern[str] | None = None

    def test(self, have: tuple[str, ...]) -> bool:
        if self.regex is not None:
            return any(self.regex.match(v) for v in have)
        return any(v in self.values for v in have)

    def describe(self) -> str:
        if self.kind == "in":
            return f"{self.key} in {{{', '.join(sorted(self.values))}}}"
        op = "~" if self.kind == "glob" else "="
        return f"{self.key} {op} {self.pattern}"


@dataclass(frozen=True)
class Rule:
    index: int
    name: str
    conditions: tuple[Condition, ...]
    allow: frozenset[str]
    deny: frozenset[str]
    max_connections: int | None
    session_max: int | None
    line: int | None = None
    quota_bytes_per_day: int | None = None
    # the pattern as written in the file: key -> str | list[str] (for the admin grid)
    raw_match: tuple[tuple[str, str | tuple[str, ...]], ...] = ()

    def matches(self, attrs: Mapping[str, tuple[str, ...]]) -> bool:
        return self.first_failure(attrs) is None

    def first_failure(self, attrs: Mapping[str, tuple[str, ...]]) -> Condition | None:
        for c in self.conditions:
            have = attrs.get(c.key)
            if have is None or not c.test(have):
                return c
        return None

    def verdict(self, service: str) -> bool | None:
        if service in self.allow:
            return True
        if service in self.deny:
            return False
        return None

    def describe_match(self) -> str:
        return " and ".join(c.describe() for c in self.conditions) or "(everyone)"


def normalize(attributes: Mapping[str, object]) -> dict[str, tuple[str, ...]]:
    """Attribute values as tuples of strings (a single string becomes a 1-tuple)."""
    out: dict[str, tuple[str, ...]] = {}
    for k, v in attributes.items():
        if isinstance(v, str):
            out[k] = (v,)
        elif isinstance(v, list | tuple | set | frozenset):
            out[k] = tuple(str(x) for x in v)
        else:
            out[k] = (str(v),)
    return out


def compile_pattern(key: str, value: object) -> Condition:
    """A match entry -> Condition; ValueError says why the pattern is unusable."""
    if not valid_key(key):
        raise ValueError(f"attribute name {key!r} is not usable ({KEY_RULE})")
    if isinstance(value, str):
        if value == "":
            raise ValueError('empty pattern (use "*" for any value)')
        if _GLOB_CHARS.search(value):
            _check_glob(value)
            return Condition(key, "glob", frozenset(), value, re.compile(translate(value)))
        return Condition(key, "eq", frozenset({value}), value)
    if isinstance(value, list | tuple):
        if not value:
            raise ValueError("an empty set matches nobody")
        items = []
        for item in value:
            if not isinstance(item, str) or not item:
                raise ValueError(f"set members must be non-empty strings, found {item!r}")
            if _GLOB_CHARS.search(item):
                raise ValueError(f"{item!r}: globs are not allowed inside a set")
            items.append(item)
        if len(set(items)) != len(items):
            raise ValueError("a value is listed twice in the set")
        return Condition(key, "in", frozenset(items), ", ".join(items))
    raise ValueError(f"expected a string or an array of strings, got {type(value).__name__}")


def _check_glob(pattern: str) -> None:
    """fnmatch takes an unclosed '[' literally; an admin almost never means that."""
    i, n = 0, len(pattern)
    while i < n:
        if pattern[i] == "[":
            j = i + 1
            if j < n and pattern[j] == "!":
                j += 1
            if j < n and pattern[j] == "]":
                j += 1
            j = pattern.find("]", j)
            if j < 0:
                raise ValueError(f"{pattern!r}: '[' without a closing ']'")
            i = j
        i += 1


class AccessTable:
    """The compiled table; immutable, so one instance can be shared by every thread."""

    def __init__(
        self, rules: Iterable[Rule], services: Iterable[str], path: Path | None = None
    ) -> None:
        self.rules: tuple[Rule, ...] = tuple(rules)
        self.services: tuple[str, ...] = tuple(services)
        self.path = path
        index: dict[tuple[str, str], list[int]] = {}
        prefix: dict[tuple[str, str], list[int]] = {}
        suffix: dict[tuple[str, str], list[int]] = {}
        always: list[int] = []
        for rule in self.rules:
            key_cond = next((c for c in rule.conditions if c.kind != "glob"), None)
            if key_cond is not None:
                for v in key_cond.values:
                    index.setdefault((key_cond.key, v), []).append(rule.index)
                continue
            # only globs: "LITERAL*" and "*LITERAL" (the common ones) are indexed too
            glob = next(iter(rule.conditions), None)
            body = glob.pattern if glob else ""
            if glob and body.endswith("*") and not _GLOB_CHARS.search(body[:-1]):
                prefix.setdefault((glob.key, body[:-1]), []).append(rule.index)
            elif glob and body.startswith("*") and not _GLOB_CHARS.search(body[1:]):
                suffix.setdefault((glob.key, body[1:]), []).append(rule.index)
            else:
                always.append(rule.index)
        self._index = {k: tuple(v) for k, v in index.items()}
        self._prefix = {k: tuple(v) for k, v in prefix.items()}
        self._suffix = {k: tuple(v) for k, v in suffix.items()}
        self._prefix_keys = frozenset(k for k, _ in prefix)
        self._suffix_keys = frozenset(k for k, _ in suffix)
        self._always = tuple(always)
        self._memo: dict[object, dict[str, Decision]] = {}

    # -- decisions ----------------------------------------------------------
    def decide(self, attributes: Attributes, service: str) -> Decision:
        """May a user with these attributes use this service? First match wins, default deny."""
        try:  # the hot path: one tuple, one dict lookup (the memo key is the items in order)
            table = self._memo.get(tuple(attributes.items()))
        except TypeError:
            table = None
        if table is None:
            table = self._decisions(attributes)
        d = table.get(service)
        if d is not None:
            return d
        return Decision(False, None, f"unknown service {service!r}")

    def may_use_network(self, attributes: Attributes) -> Decision:
        """The network-use right: some rule must match, or the login is refused."""
        return self._decisions(attributes)[""]

    def _decisions(self, attributes: Attributes) -> dict[str, Decision]:
        try:
            key: object = tuple(attributes.items())
            hit = self._memo.get(key)
        except TypeError:  # unhashable values (lists): normalize first
            key = tuple(normalize(attributes).items())
            hit = self._memo.get(key)
        if hit is not None:
            return hit
        table = self._compute(normalize(attributes))
        if len(self._memo) >= _MEMO_LIMIT:
            self._memo.clear()
        self._memo[key] = table
        return table

    def candidates(self, attrs: Mapping[str, tuple[str, ...]]) -> list[int]:
        """Indices of the rules that may match (a superset), in file order."""
        found: set[int] = set(self._always)
        index = self._index
        for k, values in attrs.items():
            for v in values:
                bucket = index.get((k, v))
                if bucket:
                    found.update(bucket)
                if k in self._prefix_keys:
                    for i in range(len(v) + 1):
                        bucket = self._prefix.get((k, v[:i]))
                        if bucket:
                            found.update(bucket)
                if k in self._suffix_keys:
                    for i in range(len(v) + 1):
                        bucket = self._suffix.get((k, v[i:]))
                        if bucket:
                            found.update(bucket)
        return sorted(found)

    def matching(self, attrs: Mapping[str, tuple[str, ...]]) -> list[Rule]:
        rules = self.rules
        return [rules[i] for i in self.candidates(attrs) if rules[i].matches(attrs)]

    def _compute(self, attrs: Mapping[str, tuple[str, ...]]) -> dict[str, Decision]:
        matched = self.matching(attrs)
        out: dict[str, Decision] = {}
        if matched:
            first = matched[0]
            out[""] = Decision(
                True,
                first.name,
                f"rule {first.name!r} matches ({first.describe_match()})",
                None,
                first.session_max,
            )
        else:
            out[""] = Decision(False, None, "no rule matches these attributes: no network use")
        for service in self.services:
            out[service] = self._decide_in(matched, service)
        return out

    @staticmethod
    def _decide_in(matched: list[Rule], service: str) -> Decision:
        for rule in matched:
            verdict = rule.verdict(service)
            if verdict is None:
                continue
            word = "allows" if verdict else "denies"
            return Decision(
                verdict,
                rule.name,
                f"rule {rule.name!r} ({rule.describe_match()}) {word} {service}",
                rule.max_connections if verdict else None,
                rule.session_max,
                rule.quota_bytes_per_day if verdict else None,
            )
        return Decision(False, None, f"no matching rule grants {service} (default deny)")

    def naive_decide(self, attributes: Attributes, service: str) -> Decision:
        """The same answer by a plain linear scan of every rule (the benchmark's peer)."""
        attrs = normalize(attributes)
        if service not in self.services:
            return Decision(False, None, f"unknown service {service!r}")
        return self._decide_in([r for r in self.rules if r.matches(attrs)], service)

    # -- explaining ---------------------------------------------------------
    def explain(self, attributes: Attributes, service: str) -> tuple[list[str], Decision]:
        """Rule-by-rule reasoning for a person, and the decision it arrives at."""
        attrs = normalize(attributes)
        lines: list[str] = []
        decided: Decision | None = None
        if service not in self.services:
            decided = Decision(False, None, f"unknown service {service!r}")
            lines.append(f"{service!r} is not a service of the server table")
            return lines, decided
        for rule in self.rules:
            where = f"line {rule.line}" if rule.line else f"#{rule.index + 1}"
            failed = rule.first_failure(attrs)
            if failed is not None:
                have = attrs.get(failed.key)
                got = "missing" if have is None else ", ".join(have)
                lines.append(
                    f"  {where} {rule.name}: no match ({failed.describe()}; user has {got})"
                )
                continue
            verdict = rule.verdict(service)
            if verdict is None:
                lines.append(f"  {where} {rule.name}: matches, says nothing about {service}")
                continue
            word = "allow" if verdict else "deny"
            lines.append(f"  {where} {rule.name}: matches, {word} {service}  <- decides")
            decided = self._decide_in([rule], service)
            break
        if decided is None:
            decided = Decision(False, None, f"no matching rule grants {service} (default deny)")
        return lines, decided


def _rule(r: Reader, index: int, services: frozenset[str]) -> Rule:
    name = r.text("name")
    if not name.strip():
        raise r.error("name", "a rule needs a name")
    match_r = r.sub("match")
    conditions = []
    raw: list[tuple[str, str | tuple[str, ...]]] = []
    for key in sorted(match_r.keys()):
        value = match_r.raw(key)
        try:
            conditions.append(compile_pattern(key, value))
        except ValueError as exc:
            raise match_r.error(key, f"unparsable pattern: {exc}") from None
        raw.append((key, tuple(value) if isinstance(value, list) else value))
    lists = {}
    for key in ("allow", "deny"):
        items = r.text_list(key, ())
        for s in items:
            if s not in services:
                known = ", ".join(sorted(services))
                raise r.error(key, f"unknown service {s!r} (services: {known})")
        if len(set(items)) != len(items):
            raise r.error(key, "a service is listed twice")
        lists[key] = frozenset(items)
    both = lists["allow"] & lists["deny"]
    if both:
        raise r.error("deny", f"{', '.join(sorted(both))} is both allowed and denied")
    max_conn = r.integer("max_connections", None, 1, 100_000)
    session_max = r.integer("session_max", None, 60, 365 * 86400)
    quota = r.integer("quota_bytes_per_day", None, 1, 10**15)
    r.finish()
    return Rule(
        index=index,
        name=name,
        conditions=tuple(conditions),
        allow=lists["allow"],
        deny=lists["deny"],
        max_connections=max_conn,
        session_max=session_max,
        quota_bytes_per_day=quota,
        line=r.file.line_of(r.keypath),
        raw_match=tuple(raw),
    )


def parse_access(doc: TomlFile, services: Iterable[str]) -> AccessTable:
    known = frozenset(services)
    top = doc.reader()
    rules: list[Rule] = []
    names: dict[str, int] = {}
    patterns: dict[frozenset[tuple[str, str | None, frozenset[str]]], str] = {}
    for i, r in enumerate(top.tables("rules")):
        rule = _rule(r, i, known)
        if rule.name in names:
            raise r.error(
                "name", f"duplicate rule name {rule.name!r} (also rule #{names[rule.name]})"
            )
        names[rule.name] = i + 1
        # same meaning, same signature: "a" and ["a"], ["a", "b"] and ["b", "a"]
        sig = frozenset(
            (c.key, c.pattern if c.kind == "glob" else None, c.values) for c in rule.conditions
        )
        if sig in patterns:
            raise r.error(
                "match",
                f"duplicate rule: same match as rule {patterns[sig]!r}, it could never decide",
            )
        patterns[sig] = rule.name
        rules.append(rule)
    top.finish()
    return AccessTable(rules, sorted(known), doc.path)


def load_access(path: str | Path, services: Iterable[str]) -> AccessTable:
    """Read and validate access.toml against the services of the server table."""
    return parse_access(TomlFile.load(path), services)


__all__ = [
    "AccessTable",
    "ConfigError",
    "Decision",
    "Rule",
    "compile_pattern",
    "load_access",
    "parse_access",
]
