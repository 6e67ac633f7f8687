"""Shared fixtures: the namespace harness (`topology`), a real PostgreSQL (`pg_dsn`), and
cleanup that survives failures.

Every netns test builds its own site with `make_topology()`; the namespaces are
removed when the test ends, passes or fails, and on SIGTERM/SIGINT too.  Output of
every background process a test started is attached to its report when it fails.
"""

from __future__ import annotations

import atexit
import os
import secrets
import shutil
import signal
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from postgres_server import PostgresServer, available

from appliance.homelink.poll_client import forget_long_poll
from appliance.lab import topology as topo_mod
from appliance.lab.topology import Topology

ROOT = Path(__file__).resolve().parent.parent
ARTIFACTS = ROOT / "tests" / "artifacts"
_live: list[Topology] = []
_servers: list[PostgresServer] = []


def _destroy_all() -> None:
    while _live:
        _live.pop().destroy()
    while _servers:
        _servers.pop().stop()


_MAIN_PID = os.getpid()


@pytest.fixture(autouse=True)
def _links_dial_websocket_first() -> Iterator[None]:
    """A URL one test's link reached by long-poll is not another test's (ports recur)."""
    yield
    forget_long_poll()


def _on_term(signum: int, _frame: object) -> None:
    # pyroute2 forks helper processes that inherit this handler: they must just exit,
    # not run a second copy of pytest's shutdown.
    if os.getpid() != _MAIN_PID:
        os._exit(128 + signum)
    raise KeyboardInterrupt(f"signal {signum}")


def pytest_sessionstart(session: pytest.Session) -> None:
    if os.geteuid() == 0:
        topo_mod.sweep_stale()
    atexit.register(_destroy_all)
    signal.signal(signal.SIGTERM, _on_term)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if os.geteuid() == 0 and shutil.which("ip"):
        return
    skip = pytest.mark.skip(reason="netns tests need root and iproute2")
    for item in items:
        if "netns" in item.keywords:
            item.add_marker(skip)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    outcome = yield
    report = outcome.get_result()
    if report.when == "call" and report.failed:
        for topo in getattr(item, "_topologies", []):
            for proc in topo.processes:
                report.sections.append(
                    (
                        f"process {proc.node}:{proc.name} {' '.join(proc.argv)}",
                        proc.output()[-20000:],
                    )
                )


@pytest.fixture
def make_topology(
    request: pytest.FixtureRequest, tmp_path: Path
) -> Iterator[Callable[..., Topology]]:
    """Build a site in namespaces: make_topology(guests=2) -> Topology (removed afterwards)."""
    made: list[Topology] = []

    def make(guests: int = 2, **kw: object) -> Topology:
        topo = Topology.build(guests=guests, workdir=tmp_path / f"lab{len(made)}", **kw)  # type: ignore[arg-type]
        made.append(topo)
        _live.append(topo)
        request.node._topologies = [*getattr(request.node, "_topologies", []), topo]
        return topo

    yield make
    for topo in made:
        topo.destroy()
        if topo in _live:
            _live.remove(topo)


@pytest.fixture
def lab_site(tmp_path: Path) -> Iterator[Callable[..., tuple[Topology, Path]]]:
    """A topology for the lab's whole site and the directory `site.start` fills:
    lab_site(guests=1, ha=False) -> (topology, directory).  Afterwards the namespaces go
    first, then the servers' private directories."""
    made: list[Topology] = []
    directory = tmp_path / "site"

    def build(guests: int = 1, **kw: bool) -> tuple[Topology, Path]:
        topo = Topology.build(guests=guests, workdir=tmp_path / "topo", **kw)
        made.append(topo)
        _live.append(topo)
        return topo, directory

    yield build
    for topo in made:
        topo.destroy()
        if topo in _live:
            _live.remove(topo)
    if (directory / "site.json").exists():
        from appliance.lab import site

        for d in site.load_info(directory).server_dirs:
            shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def artifacts() -> Path:
    """Where tests put screenshots and reports a person looks at."""
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    return ARTIFACTS


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    """One real PostgreSQL for the session, on a unix socket only; removed at the end.
    Without root it is skipped, as the netns tests are; as root (CI) a PostgreSQL that
    is not installed is a failure, never a skip: `./bootstrap test` installs it."""
    if os.geteuid() != 0:
        pytest.skip("a test PostgreSQL needs root (runuser to the postgres user)")
    if why := available():
        pytest.fail(why)
    server = PostgresServer()
    _servers.append(server)
    yield server
    server.stop()
    if server in _servers:
        _servers.remove(server)


@pytest.fixture
def pg_dsn(postgres_server: PostgresServer) -> Iterator[str]:
    """A fresh, empty database for one test (dropped afterwards, open sessions and all)."""
    name = f"t_{secrets.token_hex(6)}"
    postgres_server.psql(f"CREATE DATABASE {name}")
    yield postgres_server.dsn_for(name)
    postgres_server.psql(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
