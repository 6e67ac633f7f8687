"""tests/bench/report on sample artifacts: the table, the verdicts, the plots, the problems."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from types import ModuleType

import pytest

pytestmark = pytest.mark.unit

BENCH = Path(__file__).resolve().parents[1] / "bench"


def _module() -> ModuleType:
    spec = importlib.util.spec_from_file_location("benchreport", BENCH / "benchreport.py")
    assert spec and spec.loader
    mod = importlib.util.module_from_spec(spec)
    sys.modules["benchreport"] = mod
    spec.loader.exec_module(mod)
    return mod


br = _module()

DHCP = {
    "title": "DHCP vs dnsmasq and Kea",
    "rows": [
        {"metric": "DORA/s", "unit": "leases/s", "ours": 812.4, "peer": "dnsmasq",
         "peer_value": 1020.0, "ratio": 0.796, "target": "ratio >= 0.5"},
        {"metric": "DORA/s", "unit": "leases/s", "ours": 812.4, "peer": "Kea",
         "peer_value": 640.0, "ratio": 1.27, "target": ">= 1.5x"},
        {"metric": "p99 DORA", "unit": "ms", "ours": 4.2, "peer": "dnsmasq",
         "peer_value": 2.1, "ratio": 2.0, "target": "< 10 ms"},
    ],
    "notes": "100 clients; noisy",
}  # fmt: skip
PORTAL = {
    "title": "Portal API",
    "rows": [
        {"metric": "GET /api/captive", "unit": "req/s", "ours": 2300, "peer": "nginx",
         "peer_value": 9000, "ratio": 0.26, "target": "within 10% of nginx"},
        {"metric": "p99", "unit": "ms", "ours": 12.0, "peer": "nginx",
         "peer_value": 3.0, "ratio": 4.0, "target": "lower is better"},
        {"metric": "logins/s", "unit": "1/s", "ours": 1.25, "peer": "—",
         "peer_value": 0, "ratio": 0, "target": "-"},
    ],
    "notes": "",
}  # fmt: skip
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def write(d: Path, name: str, data: object) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    p = d / f"{name}.json"
    p.write_text(json.dumps(data))
    return p


def table_rows(report: str) -> list[list[str]]:
    rows = [line for line in report.splitlines() if line.startswith("| ")]
    return [[c.strip() for c in line.strip("|").split(" | ")] for line in rows[1:]]


def test_report_on_sample_artifacts_has_one_table_and_plots(tmp_path: Path) -> None:
    write(tmp_path, "dhcp", DHCP)
    write(tmp_path, "portal", PORTAL)
    assert br.main(["--no-run", "--artifacts", str(tmp_path)]) == 0
    report = (tmp_path / "REPORT.md").read_text()
    assert "| benchmark | metric | ours | peer | peer value | ratio | target | met? |" in report
    rows = table_rows(report)
    assert rows[0] == [
        "DHCP vs dnsmasq and Kea", "DORA/s", "812.4 leases/s", "dnsmasq", "1,020 leases/s",
        "0.80", "ratio >= 0.5", "yes",
    ]  # fmt: skip
    assert rows[1][-3:] == ["1.27", ">= 1.5x", "**no**"]
    assert rows[2][-3:] == ["2.00", "< 10 ms", "yes"]
    assert rows[3][0] == "Portal API" and rows[3][-1] == "?"
    # words are no target; a row without a peer has no ratio
    assert rows[4][-2:] == ["lower is better", "—"]
    assert rows[5][3:] == ["—", "—", "—", "-", "—"]
    assert len(rows) == 6
    assert "Targets met: 2 of 3 (1 not judged)." in report
    assert "100 clients; noisy" in report
    assert "noisy" in report.split("|")[0]  # the caveat comes before the table
    for png in ("report-ratios.png", "report-dhcp.png", "report-portal.png"):
        assert (tmp_path / png).read_bytes()[:8] == PNG_MAGIC
        assert f"![{png}]({png})" in report


def test_a_broken_artifact_is_reported_and_fails_the_run(tmp_path: Path) -> None:
    write(tmp_path, "dhcp", DHCP)
    write(tmp_path, "broken", {"title": "x", "rows": [{"metric": "m", "ours": "fast"}]})
    (tmp_path / "truncated.json").write_text('{"title": "t", "rows": [')
    assert br.main(["--no-run", "--no-plots", "--artifacts", str(tmp_path)]) == 1
    report = (tmp_path / "REPORT.md").read_text()
    problems = report.split("## Problems", 1)[1]
    assert "broken.json: rows[0]: ours must be a number" in problems
    assert "truncated.json: not readable JSON" in problems
    assert len(table_rows(report)) == 3  # the good file is still reported


def test_no_artifacts_at_all_fails_but_writes_a_report(tmp_path: Path) -> None:
    assert br.main(["--no-run", "--no-plots", "--artifacts", str(tmp_path / "none")]) == 1
    assert "(no benchmark results)" in (tmp_path / "none" / "REPORT.md").read_text()


def test_only_reports_the_named_benchmark(tmp_path: Path) -> None:
    write(tmp_path, "dhcp", DHCP)
    write(tmp_path, "portal", PORTAL)
    assert br.main(["--no-run", "--only", "portal", "--artifacts", str(tmp_path)]) == 0
    rows = table_rows((tmp_path / "REPORT.md").read_text())
    assert {r[0] for r in rows} == {"Portal API"}
    assert not (tmp_path / "report-dhcp.png").exists()


def test_a_run_marks_artifacts_it_did_not_rewrite_as_stale(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    old = write(tmp_path, "portal", PORTAL)
    os.utime(old, (time.time() - 3600, time.time() - 3600))
    calls: list[str | None] = []

    def fake_run(only: str | None) -> int:
        calls.append(only)
        write(tmp_path, "dhcp", DHCP)  # this benchmark ran; the portal one did not
        return 0

    monkeypatch.setattr(br, "run_benchmarks", fake_run)
    assert br.main(["--no-plots", "--artifacts", str(tmp_path)]) == 1
    assert calls == [None]
    report = (tmp_path / "REPORT.md").read_text()
    titles = {r[0] for r in table_rows(report)}
    assert titles == {"DHCP vs dnsmasq and Kea", "Portal API (stale)"}
    assert "portal.json is from an earlier run" in report
    assert "exited with 0" in report


def test_failed_benchmarks_fail_the_report(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def fake_run(only: str | None) -> int:
        write(tmp_path, "dhcp", DHCP)
        return 1

    monkeypatch.setattr(br, "run_benchmarks", fake_run)
    assert br.main(["--no-plots", "--artifacts", str(tmp_path)]) == 1
    assert "some benchmarks failed" in (tmp_path / "REPORT.md").read_text()


@pytest.mark.parametrize(
    ("target", "unit", "ours", "ratio", "met"),
    [
        ("ratio >= 0.8", "req/s", 1.0, 0.85, True),
        (">= 0.8x", "req/s", 1.0, 0.75, False),
        ("≥ 0.8×", "req/s", 1.0, 0.8, True),
        ("> 1", "req/s", 1.0, 1.0, False),
        # a bare number is whichever of ratio and our value it is the size of
        (">= 0.5", "queries/s", 72880.0, 1.58, True),
        ("> 200,000", "1/s", 337791.0, 6304.6, True),
        ("> 200,000", "1/s", 150000.0, 6304.6, False),
        ("lower is better", "ms", 1.0, 0.7, None),
        ("< 100 ms", "ms", 99.0, 9.0, True),
        ("< 100 ms", "s", 0.2, 9.0, False),  # 200 ms
        ("<= 500 us", "ms", 0.4, 9.0, True),
        (">= 5000 leases/s", "leases/s", 4000.0, 1.0, False),
        ("< 100 ms", "req/s", 1.0, 1.0, None),  # units that do not compare
        ("within 10% of dnsmasq", "req/s", 1.0, 1.0, None),
        ("ratio >= 0.8", "req/s", 1.0, None, None),
    ],
)
def test_targets_are_judged_against_the_ratio_or_our_value(
    target: str, unit: str, ours: float, ratio: float | None, met: bool | None
) -> None:
    row = br.Row(
        metric="m", unit=unit, ours=ours, peer="p", peer_value=1.0, ratio=ratio, target=target
    )
    assert br.judge(row) is met


def test_the_report_script_runs_from_any_python(tmp_path: Path) -> None:
    write(tmp_path, "dhcp", DHCP)
    r = subprocess.run(
        [
            "/usr/bin/env",
            "python3",
            str(BENCH / "report"),
            "--no-run",
            "--artifacts",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, r.stderr
    assert "1 benchmarks, 3 rows" in r.stdout
    assert (tmp_path / "REPORT.md").exists()
    assert os.access(BENCH / "report", os.X_OK)


def test_every_bar_names_its_peer_and_right_is_better(tmp_path: Path) -> None:
    """Two rows of one metric against two peers get two labels; a latency ratio of 2.0
    (ours twice the peer's, worse) is drawn left of parity, at 0.5."""
    dhcp = br.load(write(tmp_path, "dhcp", DHCP))
    portal = br.load(write(tmp_path, "portal", PORTAL))
    items = br.bars([(f"{b.name}: ", r) for b in (dhcp, portal) for r in b.rows])
    labels = [b.label for b in items]
    assert len(labels) == len(set(labels)) == 5
    assert "dhcp: DORA/s vs dnsmasq" in labels and "dhcp: DORA/s vs Kea" in labels
    by = {b.label: b for b in items}
    assert by["dhcp: DORA/s vs Kea"].goodness == pytest.approx(1.27)
    assert by["dhcp: DORA/s vs Kea"].target == pytest.approx(1.5)
    p99 = by["dhcp: p99 DORA vs dnsmasq (peer/ours)"]
    assert p99.inverted and p99.goodness == pytest.approx(0.5) and p99.ratio == 2.0
    assert by["portal: p99 vs nginx (peer/ours)"].goodness == pytest.approx(0.25)
    # an explicit direction wins over the unit
    row = br.Row("fds", "count", 10, "haproxy", 20, 0.5, "", better="lower")
    assert br.bars([("", row)])[0].goodness == pytest.approx(2.0)
    # a target of a lower-is-better ratio is drawn on the same side
    row = br.Row("ttfb", "ms", 1, "haproxy", 2, 0.5, "ratio <= 0.8")
    bar = br.bars([("", row)])[0]
    assert bar.goodness == pytest.approx(2.0) and bar.target == pytest.approx(1.25)
