"""Admin accounts (`config.policies.admins`), separate from the site's guest accounts.

Format:

    [admins.alice]
    password_hash = "$argon2id$v=19$..."

Written only by `appliance admins add|del|passwd` (atomically, mode 0600); hashes are
argon2id from appliance.core.passwords.
"""

from __future__ import annotations

import re
from pathlib import Path

from appliance.core import passwords, tomledit
from appliance.core.atomic_file import locked, write_atomically
from appliance.core.tomlfile import ConfigError, TomlFile

NAME = re.compile(r"^[a-z][a-z0-9._-]{0,31}$")
HEADER = "Admin accounts for the admin pages: edit with `appliance admins add|del|passwd`."


def load_admins(path: Path) -> dict[str, str]:
    """name -> argon2id hash; a missing file means no admins yet."""
    if not path.exists():
        return {}
    doc = TomlFile.load(path)
    top = doc.reader()
    admins_r = top.sub("admins")
    out = {}
    for name in list(admins_r.keys()):
        r = admins_r.sub(name)
        if not NAME.match(name):
            raise r.error(None, f"admin name {name!r} must be lower-case letters, digits, . _ -")
        h = r.text("password_hash")
        if not h.startswith("$argon2id$"):
            raise r.error("password_hash", "not an argon2id hash")
        r.finish()
        out[name] = h
    admins_r.finish()
    top.finish()
    return out


def _write(path: Path, admins: dict[str, str]) -> None:
    """The table edited in place: what an admin wrote there (comments, order) stays."""
    table = {name: {"password_hash": h} for name, h in sorted(admins.items())}
    text = tomledit.updated(tomledit.read(path), {"admins": table}, header=HEADER, path=path)
    write_atomically(path, text, 0o600)


def set_password(path: Path, name: str, password: str, *, create: bool) -> None:
    if not NAME.match(name):
        raise ValueError(f"admin name {name!r} must be lower-case letters, digits, . _ -")
    if len(password) < 10:
        raise ValueError("an admin password needs at least 10 characters")
    with locked(path):
        admins = load_admins(path)
        if create and name in admins:
            raise ValueError(f"admin {name!r} exists already (use passwd)")
        if not create and name not in admins:
            raise ValueError(f"no admin {name!r}")
        admins[name] = passwords.hash_password(password)
        _write(path, admins)


def delete(path: Path, name: str) -> None:
    with locked(path):
        admins = load_admins(path)
        if name not in admins:
            raise ValueError(f"no admin {name!r}")
        del admins[name]
        _write(path, admins)


def check_login(path: Path, name: str, password: str) -> bool:
    """Constant work for unknown names too (passwords.verify_password hashes a dummy)."""
    try:
        admins = load_admins(path)
    except ConfigError:
        admins = {}
    return passwords.verify_password(admins.get(name), password)


__all__ = ["check_login", "delete", "load_admins", "set_password"]
