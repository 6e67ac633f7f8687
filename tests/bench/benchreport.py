"""One report of every benchmark: where the appliance stands against its peers.

`tests/bench/report` runs the benchmarks (`pytest -m bench tests/bench`), then
gathers the JSON each of them writes to tests/artifacts/bench/<name>.json:

    {"title": str, "notes": str, "rows": [{"metric": str, "unit": str, "ours": float,
      "peer": str, "peer_value": float, "ratio": float, "target": str}]}

and writes tests/artifacts/bench/REPORT.md (one Markdown table) and PNG bar
plots of the ratios (report-ratios.png, report-<name>.png).

A row's `target` is judged when it reads like one of:
    "ratio >= 0.8", ">= 0.8x", "≥ 0.8×"               the ratio against the peer
    "< 100 ms", "<= 2 s", ">= 5,000 leases/s"          our own value, in the row's unit
                                                       (ms/s/us convert into each other)
    "ours > 200000"                                    our own value
    ">= 0.5", "> 200,000"                              a bare number: whichever of the
                                                       ratio and our value it is the size
                                                       of; the table says which it took
A target with a number in another form is counted as "not judged" (met? = "?");
words without a number ("lower is better", "-") are no target (met? = "—").
Prefer the explicit forms.

A ratio is ours / peer.  Whether higher is better is the row's `better` ("higher"
or "lower") where it has one, else what its target says ("< 10 ms", "lower is
better"), else its unit (times and sizes: lower).  The plots draw every ratio so
that right of parity is better: a lower-is-better ratio is drawn as peer / ours.

Options: --only NAME (run `-k NAME` and report the artifacts whose name or title
contains NAME), --no-run (only gather what is there), --artifacts DIR, --no-plots.
Exit status 0 when the report is written, every benchmark ran and every artifact
could be read; 1 otherwise (the report is still written and says what went wrong).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import json
import math
import os
import platform
import re
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
ARTIFACTS = ROOT / "tests" / "artifacts" / "bench"
REPORT = "REPORT.md"
PLOT_PREFIX = "report-"
NOISE = (
    "Figures come from a small machine (few cores, shared with other work while it ran): "
    "absolute numbers are noisy and only indicative. Each ratio compares us with a peer "
    "measured in the same run on the same machine, which is the figure to read."
)

_TIME_UNITS = {"s": 1.0, "ms": 1e-3, "us": 1e-6, "µs": 1e-6, "ns": 1e-9}
_OPS = {">=": ">=", "≥": ">=", "<=": "<=", "≤": "<=", ">": ">", "<": "<", "=": "=", "==": "="}
_TARGET = re.compile(
    r"^\s*(?P<subject>ratio|ours)?\s*(?P<op>>=|<=|==|≥|≤|>|<|=)\s*"
    r"(?P<value>(?:[0-9][0-9,_]*(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][-+]?[0-9]+)?)\s*(?P<unit>\S+)?\s*$",
    re.IGNORECASE,
)


class BadArtifact(Exception):
    pass


@dataclass(frozen=True)
class Row:
    metric: str
    unit: str
    ours: float | None
    peer: str
    peer_value: float | None
    ratio: float | None
    target: str
    better: str = ""  # "higher" | "lower" | "" (inferred: see higher_is_better)


@dataclass(frozen=True)
class Bench:
    name: str  # the artifact's file name without .json
    title: str
    rows: tuple[Row, ...]
    notes: str
    mtime: float
    stale: bool = False


@dataclass
class Gathered:
    benches: list[Bench] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)


def _number(row: dict[str, object], key: str, name: str, required: bool) -> float | None:
    v = row.get(key)
    if v is None and not required:
        return None
    if isinstance(v, bool) or not isinstance(v, int | float):
        raise BadArtifact(f"{name}: {key} must be a number, not {v!r}")
    return float(v)


def load(path: Path) -> Bench:
    """One artifact, checked against the format above."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise BadArtifact(f"{path.name}: not readable JSON ({exc})") from None
    if not isinstance(data, dict) or not isinstance(data.get("rows"), list):
        raise BadArtifact(f"{path.name}: expected an object with a list of rows")
    rows = []
    for i, raw in enumerate(data["rows"]):
        where = f"{path.name}: rows[{i}]"
        if not isinstance(raw, dict):
            raise BadArtifact(f"{where}: not an object")
        metric = raw.get("metric")
        if not isinstance(metric, str) or not metric:
            raise BadArtifact(f"{where}: metric missing")
        rows.append(
            Row(
                metric=metric,
                unit=str(raw.get("unit") or ""),
                ours=_number(raw, "ours", where, required=True),
                peer=str(raw.get("peer") or ""),
                peer_value=_number(raw, "peer_value", where, required=False),
                ratio=_number(raw, "ratio", where, required=False),
                target=str(raw.get("target") or ""),
                better=str(raw.get("better") or ""),
            )
        )
        if rows[-1].better not in ("", "higher", "lower"):
            raise BadArtifact(f"{where}: better must be 'higher' or 'lower'")
    return Bench(
        name=path.stem,
        title=str(data.get("title") or path.stem),
        rows=tuple(rows),
        notes=str(data.get("notes") or ""),
        mtime=path.stat().st_mtime,
    )


