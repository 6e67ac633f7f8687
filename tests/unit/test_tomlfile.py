"""The TOML layer under hostile text: long lines, deep nesting, odd characters written back."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import tomllib
from pathlib import Path

import pytest

from appliance.core import tomledit
from appliance.core.tomlfile import ConfigError, TomlFile

pytestmark = pytest.mark.unit
ROOT = Path(__file__).resolve().parents[2]
LONG = 200_000  # a quadratic scan of one such line is 2e10 steps: minutes, not milliseconds


@pytest.mark.parametrize(
    "line",
    [
        # a multi-line array whose element lines look like a header or a key to the indexer
        "  [1," + " " * LONG + "2],",
        "  true" + " " * LONG + ",",
        "  [" + " " * LONG + "[3]],",
    ],
    ids=["array-in-array", "value-then-spaces", "spaces-in-brackets"],
)
def test_a_long_line_is_read_in_linear_time(tmp_path: Path, line: str) -> None:
    text = f"[t]\nk = [\n{line}\n]\nafter = 1\n"
    tomllib.loads(text)  # valid TOML: only our own scan of it could be slow
    path = tmp_path / "long.toml"
    path.write_text(text)
    # in a child process, so that a slow scan is cut off instead of hanging the suite
    probe = textwrap.dedent(
        f"""
        import sys, time
        from appliance.core.tomlfile import TomlFile
        t = time.perf_counter()
        doc = TomlFile.load({str(path)!r})
        print(time.perf_counter() - t, doc.line_of(("t", "after")))
        """
    )
    try:
        out = subprocess.run(
            [sys.executable, "-c", probe], capture_output=True, text=True, timeout=20, check=True
        ).stdout.split()
    except subprocess.TimeoutExpired:
        pytest.fail(f"reading one {len(line)}-character line took more than 20 s")
    seconds, line_no = float(out[0]), out[1]
    assert seconds < 2.0, seconds
    assert line_no == "5"  # and the index still names the right line after it


def test_keys_and_headers_are_still_indexed() -> None:
    doc = TomlFile.parse(
        '[ a . "b c" ]  # note\nk   = 1\n"quoted key" = 2\nx.y\t= 3\n'
        "[[arr]]\nz = 4\n[[arr]]\nz = 5\n"
    )
    assert doc.line_of(("a", "b c", "k")) == 2
    assert doc.line_of(("a", "b c", "quoted key")) == 3
    assert doc.line_of(("a", "b c", "x", "y")) == 4
    assert doc.line_of(("arr", 1, "z")) == 8


@pytest.mark.parametrize("opening", ["[", "{a = "])
def test_deep_nesting_is_a_config_error_naming_file_and_line(tmp_path: Path, opening: str) -> None:
    depth = 5000
    closing = "]" if opening == "[" else "}"
    path = tmp_path / "deep.toml"
    path.write_text(f'ok = 1\ns = "[[[[{{{{"  # [[[[\nk = {opening * depth}1{closing * depth}\n')
    with pytest.raises(ConfigError) as err:
        TomlFile.load(path)
    e = err.value
    assert e.file == str(path) and e.line == 3
    assert "nested too deeply" in e.reason and str(path) in str(e)


@pytest.mark.parametrize(
    "value",
    [
        "del\x7fhere",
        "\x7f",
        'tab\tnewline\nquote"backslash\\nul\x00esc\x1b',
        "unicode é ß 😀 \u0085 \u2028",
    ],
)
def test_written_strings_are_valid_toml_and_read_back(value: str) -> None:
    text = tomledit.updated("", {value: value, "list": [value, "x"], "t": {"k " + value: {"v": 1}}})
    doc = tomllib.loads(text)  # raises on a raw DEL or any other character TOML forbids
    assert doc[value] == value and doc["list"] == [value, "x"]
    assert doc["t"] == {"k " + value: {"v": 1}}
    assert TomlFile.parse(text).data == doc
