"""The capabilities each unit grants are enough for its role, and each one is needed.

No systemd runs here, so the unit's credentials are re-created with setpriv(1):
a non-root user (nobody, standing in for `appliance`), no new privileges, and
exactly the unit's AmbientCapabilities= as inheritable, ambient and bounding set.
Under them, in the appliance's namespace, a small program does what the role
does with privileges (bind its ports, SO_BINDTODEVICE, a packet socket, nft set
elements, /proc/sys/net writes), inside the unit's SystemCallFilter=,
RestrictAddressFamilies= and MemoryDenyWriteExecute= (tests/unit_sandbox.py),
which `nft` inherits.  All of it must work with the unit's set, and
dropping any one capability of the set must break at least one of them.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable

import pytest
import unit_sandbox

from appliance.install import SOURCE, unit_files
from appliance.lab.topology import Node, Topology

pytestmark = pytest.mark.netns

TABLE = "ggcaptest"
GUEST = ("192.168.1.150", "02:47:00:00:00:99")

# what every role does in its sandbox: the shared store is writable, the system is not
COMMON: list[list[object]] = [["store"], ["readonly", "/etc"], ["readonly", "/var/lib"]]
# role -> what it does with privileges (see the units' comments for why)
OPS: dict[str, list[list[object]]] = {
    "net": [
        ["sysctl", "net/ipv4/conf/guest0/forwarding", "0"],
        ["nft", f"add table inet {TABLE}_net\ndelete table inet {TABLE}_net\n"],
    ],
    "dhcp": [
        ["udp", "0.0.0.0", 67, "guest0"],  # SO_BINDTODEVICE: no CAP_NET_RAW on Linux >= 5.7
        ["packet", "guest0"],  # requests read from the link, unicasts sent as frames on it
    ],
    "dns": [["udp", "192.168.1.1", 53, None], ["tcp", "192.168.1.1", 53]],
    "portal": [["tcp", "192.168.1.1", 80]],
    "proxy": [["tcp", "192.168.1.1", p] for p in (2525, 1110, 8081, 3128)],
    "admin": [["tcp", "198.51.100.1", 8000]],
    "homelink": [["tcp", "198.51.100.1", 9107]],  # its metrics; the relays it dials out to
}
# a login or logout is a row in the store: only the net role may change the firewall
NFT_ADD = ["nft", f"add element inet {TABLE} authenticated {{ {GUEST[0]} . {GUEST[1]} }}\n"]

PROGRAM = r"""
import fcntl, json, socket, struct, subprocess, sys
def run(op):
    kind, *a = op
    if kind == "udp":
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        if a[2]:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, a[2].encode())
        s.bind((a[0], a[1])); s.close()
    elif kind == "tcp":
        s = socket.socket(); s.bind((a[0], a[1])); s.listen(); s.close()
    elif kind == "sysctl":
        with open("/proc/sys/" + a[0], "w") as f:
            f.write(a[1])
    elif kind == "nft":
        p = subprocess.run(["nft", "-f", "-"], input=a[0], capture_output=True, text=True)
        if p.returncode:
            raise OSError(p.stderr.strip())
    elif kind == "store":
        import sqlite3
        c = sqlite3.connect("/var/lib/appliance/state.sqlite")
        c.execute("pragma journal_mode=wal"); c.execute("create table if not exists t (x)")
        c.execute("insert into t values (1)"); c.commit(); c.close()
    elif kind == "readonly":
        import os
        path = a[0] + "/ggcaptest-must-not-exist"
        try:
            open(path, "w").close()
        except OSError:
            return
        os.unlink(path)
        raise OSError("could write " + path)
    elif kind == "read":
        open(a[0], "rb").read()
    elif kind == "packet":
        s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, 0)
        s.bind((a[0], 0x0800)); s.close()
out = []
for op in json.loads(sys.argv[1]):
    try:
        run(op); out.append(None)
    except Exception as exc:
        out.append(f"{op[0]} {op[1:]}: {exc}")
