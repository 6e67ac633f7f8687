"""The `proxy` role: every relay listener in one event loop, in one process or in
`proxy.workers` forked ones on the same ports (workers.py).

uvloop is used when importable (the benchmark in tests/bench/test_relay_bench.py
measured it against the stock loop; see docs/design.md "The relay").  SIGHUP reloads the
tables through the gate; the relay's subscriber then closes connections the new
tables no longer allow.  SIGTERM closes listeners and open connections.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import gc
import ipaddress
import json
import logging
import os
import signal
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from appliance.core.config import StateConfig
from appliance.proxy import metrics
from appliance.proxy.accounting import UsageRecorder
from appliance.proxy.counts import Counts, SharedCounts
from appliance.proxy.gate import Gate, StaticGate
from appliance.proxy.relay import Relay
from appliance.proxy.workers import run_workers, worker_count

log = logging.getLogger("appliance.proxy")
# raw sockets (copy, then splice(2) for bulk) for tcp, SMTP and POP3: docs/design.md "The relay"
SPLICE_DEFAULT = True


def lean_logging() -> None:
    """Cheaper log records in the proxy process: one access line per connection is on the
    connection-rate path, and the caller lookup (a frame walk) and the thread/process
    fields it would fill are never in our formats (the logging HOWTO's "Optimization")."""
    logging._srcfile = None
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False


def new_loop(kind: str = "auto") -> asyncio.AbstractEventLoop:
    if kind in ("auto", "uvloop"):
        try:
            import uvloop

            loop: asyncio.AbstractEventLoop = uvloop.new_event_loop()
            return loop
        except ImportError:
            if kind == "uvloop":
                raise
    return asyncio.new_event_loop()


async def serve(
    gate: Gate,
    host: str,
    connect_timeout: float,
    idle_timeout: float,
    identity_header: str | None = None,
    hidden: Any = None,
    listening: Callable[[], None] | None = None,
    splice: bool = SPLICE_DEFAULT,
    connect_ports: tuple[int, ...] = (443,),
    counts: Counts | None = None,
    reuse_port: bool = False,
    max_connections: int = 256,
    snapshot: Path | None = None,
    usage_db: Path | StateConfig | None = None,
) -> int:
    lean_logging()
    relay = Relay(
        gate,
        connect_timeout,
        idle_timeout,
        identity_header,
        hidden,
        splice,
        connect_ports=connect_ports,
        counts=counts,
        reuse_port=reuse_port,
        max_connections=max_connections,
        # per-user accounting into the state store (each worker its own batches)
        usage=UsageRecorder.at(usage_db) if usage_db is not None else None,
    )
    await relay.start(host)
    loop = asyncio.get_running_loop()
    writer = None
    if snapshot is not None:  # this worker's counters for the metrics (proxy/metrics.py)
        writer = loop.create_task(metrics.keep_writing(snapshot, relay.snapshot))
    stop = asyncio.Event()

    def reload() -> None:
        try:
            gate.reload()
        except Exception as exc:  # a broken table keeps the old one
            log.error("reload failed, keeping the old tables: %s", exc)

    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    loop.add_signal_handler(signal.SIGHUP, reload)
    if listening is not None:
        listening()
    # what start-up made lives as long as the process: keep it out of the collector's passes
    gc.freeze()
    await stop.wait()
    await relay.stop()
    if writer is not None:
        writer.cancel()
        await asyncio.gather(writer, return_exceptions=True)
    log.info("counters: %s", json.dumps(relay.stats()))
    return 0


def run(
    make_gate: Callable[[], Gate],
    workers: int,
    loop_kind: str = "auto",
    ready_file: Path | None = None,
    snapshots: Path | None = None,
    serve_metrics: Callable[[], None] | None = None,
    **options: Any,
) -> int:
    """The relay in this process, or in `workers` forked ones that share the ports and the
    per-user counts.  Each worker makes its own gate (its own store connection).

    With `snapshots` each worker writes its counters there; `serve_metrics` (which
    serves their sum) runs once all workers listen, in this process: after the
    forks, so no worker inherits the metrics thread."""
    if snapshots is not None:
        metrics.clear(snapshots)

    def ready() -> None:
        if serve_metrics is not None:
            serve_metrics()
        if ready_file is not None:
            ready_file.write_text(str(os.getpid()))

    def one(i: int, listening: Callable[[], None], counts: Counts | None, reuse_port: bool) -> int:
        loop = new_loop(loop_kind)
        log.info("event loop: %s", type(loop).__module__)
        try:
            return loop.run_until_complete(
                serve(
                    make_gate(),
                    listening=listening,
                    counts=counts,
                    reuse_port=reuse_port,
                    snapshot=None if snapshots is None else snapshots / f"worker-{i}.json",
                    **options,
                )
            )
        finally:
            loop.close()

    if workers <= 1:
        return one(0, ready, None, False)
    counts = SharedCounts()
    log.info("%d proxy workers", workers)
    return run_workers(workers, lambda i, listening: one(i, listening, counts, True), ready)


def guest_hidden(config: Any) -> Callable[[str], bool]:
    """The relay's `hidden`: never a target for a guest (hidden networks, the appliance
    itself, special ranges; IPv6 spellings judged as what they reach: appliance.core.reach).
    Anything that is not an address is hidden.  Cached: the web proxy asks per request."""
    from appliance.core import reach

    ifs = config.interfaces

    @functools.lru_cache(maxsize=4096)
    def hidden(ip: str) -> bool:
        return reach.hidden(ifs, ip)

    return hidden


def main(config: Any) -> int:
    """Role entry point: the real gate over sessions and policy (see gate.PolicyGate)."""
    from appliance.proxy.gate import PolicyGate

    host = str(config.interfaces.guest_ip)
    workers = worker_count(config.proxy.workers)
    if workers > 1:
        PolicyGate.check(config)  # a broken table fails here, once, before any fork
    snapshots = metrics.snapshot_dir(config) if config.metrics.enabled else None
    return run(
        lambda: PolicyGate(config),
        workers,
        snapshots=snapshots,
        serve_metrics=lambda: _serve_metrics(config, snapshots),
        host=host,
        connect_timeout=config.proxy.connect_timeout,
        idle_timeout=config.proxy.idle_timeout,
        identity_header=config.proxy.identity_header,
        hidden=guest_hidden(config),
        connect_ports=config.proxy.connect_ports,
        max_connections=config.proxy.max_connections,
        usage_db=config.state if config.proxy.accounting else None,
    )


def _serve_metrics(config: Any, snapshots: Path | None) -> None:
    if snapshots is not None:
        from appliance.core import metrics as core_metrics

        core_metrics.serve(config, "proxy", metrics.collector(snapshots))


def static_main(argv: list[str] | None = None) -> int:
    """`python -m appliance.proxy TABLE.json`: the relay over a static table (tests, lab, bench)."""
    p = argparse.ArgumentParser(prog="python -m appliance.proxy")
    p.add_argument("table", type=Path)
    p.add_argument("--host", default="0.0.0.0")
    p.add_argument("--loop", choices=["auto", "uvloop", "asyncio"], default="auto")
    p.add_argument("--connect-timeout", type=float, default=2.0)
    p.add_argument("--idle-timeout", type=float, default=600.0)
    p.add_argument("--identity-header", default=None)
    p.add_argument("--hidden", action="append", default=[], help="hidden network (CIDR)")
    p.add_argument("--ready-file", type=Path, default=None)
    p.add_argument(
        "--workers", type=int, default=1, help="worker processes (0: one per core; default 1)"
    )
    p.add_argument(
        "--connect-port",
        type=int,
        action="append",
        default=None,
        help="a port CONNECT may reach (repeat; default 443)",
    )
    p.add_argument(
        "--max-connections",
        type=int,
        default=256,
        help="per user and service where the table sets none (default 256)",
    )
    p.add_argument(
        "--metrics",
        metavar="HOST:PORT",
        default=None,
        help="serve the relay's Prometheus metrics there (its workers' sum)",
    )
    p.add_argument(
        "--metrics-dir",
        type=Path,
        default=None,
        help="where the workers write their counters for --metrics (default: a new temp dir)",
    )
    p.add_argument(
        "--usage-db",
        type=Path,
        default=None,
        help="account usage per user and service into this state store (default: off)",
    )
    p.add_argument(
        "--splice",
        action=argparse.BooleanOptionalAction,
        default=SPLICE_DEFAULT,
        help="relay tcp, SMTP and POP3 over raw sockets (copy, splice(2) for bulk)",
    )
    args = p.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(name)s: %(message)s"
    )
    workers = worker_count(args.workers)
    if workers > 1:
        StaticGate.load(args.table)  # a broken table fails here, once, before any fork
    nets = [ipaddress.ip_network(n) for n in args.hidden]
    snapshots = serve_metrics = None
    if args.metrics:
        from appliance.core import metrics as core_metrics

        host, _, port = args.metrics.rpartition(":")
        snapshots = args.metrics_dir or Path(tempfile.mkdtemp(prefix="proxy-metrics-"))
        where = snapshots

        def serve_metrics() -> None:
            core_metrics.serve_on(host, int(port), "proxy", metrics.collector(where))

    @functools.lru_cache(maxsize=4096)  # as guest_hidden is: the web path asks per request
    def hidden(ip: str) -> bool:
        try:
            addr = ipaddress.ip_address(ip)
        except ValueError:
            return True
        if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
            addr = addr.ipv4_mapped
        return any(addr in n for n in nets)

    return run(
        lambda: StaticGate.load(args.table),
        workers,
        args.loop,
        args.ready_file,
        snapshots=snapshots,
        serve_metrics=serve_metrics,
        host=args.host,
        connect_timeout=args.connect_timeout,
        idle_timeout=args.idle_timeout,
        identity_header=args.identity_header,
        hidden=hidden,
        splice=args.splice,
        connect_ports=tuple(args.connect_port or (443,)),
        max_connections=args.max_connections,
        usage_db=args.usage_db,
    )
