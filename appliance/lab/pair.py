"""The lab's active/standby pair (`lab up --ha`): gw and gw2 on one guest segment.

Both boxes run every role from the segment's PostgreSQL, with the same keys
(SHARED_KEYS: households allow an appliance by its key, so to them the pair is one
appliance) and the same tables; each has its own segment address, state directory and keepalived.
gw starts first and so becomes active; gw2 stands by (docs/design.md, "Active and
standby").
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import time
import tomllib
from pathlib import Path
from typing import Any

import tomlkit

from appliance.core.atomic_file import write_atomically
from appliance.lab.commands import appliance_cmd, run_checked
from appliance.lab.topology import GW2_SEGMENT, GW_SEGMENT, LabError, Node, Process, Topology

GUEST_ADDRESS = "192.168.1.1"
ADVERT_INTERVAL = 0.5  # seconds: the standby takes over ~1.5-2 s after the active goes silent


def _ip(iface: str) -> str:
    return iface.split("/")[0]


def configure(config: Path) -> Path:
    """Turn the lab's config into gw's half of the pair; write gw2's beside it."""
    doc: Any = tomlkit.parse(config.read_text())
    ha = doc["ha"]
    ha["enabled"] = True
    ha["peers"] = [_ip(GW2_SEGMENT)]
    ha["priority"] = 150
    ha["advert_interval"] = ADVERT_INTERVAL
    doc["policies"]["shared"] = True  # the tables, edited on either box, apply on both
    write_atomically(config, tomlkit.dumps(doc))
    ifs, state = doc["interfaces"], doc["state"]
    ifs["uplink_address"] = GW2_SEGMENT
    ifs["management_address"] = _ip(GW2_SEGMENT)
    state_dir = Path(str(state["directory"]))
    state["directory"] = str(state_dir.with_name(state_dir.name + "-gw2"))
    ha["peers"] = [_ip(GW_SEGMENT)]
    ha["priority"] = 100
    tables = config.parent / "tables-gw2"  # gw2's own files, kept in step by the store
    tables.mkdir(exist_ok=True)
    for key in ("servers", "access", "agents"):
        mine = config.parent / str(doc["policies"][key])
        shutil.copy(mine, tables / mine.name)
        doc["policies"][key] = str(tables / mine.name)
    if "home_relay" in doc:  # each box its own link to the home relays
        doc["home_relay"]["socket"] = str(config.parent / "homelink-gw2.sock")
    second = config.with_name("appliance-gw2.toml")
    write_atomically(second, tomlkit.dumps(doc))
    return second


# what makes the two boxes one appliance: its key to households, the key that signs
# firewall grants (so either box's net role lets in the other's logins), the admin
# pages' session secret
SHARED_KEYS = ("agent-client.key", "firewall-grant.key", "admin-secret.key")


def share_keys(config: Path, second: Path) -> None:
    """gw2 gets gw's keys (made by `appliance agent-key` and gw's roles)."""
    src = Path(str(tomllib.loads(config.read_text())["state"]["directory"]))
    dst = Path(str(tomllib.loads(second.read_text())["state"]["directory"]))
    dst.mkdir(parents=True, exist_ok=True)
    for name in SHARED_KEYS:
        shutil.copy2(src / name, dst / name)


def start_keepalived(node: Node, config: Path, directory: Path) -> Process:
    """keepalived (VRRP only) in the box's namespace, on the conf `appliance ha` writes."""
    conf = directory / f"keepalived-{node.name}.conf"
    conf.write_text(run_checked(node, appliance_cmd("ha", "keepalived-conf", "-c", str(config))))
    run = directory / f"keepalived-{node.name}"
    run.mkdir(exist_ok=True)
    return node.start(
        "keepalived", "-n", "-l", "-P", "-f", str(conf),
        "-p", str(run / "keepalived.pid"), "-r", str(run / "vrrp.pid"),
        name="keepalived",
    )  # fmt: skip


def holds_guest_address(node: Node) -> bool:
    out = node.run("ip", "-4", "-o", "addr", "show", "dev", "guest0", check=False).stdout
    return f" {GUEST_ADDRESS}/" in out


def wait_active(node: Node, timeout: float = 20.0) -> float:
    """Seconds until `node` holds the guest address; LabError if it does not."""
    start = time.monotonic()
    while not holds_guest_address(node):
        if time.monotonic() - start > timeout:
            raise LabError(f"{node.name} did not take the guest address in {timeout:.0f}s")
        time.sleep(0.05)
    return time.monotonic() - start


def fail(topo: Topology, name: str = "gw") -> None:
    """The box `name` dies at once: kill -9 of everything it runs, its links down."""
    node = topo[name]
    out = subprocess.run(
        ["ip", "netns", "pids", node.netns], capture_output=True, text=True, check=False
    ).stdout
    for pid in out.split():
        with contextlib.suppress(ProcessLookupError):
            os.kill(int(pid), signal.SIGKILL)
    for ifname in ("guest0", "seg0", "home0"):
        node.run("ip", "link", "set", ifname, "down", check=False)
