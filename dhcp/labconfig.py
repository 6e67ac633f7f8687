"""A configuration for running the dhcp role in the lab topology (tests, benchmark, demos).

Writes an appliance.toml next to copies of the example tables, with the state
directory where the caller says, so a run never touches /var/lib/appliance.
"""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "policies"


def write_config(
    directory: Path,
    *,
    guest: str = "guest0",
    guest_address: str = "192.168.1.1/24",
    portal: bool = True,
    extra_dhcp: str = "",
    state_dsn: str = "",
    **dhcp: object,
) -> Path:
    """Write directory/appliance.toml; keyword arguments become keys of [dhcp].
    `state_dsn`: the store on that PostgreSQL (`[state] backend = "postgresql"`)."""
    directory.mkdir(parents=True, exist_ok=True)
    for name in ("servers.toml", "access.toml"):
        (directory / name).write_text((EXAMPLES / name).read_text())
    lines = []
    for key, value in dhcp.items():
        lines.append(f"{key} = {value!r}" if isinstance(value, str) else f"{key} = {value}")
    lines = [line.replace("'", '"') for line in lines]
    store = f'\nbackend = "postgresql"\ndsn = "{state_dsn}"' if state_dsn else ""
    text = f"""
[interfaces]
guest = "{guest}"
guest_address = "{guest_address}"
uplink = "seg0"
uplink_address = "198.51.100.1/24"
management_address = "198.51.100.1"

[dhcp]
{chr(10).join(lines)}
{extra_dhcp}

[portal]
enabled = {"true" if portal else "false"}
http_port = 80

[policies]
servers = "servers.toml"
access = "access.toml"

[state]
directory = "{directory / "state"}"{store}
"""
    path = directory / "appliance.toml"
    path.write_text(text)
    return path
