"""Safe writes of the files admins edit: atomic replace, a backup, a version to detect conflicts.

The file on disk is the source of truth.  Its version is the SHA-256 of its bytes:
a form carries the version it was built from, and a save whose version no longer
matches the file (another admin saved in between, or someone edited by hand) is a
conflict, never a silent overwrite.  Saves hold an exclusive lock file so two
processes cannot interleave their check and write.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from appliance.core.atomic_file import locked, write_atomically


class Conflict(Exception):
    """The file changed since the editor read it."""


def version_of(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:16]


def read_versioned(path: Path) -> tuple[str, str]:
    """(text, version) of a file; a missing file is empty text with its own version."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        data = b""
    return data.decode("utf-8"), version_of(data)


def save_if_unchanged(path: Path, text: str, expected_version: str, mode: int | None = None) -> str:
    """Replace the file if it is still at `expected_version`; keeps `<name>.bak`.

    Returns the previous text (for the audit diff).  Raises Conflict otherwise.
    """
    with locked(path):
        old, version = read_versioned(path)
        if version != expected_version:
            raise Conflict(f"{path.name} was changed by someone else since you opened it")
        if path.exists():
            write_atomically(path.with_name(path.name + ".bak"), old, mode)
        write_atomically(path, text, mode)
        return old
