"""Every role of this build starts and listens inside its unit's sandbox.

As systemd would run `appliance run --config ... ROLE` for appliance-ROLE.service:
the unit's capabilities only, no new privileges, its SystemCallFilter=,
RestrictAddressFamilies=, MemoryDenyWriteExecute= and file-system layout
(tests/unit_sandbox.py), with the example configuration, in the appliance's
namespace of a fresh lab.  Roles this build does not have are left out.

The stand-in user is nobody.  Where the interpreter lives under /root or /home
(pyenv), nobody cannot run it and ProtectHome= would hide it: then the roles run
as uid 0 with only the unit's capabilities (no CAP_DAC_OVERRIDE, so file modes
still bind) and /root, /home stay visible; the test says so in its output.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import unit_sandbox

from appliance import roles
from appliance.install import SOURCE
from appliance.lab.topology import Topology

pytestmark = pytest.mark.netns

CONFIG = "/var/lib/etc-appliance/appliance.toml"
# what each role listens on in the example configuration: (ss -l protocol, address:port)
LISTENS = {
    "dhcp": ("udp", "0.0.0.0%guest0:67"),
    "dns": ("udp", "192.168.1.1:53"),
    "portal": ("tcp", "192.168.1.1:80"),
    "proxy": ("tcp", "192.168.1.1:2525"),
    "admin": ("tcp", "198.51.100.1:8000"),
}


def built_roles() -> list[str]:
    out = []
    for role in roles.ROLES:
        try:
            roles.resolve(role)
        except roles.RoleUnavailable:
            continue
        if (SOURCE / "systemd" / f"appliance-{role}.service").exists():
            out.append(role)
    return out


def listening(gw_ss: str, proto: str, where: str) -> bool:
    return any(
        line.startswith(proto) and f" {where} " in f" {line} " for line in gw_ss.splitlines()
    )


def test_every_role_starts_and_listens_in_its_units_sandbox(
    make_topology: Callable[..., Topology],
) -> None:
    present = built_roles()
    if not present:
        pytest.skip("no role of this build has a unit yet")
    python = str(Path(sys.executable).absolute())
    hidden = str(Path(sys.executable).resolve()).startswith(("/root/", "/home/"))
    uid, home = (0, False) if hidden else (65534, True)
    if hidden:
        print(f"interpreter {Path(sys.executable).resolve()}: roles run as uid 0, home visible")
    gw = make_topology(guests=1)["gw"]
    setup = f"mkdir -p /var/lib/etc-appliance\ncp {SOURCE}/policies/*.toml /var/lib/etc-appliance/"
    procs = {}
    # net first: it closes the guest side before the others listen (as the units order it)
    for role in sorted(present, key=lambda r: r != "net"):
        unit = SOURCE / "systemd" / f"appliance-{role}.service"
        body = (
            f"sys.argv = ['appliance', 'run', '--config', {CONFIG!r}, {role!r}]\n"
            "from appliance.cli import main\nsys.exit(main())\n"
        )
        argv = unit_sandbox.command(unit, python, body, uid=uid, setup=setup, home=home)
        procs[role] = gw.start(*argv, name=role)
        if role == "net":
            deadline = time.monotonic() + 20
            while "appliance" not in gw.run("nft", "list", "tables").stdout:
                assert procs[role].alive(), procs[role].output()
                assert time.monotonic() < deadline, "net never loaded its table"
                time.sleep(0.2)
    deadline = time.monotonic() + 30
    missing = dict(LISTENS)
    while missing and time.monotonic() < deadline:
        ss = gw.run("ss", "-lntu").stdout
        missing = {r: w for r, w in missing.items() if r in procs and not listening(ss, *w)}
        for role, p in procs.items():
            assert p.alive(), f"{role} died in its sandbox:\n{p.output()[-3000:]}"
        time.sleep(0.3)
    assert not missing, f"not listening: {missing}"
    for role, p in procs.items():
        out = p.output()
        for bad in ("Traceback", "Permission denied", "Operation not permitted", "Read-only"):
            assert bad not in out, f"{role}: {bad}\n{out[-3000:]}"


def test_the_personal_agent_serves_in_its_units_sandbox(
    make_topology: Callable[..., Topology],
) -> None:
    example = SOURCE / "appliance" / "agent" / "agent.example.toml"
    if not example.exists():
        pytest.skip("the personal agent is not part of this build")
    python = str(Path(sys.executable).absolute())
    hidden = str(Path(sys.executable).resolve()).startswith(("/root/", "/home/"))
    uid, home = (0, False) if hidden else (65534, True)
    home_ns = make_topology(guests=1)["home"]
    unit = SOURCE / "systemd" / "personal-agent.service"
    setup = f"mkdir -p /var/lib/etc-agent\ncp {example} /var/lib/etc-agent/agent.toml"
    body = (
        "sys.argv = ['personal-agent', 'run', '--config', '/var/lib/etc-agent/agent.toml']\n"
        "from appliance.agent.cli import main\nsys.exit(main())\n"
    )
    argv = unit_sandbox.command(unit, python, body, uid=uid, setup=setup, home=home)
    proc = home_ns.start(*argv, name="personal-agent")
    deadline = time.monotonic() + 30
    while not listening(home_ns.run("ss", "-lntu").stdout, "tcp", "0.0.0.0:8443"):
        assert proc.alive(), f"the agent died in its sandbox:\n{proc.output()[-3000:]}"
        assert time.monotonic() < deadline, "the agent never listened on 8443"
        time.sleep(0.3)
    # it made its TLS key and certificate in its state directory and answers TLS
    r = home_ns.run("curl", "-sk", "-o", "/dev/null", "-w", "%{http_code}",
                    "https://127.0.0.1:8443/", check=False)  # fmt: skip
    assert r.stdout.strip().isdigit() and r.stdout.strip() != "000", r.stdout + r.stderr
    assert "Traceback" not in proc.output()


def test_the_net_units_stop_commands_close_the_guest_side_in_its_sandbox(
    make_topology: Callable[..., Topology],
) -> None:
    """ExecStopPost= of appliance-net.service, with the unit's privileges, after a kill -9."""
    if "net" not in built_roles():
        pytest.skip("no net role in this build")
    python = str(Path(sys.executable).absolute())
    hidden = str(Path(sys.executable).resolve()).startswith(("/root/", "/home/"))
    uid, home = (0, False) if hidden else (65534, True)
    gw = make_topology(guests=1)["gw"]
    unit = SOURCE / "systemd" / "appliance-net.service"
    setup = f"mkdir -p /var/lib/etc-appliance\ncp {SOURCE}/policies/*.toml /var/lib/etc-appliance/"
    stop_post = unit_sandbox.unit_settings(unit)["ExecStopPost"][-1].split()
    assert stop_post[1:4] == ["net", "close", "--config"]
    stop_post[4] = CONFIG  # the unit's configuration, where this sandbox keeps it

    def as_unit(*args: str) -> list[str]:
        body = f"sys.argv = ['appliance', *{list(args)!r}]\nfrom appliance.cli import main\n"
        body += "sys.exit(main())\n"
        return unit_sandbox.command(unit, python, body, uid=uid, setup=setup, home=home)

    net = gw.start(*as_unit("run", "--config", CONFIG, "net"), name="net")
    deadline = time.monotonic() + 20
    while "authenticated" not in gw.run("nft", "list", "ruleset").stdout:
        assert net.alive() and time.monotonic() < deadline, net.output()
        time.sleep(0.2)
    gw.run("kill", "-9", str(net.popen.pid))
    net.popen.wait(5)
    assert "authenticated" in gw.run("nft", "list", "ruleset").stdout  # a kill cleans nothing
    r = gw.run(*as_unit(*stop_post[1:]), check=False)
    assert r.returncode == 0, r.stdout + r.stderr
    left = gw.run("nft", "list", "table", "inet", "appliance").stdout
    assert "guest_closed" in left and "authenticated" not in left
