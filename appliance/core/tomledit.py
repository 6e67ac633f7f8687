"""Rewrite a table file with tomlkit, changing only what changed, so an admin's comments stay.

Every writer of a TOML table (the CLIs, the admin pages) says what the file must hold as
plain values; `updated` edits the parsed document towards that and leaves the rest as
it was written: comments, blank lines, key order, quoting.  tomlkit also escapes what a
TOML string cannot hold raw (DEL and the other control characters).

tomlkit keeps a comment where it stands in the text, so the comment block written above a
table's header lives, in its tree, at the end of the table before it (or at the top of the
document).  The rule here: the comment lines directly above a header, after the last
blank line, are that header's; they move with its table when the table is removed or
reordered, and a removed table takes its own block away with it (the last table of a
file also takes the comments that close the file).
"""

from __future__ import annotations

import itertools
import tomllib
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import tomlkit
from tomlkit.container import Container
from tomlkit.exceptions import ParseError
from tomlkit.items import AoT, Comment, InlineTable, Item, Null, Table, Whitespace
from tomlkit.toml_document import TOMLDocument

from appliance.core.tomlfile import ConfigError

Box = TOMLDocument | Table | InlineTable


@dataclass(frozen=True)
class Entry:
    """One table of an array of tables: `source` is its index in the file as read (None:
    a new table), so an edited table keeps its comments even when it moves."""

    source: int | None
    values: Mapping[str, Any]


@dataclass(frozen=True)
class Tables:
    """An array of tables (`[[key]]`), in this order."""

    entries: Sequence[Entry]


def read(path: Path) -> str:
    """The file's text as a writer starts from it ("" when there is no file yet)."""
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return ""
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(path, "", f"cannot read: {exc}") from None


def updated(
    text: str,
    desired: Mapping[str, Any],
    *,
    header: str = "",
    path: str | Path = "<string>",
    inline: Collection[str] = (),
) -> str:
    """`text` edited to hold exactly `desired`; a blank `text` (no file yet) becomes a new
    document that starts with `header` as comment lines.

    Values are strings, integers, booleans, sequences of strings, mappings (tables; a new
    one is inline when its key is in `inline`, else gets a header; an empty new one is left
    out, as readers take a missing table for an empty one) and `Tables` (arrays of
    tables).  A value equal to the one in the file is not touched.
    """
    if text.strip():
        try:
            doc = tomlkit.parse(text)
        except ParseError as exc:
            raise ConfigError(path, "", f"not valid TOML: {exc}", exc.line) from None
    else:
        doc = tomlkit.document()
        for line in header.splitlines():
            doc.add(tomlkit.comment(line))
    top = _Top(doc)
    _sync(top, [], doc, desired, inline)
    out = tomlkit.dumps(top.finish())
    if _pruned(tomllib.loads(out)) != _pruned(desired):  # never write a table that reads wrong
        raise ConfigError(path, "", "the edited table would not read back as edited; not saved")
    return out


def _pruned(value: Any) -> Any:
    """Plain values, without empty tables or arrays of tables (a reader takes a missing one
    for an empty one)."""
    if isinstance(value, Tables):  # no tables left: no array either
        return [_pruned(e.values) for e in value.entries] or {}
    if isinstance(value, Mapping):
        out = {k: _pruned(v) for k, v in value.items()}
        return {k: v for k, v in out.items() if v != {}}
    if isinstance(value, list | tuple):
        return [_pruned(v) for v in value]
    return value


# -- where comment blocks go ---------------------------------------------------------


@dataclass
class _Top:
    """Moves at the document's top level, applied by rebuilding it in order: tomlkit has
    no way to insert a comment before an item, only after the last one."""

    doc: TOMLDocument
    drops: set[int] = field(default_factory=set)  # drop the block above body[i]
    inserts: dict[int, list[Item]] = field(default_factory=dict)  # put these above body[i]

    def above(self, key: str) -> int:
        for i, (k, _) in enumerate(self.doc.body):
            if k is not None and k.key == key:
                return i
        raise KeyError(key)

    def finish(self) -> TOMLDocument:
        if not self.drops and not self.inserts:
            return self.doc
        new = TOMLDocument(parsed=True)
        pending: list[Item] = []
        for i, (k, item) in enumerate(self.doc.body):
            if i in self.drops:
                pending = _split(pending)[0]
            pending += self.inserts.get(i, [])
            if isinstance(item, Null):
                continue
            if k is None:
                pending.append(item)
                continue
            for p in pending:
                new.append(None, p)
            pending = []
            new.append(k, item)
        for p in pending:
            new.append(None, p)
        new.parsing(False)
        return new


