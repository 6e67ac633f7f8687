"""The project's own commands as the lab runs them: in a node, checked, output back."""

from __future__ import annotations

import subprocess
import sys

from appliance.lab.topology import LabError, Node


def appliance_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "appliance", *args]


def agent_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "appliance.agent.cli", *args]


def relay_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "appliance.homerelay.cli", *args]


def run_checked(node: Node | None, argv: list[str], stdin: str | None = None) -> str:
    """Run to the end (in `node`, or here); its stdout, or LabError with all it said."""
    full = node.argv(argv) if node else argv
    proc = subprocess.run(
        full, input=stdin, capture_output=True, text=True, timeout=120, check=False
    )
    if proc.returncode != 0:
        raise LabError(f"{' '.join(argv)} exited {proc.returncode}:\n{proc.stdout}{proc.stderr}")
    return proc.stdout
