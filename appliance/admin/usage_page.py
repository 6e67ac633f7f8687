"""What the admin's usage page shows: each user's totals per service for a period, a
small bar plot of bytes per day (server-side SVG: the pages run no script, and the
CSP allows none), and the CSV export of the same period.

The plot is geometry only (rectangles and their titles); the template draws it, so
Jinja's autoescape covers every text in it, as on the other pages.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import date, timedelta
from typing import Any

from appliance.state import usage
from appliance.state.connection import Connection

PERIODS = {"1": "today", "7": "7 days", "30": "30 days"}
DEFAULT_PERIOD = "7"
PLOT_W, PLOT_H = 210, 48
MIN_PLOT_DAYS = 7  # "today" still shows the week before it, else the plot is one bar


@dataclass(frozen=True)
class Bar:
    x: float
    y: float
    w: float
    h: float
    title: str


@dataclass(frozen=True)
class UserUsage:
    user: str
    services: list[usage.Usage]
    total: int  # bytes both ways, all services
    bars: list[Bar]
    peak: int  # the tallest bar's bytes (the plot's scale)


def period_days(asked: str | None) -> str:
    """The period asked for, or the default one (an unknown value is not an error)."""
    return asked if asked in PERIODS else DEFAULT_PERIOD


def human_bytes(n: int) -> str:
    """1536 -> "1.5 KiB": what an admin reads; the exact count is in the cell's title."""
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{int(value)} B" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def days_of(first: str, last: str) -> list[str]:
    """Every day from first to last (inclusive), as the tables name them."""
    start, end = date.fromisoformat(first), date.fromisoformat(last)
    return [(start + timedelta(days=i)).isoformat() for i in range((end - start).days + 1)]


def bars(series: list[tuple[str, int, int]], days: list[str]) -> tuple[list[Bar], int]:
    """One bar per day of `days` (bytes both ways), scaled to the day with the most."""
    by_day = {d: up + down for d, up, down in series}
    peak = max(by_day.values(), default=0)
    step = PLOT_W / max(1, len(days))
    out = []
    for i, day in enumerate(days):
        n = by_day.get(day, 0)
        h = 0.0 if peak == 0 else max(1.0 if n else 0.0, (PLOT_H - 2) * n / peak)
        out.append(
            Bar(
                round(i * step + 1, 1),
                round(PLOT_H - h, 1),
                round(max(1.0, step - 2), 1),
                round(h, 1),
                f"{day}: {human_bytes(n)}",
            )
        )
    return out, peak


def page_data(conn: Connection, period: str, now: float | None = None) -> dict[str, Any]:
    """The template's values for a period ("1", "7" or "30" days ending today)."""
    first, last = usage.days_back(int(period), now)
    plot_first = usage.days_back(max(int(period), MIN_PLOT_DAYS), now)[0]
    days = days_of(plot_first, last)
    per_user: dict[str, list[usage.Usage]] = {}
    for u in usage.by_user_service(conn, first, last):
        per_user.setdefault(u.user, []).append(u)
    users = []
    for user, services in per_user.items():
        series_bars, peak = bars(usage.daily(conn, user, plot_first, last), days)
        users.append(UserUsage(user, services, sum(s.bytes for s in services), series_bars, peak))
    return {
        "users": users,
        "period": period,
        "periods": PERIODS,
        "first": first,
        "last": last,
        "plot_first": plot_first,
        "plot_w": PLOT_W,
        "plot_h": PLOT_H,
    }


def _cell(value: object) -> object:
    """A text cell a spreadsheet would run as a formula gets a leading quote (user names
    come from guests' agents: "=HYPERLINK(...)" must stay text)."""
    if isinstance(value, str) and value[:1] in ("=", "+", "-", "@", "\t", "\r"):
        return "'" + value
    return value


def csv_text(rows: Iterable[tuple[object, ...]]) -> str:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\r\n")
    for row in rows:
        writer.writerow([_cell(v) for v in row])
    return out.getvalue()


__all__ = ["PERIODS", "csv_text", "human_bytes", "page_data", "period_days"]
