"""The README's main command: the lab comes up, the demo walks through, `lab down` leaves nothing.

This is the whole appliance end to end with real parts: dhclient, the DHCP, DNS,
portal, proxy and admin roles under the supervisor with the real nftables ruleset,
a personal agent at home, postfix, squid, dnsmasq, dovecot and nginx.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.netns
APPLIANCE = [sys.executable, "-m", "appliance"]


def lab(*args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*APPLIANCE, "lab", *args], capture_output=True, text=True, timeout=timeout, check=False
    )


def lab_namespaces() -> list[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    return [ln.split()[0] for ln in out.splitlines() if ln.startswith("gglab-")]


def root_ruleset() -> str:
    return subprocess.run(["nft", "list", "ruleset"], capture_output=True, text=True).stdout


def test_lab_up_demo_down() -> None:
    if lab_namespaces():
        pytest.skip("a lab is already up on this machine")
    root_rules = root_ruleset()
    try:
        up = lab("up")
        assert up.returncode == 0, up.stdout + up.stderr
        assert "alice / alice-pass" in up.stdout and "appliance lab demo" in up.stdout
        assert "bob / bob-pass" in up.stdout and "@bob-home.relay.example#sha256:" in up.stdout
        status = lab("status")
        for proc in ("master", "squid", "dnsmasq", "dovecot", "nginx"):  # master: postfix
            assert proc in status.stdout, status.stdout
        relay = [line for line in status.stdout.splitlines() if line.startswith("relay ")]
        assert relay and "python" in relay[0], status.stdout  # the home relay runs there
        ex = lab("exec", "gw", "--", "nft", "list", "table", "inet", "appliance")
        assert ex.returncode == 0 and "authenticated" in ex.stdout
        assert lab("exec", "guest1", "--", "sh", "-c", "exit 7").returncode == 7
        demo = lab("demo")
        print(demo.stdout)
        assert demo.returncode == 0, demo.stdout + demo.stderr
        assert "19 passed, 0 failed" in demo.stdout  # bob behind NAT; Prometheus last
        again = lab("demo")  # a second walk: the laptops release and start over
        assert again.returncode == 0, again.stdout + again.stderr
    finally:
        down = lab("down")
    assert down.returncode == 0
    assert lab_namespaces() == []
    assert not list(Path("/tmp").glob("gglab-*"))
    assert not Path("/run/appliance-lab").exists()
    assert root_ruleset() == root_rules  # nothing was ever configured in the root namespace
    st = lab("status")
    assert st.returncode == 3 and "down" in st.stdout