def _is_trivia(item: Item) -> bool:
    return isinstance(item, Comment | Whitespace | Null)


def _holder(table: Table) -> Table:
    """The table whose body is rendered last (a table's sub-tables come after its keys)."""
    for k, v in reversed(table.value.body):
        if isinstance(v, Null):
            continue
        if k is not None and isinstance(v, Table):
            return _holder(v)
        if k is not None and isinstance(v, AoT) and v.body:
            return _holder(v.body[-1])
        break
    return table


def _trailing(item: Table | AoT) -> list[tuple[Any, Item]]:
    """The comments and blank lines at the end of what `item` renders (the body they end)."""
    if isinstance(item, AoT):
        return _trailing(item.body[-1]) if item.body else []
    body = _holder(item).value.body
    n = len(body)
    while n and body[n - 1][0] is None and _is_trivia(body[n - 1][1]):
        n -= 1
    return body[n:]


def _detach(item: Table | AoT) -> list[Item]:
    """Take away the comments and blank lines at the end of what `item` renders."""
    if isinstance(item, AoT):
        return _detach(item.body[-1]) if item.body else []
    body = _holder(item).value.body
    taken = _trailing(item)
    del body[len(body) - len(taken) :]  # the end of a body: no index after it to renumber
    return [i for _, i in taken if not isinstance(i, Null)]


def _attach(item: Table | AoT, items: Sequence[Item]) -> None:
    holder = _holder(item.body[-1] if isinstance(item, AoT) else item)
    for i in items:
        holder.value.append(None, i)


def _split(items: Sequence[Item]) -> tuple[list[Item], list[Item]]:
    """(what stays with the table before, the block directly above the next header)."""
    cut = 0
    for n, i in enumerate(items):
        if isinstance(i, Whitespace) and "\n" in i.value:
            cut = n + 1
    return list(items[:cut]), list(items[cut:])


def _previous_header(box: Box, key: str) -> Table | AoT | None:
    prev: Table | AoT | None = None
    for k, v in _body(box):
        if k is not None and k.key == key:
            return prev
        if k is not None and isinstance(v, Table | AoT):
            prev = v
    return None


def _body(box: Box) -> list[tuple[Any, Item]]:
    return box.body if isinstance(box, Container) else box.value.body


def _above(top: _Top, chain: list[tuple[Box, str]], box: Box, key: str) -> list[Item]:
    """The comment block directly above `box[key]`'s header (read, not taken)."""
    prev = _previous_header(box, key)
    if prev is not None:
        return _split([i for _, i in _trailing(prev) if not isinstance(i, Null)])[1]
    if box is top.doc:
        before: list[Item] = []
        for k, i in top.doc.body[: top.above(key)]:
            before = [*before, i] if k is None else []
        return _split([i for i in before if not isinstance(i, Null)])[1]
    if chain:  # the first table in a table without a header of its own: look further up
        parent, pkey = chain[-1]
        return _above(top, chain[:-1], parent, pkey)
    return []


def _rehome(top: _Top, chain: list[tuple[Box, str]], box: Box, key: str, moved: list[Item]) -> None:
    """Drop the block above `box[key]`'s header and put `moved` there instead."""
    prev = _previous_header(box, key)
    if prev is not None:
        own = _split(_detach(prev))[0]
        _attach(prev, [*own, *moved])
    elif box is top.doc:
        i = top.above(key)
        top.drops.add(i)
        top.inserts.setdefault(i, []).extend(moved)
    elif chain:
        parent, pkey = chain[-1]
        _rehome(top, chain[:-1], parent, pkey, moved)


