"""The access log: one line per relayed connection, written in batches.

A line per connection is on the connection-rate path: through `logging` it
cost about 9 µs (a LogRecord, a Formatter, a locked write and a flush per line)
of the 90 µs or so a relayed connection costs the proxy in all.  So the lines
are formatted here and written together, at most every 0.2 s or every 64 KiB,
like nginx's `access_log ... buffer= flush=`.  They go to stderr as the other
lines do, with the priority prefix journald reads under systemd (see logs.py),
and only when the `appliance.proxy.access` logger is enabled for INFO.  What a
crash loses is at most the last 0.2 s of lines; a stop flushes.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys
import time

NAME = "appliance.proxy.access"
INTERVAL = 0.2
LIMIT = 64 * 1024


class AccessLog:
    def __init__(self, loop: asyncio.AbstractEventLoop, fd: int | None = None) -> None:
        self.loop = loop
        self.fd = sys.stderr.fileno() if fd is None else fd
        self.enabled = logging.getLogger(NAME).isEnabledFor(logging.INFO)
        self.prefix = f"<6>{NAME}: " if os.environ.get("JOURNAL_STREAM") else f"{NAME}: "
        self.lines: list[str] = []
        self.size = 0
        self.lost = 0  # lines that could not be written (stderr gone): counted, not raised
        self._timer: asyncio.TimerHandle | None = None
        self._stamp = (-1, "")

    def connection(
        self,
        started: float,
        user: str | None,
        ip: str,
        service: str,
        rule: str | None,
        upstream: str | None,
        bytes_up: int,
        bytes_down: int,
        result: str,
        dest: str = "",
        reason: str = "",
    ) -> None:
        """The line of one finished connection (names only: never an upstream address);
        `dest` is the name a guest asked for where the relay reads one (a ClientHello's),
        `reason` why it was refused or dropped."""
        if not self.enabled:
            return
        second = int(started)
        if second != self._stamp[0]:  # one strftime per second, not per connection
            self._stamp = (second, time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(second)))
        line = (
            f"{self.prefix}time={self._stamp[1]} user={user or '-'} ip={ip} service={service} "
            f"rule={rule or '-'} upstream={upstream or '-'}{' dest=' + dest if dest else ''} "
            f"bytes_up={bytes_up} bytes_down={bytes_down} duration={time.time() - started:.3f}"
            f"{_reason(reason)} result={result}\n"
        )
        self.lines.append(line)
        self.size += len(line)
        if self.size >= LIMIT:
            self.flush()
        elif self._timer is None:
            self._timer = self.loop.call_later(INTERVAL, self.flush)

    def flush(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if not self.lines:
            return
        data = memoryview("".join(self.lines).encode())
        count = len(self.lines)
        self.lines.clear()
        self.size = 0
        try:
            while data:
                data = data[os.write(self.fd, data) :]
        except OSError:
            self.lost += count


def _reason(reason: str) -> str:
    """` reason="..."`: words, quoted; a quote or control character in them is dropped."""
    if not reason:
        return ""
    clean = "".join(c for c in reason if c.isprintable() and c not in '"\\')
    return f' reason="{clean}"'