def gather(directory: Path, only: str | None = None, since: float | None = None) -> Gathered:
    """Every artifact in `directory`; `since`: files older than that are marked stale."""
    out = Gathered()
    for path in sorted(directory.glob("*.json")) if directory.is_dir() else []:
        try:
            bench = load(path)
        except BadArtifact as exc:
            out.problems.append(str(exc))
            continue
        if only and only.lower() not in f"{bench.name} {bench.title}".lower():
            continue
        if since is not None and bench.mtime < since:
            bench = dataclasses.replace(bench, stale=True)
            out.problems.append(
                f"{path.name} is from an earlier run "
                f"({_when(bench.mtime)}): its benchmark did not write it this time"
            )
        out.benches.append(bench)
    return out


def _compare(a: float, op: str, b: float) -> bool:
    return {
        ">=": a >= b,
        "<=": a <= b,
        ">": a > b,
        "<": a < b,
        "=": math.isclose(a, b, rel_tol=1e-9),
    }[op]


def ratio_of(row: Row) -> float | None:
    """The row's ratio, or None when there is no peer figure to compare with."""
    if row.ratio is None or math.isnan(row.ratio) or (row.ratio == 0 and not row.peer_value):
        return None
    return row.ratio


def has_target(target: str) -> bool:
    """Targets are thresholds; a text without a number ("lower is better", "-") is not one."""
    return any(c.isdigit() for c in target)


@dataclass(frozen=True)
class Target:
    subject: str  # "ratio" or "ours"
    op: str
    value: float  # in the row's unit when the subject is "ours"
    guessed: bool  # a bare number: read as whichever of ratio and ours it is closer to


def _closer(value: float, row: Row) -> str:
    """For a bare number: the subject of the same order of magnitude (0.5 is a ratio,
    200,000 queries/s is our rate)."""
    ratio = ratio_of(row)
    if ratio is None or value <= 0:
        return "ours" if ratio is None else "ratio"
    if row.ours is None or row.ours <= 0 or ratio <= 0:
        return "ratio"
    d_ratio = abs(math.log10(value) - math.log10(ratio))
    d_ours = abs(math.log10(value) - math.log10(row.ours))
    return "ratio" if d_ratio <= d_ours else "ours"


def parse_target(row: Row) -> Target | None:
    """How the row's target reads, or None if it cannot be judged."""
    m = _TARGET.match(row.target)
    if not m:
        return None
    op = _OPS[m.group("op")]
    value = float(m.group("value").replace(",", "").replace("_", ""))
    unit = m.group("unit") or ""
    subject = (m.group("subject") or "").lower()
    if unit in ("x", "×"):
        return Target("ratio", op, value, False) if subject in ("", "ratio") else None
    if not unit:
        if subject:
            return Target(subject, op, value, False)
        return Target(_closer(value, row), op, value, True)
    if subject == "ratio":
        return None
    if unit == row.unit:
        return Target("ours", op, value, False)
    if unit in _TIME_UNITS and row.unit in _TIME_UNITS:
        return Target("ours", op, value * _TIME_UNITS[unit] / _TIME_UNITS[row.unit], False)
    return None


def judge(row: Row) -> bool | None:
    """Whether the row meets its target; None when it cannot be told."""
    target = parse_target(row)
    if target is None:
        return None
    actual = ratio_of(row) if target.subject == "ratio" else row.ours
    if actual is None:
        return None
    return _compare(actual, target.op, target.value)


_SIZE_UNITS = {"b", "bytes", "kib", "mib", "gib", "kb", "mb", "gb"}


def higher_is_better(row: Row) -> bool:
    """Whether a larger ratio (ours / peer) is the better one for this row."""
    if row.better:
        return row.better == "higher"
    target = parse_target(row)
    if target is not None:
        return target.op in (">=", ">", "=")
    if "lower is better" in row.target.lower():
        return False
    if "higher is better" in row.target.lower():
        return True
    unit = row.unit.split("/")[0].strip().lower()
    return not (unit in _TIME_UNITS or unit in _SIZE_UNITS or row.unit.lower() in _SIZE_UNITS)


