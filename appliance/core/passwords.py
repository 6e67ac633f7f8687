"""Password hashing for site accounts, admins and the personal agent: argon2id only.

The parameters are argon2-cffi's RFC 9106 "low memory" profile (t=3, m=64 MiB, p=4);
a login costs tens of milliseconds, which the login rate limits make affordable.
`verify` runs in constant time for a known user and against a dummy hash for an
unknown one, so timing does not tell which user ids exist.
"""

from __future__ import annotations

import getpass
import sys

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError
from argon2.profiles import RFC_9106_LOW_MEMORY

_hasher = PasswordHasher.from_parameters(RFC_9106_LOW_MEMORY)
_DUMMY = _hasher.hash("not a real password")


def hash_password(password: str) -> str:
    return _hasher.hash(password)


def verify_password(stored_hash: str | None, password: str) -> bool:
    """True when the password matches; an unknown user (None) costs the same and fails."""
    try:
        return _hasher.verify(stored_hash or _DUMMY, password) and stored_hash is not None
    except (VerifyMismatchError, VerificationError, InvalidHashError):
        return False


def read_new_password(from_stdin: bool) -> str:
    """A new password for a CLI: one line of stdin, or typed twice without echo.

    Never a command-line argument (a process list would show it)."""
    if from_stdin:
        return sys.stdin.readline().rstrip("\r\n")
    first = getpass.getpass("password: ")
    if getpass.getpass("again: ") != first:
        raise ValueError("the two passwords differ")
    return first


def parameters() -> str:
    p = RFC_9106_LOW_MEMORY
    return f"argon2id t={p.time_cost} m={p.memory_cost}KiB p={p.parallelism}"
