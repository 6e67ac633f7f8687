"""User attributes: the one type, key grammar, value rules and `--attr` syntax.

Attributes are what the access-rights table matches on.  They come from three
places (the site's users table, a personal agent's users table, an agent's
answer on the wire) and are typed on three command lines (`appliance users add`,
`personal-agent users add|attr`, `appliance policy explain --attr`); every one of
them goes through this module, so an attribute one part accepts is one every
other part accepts too.

Rules:

- a key is a letter, then up to 63 letters, digits, `_`, `.` or `-`
  (`department`, `org.unit`, `home-site`); keys are case-sensitive;
- a value is a string or a list of strings, each string at most
  `MAX_VALUE_LEN` characters and valid Unicode text (no lone surrogates, which no
  TOML or UTF-8 file can hold); a list has at most `MAX_LIST` members;
- a user has at most `MAX_KEYS` attributes.

The limits are the ones the agent protocol has always had; applying them to the
tables too means a table an agent serves is one the appliance accepts.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping

from appliance.core.tomlfile import Reader

AttrValue = str | tuple[str, ...]
Attributes = Mapping[str, AttrValue]

KEY_RE = re.compile(r"^[A-Za-z][A-Za-z0-9_.-]{0,63}$")
KEY_RULE = "a letter, then up to 63 letters, digits, '_', '.' or '-'"
MAX_KEYS = 32
MAX_LIST = 32
MAX_VALUE_LEN = 256
CLI_HELP = "an attribute (repeat); a comma, or the key given again, makes a list"


class BadAttribute(ValueError):
    """An attribute breaks a rule; `key` is the attribute (None: the whole set), `reason` why."""

    def __init__(self, key: str | None, reason: str) -> None:
        self.key = key
        self.reason = reason
        super().__init__(f"attribute {key!r}: {reason}" if key is not None else reason)


def valid_key(key: object) -> bool:
    return isinstance(key, str) and KEY_RE.fullmatch(key) is not None


def check_key(key: object) -> str:
    if not isinstance(key, str) or not KEY_RE.fullmatch(key):
        raise BadAttribute(str(key), f"an attribute name is {KEY_RULE}")
    return key


def _check_text(key: str, value: str) -> None:
    if len(value) > MAX_VALUE_LEN:
        raise BadAttribute(key, f"a value has at most {MAX_VALUE_LEN} characters")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise BadAttribute(key, "a value must be valid Unicode text") from None


def check_value(key: str, value: object) -> AttrValue:
    """A value as the type holds it: a string, or a tuple for a list of strings."""
    if isinstance(value, str):
        _check_text(key, value)
        return value
    if isinstance(value, list | tuple) and all(isinstance(v, str) for v in value):
        if len(value) > MAX_LIST:
            raise BadAttribute(key, f"a list has at most {MAX_LIST} values")
        for v in value:
            _check_text(key, v)
        return tuple(value)
    raise BadAttribute(key, "a value is a string or a list of strings")


def check_attributes(raw: object) -> dict[str, AttrValue]:
    """Checked attributes from decoded TOML or JSON; BadAttribute (a ValueError) says why not."""
    if not isinstance(raw, Mapping):
        raise BadAttribute(None, "attributes are a table of name = value")
    if len(raw) > MAX_KEYS:
        raise BadAttribute(None, f"a user has at most {MAX_KEYS} attributes")
    return {check_key(k): check_value(k, v) for k, v in raw.items()}


def read_attributes(r: Reader) -> dict[str, AttrValue]:
    """The attributes table a Reader stands on; a broken rule is a ConfigError at its key."""
    raw = {k: r.raw(k) for k in list(r.keys())}
    try:
        return check_attributes(raw)
    except BadAttribute as exc:
        raise r.error(exc.key, exc.reason) from None


def as_json(attributes: Attributes) -> dict[str, str | list[str]]:
    """Attributes as JSON holds them (lists for tuples)."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in attributes.items()}


def parse_attribute_args(items: Iterable[str]) -> dict[str, AttrValue]:
    """`--attr key=value` arguments, the one syntax of every CLI that takes them.

    `key=value` sets a string; a comma makes a list (`roles=staff,sales`); a key
    given again adds its values to the list (`--attr roles=staff --attr roles=sales`
    is the same list).  Whitespace around the key, the value and each list member
    is dropped.  BadAttribute (a ValueError) names the item that is wrong.
    """
    values: dict[str, list[str]] = {}
    listed: set[str] = set()
    for item in items:
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep:
            raise BadAttribute(key, f"expected key=value, got {item!r}")
        check_key(key)
        parts = [v.strip() for v in value.split(",")]
        if len(parts) > 1 or key in values:
            listed.add(key)
        values.setdefault(key, []).extend(parts)
    out = {k: tuple(v) if k in listed else v[0] for k, v in values.items()}
    return check_attributes(out)


__all__ = [
    "CLI_HELP",
    "KEY_RE",
    "KEY_RULE",
    "MAX_KEYS",
    "MAX_LIST",
    "MAX_VALUE_LEN",
    "AttrValue",
    "Attributes",
    "BadAttribute",
    "as_json",
    "check_attributes",
    "check_key",
    "check_value",
    "parse_attribute_args",
    "read_attributes",
    "valid_key",
]
