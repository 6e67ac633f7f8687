"""Load a TOML file once and read it into typed values with errors that name file, line and key.

`tomllib` parses but does not say where a key stands, so `TomlFile` keeps a
small index from dotted key paths to line numbers, built by scanning the text
for table headers and `key =` lines.  `Reader` then walks one table, checks
types and ranges, and refuses keys nobody asked for.
"""

from __future__ import annotations

import ipaddress
import re
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

KeyPath = tuple[str | int, ...]


class ConfigError(Exception):
    """A configuration or table file is wrong; the message is meant for the admin."""

    def __init__(self, file: str | Path, key: str, message: str, line: int | None = None):
        self.file = str(file)
        self.key = key
        self.line = line
        self.reason = message
        where = f"{self.file}:{line}" if line else self.file
        super().__init__(f"{where}: {key}: {message}" if key else f"{where}: {message}")


# No two neighbouring parts of these patterns can match the same character (the
# lazy `+?` next to `\s*` they replace backtracked over every split of a long run
# of spaces: a few kB of one line took minutes); names are stripped in code instead.
_HEADER = re.compile(r"^[ \t]*(\[\[?)([^\]]+)\]\]?[ \t]*(#.*)?$")
_KEYLINE = re.compile(
    r"""^[ \t]*(?:("[^"]*"|'[^']*')[ \t]*|([A-Za-z0-9_.\-][A-Za-z0-9_.\- \t]*))="""
)


def _split_dotted(text: str) -> list[str]:
    parts = []
    for m in re.finditer(r'"([^"]*)"|\'([^\']*)\'|([^.\s]+)', text):
        parts.append(next(g for g in m.groups() if g is not None))
    return parts


def _index_lines(text: str) -> dict[KeyPath, int]:
    """Map key paths to the line where they are defined (best effort, 1-based)."""
    index: dict[KeyPath, int] = {}
    array_counts: dict[KeyPath, int] = {}
    table: KeyPath = ()
    in_multiline = False
    for lineno, raw in enumerate(text.splitlines(), start=1):
        if in_multiline:
            if raw.count('"""') % 2 == 1 or raw.count("'''") % 2 == 1:
                in_multiline = False
            continue
        header = _HEADER.match(raw)
        if header:
            path: KeyPath = tuple(_split_dotted(header.group(2).strip()))
            if header.group(1) == "[[":
                n = array_counts.get(path, 0)
                array_counts[path] = n + 1
                table = (*path, n)
            else:
                table = path
            index.setdefault(table, lineno)
            continue
        key = _KEYLINE.match(raw)
        if key:
            path = (*table, *_split_dotted(key.group(1) or key.group(2).strip()))
            index.setdefault(path, lineno)
            rest = raw[key.end() :]
            if rest.count('"""') % 2 == 1 or rest.count("'''") % 2 == 1:
                in_multiline = True
    return index


def _deepest_line(text: str) -> int | None:
    """The first line where `[`/`{` nesting outside strings and comments is deepest:
    where a RecursionError from tomllib (which says nothing more) comes from."""
    depth = best = 0
    best_line: int | None = None
    line, i, n = 1, 0, len(text)
    while i < n:
        c = text[i]
        if c == "\n":
            line += 1
        elif c == "#":
            end = text.find("\n", i)
            i = n if end < 0 else end
            continue
        elif c in "\"'":
            quote = c * 3 if text.startswith(c * 3, i) else c
            j = i + len(quote)
            while j < n and not text.startswith(quote, j):
                if text[j] == "\\" and c == '"':
                    j += 1
                elif text[j] == "\n" and len(quote) == 1:
                    break  # an unclosed one-line string (tomllib would have said so)
                j += 1
            line += text.count("\n", i, j)
            i = j + len(quote)
            continue
        elif c in "[{":
            depth += 1
            if depth > best:
                best, best_line = depth, line
        elif c in "]}":
            depth = max(0, depth - 1)
        i += 1
    return best_line


