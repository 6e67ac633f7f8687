"""The appliance's side of the dialer role's socket: ask for a stream to a household.

The dialer (appliance/homelink/dialer.py) holds the links to the relays; the portal
(a login) and the proxy (a guest's mail to a household's own server) ask it for one
stream each over its local stream socket:

    client -> dialer: "OPEN RELAY HOUSEHOLD\\n"
    dialer -> client: "OK\\n"  or  "ERR CODE text\\n"

after which the socket carries the stream's bytes both ways.  The line format is
sans-IO here (`open_line`, `parse_answer`); `dial` and `dial_async` are the two thin
socket layers (the portal's threads, the proxy's event loop).
"""

from __future__ import annotations

import asyncio
import re
import socket

from appliance.core.config import HomeRelayConfig
from appliance.homelink.frames import HOUSEHOLD_RE

MAX_LINE = 512
CODES = ("offline", "limit", "refused", "timeout", "unreachable", "protocol", "bad_request")
_ERR = re.compile(r"ERR ([a-z_]{1,32})(?: (.{0,400}))?")


class DialerError(Exception):
    """No stream: `code` is one of CODES, `message` for logs and the visitor."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


def relayed(cfg: HomeRelayConfig, host: str) -> tuple[str, str] | None:
    """(relay, household) when `host` is HOUSEHOLD.RELAY for a relay the site lists."""
    name = host.lower().rstrip(".")
    household, dot, relay = name.partition(".")
    if dot and relay in cfg.relays and HOUSEHOLD_RE.fullmatch(household):
        return relay, household
    return None


def open_line(relay: str, household: str) -> bytes:
    if not HOUSEHOLD_RE.fullmatch(household) or not relay or " " in relay or "\n" in relay:
        raise ValueError("not a relay and household")
    return f"OPEN {relay} {household}\n".encode("ascii")


def parse_open(line: bytes) -> tuple[str, str] | DialerError:
    """The dialer's reading of a client's line: (relay, household) or why not."""
    parts = line.rstrip(b"\n").split(b" ")
    if len(parts) != 3 or parts[0] != b"OPEN" or len(line) > MAX_LINE:
        return DialerError("bad_request", "expected OPEN RELAY HOUSEHOLD")
    try:
        relay, household = parts[1].decode("ascii"), parts[2].decode("ascii")
    except UnicodeDecodeError:
        return DialerError("bad_request", "not ASCII")
    if not HOUSEHOLD_RE.fullmatch(household):
        return DialerError("bad_request", "not a household name")
    return relay, household


def answer_line(error: DialerError | None) -> bytes:
    if error is None:
        return b"OK\n"
    text = error.message.replace("\n", " ")[:400]
    return f"ERR {error.code} {text}\n".encode("utf-8", "replace")


def parse_answer(line: bytes) -> DialerError | None:
    """None for OK; the dialer's refusal; a line that is neither is a protocol error."""
    if line == b"OK\n":
        return None
    match = _ERR.fullmatch(line.rstrip(b"\n").decode("utf-8", "replace"))
    if match is None:
        return DialerError("protocol", "the dialer's answer is not OK or ERR")
    return DialerError(match.group(1), match.group(2) or match.group(1))


def dial(cfg: HomeRelayConfig, relay: str, household: str, timeout: float) -> socket.socket:
    """A connected stream socket to `household` (blocking, `timeout` set) or DialerError."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.settimeout(timeout)
        try:
            sock.connect(str(cfg.socket))
            sock.sendall(open_line(relay, household))
            line = b""
            while not line.endswith(b"\n"):
                byte = sock.recv(1)  # a byte at a time: what follows is the stream's
                if not byte or len(line) >= MAX_LINE:
                    raise DialerError("protocol", "the dialer closed without an answer")
                line += byte
        except TimeoutError:
            raise DialerError("timeout", "the relay did not answer in time") from None
        except OSError as exc:
            raise DialerError("unreachable", f"the relay dialer is not running ({exc})") from None
        error = parse_answer(line)
        if error is not None:
            raise error
    except BaseException:
        sock.close()
        raise
    return sock


async def dial_async(
    cfg: HomeRelayConfig, relay: str, household: str, timeout: float
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """The same for an event loop: the stream as a reader and writer pair."""
    try:
        async with asyncio.timeout(timeout):
            reader, writer = await asyncio.open_unix_connection(str(cfg.socket))
            try:
                writer.write(open_line(relay, household))
                line = await reader.readuntil(b"\n")
            except BaseException:
                writer.close()
                raise
    except TimeoutError:
        raise DialerError("timeout", "the relay did not answer in time") from None
    except (asyncio.IncompleteReadError, asyncio.LimitOverrunError):
        raise DialerError("protocol", "the dialer closed without an answer") from None
    except OSError as exc:
        raise DialerError("unreachable", f"the relay dialer is not running ({exc})") from None
    error = parse_answer(line)
    if error is not None:
        writer.close()
        raise error
    return reader, writer
