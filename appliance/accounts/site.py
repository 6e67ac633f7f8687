"""Site accounts: the users the site itself keeps, in the TOML table `policies.users`.

The file is small and edited by `appliance users ...` (or by hand):

    [users.alice]
    password = "$argon2id$v=19$m=65536,t=3,p=4$..."
    [users.alice.attributes]
    department = "Sales 1"
    roles = ["staff", "sales"]

Attributes are a string or a list of strings per key, under the rules of
`appliance.core.attributes`; the access-rights table matches on them.  Passwords are argon2id hashes
(`appliance.core.passwords`); writes go to a temporary file that replaces the table
in one rename, so a crash or a concurrent reader never sees half a file.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from appliance.core import attributes as attrs_rules
from appliance.core import passwords, tomledit
from appliance.core.atomic_file import write_atomically
from appliance.core.attributes import Attributes
from appliance.core.tomlfile import ConfigError, TomlFile

HEADER = "Site accounts (appliance users add|del|list|passwd). Passwords are argon2id hashes."
USER_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


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
        attrs = attrs_rules.read_attributes(a)
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


def render(accounts: Mapping[str, Account], text: str = "", path: str | Path = "<string>") -> str:
    """The table holding `accounts`, edited from `text` (the file as it is) so that what
    an admin wrote there stays: comments, order; a new user goes at the end."""
    users = {
        name: {
            "password": accounts[name].password_hash,
            "attributes": attrs_rules.as_json(dict(sorted(accounts[name].attributes.items()))),
        }
        for name in sorted(accounts)
    }
    return tomledit.updated(text, {"users": users}, header=HEADER, path=path)


def save(path: str | Path, accounts: Mapping[str, Account]) -> None:
    """Replace the table atomically (write, fsync, rename); the file stays mode 0600."""
    path = Path(path)
    write_atomically(path, render(accounts, tomledit.read(path), path), 0o600)


__all__ = [
    "Account",
    "ConfigError",
    "authenticate",
    "load",
    "render",
    "save",
    "valid_user_id",
]