@dataclass
class TomlFile:
    """A parsed TOML file that remembers where each key is."""

    path: Path
    data: dict[str, Any]
    lines: dict[KeyPath, int] = field(default_factory=dict)

    @classmethod
    def load(cls, path: str | Path) -> TomlFile:
        path = Path(path)
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise ConfigError(path, "", "file not found") from None
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(path, "", f"cannot read: {exc}") from None
        return cls.parse(text, path)

    @classmethod
    def parse(cls, text: str, path: str | Path = "<string>") -> TomlFile:
        try:
            data = tomllib.loads(text)
        except RecursionError:
            raise ConfigError(
                path,
                "",
                "arrays or inline tables nested too deeply to read",
                _deepest_line(text),
            ) from None
        except tomllib.TOMLDecodeError as exc:
            m = re.search(r"line (\d+)", str(exc))
            raise ConfigError(
                path, "", f"not valid TOML: {exc}", int(m.group(1)) if m else None
            ) from None
        return cls(Path(path), data, _index_lines(text))

    def line_of(self, path: KeyPath) -> int | None:
        """The line of the key, or of the closest enclosing table that has one."""
        while path:
            if path in self.lines:
                return self.lines[path]
            path = path[:-1]
        return None

    def error(self, path: KeyPath, message: str) -> ConfigError:
        return ConfigError(self.path, dotted(path), message, self.line_of(path))

    def reader(self, *path: str, required: bool = False) -> Reader:
        """A Reader over the table at `path` (an empty table if absent and not required)."""
        node: Any = self.data
        for i, part in enumerate(path):
            if isinstance(node, dict) and part in node:
                node = node[part]
            elif required:
                raise self.error(path[: i + 1], "missing table")
            else:
                node = {}
                break
        if not isinstance(node, dict):
            raise self.error(path, f"expected a table, got {type_name(node)}")
        return Reader(self, tuple(path), node)


def dotted(path: KeyPath) -> str:
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else part)
    return out


def type_name(value: Any) -> str:
    return {
        bool: "a boolean",
        int: "an integer",
        float: "a number",
        str: "a string",
        list: "an array",
        dict: "a table",
    }.get(type(value), type(value).__name__)


_MISSING: Any = object()


