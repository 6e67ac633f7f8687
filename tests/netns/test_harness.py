"""The namespace harness itself: the topology of docs/design.md, and nothing left behind."""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from appliance.lab import topology
from appliance.lab.topology import Topology, guest_mac

pytestmark = pytest.mark.netns
ROOT = Path(__file__).resolve().parents[2]


def namespaces(pid: int | None = None) -> set[str]:
    """Namespaces on the machine, or those of the run with this pid (other runs may be going)."""
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    names = {line.split()[0] for line in out.splitlines() if line.strip()}
    return {n for n in names if n.startswith(f"gg{pid}x")} if pid else names


def test_topology_matches_the_address_plan(make_topology: Callable[..., Topology]) -> None:
    topo = make_topology(guests=2)
    assert set(topo.nodes) == {"gw", "sw", "seg", "home", "guest1", "guest2"}
    gw = topo["gw"].run("ip", "-br", "-4", "addr").stdout
    assert "192.168.1.1/24" in gw and "198.51.100.1/24" in gw and "203.0.113.254/24" in gw
    # the appliance reaches the segment servers and the home network
    topo["gw"].run("ping", "-c1", "-W2", "198.51.100.3")
    topo["gw"].run("ping", "-c1", "-W2", "203.0.113.3")
    # the segment reaches home through the appliance's uplinks (the site's own routing)
    topo["seg"].run("ping", "-c1", "-W2", "203.0.113.80")
    # a guest has no address and no route until DHCP gives it one
    g1 = topo["guest1"]
    assert "inet " not in g1.run("ip", "-4", "addr", "show", "eth0").stdout
    assert g1.run("ip", "route").stdout.strip() == ""
    assert g1.mac() == guest_mac(1)
    # the guest side never forwards, whatever the uplinks do
    fwd = topo["gw"].run("sysctl", "-n", "net.ipv4.conf.guest0.forwarding").stdout.strip()
    assert fwd == "0"


def test_guests_share_a_link_with_the_appliance(make_topology: Callable[..., Topology]) -> None:
    topo = make_topology(guests=2)
    g1, g2 = topo["guest1"], topo["guest2"]
    g1.run("ip", "addr", "add", "192.168.1.201/24", "dev", "eth0")
    g2.run("ip", "addr", "add", "192.168.1.202/24", "dev", "eth0")
    g1.run("ping", "-c1", "-W2", "192.168.1.1")
    g1.run("ping", "-c1", "-W2", "192.168.1.202")
    # and even with an address set by hand, the segment is unreachable: no route, no forward
    assert g1.run("ping", "-c1", "-W1", "198.51.100.3", check=False).returncode != 0


def test_background_process_and_wait_port(make_topology: Callable[..., Topology]) -> None:
    topo = make_topology(guests=1)
    seg = topo["seg"]
    proc = seg.start(
        sys.executable, "-m", "http.server", "--bind", "198.51.100.4", "8088", name="http"
    )
    seg.wait_port(8088, "198.51.100.4")
    page = topo["gw"].run("curl", "-sS", "-m", "5", "http://198.51.100.4:8088/").stdout
    assert "Directory listing" in page
    with topo["gw"].connect("198.51.100.4", 8088) as sock:
        sock.sendall(b"GET / HTTP/1.0\r\n\r\n")
        assert sock.recv(12).startswith(b"HTTP/1.0 200")
    proc.stop()
    assert not proc.alive()
    assert "GET / HTTP/1.1" in proc.output()


def test_destroy_removes_every_namespace_and_process(tmp_path: Path) -> None:
    topo = Topology.build(guests=3, workdir=tmp_path)
    mine = {n.netns for n in topo.nodes.values()}
    assert len(mine) == 7 and mine <= namespaces()
    sleeper = topo["home"].start("sleep", "600")
    topo.destroy()
    assert not mine & namespaces()
    assert sleeper.popen.poll() is not None
    assert not any((topology.NETNS_ETC / n).exists() for n in mine)


def test_two_runs_never_collide(make_topology: Callable[..., Topology]) -> None:
    a, b = make_topology(guests=1), make_topology(guests=1)
    assert a.prefix != b.prefix
    assert not {n.netns for n in a.nodes.values()} & {n.netns for n in b.nodes.values()}


def _pytest_child(tmp_path: Path, body: str) -> subprocess.Popen[str]:
    test = tmp_path / "test_child.py"
    test.write_text(textwrap.dedent(body))
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            "--rootdir",
            str(ROOT),
            "-c",
            str(ROOT / "pyproject.toml"),
            "--confcutdir",
            str(ROOT / "tests"),
            str(test),
        ],
        cwd=ROOT / "tests",
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def test_a_failing_test_leaves_nothing(tmp_path: Path) -> None:
    # run a failing test in its own pytest, with our conftest, and look afterwards
    body = """
        def test_fails(make_topology):
            make_topology(guests=2)
            assert False, "deliberate"
    """
    conftest = ROOT / "tests" / "conftest.py"
    (tmp_path / "conftest.py").write_text(conftest.read_text())
    child = _pytest_child(tmp_path, body)
    out, _ = child.communicate(timeout=120)
    assert "1 failed" in out, out
    assert namespaces(child.pid) == set()


def test_an_interrupted_run_is_cleaned(tmp_path: Path) -> None:
    mark = tmp_path / "built"
    body = f"""
        import pathlib, time
        def test_hangs(make_topology):
            make_topology(guests=1)
            pathlib.Path({str(mark)!r}).touch()
            time.sleep(600)
    """
    (tmp_path / "conftest.py").write_text((ROOT / "tests" / "conftest.py").read_text())
    child = _pytest_child(tmp_path, body)
    deadline = time.monotonic() + 60
    while not mark.exists() and child.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert len(namespaces(child.pid)) == 5  # gw sw seg home guest1
    child.send_signal(signal.SIGTERM)
    child.communicate(timeout=60)
    assert namespaces(child.pid) == set()


def test_a_killed_run_is_swept_by_the_next(tmp_path: Path) -> None:
    script = (
        "from appliance.lab.topology import Topology\n"
        "import os, pathlib\n"
        f"Topology.build(guests=1, workdir=pathlib.Path({str(tmp_path)!r}))\n"
        "os.kill(os.getpid(), 9)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", script])
    assert proc.wait() == -signal.SIGKILL
    left = namespaces(proc.pid)
    assert len(left) == 5
    swept = topology.sweep_stale()
    assert set(swept) >= left
    assert namespaces(proc.pid) == set()
