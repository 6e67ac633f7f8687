"""Running `nft` in the current network namespace: one place for the subprocess details."""

from __future__ import annotations

import json
import subprocess
from typing import Any

TABLE = "appliance"


class NftError(RuntimeError):
    pass


def run(script: str) -> None:
    """Load a script with `nft -f -`: everything in it is one atomic transaction."""
    proc = subprocess.run(
        ["nft", "-f", "-"], input=script, capture_output=True, text=True, check=False
    )
    if proc.returncode != 0:
        raise NftError(f"nft -f - failed: {proc.stderr.strip()}")


def query(*args: str) -> dict[str, Any] | None:
    """`nft -j ARGS` parsed, or None when the object does not exist."""
    proc = subprocess.run(["nft", "-j", *args], capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        if "No such file or directory" in proc.stderr:
            return None
        raise NftError(f"nft {' '.join(args)} failed: {proc.stderr.strip()}")
    out: dict[str, Any] = json.loads(proc.stdout)
    return out


def set_elements(name: str) -> set[tuple[str, str]]:
    """The (ip, mac) pairs in one of our concatenated sets; empty when the table is absent."""
    doc = query("list", "set", "inet", TABLE, name)
    if doc is None:
        return set()
    out: set[tuple[str, str]] = set()
    for item in doc.get("nftables", []):
        body = item.get("set")
        if not body:
            continue
        for elem in body.get("elem", []):
            if isinstance(elem, dict) and "elem" in elem:
                elem = elem["elem"]["val"]
            concat = elem.get("concat") if isinstance(elem, dict) else None
            if concat and len(concat) == 2:
                out.add((str(concat[0]), str(concat[1]).lower()))
    return out


def elements_text(pairs: set[tuple[str, str]] | list[tuple[str, str]]) -> str:
    """`ip . mac, ...` for an nft elements block (callers validate the values first)."""
    return ", ".join(f"{ip} . {mac}" for ip, mac in sorted(pairs))


def table_exists() -> bool:
    return query("list", "table", "inet", TABLE) is not None
