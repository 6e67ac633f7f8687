"""The systemd units in systemd/: they verify, they are hardened, each role gets only its caps.

`systemd-analyze verify` wants the commands of ExecStart= to exist, so the units
are rendered (as `appliance install` does) with a prefix in a temp directory
holding stand-in executables.  No running systemd is needed for any of this.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from appliance import roles
from appliance.install import SOURCE, Layout, render_unit, unit_files

pytestmark = pytest.mark.unit

ANALYZE = shutil.which("systemd-analyze") or "/usr/bin/systemd-analyze"
ROLE_UNITS = ["net", "dhcp", "dns", "portal", "proxy", "admin"]
# role -> the capabilities it needs, and why (README, "Installing on a real box")
CAPS = {
    "net": {"CAP_NET_ADMIN"},  # links, nftables, and /proc/sys/net as a non-root user
    "dhcp": {"CAP_NET_BIND_SERVICE", "CAP_NET_RAW"},  # 67, AF_PACKET (reads and unicasts)
    "dns": {"CAP_NET_BIND_SERVICE"},  # port 53
    # a login or logout is a row in the store; the net role alone writes nftables
    "portal": {"CAP_NET_BIND_SERVICE"},  # port 80
    "proxy": set(),  # listens above 1023 only
    "admin": set(),  # port 8000
}
MAX_EXPOSURE = 3.0


def parse(path: Path) -> dict[str, dict[str, list[str]]]:
    """section -> key -> every value given (units repeat keys)."""
    out: dict[str, dict[str, list[str]]] = {}
    section = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line.strip("[]")
            out.setdefault(section, {})
            continue
        key, _, value = line.partition("=")
        out[section].setdefault(key, []).append(value)
    return out


def units() -> dict[str, Path]:
    return {p.name: p for p in unit_files()}


def test_one_unit_per_role_and_the_target_wants_them_all() -> None:
    names = set(units())
    for role in [*ROLE_UNITS, *roles.ROLES]:
        assert f"appliance-{role}.service" in names
    assert {"appliance.target", "appliance-net.service", "personal-agent.service"} <= names
    target = parse(units()["appliance.target"])
    wanted = " ".join(target["Unit"]["Wants"]).split()
    assert sorted(wanted) == sorted(n for n in names if n.startswith("appliance-"))
    # and starts them again while it is up (after the net role's automatic restart)
    upheld = " ".join(target["Unit"]["Upholds"]).split()
    assert sorted(upheld) == sorted(wanted)
    assert target["Install"]["WantedBy"] == ["multi-user.target"]


@pytest.mark.parametrize("role", ROLE_UNITS)
def test_role_unit_runs_the_role_as_appliance_with_only_its_capabilities(role: str) -> None:
    u = parse(units()[f"appliance-{role}.service"])
    svc = u["Service"]
    assert svc["ExecStart"] == [
        f"/usr/local/bin/appliance run --config /etc/appliance/appliance.toml {role}"
    ]
    assert svc["ExecReload"] == ["/bin/kill -HUP $MAINPID"]
    assert svc["User"] == ["appliance"]
    assert svc["StateDirectory"] == ["appliance"]
    assert set(svc["CapabilityBoundingSet"][-1].split()) == CAPS[role]
    assert set(svc["AmbientCapabilities"][-1].split()) == CAPS[role]
    families = set(svc["RestrictAddressFamilies"][-1].split())
    assert families <= {"AF_UNIX", "AF_INET", "AF_INET6", "AF_NETLINK", "AF_PACKET"}
    # nft talks netlink: exactly the roles that run it may open netlink sockets
    assert ("AF_NETLINK" in families) == (role == "net")
    # only DHCP reads the link itself (the Ethernet source of a request)
    assert ("AF_PACKET" in families) == (role == "dhcp")
    for key in ("NoNewPrivileges", "PrivateTmp", "LockPersonality", "MemoryDenyWriteExecute"):
        assert svc[key] == ["yes"], key
    assert svc["ProtectSystem"] == ["strict"]
    assert svc["ProtectHome"] == ["yes"]
    assert "@system-service" in svc["SystemCallFilter"]
    assert "appliance.target" in u["Unit"]["PartOf"]
    if role == "net":
        # it writes /proc/sys/net/...; everyone else cannot touch kernel tunables
        assert svc["ProtectKernelTunables"] == ["no"]
        assert svc["ExecStartPre"] == [
            "/usr/local/bin/appliance net up --config /etc/appliance/appliance.toml"
        ]
        # however it ends (a kill included), the guest side is left closed, not open
        assert svc["ExecStopPost"] == [
            "/usr/local/bin/appliance net close --config /etc/appliance/appliance.toml"
        ]
    else:
        assert svc["ProtectKernelTunables"] == ["yes"]
        # the guest side is closed before a guest-facing role listens, and the role
        # stops when the net role does (never serving guests without it)
        assert u["Unit"]["BindsTo"] == ["appliance-net.service"]
        assert "Requires" not in u["Unit"]
        assert "appliance-net.service" in u["Unit"]["After"][0].split()
    # only the admin role may write the configuration directory (tables, accounts)
    assert svc.get("ReadWritePaths", []) == (["/etc/appliance"] if role == "admin" else [])


def test_personal_agent_unit_runs_the_agent_unprivileged() -> None:
    svc = parse(units()["personal-agent.service"])["Service"]
    assert svc["ExecStart"] == [
        "/usr/local/bin/personal-agent run --config /etc/personal-agent/agent.toml"
    ]
    assert svc["User"] == ["personal-agent"]
    assert svc["StateDirectory"] == ["personal-agent"]
    assert svc["CapabilityBoundingSet"] == [""] and svc["AmbientCapabilities"] == [""]
    assert svc["ExecReload"] == ["/bin/kill -HUP $MAINPID"]


def test_home_relay_unit_runs_the_relay_with_only_the_low_port_capability() -> None:
    svc = parse(units()["home-relay.service"])["Service"]
    assert svc["ExecStart"] == ["/usr/local/bin/home-relay --config /etc/home-relay/relay.toml"]
    assert svc["User"] == ["home-relay"]
    assert svc["StateDirectory"] == ["home-relay"]
    assert svc["CapabilityBoundingSet"] == ["CAP_NET_BIND_SERVICE"]
    assert svc["AmbientCapabilities"] == ["CAP_NET_BIND_SERVICE"]


def _render_all(tmp_path: Path) -> list[Path]:
    """The units as `appliance install --prefix TMP` writes them, with stand-in commands."""
    prefix = tmp_path / "prefix"
    (prefix / "bin").mkdir(parents=True)
    for cmd in ("appliance", "personal-agent", "home-relay"):
        exe = prefix / "bin" / cmd
        exe.write_text("#!/bin/sh\nexit 0\n")
        exe.chmod(0o755)
    out = tmp_path / "units"
    out.mkdir()
    rendered = []
    for src in unit_files():
        dest = out / src.name
        dest.write_text(render_unit(src.read_text(), Layout(prefix=prefix)))
        rendered.append(dest)
    return rendered


def test_every_unit_passes_systemd_analyze_verify(tmp_path: Path) -> None:
    rendered = _render_all(tmp_path)
    r = subprocess.run(
        [ANALYZE, "verify", *map(str, rendered)], capture_output=True, text=True, timeout=60
    )
    assert r.returncode == 0, r.stderr
    # verify reports problems on stderr even when it exits 0: there must be none
    ours = [line for line in r.stderr.splitlines() if any(p.name in line for p in rendered)]
    assert ours == []


def exposure(unit: Path) -> float:
    r = subprocess.run(
        [ANALYZE, "security", "--offline=true", "--no-pager", str(unit)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    m = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", r.stdout + r.stderr)
    assert m, r.stdout + r.stderr
    return float(m.group(1))


@pytest.mark.parametrize("name", sorted(p.name for p in unit_files() if p.suffix == ".service"))
def test_exposure_score_is_ok(name: str) -> None:
    score = exposure(units()[name])
    assert score <= MAX_EXPOSURE, f"{name}: exposure {score} > {MAX_EXPOSURE}"


def test_readme_lists_every_unit_with_its_score() -> None:
    readme = (SOURCE / "README.md").read_text()
    section = readme.split("## Installing on a real box", 1)[1].split("\n## ", 1)[0]
    for p in unit_files():
        if p.suffix == ".service":
            m = re.search(rf"\| `{re.escape(p.name)}` \|[^|]*\| (\d+\.\d+) ", section)
            assert m, f"README has no score row for {p.name}"
            assert abs(float(m.group(1)) - exposure(p)) < 0.05, p.name
