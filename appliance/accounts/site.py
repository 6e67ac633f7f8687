"""Site accounts: the users the site itself keeps, in the TOML table `policies.users`.

The file is small and edited by `appliance users ...` (or by hand):

    [users.alice]
    password = "$argon2id$v=19$m=65536,t=3,p=4$..."
    [users.alice.attributes]
    department = "Sales 1"
    roles = ["staff", "sales"]

Attributes are free-form: a string or a list of strings per key; the
access-rights table matches on them.  Passwords are argon2id hashes
(`appliance.core.passwords`); writes go to a temporary file that replaces the table
in one rename, so a crash or a concurrent reader never sees half a file.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from appliance.core import passwords
from appliance.core.atomic_file import write_atomically
from appliance.core.tomlfile import ConfigError, TomlFile, toml_key, toml_string, toml_value

Attributes = Mapping[str, str | tuple[str, ...]]
USER_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
ATTR_KEY = re.compile(r"^[A-Za-z][A-Za-z0-9_-]{0,63}$")


@dataclass(frozen=True)
class Account:
    user: str
    password_hash: str
    attributes: Attributes = field(default_factory=dict)


def valid_user_id(user: str) -> bool:
    return bool(USER_ID.match(user))


def load(path: str | Path) -> dict[str, Account]:
    """Read the table; a missing file is an empty table; mistakes raise ConfigError."""
    path = Path(path)
    if not path.exists():
        return {}
    doc = TomlFile.load(path)
    top = doc.reader()
    users = top.sub("users")
    out: dict[str, Account] = {}
    for name in list(users.keys()):
        if not valid_user_id(name):
            raise users.error(name, "user ids are letters, digits, '.', '_' and '-'")
        r = users.sub(name)
        pw = r.text("password")
        if not pw.startswith("$argon2"):
            raise r.error(
                "password", "expected an argon2 hash (set it with appliance users passwd)"
            )
        a = r.sub("attributes")
        attrs: dict[str, str | tuple[str, ...]] = {}
        for key in list(a.keys()):
            value = a.raw(key)
            if isinstance(value, str):
                attrs[key] = value
            elif isinstance(value, list) and all(isinstance(v, str) for v in value):
                attrs[key] = tuple(value)
            else:
                raise a.error(key, "expected a string or an array of strings")
        a.finish()
        r.finish()
        out[name] = Account(name, pw, attrs)
    users.finish()
    top.finish()
    return out


def authenticate(path: str | Path, user: str, password: str) -> Account | None:
    """The account when the password matches; an unknown user costs the same time."""
    account = load(path).get(user) if valid_user_id(user) else None
    ok = passwords.verify_password(account.password_hash if account else None, password)
    return account if ok and account else None


def render(accounts: Mapping[str, Account]) -> str:
    lines = [
        "# Site accounts (appliance users add|del|list|passwd). Passwords are argon2id hashes.",
        "",
    ]
    for name in sorted(accounts):
        acc = accounts[name]
        lines += [f"[users.{toml_key(name)}]", f"password = {toml_string(acc.password_hash)}"]
        if acc.attributes:
            lines.append(f"[users.{toml_key(name)}.attributes]")
            for k in sorted(acc.attributes):
                lines.append(f"{toml_key(k)} = {toml_value(acc.attributes[k])}")
        lines.append("")
    return "\n".join(lines)


def save(path: str | Path, accounts: Mapping[str, Account]) -> None:
    """Replace the table atomically (write, fsync, rename); the file stays mode 0600."""
    write_atomically(Path(path), render(accounts), 0o600)


def parse_attributes(items: list[str]) -> dict[str, str | tuple[str, ...]]:
    """`key=value` items from the command line; `key=a,b` gives a list."""
    out: dict[str, str | tuple[str, ...]] = {}
    for item in items:
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or not ATTR_KEY.match(key):
            raise ValueError(f"attribute {item!r}: expected key=value (key: letters, digits, _)")
        out[key] = tuple(v.strip() for v in value.split(",")) if "," in value else value.strip()
    return out


__all__ = [
    "Account",
    "ConfigError",
    "authenticate",
    "load",
    "parse_attributes",
    "render",
    "save",
    "valid_user_id",
]