print(json.dumps(out))
"""


def unit_caps() -> dict[str, set[str]]:
    """role -> AmbientCapabilities= of appliance-ROLE.service."""
    out = {}
    for p in unit_files():
        if p.name.startswith("appliance-") and p.suffix == ".service":
            role = p.stem.removeprefix("appliance-")
            caps: set[str] = set()
            for line in p.read_text().splitlines():
                if line.startswith("AmbientCapabilities="):
                    caps = set(line.partition("=")[2].split())
            out[role] = caps
    return out


def as_unit(
    node: Node, role: str, caps: set[str], ops: list[list[object]], setup: str = ""
) -> list[str | None]:
    """Run the ops as nobody with exactly `caps`, in the unit's sandbox."""
    unit = SOURCE / "systemd" / f"appliance-{role}.service"
    body = f"sys.argv[1:] = [{json.dumps(ops)!r}]\n{PROGRAM}"
    argv = unit_sandbox.command(unit, "/usr/bin/python3", body, caps=sorted(caps), setup=setup)
    r = node.run(*argv, check=False, timeout=30)
    assert r.returncode == 0, r.stderr
    results: list[str | None] = json.loads(r.stdout)
    return results


@pytest.mark.skipif(shutil.which("setpriv") is None, reason="needs setpriv (util-linux)")
def test_each_unit_has_exactly_the_capabilities_its_role_uses(
    make_topology: Callable[..., Topology],
) -> None:
    gw = make_topology(guests=1)["gw"]
    gw.run(
        "nft", "-f", "-",
        input=f"table inet {TABLE} {{\n set authenticated {{ type ipv4_addr . ether_addr; }}\n}}\n",
    )  # fmt: skip
    caps = unit_caps()
    assert set(caps) == set(OPS)
    problems = []
    for role, ops in OPS.items():
        failed = [r for r in as_unit(gw, role, caps[role], ops + COMMON) if r]
        if failed:
            problems.append(f"{role} with {sorted(caps[role])}: {failed}")
        for cap in sorted(caps[role]):
            if not any(as_unit(gw, role, caps[role] - {cap}, ops)):
                problems.append(f"{role}: {cap} is granted but nothing it does needs it")
    # the harness can fail: without any capability the privileged roles cannot work
    assert any(as_unit(gw, "portal", set(), OPS["portal"]))
    for role in caps:
        (result,) = as_unit(gw, role, caps[role], [NFT_ADD])
        if (result is None) != (role == "net"):
            problems.append(f"{role}: nft set change {'fails' if result else 'works'}")
    assert problems == []


# the keys in the shared state directory, and the roles each is for
KEYS = {
    "admin-secret.key": {"admin"},
    "agent-client.key": {"portal", "proxy"},  # proxy: /v1/connect behind a home relay
    "firewall-grant.key": {"portal", "net"},  # the portal grants a login, net checks it
}


@pytest.mark.skipif(shutil.which("setpriv") is None, reason="needs setpriv (util-linux)")
def test_each_key_is_readable_by_the_role_that_uses_it_only(
    make_topology: Callable[..., Topology],
) -> None:
    """All roles run as one user; the units hide each key from every other role."""
    gw = make_topology(guests=1)["gw"]
    setup = "\n".join(
        f"printf secret > /var/lib/appliance/{k}\nchown 65534:65534 /var/lib/appliance/{k}\n"
        f"chmod 0600 /var/lib/appliance/{k}"
        for k in KEYS
    )
    caps = unit_caps()
    problems = []
    for role in caps:
        ops: list[list[object]] = [["read", f"/var/lib/appliance/{k}"] for k in KEYS]
        for (key, owners), result in zip(
            KEYS.items(), as_unit(gw, role, caps[role], ops, setup), strict=True
        ):
            if (result is None) != (role in owners):
                problems.append(f"{role}: {key} {'unreadable' if result else 'readable'}")
    assert problems == []
