"""A real nginx in front of the home relay, as a site or CDN front that does not pass
WebSocket upgrades (nginx's default): the links must fall back to long-poll."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
from pathlib import Path

from relay_helpers import free_port


class NginxFront:
    """TLS for the relay's name with `cert`/`key`, every request forwarded to the
    relay in HTTP/1.0 without its Upgrade header.  Call it with the relay's port: it
    starts and gives its own port."""

    def __init__(
        self,
        directory: Path,
        cert: Path,
        key: Path,
        relay_name: str,
        upgrade: bool = False,
        hold_upgrade: bool = False,
        forwarded_for: bool = False,
    ) -> None:
        """`upgrade`: pass the WebSocket Upgrade after all (nginx's documented recipe), the
        same front for a WebSocket link: the peer of the long-poll benchmark.
        `hold_upgrade`: a request with an Upgrade gets no answer at all (sent on to a
        listener that never reads, as a middlebox that holds what it does not know).
        `forwarded_for`: say whom each request came from (X-Forwarded-For, appended)."""
        directory.mkdir()
        self.d = directory
        self.cert, self.key, self.relay_name = cert, key, relay_name
        self.upgrade = upgrade
        self.forwarded_for = forwarded_for
        self.port = free_port()
        self.hole: socket.socket | None = None
        if hold_upgrade:
            self.hole = socket.create_server(("127.0.0.1", 0), backlog=64)
        self.proc: subprocess.Popen[bytes] | None = None

    def __call__(self, relay_port: int) -> int:
        d = self.d
        temps = "".join(f"{k}_temp_path {d}/{k}; " for k in ("client_body", "proxy"))
        extra = (
            "proxy_http_version 1.1; proxy_set_header Upgrade $http_upgrade;\n"
            '      proxy_set_header Connection "upgrade"; proxy_read_timeout 1h;\n'
            if self.upgrade
            else ""
        )
        if self.forwarded_for:
            extra += "proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;\n      "
        if self.hole is not None:
            hole = self.hole.getsockname()[1]
            extra += f"if ($http_upgrade) {{ proxy_pass http://127.0.0.1:{hole}; }}\n      "
        (d / "nginx.conf").write_text(
            f"user root; worker_processes 1; pid {d}/nginx.pid; error_log {d}/error.log;\n"
            "events { worker_connections 1024; }\n"
            f"http {{ access_log {d}/access.log; {temps}\n"
            f"  server {{ listen 127.0.0.1:{self.port} ssl;\n"
            f"    ssl_certificate {self.cert}; ssl_certificate_key {self.key};\n"
            f"    location / {{ proxy_pass https://127.0.0.1:{relay_port};\n"
            f"      {extra}"
            f"      proxy_ssl_server_name on; proxy_ssl_name {self.relay_name}; }} }} }}\n"
        )
        self.start()
        return self.port

    def start(self) -> None:
        self.proc = subprocess.Popen(
            ["nginx", "-p", str(self.d), "-c", str(self.d / "nginx.conf"), "-g", "daemon off;"],
            start_new_session=True,  # its worker too is killed with the group
        )
        deadline = time.monotonic() + 10
        while True:
            with contextlib.suppress(OSError):
                socket.create_connection(("127.0.0.1", self.port), 1).close()
                return
            assert self.proc.poll() is None and time.monotonic() < deadline, "no nginx"
            time.sleep(0.05)

    def stop(self) -> None:
        if self.proc is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
            self.proc = None
        if self.hole is not None:
            self.hole.close()
            self.hole = None

    def access_log(self) -> str:
        return (self.d / "access.log").read_text()