# -- editing -------------------------------------------------------------------------


def _plain(value: Any) -> Any:
    return value.unwrap() if hasattr(value, "unwrap") else value


def _same(have: Any, want: Any) -> bool:
    have = _plain(have)
    return type(have) is type(want) and have == want


def _sync(
    top: _Top,
    chain: list[tuple[Box, str]],
    box: Box,
    desired: Mapping[str, Any],
    inline: Collection[str],
) -> None:
    # what closes the table (often the comments above the next header) stays at its end
    closing = _detach(box) if isinstance(box, Table) else []
    for key in [k for k in box if k not in desired]:
        item = box.get(key)
        if isinstance(item, Table | AoT):
            _rehome(top, chain, box, key, _split(_detach(item))[1])
        del box[key]
    for key, want in desired.items():
        have = box.get(key)
        if isinstance(want, Mapping):
            if isinstance(have, Table | InlineTable):
                _sync(top, [*chain, (box, key)], have, want, inline)
            elif want or have is not None:
                box[key] = _new(want, key in inline or isinstance(box, InlineTable), inline)
        elif isinstance(want, Tables):
            if want.entries or have is not None:
                _sync_array(top, [*chain, (box, key)], box, key, want.entries, inline)
        else:
            value = list(want) if isinstance(want, tuple) else want
            if have is None or not _same(have, value):
                box[key] = value
    if isinstance(box, Table):
        _attach(box, closing)


def _new(want: Mapping[str, Any], as_inline: bool, inline: Collection[str]) -> Table | InlineTable:
    if as_inline:
        return _fill(tomlkit.inline_table(), want, inline)
    return _fill(tomlkit.table(), want, inline)


_Made = TypeVar("_Made", Table, InlineTable)


def _fill(made: _Made, want: Mapping[str, Any], inline: Collection[str]) -> _Made:
    for key, value in want.items():
        if isinstance(value, Mapping):
            if value:
                made[key] = _new(value, key in inline or isinstance(made, InlineTable), inline)
        else:
            made[key] = list(value) if isinstance(value, tuple) else value
    return made


def _sync_array(
    top: _Top,
    chain: list[tuple[Box, str]],
    box: Box,
    key: str,
    entries: Sequence[Entry],
    inline: Collection[str],
) -> None:
    """An array of tables in the order of `entries`, each kept table with its comments."""
    have = box.get(key)
    old: list[Table] = list(have.body) if isinstance(have, AoT) else []
    own: dict[int, list[Item]] = {}
    above: dict[int, list[Item]] = {id(old[0]): _above(top, chain[:-1], box, key)} if old else {}
    for n, t in enumerate(old):
        trailing = _detach(t)
        if n + 1 < len(old):
            own[id(t)], above[id(old[n + 1])] = _split(trailing)
        else:
            own[id(t)] = trailing  # the last table keeps what closes the file
    tables: list[Table] = []
    used: set[int] = set()
    for e in entries:
        if e.source is not None and 0 <= e.source < len(old) and e.source not in used:
            used.add(e.source)
            t = old[e.source]
            _sync(top, chain, t, e.values, inline)
        else:
            t = _fill(tomlkit.table(), e.values, inline)
        tables.append(t)
    for prev, t in itertools.pairwise(tables):
        tail = own.get(id(prev), [])
        if not tail or not isinstance(tail[-1], Whitespace):
            tail = [*tail, tomlkit.ws("\n")]
        _attach(prev, [*tail, *above.get(id(t), [])])
    if tables:
        last = own.get(id(tables[-1]), [])
        while last and isinstance(last[-1], Whitespace):
            last = last[:-1]
        _attach(tables[-1], last)
    first_above = above.get(id(tables[0]), []) if tables else []
    for t in tables[1:]:  # the blank lines between tables are the ones attached above
        t.trivia.indent = t.trivia.indent.replace("\n", "")
    aot = AoT(tables, name=key, parsed=True)
    if have is not None:
        _rehome(top, chain[:-1], box, key, first_above)
        if tables:
            box[key] = aot
        else:
            del box[key]
    elif tables:
        box[key] = aot
