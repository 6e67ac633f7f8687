"""The dialer role's core: one link per relay, and the local socket that hands out streams.

The portal and the proxy never speak WebSocket: they connect to the dialer's unix
stream socket, send `OPEN RELAY HOUSEHOLD` (dialer_client.py) and, after `OK`, use
the socket as the stream.  Every stream to one relay shares that relay's `Link`,
which keeps a WebSocket up (dialled again with backoff) and resumes the streams on
it (docs/home-relay.md, "The appliance side" and "Resume").

A client's fault (a garbage line, a stream that fails) is logged and counted, never
raised: one visitor's stream must not take the others down.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import ssl
import stat
import time
from collections.abc import Callable, Sequence

from websockets.exceptions import WebSocketException

from appliance.core.config import HomeRelayConfig
from appliance.homelink import frames
from appliance.homelink.dialer_client import MAX_LINE, DialerError, answer_line, parse_open
from appliance.homelink.frames import Reset
from appliance.homelink.link import Dial, Link, LinkConnection, LinkStream
from appliance.homelink.poll_client import dial_link

log = logging.getLogger(__name__)

LINE_TIMEOUT = 5.0  # a client must send its OPEN line within this
MAX_CLIENTS = 1024  # streams (and clients waiting for one) at once
SOCKET_MODE = 0o660  # the portal and the proxy run as the same user or group
DIRECTORY_MODE = 0o750

COUNTER_NAMES = (
    "clients",
    "streams_opened",
    "busy",
    "bad_requests",
    "unreachable",
    "offline",
    "limit",
    "refused",
    "timeout",
    "protocol",
    "errors",
)


def tls_context(cfg: HomeRelayConfig) -> ssl.SSLContext:
    """Verify the relay's chain (the site's relay CA, or the system's) and its name."""
    cafile = str(cfg.ca) if cfg.ca is not None else None
    ctx = ssl.create_default_context(cafile=cafile)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    return ctx


def relay_dial(cfg: HomeRelayConfig, name: str, urls: Sequence[str], ctx: ssl.SSLContext) -> Dial:
    """The coroutine a relay's `Link` calls for each new WebSocket.

    The relay's certificate is checked against its *name* (what visitors type), not
    the URL's host, so a URL with an address still verifies the relay.  Several URLs
    (a federation of relays under the name): the one that worked last first, then the
    others in turn, so a dead relay costs one refused dial.  `proxy=None` when the
    site has none: websockets would otherwise take one from the environment.
    """
    order = list(urls)

    async def dial() -> LinkConnection:
        for i, url in enumerate(order):
            try:
                ws = await _dial_one(url)
            except (OSError, TimeoutError, WebSocketException):
                if i == len(order) - 1:
                    raise
                continue
            order.insert(0, order.pop(i))
            return ws
        raise OSError(f"relay {name}: no URL")

    async def _dial_one(url: str) -> LinkConnection:
        # a WebSocket, or a long-poll session where something on the way blocks it
        ws: LinkConnection = await dial_link(
            url,
            tls=ctx,
            server_hostname=name,
            compression=None,  # the streams carry TLS ciphertext
            ping_interval=3,
            ping_timeout=5,
            close_timeout=2,
            proxy=cfg.proxy or None,
            max_size=frames.MAX_FRAME + 256,
        )
        return ws

    return dial


def _refusal(code: Reset, relay: str, household: str) -> DialerError:
    """What the visitor reads when the stream was not opened."""
    if code is Reset.OFFLINE:
        return DialerError("offline", f"your household {household} is not online at {relay}")
    if code is Reset.LIMIT:
        return DialerError(
            "limit", f"too many connections to {household} at {relay}; try again shortly"
        )
    if code is Reset.REFUSED:
        return DialerError("refused", f"your household {household} refused the connection")
    if code is Reset.EXPIRED:
        return DialerError("timeout", f"your household {household} did not answer at {relay}")
    return DialerError("protocol", f"the stream to {household} at {relay} failed ({code.name})")


