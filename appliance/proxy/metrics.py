"""The relay's Prometheus metrics, over all its worker processes.

Each worker's `Relay` keeps its counters in plain dicts (one increment per finished
connection).  Once a second every worker writes `Relay.snapshot()` to its own file
in `<state.directory>/run/proxy-metrics/`, and the role's metrics endpoint (in the
parent when there are several workers) sums the files at scrape time.  Why files
and not prometheus-client's multiprocess mode: that mode needs a client-library
counter call per event on the connection path, which is what the issue's budget
(under 5% of the connection rate) rules out; a worker's file costs one small write
a second whatever the load.  Numbers are at most a second behind.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from prometheus_client.core import Metric

from appliance.core.metrics import counter, one_gauge

log = logging.getLogger("appliance.proxy")
SNAPSHOT_EVERY = 1.0


def snapshot_dir(config: Any) -> Path:
    return Path(config.state.directory) / "run" / "proxy-metrics"


def clear(directory: Path) -> None:
    """Before the workers start: a previous run's files would count twice."""
    directory.mkdir(parents=True, exist_ok=True)
    for old in directory.glob("worker-*.json"):
        old.unlink(missing_ok=True)


def write_snapshot(path: Path, doc: dict[str, Any]) -> None:
    """Replace the file (no fsync: these are a second old at most, and lost with a crash)."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(doc))
    os.replace(tmp, path)


async def keep_writing(path: Path, snapshot: Callable[[], dict[str, Any]]) -> None:
    """A worker's task: its snapshot every SNAPSHOT_EVERY seconds (and once at the end)."""
    try:
        while True:
            write_snapshot(path, snapshot())
            await asyncio.sleep(SNAPSHOT_EVERY)
    finally:
        with contextlib.suppress(OSError):
            write_snapshot(path, snapshot())


def read_snapshots(directory: Path) -> list[dict[str, Any]]:
    out = []
    for path in sorted(directory.glob("worker-*.json")):
        try:
            out.append(json.loads(path.read_text()))
        except (OSError, ValueError):  # replaced meanwhile: the next scrape has it
            continue
    return out


def families(docs: list[dict[str, Any]]) -> Iterator[Metric]:
    """The relay's metric families, summed over the workers' snapshots."""
    conns: Counter[tuple[str, ...]] = Counter()
    refusals: Counter[tuple[str, ...]] = Counter()
    moved: Counter[tuple[str, ...]] = Counter()
    failures: Counter[tuple[str, ...]] = Counter()
    mails: Counter[tuple[str, ...]] = Counter()
    open_now = 0
    for doc in docs:
        for service, result, n in doc.get("connections", []):
            conns[(service, result)] += n
            if result.startswith("refused-"):
                refusals[(service, result.removeprefix("refused-"))] += n
        for service, direction, n in doc.get("bytes", []):
            moved[(service, direction)] += n
        for service, n in doc.get("upstream_failures", {}).items():
            failures[(service,)] += n
        for service, n in doc.get("messages", {}).items():
            mails[(service,)] += n
        open_now += doc.get("open", 0)
    yield counter(
        "proxy_connections",
        "Relayed connections by service and result, counted when they end.",
        ("service", "result"),
        conns,
    )
    yield counter(
        "proxy_refusals",
        "Connections refused by the gate, by service and reason.",
        ("service", "reason"),
        refusals,
    )
    yield counter(
        "proxy_bytes",
        "Bytes relayed by service; up is guest to server, down server to guest.",
        ("service", "direction"),
        moved,
    )
    yield counter(
        "proxy_upstream_failures",
        "Upstreams that could not be reached, by service.",
        ("service",),
        failures,
    )
    yield counter(
        "proxy_smtp_messages",
        "Mails the SMTP servers accepted through the relay, by service (counted with "
        "[proxy] accounting on, where the dialog is plaintext: not after STARTTLS).",
        ("service",),
        mails,
    )
    yield one_gauge("proxy_open_connections", "Connections open now.", open_now)
    yield one_gauge("proxy_workers", "Relay worker processes reporting.", len(docs))


def collector(directory: Path) -> Callable[[], Iterator[Metric]]:
    return lambda: families(read_snapshots(directory))


__all__ = ["clear", "collector", "families", "keep_writing", "snapshot_dir"]
