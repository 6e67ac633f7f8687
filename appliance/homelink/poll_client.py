"""The client end of a long-poll link (poll.py), and the dial that falls back to it.

`dial_link` tries a WebSocket first.  When the answer to its Upgrade is not a
WebSocket (a reverse proxy or an inspecting middlebox that does not pass Upgrade
answers 400, 426, 501, or a page of its own), or there is no answer before the
handshake's timeout (one that holds it), it opens a long-poll session at the same
URL instead: the agent and the dialer carry on over it unchanged.  A URL that
needed long-poll is dialled by long-poll first for a while.

A `PollClient` keeps two HTTP/1.1 connections (kept alive, opened again when they
fail): one posts what this end sends, one asks for what the relay holds.  Every
TLS connection is checked as the WebSocket's is (the relay's name, and the agent's
pin when it has one).  The relay unreachable for `DEAD_AFTER`: the link is dead.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl
import time
import urllib.parse
from collections.abc import Callable
from typing import Any

import h11
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import InvalidHandshake, InvalidStatus

from appliance.homelink import poll
from appliance.homelink.poll import DEAD_AFTER, REQUEST_TIMEOUT, PollError
from appliance.homelink.poll_end import CLOSE_ABNORMAL, PollEnd

log = logging.getLogger(__name__)

RETRY = 0.25  # between tries of a failed request
FINAL = frozenset({400, 404, 405, 413})  # the relay's verdict: the session is over
CONNECT_TIMEOUT = 10.0
MAX_HEAD = 16384

Verify = Callable[[ssl.SSLObject | None], None]  # raises when the TLS peer is not the relay


class PollRefused(OSError):
    """The relay (or what stands in front of it) did not open a session."""

    def __init__(self, message: str, status: int = 0) -> None:
        super().__init__(message)
        self.status = status  # the HTTP answer's, when there was one


class _Http:
    """One kept-alive HTTP/1.1 connection to the relay, through a CONNECT proxy or not."""

    def __init__(
        self,
        host: str,
        port: int,
        tls: ssl.SSLContext,
        server_hostname: str,
        proxy: str | None,
        verify: Verify | None,
    ) -> None:
        self.host, self.port = host, port
        self.tls = tls
        self.server_hostname = server_hostname
        self.proxy = proxy
        self.verify = verify
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._conn: h11.Connection | None = None

    async def _connect(self) -> None:
        if self.proxy:
            p = urllib.parse.urlsplit(self.proxy)
            reader, writer = await asyncio.open_connection(p.hostname, p.port or 3128)
            authority = f"{self.host}:{self.port}"
            writer.write(f"CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\n\r\n".encode())
            head = await reader.readuntil(b"\r\n\r\n")
            if len(head) > MAX_HEAD or head.split(b" ", 2)[1:2] != [b"200"]:
                writer.close()
                raise PollRefused(f"the proxy refused CONNECT: {head[:80]!r}")
            await writer.start_tls(self.tls, server_hostname=self.server_hostname)
        else:
            reader, writer = await asyncio.open_connection(
                self.host, self.port, ssl=self.tls, server_hostname=self.server_hostname
            )
        if self.verify is not None:
            try:
                self.verify(writer.get_extra_info("ssl_object"))
            except BaseException:
                writer.transport.abort()
                raise
        self._reader, self._writer = reader, writer
        self._conn = h11.Connection(h11.CLIENT, max_incomplete_event_size=MAX_HEAD)

    def drop(self) -> None:
        if self._writer is not None:
            self._writer.transport.abort()
        self._reader = self._writer = self._conn = None

    async def post(self, path: str, body: bytes, session: str = "") -> tuple[int, bytes]:
        """POST `body`; (status, answer).  Any failure drops the connection and raises."""
        try:
            if self._conn is None:
                await asyncio.wait_for(self._connect(), CONNECT_TIMEOUT)
            return await self._exchange(path, body, session)
        except BaseException:
            self.drop()
            raise

    async def _exchange(self, path: str, body: bytes, session: str) -> tuple[int, bytes]:
        conn, reader, writer = self._conn, self._reader, self._writer
        assert conn is not None and reader is not None and writer is not None
        headers = [
            ("host", self.server_hostname),
            ("content-type", "application/octet-stream"),
            ("content-length", str(len(body))),
        ]
        if session:
            headers.append((poll.SESSION_HEADER, session))
        writer.write(conn.send(h11.Request(method="POST", target=path, headers=headers)))
        writer.write(conn.send(h11.Data(data=body)))
        writer.write(conn.send(h11.EndOfMessage()))
        await writer.drain()
        status = 0
        answer = bytearray()
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                data = await reader.read(65536)
                conn.receive_data(data)
                continue
            if isinstance(event, h11.Response):
                status = event.status_code
            elif isinstance(event, h11.Data):
                answer += event.data
                if len(answer) > poll.MAX_BODY:
                    raise PollError("an answer longer than a poll body")
            elif isinstance(event, h11.EndOfMessage):
                break
            elif isinstance(event, h11.ConnectionClosed):
                raise ConnectionResetError("the relay closed the connection")
        if conn.our_state is h11.DONE and conn.their_state is h11.DONE:
            conn.start_next_cycle()
        else:
            self.drop()
        return status, bytes(answer)


class PollClient(PollEnd):
    """A long-poll link: `await PollClient.open(...)`, then use it as a WebSocket."""

    def __init__(self, sid: str, make_http: Callable[[], _Http]) -> None:
        super().__init__()
        self.sid = sid
        self._up = make_http()
        self._down = make_http()
        self._last_ok = time.monotonic()
        self.retries = 0  # requests that failed and were made again
        self._tasks = [
            asyncio.ensure_future(self._uploader()),
            asyncio.ensure_future(self._downloader()),
        ]

    @classmethod
    async def open(
        cls,
        url: str,
        *,
        tls: ssl.SSLContext,
        server_hostname: str,
        proxy: str | None = None,
        verify: Verify | None = None,
    ) -> PollClient:
        """Open a session at `url` (wss:// or https://, the link's own path)."""
        u = urllib.parse.urlsplit(url)
        if u.hostname is None:
            raise PollRefused(f"{url}: no host")
        host, port, path = u.hostname, u.port or 443, u.path or "/"

        def make_http() -> _Http:
            return _Http(host, port, tls, server_hostname, proxy, verify)

        first = make_http()
        try:
            status, body = await asyncio.wait_for(first.post(path, b""), CONNECT_TIMEOUT)
        finally:
            first.drop()
        sid = body.decode("ascii", "replace")
        if status != 200 or not poll.SESSION_RE.fullmatch(sid):
            raise PollRefused(
                f"the relay did not open a poll session: {status} {body[:80]!r}", status
            )
        return cls(sid, make_http)

    def ended(self) -> None:
        for task in self._tasks:
            if task is not asyncio.current_task():
                task.cancel()
        self._up.drop()
        self._down.drop()

    async def _request(self, http: _Http, path: str, body: bytes) -> bytes | None:
        """POST until it works; None once the relay has been unreachable too long.

        Retrying is safe (messages are numbered), so anything but the relay's own
        verdict on the session is tried again: a dropped connection, a timeout, a
        front's 502 or 503 while the relay restarts."""
        while not self.closed:
            left = DEAD_AFTER - (time.monotonic() - self._last_ok)
            why = ""
            try:
                status, answer = await asyncio.wait_for(
                    http.post(path, body, self.sid), max(min(REQUEST_TIMEOUT, left), RETRY)
                )
            except ssl.SSLCertVerificationError as exc:  # not the relay: never retried
                self.finish(CLOSE_ABNORMAL, f"relay certificate refused: {exc}")
                return None
            except (OSError, TimeoutError, h11.ProtocolError, PollError, EOFError) as exc:
                why = f"relay unreachable: {exc or type(exc).__name__}"
            else:
                if status == 200:
                    self._last_ok = time.monotonic()
                    return answer
                if status in FINAL:
                    self.finish(CLOSE_ABNORMAL, f"relay answered {status}")
                    return None
                why = f"relay answered {status}"
            if time.monotonic() - self._last_ok > DEAD_AFTER:
                self.finish(CLOSE_ABNORMAL, why)
                return None
            self.retries += 1
            await asyncio.sleep(RETRY)
        return None

    async def _uploader(self) -> None:
        try:
            while not self.closed:
                if not self.outbox.unsent:
                    self._unsent.clear()
                    await self._unsent.wait()
                    continue
                first, messages = self.outbox.batch()
                batch = poll.encode_batch(first, messages)
                answer = await self._request(self._up, poll.UP_PATH, batch)
                if answer is None:
                    return
                self.acknowledged(poll.decode_number(answer))
                self.outbox.rewind()  # anything beyond what the relay holds goes again
        except PollError as exc:
            self.finish(1002, str(exc))
        except Exception as exc:  # a pin that fails on a new connection, a proxy's junk
            self.finish(CLOSE_ABNORMAL, f"{type(exc).__name__}: {exc}")

    async def _downloader(self) -> None:
        try:
            while not self.closed:
                while self.received_bytes > poll.HIGH_WATER and not self.closed:
                    self._taken.clear()
                    await self._taken.wait()
                have = poll.NUMBER.pack(self.inbox.next)
                answer = await self._request(self._down, poll.DOWN_PATH, have)
                if answer is None:
                    return
                first, messages = poll.decode_batch(answer)
                self.received(self.inbox.accept(first, messages))
        except PollError as exc:
            self.finish(1002, str(exc))
        except Exception as exc:
            self.finish(CLOSE_ABNORMAL, f"{type(exc).__name__}: {exc}")


# a URL whose WebSocket failed is dialled by long-poll first for this long after: a front
# that holds the Upgrade would otherwise cost a whole handshake timeout at every relink
POLL_FIRST_FOR = 600.0
HANDSHAKE_TIMEOUT = 10.0  # a WebSocket handshake (TCP, TLS, the Upgrade) unanswered by then
_polled: dict[str, float] = {}  # URL -> when its WebSocket last failed and long-poll worked


def forget_long_poll() -> None:
    """Dial every URL by WebSocket first again, as after a start."""
    _polled.clear()


async def _tcp(host: str, port: int) -> socket.socket:
    """A connected TCP socket to the first of `host`'s addresses that answers."""
    loop = asyncio.get_running_loop()
    last: OSError = OSError(f"{host}: no address")
    for family, kind, proto, _name, address in await loop.getaddrinfo(
        host, port, type=socket.SOCK_STREAM
    ):
        sock = socket.socket(family, kind, proto)
        sock.setblocking(False)
        try:
            await loop.sock_connect(sock, address)
        except OSError as exc:
            sock.close()
            last = exc
            continue
        except BaseException:  # the deadline
            sock.close()
            raise
        return sock
    raise last


async def dial_link(
    url: str,
    *,
    tls: ssl.SSLContext,
    server_hostname: str,
    proxy: str | None,
    verify: Verify | None = None,
    **websocket: Any,
) -> ClientConnection | PollClient:
    """A WebSocket to `url`, or a long-poll session there when the Upgrade is refused,
    or goes unanswered once TCP is up (a front or middlebox that holds it; through a
    proxy a timeout is not told apart from a relay that is not there, and falls back
    to nothing).  Where the WebSocket failed lately, long-poll is tried first."""

    async def poll_session() -> PollClient:
        return await PollClient.open(
            url, tls=tls, server_hostname=server_hostname, proxy=proxy, verify=verify
        )

    since = _polled.get(url)
    if since is not None and time.monotonic() - since < POLL_FIRST_FOR:
        try:
            return await poll_session()
        except PollRefused as exc:
            if exc.status == 429:  # the relay's own limit: the WebSocket would get it too
                raise
            log.info("%s: long-poll failed (%s); a WebSocket again", url, exc)
        except ssl.SSLCertVerificationError:  # not the relay: no transport will do
            raise
        except (OSError, TimeoutError, h11.ProtocolError, PollError, EOFError) as exc:
            log.info("%s: long-poll failed (%s); a WebSocket again", url, exc)
        _polled.pop(url, None)
    deadline = time.monotonic() + HANDSHAKE_TIMEOUT
    sock: socket.socket | None = None
    if proxy is None:
        u = urllib.parse.urlsplit(url)
        # TCP first and on its own: a relay that does not answer at all is no reason to
        # try long-poll (it would only double the wait before the next relay's URL)
        sock = await asyncio.wait_for(_tcp(u.hostname or "", u.port or 443), HANDSHAKE_TIMEOUT)
        websocket["sock"] = sock
    try:
        ws: ClientConnection = await connect(
            url,
            ssl=tls,
            server_hostname=server_hostname,
            proxy=proxy,
            open_timeout=max(0.1, deadline - time.monotonic()),
            **websocket,
        )
    except InvalidStatus as exc:
        if exc.response.status_code == 429:  # the relay's own limit: polling is no way out
            raise
        log.info("%s: the WebSocket was refused (%s); long-poll instead", url, exc)
    except InvalidHandshake as exc:
        log.info("%s: no WebSocket (%s); long-poll instead", url, exc)
    except TimeoutError:
        if sock is None:
            raise
        log.info("%s: the WebSocket handshake was not answered in time; long-poll instead", url)
    except BaseException:
        if sock is not None:
            sock.close()
        raise
    else:
        if verify is not None:
            try:
                verify(ws.transport.get_extra_info("ssl_object"))
            except BaseException:
                ws.transport.abort()
                raise
        return ws
    if sock is not None:
        sock.close()
    client = await poll_session()
    _polled[url] = time.monotonic()
    return client