class Dialer:
    """One `Link` per relay of `[home_relay]`, and the unix socket that opens streams."""

    def __init__(
        self,
        cfg: HomeRelayConfig,
        *,
        max_clients: int = MAX_CLIENTS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.cfg = cfg
        self.max_clients = max_clients
        self.clock = clock
        ctx = tls_context(cfg)
        self.links: dict[str, Link] = {
            name: Link(relay_dial(cfg, name, urls, ctx), name=name)
            for name, urls in cfg.relays.items()
        }
        self.counters: dict[str, int] = dict.fromkeys(COUNTER_NAMES, 0)
        self._server: asyncio.AbstractServer | None = None
        self._link_tasks: list[asyncio.Task[None]] = []
        self._clients: set[asyncio.Task[None]] = set()

    def stats(self) -> dict[str, object]:
        """The dialer's counters and each link's (for the log at exit)."""
        return {
            "dialer": dict(self.counters),
            "links": {name: dict(link.counters) for name, link in self.links.items()},
        }

    # -- lifecycle -----------------------------------------------------------------

    async def start(self) -> None:
        for link in self.links.values():
            self._link_tasks.append(asyncio.create_task(link.run()))
        path = self.cfg.socket
        if not path.parent.is_dir():
            path.parent.mkdir(parents=True, exist_ok=True)
            os.chmod(path.parent, DIRECTORY_MODE)
        with contextlib.suppress(FileNotFoundError):
            if not stat.S_ISSOCK(path.lstat().st_mode):
                raise FileExistsError(f"{path} exists and is not a socket")
            path.unlink()  # left by a dialer that was killed
        self._server = await asyncio.start_unix_server(self._client, str(path))
        os.chmod(path, SOCKET_MODE)
        log.info("home relay dialer on %s for %s", path, ", ".join(self.links) or "no relay")

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        tasks = [*self._clients, *self._link_tasks]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._link_tasks.clear()
        if self._server is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 2)
            self._server = None
            with contextlib.suppress(FileNotFoundError):
                self.cfg.socket.unlink()

    # -- one client ------------------------------------------------------------------

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self.counters["clients"] += 1
        if len(self._clients) >= self.max_clients:
            self.counters["busy"] += 1
            await self._refuse(writer, DialerError("limit", "the relay dialer is busy"))
            return
        self._clients.add(task)
        try:
            await self._serve(reader, writer)
        except asyncio.CancelledError:
            raise
        except Exception:
            self.counters["errors"] += 1
            log.exception("dialer client failed")
        finally:
            self._clients.discard(task)
            writer.close()

    async def _refuse(self, writer: asyncio.StreamWriter, error: DialerError) -> None:
        if error.code in self.counters:
            self.counters[error.code] += 1
        elif error.code == "bad_request":
            self.counters["bad_requests"] += 1
        try:
            writer.write(answer_line(error))
            await asyncio.wait_for(writer.drain(), LINE_TIMEOUT)
        except (OSError, TimeoutError):
            pass
        finally:
            writer.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        line = await _read_line(reader)
        parsed = parse_open(line) if line else DialerError("bad_request", "no OPEN line in time")
        if isinstance(parsed, DialerError):
            log.info("dialer: bad request: %s", parsed.message)
            await self._refuse(writer, parsed)
            return
        relay, household = parsed
        link = self.links.get(relay)
        if link is None:
            await self._refuse(writer, DialerError("bad_request", f"no relay {relay} at this site"))
            return
        deadline = self.clock() + self.cfg.open_timeout
        if not link.up.is_set():
            try:
                await asyncio.wait_for(link.up.wait(), self.cfg.open_timeout)
            except TimeoutError:
                why = link.last_error or "no link yet"
                log.info("stream to %s at %s: relay unreachable: %s", household, relay, why)
                message = f"relay {relay} is not reachable: {why}"
                await self._refuse(writer, DialerError("unreachable", message))
                return
        ls = link.open(household)
        try:
            remaining = max(deadline - self.clock(), 0.5)
            code = await ls.wait_opened(remaining)
            if code is not None:
                log.info("stream to %s at %s: %s", household, relay, code.name)
                await self._refuse(writer, _refusal(code, relay, household))
                return
            self.counters["streams_opened"] += 1
            writer.write(answer_line(None))
            await writer.drain()
            await ls.bridge(reader, writer)  # a client gone without its FIN resets it
        except BaseException:
            _abort(ls)  # cancelled (the dialer stops) or failed: the agent's side ends too
            raise


def _abort(ls: LinkStream) -> None:
    if ls.stream.reset_code is None and not ls.stream.done:
        ls.abort(Reset.CLOSED, "the local client went away")


async def _read_line(reader: asyncio.StreamReader) -> bytes:
    """The client's OPEN line (newline included), or b"" when it sent none in time.

    Byte by byte from the reader's buffer, so nothing after the newline (the stream's
    first bytes, if the client did not wait for OK) is taken from the stream."""
    line = bytearray()
    try:
        async with asyncio.timeout(LINE_TIMEOUT):
            while len(line) < MAX_LINE:
                byte = await reader.read(1)
                if not byte:
                    return b""
                line += byte
                if byte == b"\n":
                    return bytes(line)
    except (TimeoutError, OSError):
        return b""
    return bytes(line)  # too long: parse_open refuses it
