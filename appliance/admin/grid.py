"""The access-rights table as a grid of rows (attribute patterns) x columns (services).

Rows come from the parsed table and go back into the file's own text (through
appliance.core.tomledit, so the comments an admin wrote stay with their rules); the text
is then validated by the real loader before anything is saved.  A row's pattern is written as
`key=value; key=a|b; key=glob*` (`;` between attributes, `|` between set members,
empty for everyone).  Cells are "allow", "deny" or "" (this row says nothing: the
next matching row decides).
"""

from __future__ import annotations

import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from appliance.core import tomledit
from appliance.policy.access_rights import AccessTable


class GridError(ValueError):
    pass


@dataclass
class Row:
    name: str
    pattern: str
    cells: dict[str, str] = field(default_factory=dict)
    max_connections: str = ""
    session_max: str = ""
    quota_bytes_per_day: str = ""
    source: int | None = None  # the rule's index in the file the grid was built from


def rows_of(table: AccessTable) -> list[Row]:
    rows = []
    for r in table.rules:
        parts = []
        for key, value in r.raw_match:
            parts.append(f"{key}={value if isinstance(value, str) else '|'.join(value)}")
        cells = {
            s: ("allow" if r.verdict(s) else "deny")
            for s in table.services
            if r.verdict(s) is not None
        }
        rows.append(
            Row(
                r.name,
                "; ".join(parts),
                cells,
                str(r.max_connections or ""),
                str(r.session_max or ""),
                str(r.quota_bytes_per_day or ""),
                r.index,
            )
        )
    return rows


def rows_from_form(form: Mapping[str, str], services: Sequence[str]) -> list[Row]:
    """The posted grid: fields name-N, pattern-N, cell-N-SERVICE, max-N, session-N,
    quota-N, order-N, remove-N; the blank row "new" becomes a rule when it has a name."""
    ids = sorted({k.split("-", 1)[1] for k in form if k.startswith("name-")})
    keyed = []
    for n, i in enumerate(ids):
        name = form.get(f"name-{i}", "").strip()
        if form.get(f"remove-{i}") or (i == "new" and not name):
            continue
        order_text = form.get(f"order-{i}", "").strip()
        try:
            order = float(order_text) if order_text else float(n)
        except ValueError:
            raise GridError(f"row {name or i}: position {order_text!r} is not a number") from None
        cells = {}
        for s in services:
            v = form.get(f"cell-{i}-{s}", "")
            if v not in ("", "allow", "deny"):
                raise GridError(f"row {name}: cell {s} must be allow, deny or empty")
            if v:
                cells[s] = v
        row = Row(
            name,
            form.get(f"pattern-{i}", "").strip(),
            cells,
            form.get(f"max-{i}", "").strip(),
            form.get(f"session-{i}", "").strip(),
            form.get(f"quota-{i}", "").strip(),
            int(i) if i.isdecimal() else None,
        )
        keyed.append((order, i == "new", n, row))
    keyed.sort(key=lambda t: (t[0], t[1], t[2]))
    return [t[3] for t in keyed]


def parse_pattern(text: str, row: str) -> list[tuple[str, str | list[str]]]:
    out: list[tuple[str, str | list[str]]] = []
    for part in text.split(";"):
        part = part.strip()
        if not part:
            continue
        key, sep, value = part.partition("=")
        key, value = key.strip(), value.strip()
        if not sep or not key:
            raise GridError(f"row {row}: {part!r} is not key=value")
        if "|" in value:
            out.append((key, [v.strip() for v in value.split("|")]))
        else:
            out.append((key, value))
    return out


def to_toml(rows: Sequence[Row], text: str) -> str:
    """`text` (access.toml as it is) edited to hold the rows, each rule edited in place:
    the comments above and beside it stay, also when it moves; a removed rule's go."""
    try:
        old = tomllib.loads(text).get("rules", [])
    except tomllib.TOMLDecodeError:
        old = []  # tomledit says what is wrong
    entries = []
    for row in rows:
        was: dict[str, Any] = {}
        if row.source is not None and 0 <= row.source < len(old):
            was = old[row.source]
        values: dict[str, Any] = {"name": row.name}
        match = parse_pattern(row.pattern, row.name)
        if match:
            values["match"] = dict(match)
        for verdict in ("allow", "deny"):
            names = [s for s, v in row.cells.items() if v == verdict]
            if names:  # the order as written, when the services are the same
                same = sorted(was.get(verdict, [])) == sorted(names)
                values[verdict] = list(was[verdict]) if same else names
        for key, number in (
            ("max_connections", row.max_connections),
            ("session_max", row.session_max),
            ("quota_bytes_per_day", row.quota_bytes_per_day),
        ):
            if number:
                if not number.isdecimal() or not number.isascii():  # "²" is a digit to isdigit
                    raise GridError(f"row {row.name}: {key} {number!r} is not a whole number")
                values[key] = int(number)
        entries.append(tomledit.Entry(row.source, values))
    return tomledit.updated(
        text, {"rules": tomledit.Tables(entries)}, path="access.toml", inline=("match",)
    )