class Reader:
    """Typed access to one table; `finish()` refuses the keys that were never read."""

    def __init__(self, file: TomlFile, path: KeyPath, table: dict[str, Any]):
        self.file = file
        self.keypath = path
        self.table = table
        self.seen: set[str] = set()

    def error(self, key: str | None, message: str) -> ConfigError:
        return self.file.error((*self.keypath, key) if key else self.keypath, message)

    def has(self, key: str) -> bool:
        return key in self.table

    def keys(self) -> Iterator[str]:
        return iter(self.table)

    def raw(self, key: str, default: Any = _MISSING) -> Any:
        self.seen.add(key)
        if key in self.table:
            return self.table[key]
        if default is _MISSING:
            raise self.error(key, "missing required key")
        return default

    def _typed(self, key: str, default: Any, kinds: tuple[type, ...], what: str) -> Any:
        value = self.raw(key, default)
        if value is default and default is not _MISSING:
            return value
        if isinstance(value, bool) and bool not in kinds:
            raise self.error(key, f"expected {what}, got {type_name(value)}")
        if not isinstance(value, kinds):
            raise self.error(key, f"expected {what}, got {type_name(value)}")
        return value

    def text(self, key: str, default: Any = _MISSING, choices: tuple[str, ...] = ()) -> Any:
        value = self._typed(key, default, (str,), "a string")
        if choices and value not in choices and value is not default:
            raise self.error(key, f"expected one of {', '.join(choices)}, got {value!r}")
        return value

    def boolean(self, key: str, default: Any = _MISSING) -> Any:
        return self._typed(key, default, (bool,), "true or false")

    def integer(
        self, key: str, default: Any = _MISSING, lo: int | None = None, hi: int | None = None
    ) -> Any:
        value = self._typed(key, default, (int,), "an integer")
        if value is default:
            return value
        if (lo is not None and value < lo) or (hi is not None and value > hi):
            raise self.error(key, f"{value} is out of range {lo}..{hi}")
        return value

    def port(self, key: str, default: Any = _MISSING) -> Any:
        return self.integer(key, default, 1, 65535)

    def number(self, key: str, default: Any = _MISSING, lo: float | None = None) -> Any:
        value = self._typed(key, default, (int, float), "a number")
        if value is not default and lo is not None and value < lo:
            raise self.error(key, f"{value} must be at least {lo}")
        return value if value is default else float(value)

    def array(self, key: str, default: Any = _MISSING) -> Any:
        return self._typed(key, default, (list,), "an array")

    def text_list(self, key: str, default: Any = _MISSING) -> Any:
        value = self.array(key, default)
        if value is default:
            return value
        for item in value:
            if not isinstance(item, str):
                raise self.error(key, f"expected an array of strings, found {type_name(item)}")
        return tuple(value)

    def ip(self, key: str, default: Any = _MISSING) -> Any:
        value = self.text(key, default)
        if value is default:
            return value
        try:
            return ipaddress.IPv4Address(value)
        except ValueError:
            raise self.error(key, f"{value!r} is not an IPv4 address") from None

    def interface(self, key: str, default: Any = _MISSING) -> Any:
        """An address with its prefix, like 192.168.1.1/24."""
        value = self.text(key, default)
        if value is default:
            return value
        try:
            iface = ipaddress.IPv4Interface(value)
        except ValueError:
            raise self.error(key, f"{value!r} is not an IPv4 address/prefix") from None
        if "/" not in value:
            raise self.error(key, f"{value!r} needs a prefix length, like 192.168.1.1/24")
        return iface

    def network(self, key: str, default: Any = _MISSING) -> Any:
        value = self.text(key, default)
        if value is default:
            return value
        return self._parse_network(key, value)

    def network_list(self, key: str, default: Any = _MISSING) -> Any:
        value = self.text_list(key, default)
        if value is default:
            return value
        return tuple(self._parse_network(key, v) for v in value)

    def any_network_list(self, key: str, default: Any = _MISSING) -> Any:
        """An array of IPv4 and IPv6 networks (host bits must be zero: a typo, else)."""
        value = self.text_list(key, default)
        if value is default:
            return value
        out: list[ipaddress.IPv4Network | ipaddress.IPv6Network] = []
        for v in value:
            try:
                out.append(ipaddress.ip_network(v))
            except ValueError:
                raise self.error(
                    key, f"{v!r} is not a network like 198.51.100.0/24 or 2001:db8:5::/48"
                ) from None
        return tuple(out)

    def _parse_network(self, key: str, value: str) -> ipaddress.IPv4Network:
        try:
            return ipaddress.IPv4Network(value)
        except ValueError:
            raise self.error(
                key, f"{value!r} is not an IPv4 network like 198.51.100.0/24"
            ) from None

    def filepath(self, key: str, default: Any = _MISSING) -> Any:
        """A path; relative paths (a default's too) are taken from the directory of the file."""
        value = self.text(key, default)
        if value is None or value is _MISSING:
            return value
        p = Path(value)
        return p if p.is_absolute() else (self.file.path.parent / p).resolve()

    def sub(self, key: str) -> Reader:
        """A Reader over a nested table (empty if absent)."""
        self.seen.add(key)
        value = self.table.get(key, {})
        if not isinstance(value, dict):
            raise self.error(key, f"expected a table, got {type_name(value)}")
        return Reader(self.file, (*self.keypath, key), value)

    def tables(self, key: str) -> list[Reader]:
        """Readers over an array of tables (`[[key]]`)."""
        value = self.raw(key, [])
        if not isinstance(value, list) or not all(isinstance(v, dict) for v in value):
            raise self.error(key, "expected an array of tables")
        return [Reader(self.file, (*self.keypath, key, i), v) for i, v in enumerate(value)]

    def finish(self) -> None:
        """Refuse keys that no one read: a typo must not pass silently."""
        for key in self.table:
            if key not in self.seen:
                raise self.error(key, "unknown key")