@dataclass(frozen=True)
class Bar:
    """One bar of a plot: right of 1 is better, whatever the row measures."""

    label: str  # benchmark, metric and the peer it is measured against
    goodness: float  # the ratio, or its inverse where lower is better
    ratio: float  # as the table shows it (ours / peer)
    inverted: bool
    target: float | None  # the ratio target, on the same scale as goodness
    ok: bool | None


def bars(rows: Sequence[tuple[str, Row]]) -> list[Bar]:
    """The bars for (label prefix, row) pairs that have a ratio."""
    out = []
    for prefix, r in rows:
        ratio = ratio_of(r)
        if ratio is None or ratio <= 0:
            continue
        up = higher_is_better(r)
        t = parse_target(r)
        target = t.value if t and t.subject == "ratio" and t.value > 0 else None
        if target is not None and not up:
            target = 1.0 / target
        label = _short(f"{prefix}{r.metric} vs {r.peer}" + ("" if up else " (peer/ours)"), 70)
        out.append(Bar(label, ratio if up else 1.0 / ratio, ratio, not up, target, judge(r)))
    return out


def fmt(v: float | None, unit: str = "") -> str:
    if v is None or math.isnan(v):
        return "—"
    if v != 0 and abs(v) >= 1000:
        s = f"{v:,.0f}"
    elif v != 0 and abs(v) >= 10:
        s = f"{v:.1f}"
    else:
        s = f"{v:.3g}"
    return f"{s} {unit}".strip()


def fmt_ratio(v: float | None) -> str:
    if v is None or math.isnan(v):
        return "—"
    return f"{v:,.0f}" if abs(v) >= 100 else f"{v:.2f}"


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ") or "—"


def _when(t: float) -> str:
    return dt.datetime.fromtimestamp(t, dt.UTC).strftime("%Y-%m-%d %H:%M UTC")


def _met(ok: bool | None, target: str) -> str:
    if not has_target(target):
        return "—"
    return "?" if ok is None else ("yes" if ok else "**no**")


def machine() -> str:
    cpu = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"Linux {platform.release()}, {os.cpu_count()} CPUs" + (f" ({cpu})" if cpu else "")


def render(gathered: Gathered, plots: Sequence[str], run_note: str, now: float) -> str:
    """REPORT.md: one table of every row, then the plots, the notes and any problems."""
    lines = [
        "# Benchmark report",
        "",
        f"Generated {_when(now)} on {machine()}. {run_note}",
        "",
        NOISE,
        "",
        "| benchmark | metric | ours | peer | peer value | ratio | target | met? |",
        "|---|---|---:|---|---:|---:|---|---|",
    ]
    judged = met = unjudged = 0
    for b in gathered.benches:
        title = b.title + (" (stale)" if b.stale else "")
        for r in b.rows:
            ok = judge(r)
            target = parse_target(r)
            shown = r.target + (f" ({target.subject})" if target and target.guessed else "")
            if has_target(r.target):
                if ok is None:
                    unjudged += 1
                else:
                    judged += 1
                    met += ok
            cells = [
                title,
                r.metric,
                fmt(r.ours, r.unit),
                r.peer,
                fmt(r.peer_value if r.peer_value or ratio_of(r) else None, r.unit),
                fmt_ratio(ratio_of(r)),
                shown,
                _met(ok, r.target),
            ]
            lines.append("| " + " | ".join(_cell(c) for c in cells) + " |")
    if not gathered.benches:
        lines.append("| (no benchmark results) | | | | | | | |")
    tail = f" ({unjudged} not judged)." if unjudged else "."
    lines += ["", f"Targets met: {met} of {judged}{tail}"]
    if plots:
        lines += ["", "## Ratios against the peers", ""]
        lines += [f"![{p}]({p})" for p in plots]
    noted = [b for b in gathered.benches if b.notes]
    if noted:
        lines += ["", "## Notes", ""]
        for b in noted:
            lines.append(f"- **{b.title}** (`{b.name}.json`, {_when(b.mtime)}): {b.notes}")
    if gathered.problems:
        lines += ["", "## Problems", ""]
        lines += [f"- {p}" for p in gathered.problems]
    return "\n".join(lines).rstrip() + "\n"


def _colour(ok: bool | None) -> str:
    return {True: "#2e7d32", False: "#c62828", None: "#9e9e9e"}[ok]


def _short(text: str, n: int = 60) -> str:
    return text if len(text) <= n else text[: n - 1] + "…"


