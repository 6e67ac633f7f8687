"""Helpers for the personal-agent tests: appliance Config, agent directory, signed requests."""

from __future__ import annotations

import json
import secrets
import time
from pathlib import Path
from typing import Any

from appliance.agent import tables
from appliance.agent.settings import AgentSettings
from appliance.agent.settings import load as load_settings
from appliance.core import agent_protocol as wire
from appliance.core import config as config_mod
from appliance.core import passwords
from appliance.core.atomic_file import write_atomically

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "policies" / "appliance.toml"


def appliance_config(directory: Path, timeout: float = 2.0) -> config_mod.Config:
    """The example appliance config, with its state in `directory` and a short agent timeout."""
    directory.mkdir(parents=True, exist_ok=True)
    for name in ("servers.toml", "access.toml"):
        (directory / name).write_text((ROOT / "policies" / name).read_text())
    text = EXAMPLE.read_text()
    text = text.replace('directory = "/var/lib/appliance"', f'directory = "{directory / "state"}"')
    text = text.replace("timeout = 4.0", f"timeout = {timeout}")
    (directory / "appliance.toml").write_text(text)
    return config_mod.load(directory / "appliance.toml")


def make_agent_dir(
    directory: Path,
    address: str = "127.0.0.1",
    port: int = 8443,
    extra: str = "",
    users: dict[str, tuple[str, dict[str, str | tuple[str, ...]], dict[str, str]]] | None = None,
) -> AgentSettings:
    """An agent.toml in `directory` with users {name: (password, attributes, servers)}."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "agent.toml"
    path.write_text(
        f'[listen]\naddress = "{address}"\nport = {port}\n[state]\ndirectory = "state"\n{extra}'
    )
    settings = load_settings(path)
    table = {
        name: tables.User(name, passwords.hash_password(pw), attributes=attrs, servers=servers)
        for name, (pw, attrs, servers) in (users or {}).items()
    }
    write_atomically(settings.users_file, tables.dump_users(tables.UserTable(table)))
    return settings


def signed(
    key: object,
    body: dict[str, object] | bytes,
    fingerprint: str,
    now: float | None = None,
    path: str = wire.AUTHENTICATE_PATH,
) -> tuple[bytes, dict[str, str]]:
    """A body and the headers an appliance would send for it."""
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    assert isinstance(key, Ed25519PrivateKey)
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    headers = wire.sign_headers(
        key,
        "POST",
        path,
        fingerprint,
        raw,
        time.time() if now is None else now,
        secrets.token_urlsafe(18),
    )
    return raw, {"content-type": "application/json", **{k.lower(): v for k, v in headers.items()}}


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class RunningAgent:
    """`AgentServer` on an event loop in a thread, for tests that speak HTTPS over loopback."""

    def __init__(self, settings: AgentSettings, **kw: Any) -> None:
        import asyncio
        import threading

        from appliance.agent.server import AgentServer

        self.loop = asyncio.new_event_loop()
        self.server = AgentServer(settings, **kw)
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        asyncio.run_coroutine_threadsafe(self.server.start(), self.loop).result(10)
        self.url = f"https://127.0.0.1:{self.server.port}"

    def close(self) -> None:
        import asyncio

        asyncio.run_coroutine_threadsafe(self.server.close(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
