"""A tunnel through the site's web proxy: the CONNECT request and its answer (sans-IO).

The relay asks the proxy for `CONNECT name:port` and holds the guest's bytes
until the proxy has said 2xx: a proxy that refuses and keeps the connection
must never get them as the start of an HTTP request.  The answer's head is
read whole (up to `MAX_HEAD`); any bytes after it are already the tunnel's.
"""

from __future__ import annotations

from dataclasses import dataclass

MAX_HEAD = 16384


def connect_request(host: str, port: int) -> bytes:
    """The request for a tunnel; `host` is a checked name or dotted IPv4 address."""
    authority = f"{host}:{port}"
    return f"CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\n\r\n".encode()


@dataclass(frozen=True, slots=True)
class TunnelAnswer:
    ok: bool  # the proxy said 2xx: the tunnel is open
    status: int  # 0: not an HTTP answer
    head: bytes  # the answer's head, as the proxy sent it
    rest: bytes  # bytes after the head: the tunnel's first bytes


class AnswerReader:
    """Feed the proxy's bytes; an answer once its head is complete.  A head over
    MAX_HEAD, or one that is not HTTP, is an answer that is not ok."""

    __slots__ = ("buf",)

    def __init__(self) -> None:
        self.buf = b""

    def feed(self, data: bytes) -> TunnelAnswer | None:
        self.buf += data
        end = self.buf.find(b"\r\n\r\n")
        if end < 0:
            if len(self.buf) > MAX_HEAD or (
                len(self.buf) >= 9 and not self.buf.startswith(b"HTTP/1.")
            ):
                return TunnelAnswer(False, 0, b"", b"")
            return None
        head, rest = self.buf[: end + 4], self.buf[end + 4 :]
        return TunnelAnswer(_ok(head), _status(head), head, rest)


def _status(head: bytes) -> int:
    parts = head.split(b" ", 2)
    if len(parts) < 2 or not parts[0].startswith(b"HTTP/1.") or not parts[1].isdigit():
        return 0
    return int(parts[1])


def _ok(head: bytes) -> bool:
    return 200 <= _status(head) < 300