def plot(gathered: Gathered, outdir: Path) -> list[str]:
    """Bars from parity (1) on a log scale, right is better: one overview, one per benchmark."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    for old in outdir.glob(f"{PLOT_PREFIX}*.png"):
        old.unlink()

    def draw(items: list[Bar], title: str, path: Path) -> None:
        fig, ax = plt.subplots(figsize=(10, 1.4 + 0.4 * len(items)))
        values = [b.goodness for b in items]
        ys = range(len(items))
        ax.barh(
            ys,
            [x - 1.0 for x in values],
            left=1.0,
            color=[_colour(b.ok) for b in items],
            height=0.6,
        )
        ax.set_xscale("log")
        ax.axvline(1.0, color="black", linewidth=0.8, linestyle="--")
        marks = list(values)
        for y, b in enumerate(items):
            if b.target is not None:
                ax.plot([b.target] * 2, [y - 0.4, y + 0.4], color="black", linewidth=2)
                marks.append(b.target)
            ax.text(b.goodness, y, f" {fmt_ratio(b.goodness)} ", va="center", fontsize=8,
                    ha="left" if b.goodness >= 1 else "right")  # fmt: skip
        lo, hi = min([*marks, 1.0]), max([*marks, 1.0])
        ax.set_xlim(lo / 3, hi * 3)
        ax.set_yticks(list(ys), [b.label for b in items], fontsize=8)
        ax.invert_yaxis()
        ax.set_xlabel(
            "better than the peer to the right of the dashed line (log scale): ours/peer where "
            "higher is better, peer/ours where lower is\nblack tick: target; green: met, red: "
            "missed, grey: no target",
            fontsize=8,
        )
        ax.set_title(title, fontsize=10)
        fig.tight_layout()
        fig.savefig(path, dpi=100)
        plt.close(fig)

    written = []
    everything: list[Bar] = []
    for bench in gathered.benches:
        items = bars([("", r) for r in bench.rows])
        if not items:
            continue
        everything += bars([(f"{bench.name}: ", r) for r in bench.rows])
        name = f"{PLOT_PREFIX}{re.sub(r'[^A-Za-z0-9_.-]', '_', bench.name)}.png"
        draw(items, _short(bench.title, 90), outdir / name)
        written.append(name)
    if everything:
        overview = f"{PLOT_PREFIX}ratios.png"
        draw(everything, "The appliance against its peers (right is better)", outdir / overview)
        written.insert(0, overview)
    return written


def run_benchmarks(only: str | None) -> int:
    argv = [sys.executable, "-m", "pytest", "-m", "bench", "tests/bench"]
    if only:
        argv += ["-k", only]
    print("report: " + " ".join(argv[2:]), flush=True)
    return subprocess.run(argv, cwd=ROOT, check=False).returncode


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="tests/bench/report", description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", metavar="NAME", help="run and report only this benchmark")
    ap.add_argument("--no-run", action="store_true", help="only gather the JSON already there")
    ap.add_argument("--artifacts", type=Path, default=ARTIFACTS, help="where the JSON files are")
    ap.add_argument("--no-plots", action="store_true", help="only the Markdown table")
    args = ap.parse_args(argv)
    outdir: Path = args.artifacts
    started = time.time()
    ok = True
    if args.no_run:
        run_note = "Gathered only (`--no-run`): results of earlier runs."
        since = None
    else:
        # a file system's timestamps can lag the clock a little; a whole second is plenty
        started -= 1.0
        rc = run_benchmarks(args.only)
        # 5: nothing collected (no benchmark matched); not a failure of the benchmarks
        ok = rc in (0, 5)
        k = f" -k {args.only}" if args.only else ""
        run_note = f"`pytest -m bench tests/bench{k}` exited with {rc}" + (
            "." if ok else " (some benchmarks failed: see its output)."
        )
        since = started
    gathered = gather(outdir, only=args.only, since=since)
    outdir.mkdir(parents=True, exist_ok=True)
    plots = [] if args.no_plots else plot(gathered, outdir)
    report = outdir / REPORT
    report.write_text(render(gathered, plots, run_note, time.time()))
    n_rows = sum(len(b.rows) for b in gathered.benches)
    print(f"report: {len(gathered.benches)} benchmarks, {n_rows} rows -> {report}")
    for p in gathered.problems:
        print(f"report: problem: {p}", file=sys.stderr)
    if not gathered.benches:
        print("report: no benchmark results found", file=sys.stderr)
        ok = False
    return 0 if ok and not gathered.problems else 1


if __name__ == "__main__":
    raise SystemExit(main())
