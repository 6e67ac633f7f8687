"""The agent's HTTPS server: asyncio with the stdlib's TLS, h11 for HTTP/1.1, the API in threads.

Why not flask behind waitress: waitress does no TLS, and the agent should be one
small process a household can run without a reverse proxy.  asyncio gives TLS
(`ssl_handshake_timeout`) and a cheap coroutine per connection; h11 is a strict,
well-tested HTTP/1.1 state machine (no parsing of our own); the pure
`AgentApp.handle` runs in a small thread pool because argon2id is CPU- and
memory-hard.  One request per connection, bounded header and body sizes, a
deadline per request and a cap on connections: slow or hostile clients cost little.

An admitted `/v1/connect` turns its connection into a server stream: the server
opens TCP to the user's own server, answers `200 Connection established` and
splices bytes both ways until either side is done (or nothing moved for
STREAM_IDLE_TIMEOUT).  Streams have their own cap and leave the connection cap,
so a few long mail sessions cannot lock out logins.
"""

from __future__ import annotations

import asyncio
import contextlib
import http
import json
import logging
import os
import signal
import ssl
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import h11
import uvloop
from prometheus_client.core import Metric

from appliance.agent import relay_link, tables, tlscert
from appliance.agent.api import (
    PENDING_SAVE_INTERVAL,
    AgentApp,
    LoginKey,
    Request,
    Response,
    Tunnel,
    dump_logins,
    parse_logins,
    refuse,
)
from appliance.agent.settings import AgentSettings
from appliance.core import metrics, passwords
from appliance.core.atomic_file import write_atomically

log = logging.getLogger("appliance.agent")

MAX_CONNECTIONS = 128
MAX_HEADER_BYTES = 16384
MAX_STREAMS = 64  # server streams open at once, besides MAX_CONNECTIONS
SERVER_CONNECT_TIMEOUT = 5.0
STREAM_IDLE_TIMEOUT = 3600.0  # no byte either way for this long ends a stream (IMAP IDLE: 29 min)
STREAM_CHUNK = 65536
DROP_REPORT_INTERVAL = 60.0  # seconds between log lines that sum up refused floods
_DROPS = {
    "rate_limited": "requests refused over a rate limit (429)",
    "pending_evicted": "pending appliance keys replaced by newer ones",
    "no_login": "server streams refused without a login (403)",
    "server_unreachable": "server streams whose server did not answer (502)",
    "streams_busy": "server streams refused over the cap (503)",
    "login_evicted": "remembered logins forgotten for newer ones",
}
ESTABLISHED = b"HTTP/1.1 200 Connection established\r\n\r\n"


@dataclass
class _Stream:
    """A server stream being set up: the connection to the user's server, and the bytes
    the appliance sent after its request (h11 holds them)."""

    tunnel: Tunnel
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    early: bytes


class AgentServer:
    def __init__(
        self,
        settings: AgentSettings,
        verify: Callable[[str | None, str], bool] = passwords.verify_password,
    ) -> None:
        self.settings = settings
        tlscert.secure_dir(settings.state_directory)
        if tlscert.ensure_certificate(
            settings.tls_certificate, settings.tls_key, settings.tls_names
        ):
            log.info("made a new self-signed certificate %s", settings.tls_certificate)
        self.fingerprint = tlscert.certificate_fingerprint(settings.tls_certificate)
        self.users = tables.Watched(settings.users_file, tables.load_users)
        self.appliance_table = tables.Watched(settings.appliances_file, tables.load_appliances)
        self.app = AgentApp(
            settings,
            self.fingerprint,
            self.users.get,
            self.appliance_table.get,
            persist_pending=self._save_pending,
            verify=verify,
            logins=self._load_logins(),
            persist_logins=self._save_logins,
        )
        self.open_streams = 0
        self.pool = ThreadPoolExecutor(settings.limits.workers, thread_name_prefix="agent-auth")
        self.busy = asyncio.Semaphore(MAX_CONNECTIONS)
        self.queue = asyncio.Semaphore(settings.limits.workers * 8)
        self.server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._ticker: asyncio.Task[None] | None = None
        self.relay: relay_link.RelayLink | None = None  # `[relay]`: the link to the home relay
        self._relay_task: asyncio.Task[None] | None = None
        self._reported: Counter[str] = Counter()
        self._status_text = ""

    @property
    def port(self) -> int:
        """The bound port (useful when the settings say 0)."""
        assert self.server is not None
        return int(self.server.sockets[0].getsockname()[1])

    def _save_pending(self, pending: dict[str, dict[str, Any]]) -> None:
        write_atomically(self.settings.pending_file, json.dumps(pending, indent=1), 0o600)

    def _load_logins(self) -> dict[LoginKey, float]:
        try:
            text = self.settings.logins_file.read_text(encoding="utf-8")
        except FileNotFoundError:
            return {}
        except (OSError, UnicodeDecodeError) as exc:
            log.warning("cannot read the login record, starting without it: %s", exc)
            return {}
        return parse_logins(text, time.time())

    def _save_logins(self, logins: dict[LoginKey, float]) -> None:
        write_atomically(self.settings.logins_file, dump_logins(logins), 0o600)

    async def start(self) -> None:
        ctx = tlscert.server_context(self.settings.tls_certificate, self.settings.tls_key)
        self.server = await asyncio.start_server(
            self._connection,
            self.settings.listen_address,
            self.settings.port,
            ssl=ctx,
            ssl_handshake_timeout=self.settings.limits.request_timeout,
            limit=MAX_HEADER_BYTES,
        )
        self._ticker = asyncio.create_task(self._tick())
        log.info(
            "personal agent listening on %s:%d, certificate fingerprint %s",
            self.settings.listen_address,
            self.port,
            self.fingerprint,
        )
        if self.settings.relay is not None:
            self._start_relay()

    def _start_relay(self) -> None:
        """`[relay]`: keep a link to the home relay; a key it cannot use leaves it off."""
        try:
            self.relay = relay_link.make_link(
                self.settings, relay_link.api_address(self.settings), self.port
            )
        except (relay_link.RelayKeyError, OSError, ValueError) as exc:
            log.error("relay link not started: %s", exc)
            return
        log.info("relay link to %s for household %s", self.relay.relay.url, self.relay.household)
        self._relay_task = asyncio.create_task(self.relay.run())

    def metric_families(self) -> list[Metric]:
        """The agent's counters as Prometheus families (per scrape, in the metrics
        server's thread: copies only).  No user name is a label."""
        out = [
            metrics.counter(
                "agent_accepted_total", "Logins and server streams accepted", ["kind"],
                {(k,): float(v) for k, v in self.app.accepted.copy().items()},
            ),
            metrics.counter(
                "agent_refused_total", "Requests refused or dropped, by reason", ["reason"],
                {(k,): float(v) for k, v in self.app.dropped.copy().items()},
            ),
            metrics.one_gauge("agent_server_streams", "Open server streams", self.open_streams),
        ]  # fmt: skip
        if self.relay is not None:
            link = self.relay.link
            out.append(metrics.one_gauge("agent_relay_up", "Relay link up", link.up.is_set()))
            out.append(
                metrics.counter(
                    "agent_relay_link_events_total", "The relay link's events", ["event"],
                    {(k,): float(v) for k, v in link.counters.copy().items()},
                )
            )  # fmt: skip
        return out

    def relay_status(self) -> dict[str, Any] | None:
        """The relay link's state and counters; None without `[relay]` (or when it is off)."""
        return None if self.relay is None else self.relay.status()

    async def _tick(self) -> None:
        """Write pending keys held back by the write interval; now and then sum up drops."""
        next_report = time.monotonic() + DROP_REPORT_INTERVAL
        while True:
            await asyncio.sleep(PENDING_SAVE_INTERVAL)
            try:
                await asyncio.to_thread(self.app.flush_pending)
            except Exception:  # a bug: log it, keep ticking
                log.exception("error saving pending appliances")
            if time.monotonic() >= next_report:
                next_report = time.monotonic() + DROP_REPORT_INTERVAL
                self._report_drops()
                self._report_relay()
            try:
                await asyncio.to_thread(self._write_status)
            except OSError as exc:
                log.warning("status file %s: %s", self.settings.status_file, exc)

    def _write_status(self) -> None:
        """`personal-agent status` reads this: the relay link's state, written when it
        changes (the CLI checks the pid, so no heartbeat is needed)."""
        doc = {"pid": os.getpid(), "relay": self.relay_status()}
        text = json.dumps(doc, sort_keys=True)
        if text != self._status_text:
            write_atomically(self.settings.status_file, text + "\n", mode=0o600)
            self._status_text = text

    def _report_drops(self) -> None:
        now = Counter(self.app.dropped)
        new = now - self._reported
        if new:
            log.warning(
                "in the last %d s: %s",
                DROP_REPORT_INTERVAL,
                ", ".join(f"{n} {_DROPS.get(what, what)}" for what, n in sorted(new.items())),
            )
        self._reported = now

    def _report_relay(self) -> None:
        status = self.relay_status()
        if status is not None:
            log.info(
                "relay link %s: %s",
                "up" if status.pop("up") else "down",
                ", ".join(f"{k}={v}" for k, v in status.items() if v != ""),
            )

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.busy.locked():
            writer.close()
            return
        task = asyncio.current_task()
        if task is not None:
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        stream: _Stream | None = None
        try:
            async with self.busy:
                try:
                    stream = await asyncio.wait_for(
                        self._serve(reader, writer), self.settings.limits.request_timeout + 30
                    )
                except (TimeoutError, ConnectionError, ssl.SSLError, OSError):
                    pass
                except Exception:  # a bug: log it, keep serving others
                    log.exception("error serving a connection")
            if stream is not None:
                await self._splice(reader, writer, stream)
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(writer.wait_closed(), 2)

    async def _read_request(
        self, conn: h11.Connection, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> tuple[h11.Request, bytes] | Response:
        max_body = self.settings.limits.max_body
        head: h11.Request | None = None
        body = bytearray()
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                if conn.they_are_waiting_for_100_continue:  # curl does this for large bodies
                    writer.write(
                        conn.send(h11.InformationalResponse(status_code=100, headers=[])) or b""
                    )
                data = await reader.read(8192)
                conn.receive_data(data)
                continue
            if isinstance(event, h11.Request):
                head = event
                for name, value in event.headers:
                    if name == b"content-length" and int(value) > max_body:
                        return refuse(413, "too_large", f"at most {max_body} bytes")
            elif isinstance(event, h11.Data):
                body += event.data
                if len(body) > max_body:
                    return refuse(413, "too_large", f"at most {max_body} bytes")
            elif isinstance(event, h11.EndOfMessage):
                assert head is not None
                return head, bytes(body)
            else:  # ConnectionClosed, PAUSED
                raise ConnectionError("client went away")

    async def _serve(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> _Stream | None:
        conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEADER_BYTES)
        peer = self._peer_name(writer.get_extra_info("peername"))  # once TLS is up
        try:
            got = await asyncio.wait_for(
                self._read_request(conn, reader, writer), self.settings.limits.request_timeout
            )
        except h11.RemoteProtocolError as exc:
            got = refuse(exc.error_status_hint, "bad_http", "malformed HTTP request")
        except TimeoutError:
            got = refuse(408, "timeout", "request not received in time")
        except ValueError:
            got = refuse(400, "bad_http", "malformed HTTP request")
        if isinstance(got, Response):
            response = got
            method = "GET"
        else:
            head, body = got
            method = head.method.decode("ascii", "replace")
            request = Request(
                method=method,
                path=head.target.decode("ascii", "replace"),
                headers={k.decode("latin-1").lower(): v.decode("latin-1") for k, v in head.headers},
                body=body,
                peer=peer,
            )
            if self.queue.locked():
                response = refuse(
                    503, "busy", "too many checks at once; try again", **{"Retry-After": "5"}
                )
            else:
                async with self.queue:
                    loop = asyncio.get_running_loop()
                    answer = await loop.run_in_executor(self.pool, self.app.handle, request)
                if isinstance(answer, Tunnel):
                    opened = await self._open_stream(answer, conn, writer)
                    if isinstance(opened, _Stream):
                        return opened
                    answer = opened
                response = answer
        await self._send(conn, writer, response, head_only=method == "HEAD")
        return None

    def _peer_name(self, peer: Any) -> str:
        """What the API counts a request against: the peer's address, or for a relayed
        stream's bridge (loopback) `relay:<who opened the stream>`."""
        if not peer:
            return "?"
        if self.relay is not None:
            relayed = self.relay.relayed_source((str(peer[0]), int(peer[1])))
            if relayed is not None:
                return relayed
        return str(peer[0])

    # -- server streams -----------------------------------------------------------
    async def _open_stream(
        self, tunnel: Tunnel, conn: h11.Connection, writer: asyncio.StreamWriter
    ) -> _Stream | Response:
        """Connect to the user's server and tell the appliance; a Response if that fails."""
        if self.open_streams >= MAX_STREAMS:
            self.app.note_drop("streams_busy")
            return refuse(503, "busy", "too many server streams at once", **{"Retry-After": "5"})
        self.open_streams += 1  # reserved before the awaits below; `_splice` gives it back
        opened: _Stream | Response | None = None
        try:
            opened = await self._connect_stream(tunnel, conn, writer)
            return opened
        finally:
            if not isinstance(opened, _Stream):
                self.open_streams -= 1

    async def _connect_stream(
        self, tunnel: Tunnel, conn: h11.Connection, writer: asyncio.StreamWriter
    ) -> _Stream | Response:
        try:
            sreader, swriter = await asyncio.wait_for(
                asyncio.open_connection(tunnel.host, tunnel.port, limit=STREAM_CHUNK),
                SERVER_CONNECT_TIMEOUT,
            )
        except (OSError, TimeoutError) as exc:
            self.app.note_drop("server_unreachable")
            log.info(
                "stream %s: server %s:%d does not answer (%s)",
                tunnel.describe(),
                tunnel.host,
                tunnel.port,
                exc.strerror if isinstance(exc, OSError) and exc.strerror else "timeout",
            )
            return refuse(
                502, "server_unreachable", f"the user's {tunnel.service} server does not answer"
            )
        try:
            writer.write(ESTABLISHED)
            await asyncio.wait_for(writer.drain(), 10)
        except BaseException:
            swriter.close()
            raise
        early, _closed = conn.trailing_data
        return _Stream(tunnel, sreader, swriter, bytes(early))

    async def _splice(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, stream: _Stream
    ) -> None:
        """Bytes both ways until the server is done, the appliance is gone, or all is idle.

        EOF from the appliance shuts the server's write side (its answer may still come,
        where the appliance's transport can take it); EOF from the server is passed on
        after everything before it, then the stream closes: TLS cannot half-close."""
        loop = asyncio.get_running_loop()
        last = [loop.time()]
        moved = [0, 0]  # up (to the server), down (to the appliance)
        log.info("stream %s open", stream.tunnel.describe())

        async def pump(src: asyncio.StreamReader, dst: asyncio.StreamWriter, way: int) -> None:
            while data := await src.read(STREAM_CHUNK):
                dst.write(data)
                await dst.drain()
                moved[way] += len(data)
                last[0] = loop.time()
            if way == 1:
                return  # the server is done: the caller closes the appliance's side
            if dst.can_write_eof():
                dst.write_eof()

        async def up() -> None:
            if stream.early:
                stream.writer.write(stream.early)
                moved[0] += len(stream.early)
            await pump(reader, stream.writer, 0)

        to_server = asyncio.create_task(up())
        to_appliance = asyncio.create_task(pump(stream.reader, writer, 1))
        pending: set[asyncio.Task[None]] = {to_server, to_appliance}
        try:
            while True:
                idle = loop.time() - last[0]
                if idle >= STREAM_IDLE_TIMEOUT:
                    log.info("stream %s idle, closed", stream.tunnel.describe())
                    break
                done, pending = await asyncio.wait(
                    pending,
                    timeout=min(60.0, STREAM_IDLE_TIMEOUT - idle),
                    return_when=asyncio.FIRST_COMPLETED,
                )
                if to_appliance in done:
                    break  # the server is done (or its side broke)
                # the appliance is done: its EOF went on to the server as a half-close, but
                # asyncio ends a TLS transport wholly on EOF, so no answer could reach it now
                if to_server.done() and (
                    to_server.exception() is not None
                    or not writer.can_write_eof()
                    or writer.transport.is_closing()
                ):
                    break
        finally:
            for task in (to_server, to_appliance):
                task.cancel()
            await asyncio.gather(to_server, to_appliance, return_exceptions=True)
            stream.writer.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(stream.writer.wait_closed(), 2)
            self.open_streams -= 1
            log.info(
                "stream %s closed: %d bytes to the server, %d to the appliance",
                stream.tunnel.describe(),
                moved[0],
                moved[1],
            )

    async def _send(
        self,
        conn: h11.Connection,
        writer: asyncio.StreamWriter,
        response: Response,
        head_only: bool,
    ) -> None:
        payload = response.encode()
        headers = [
            ("Content-Type", "application/json"),
            ("Content-Length", str(len(payload))),
            ("Connection", "close"),
            ("Cache-Control", "no-store"),
            *response.headers.items(),
        ]
        if conn.their_state is h11.ERROR or conn.our_state is not h11.SEND_RESPONSE:
            # h11 refuses to answer a request it could not parse: write a minimal reply by hand
            status_line = f"HTTP/1.1 {response.status} {_phrase(response.status)}\r\n".encode()
            hdrs = "".join(f"{k}: {v}\r\n" for k, v in headers).encode("latin-1")
            writer.write(status_line + hdrs + b"\r\n" + payload)
        else:
            data = conn.send(
                h11.Response(
                    status_code=response.status,
                    headers=headers,
                    reason=_phrase(response.status).encode(),
                )
            )
            writer.write(data or b"")
            if not head_only:
                writer.write(conn.send(h11.Data(data=payload)) or b"")
            writer.write(conn.send(h11.EndOfMessage()) or b"")
        await asyncio.wait_for(writer.drain(), 10)

    def reload(self) -> None:
        """SIGHUP: re-read the tables now (they are also re-read whenever their files change)."""
        self.users.force()
        self.appliance_table.force()
        for watched in (self.users, self.appliance_table):
            if watched.error is not None:
                log.error("keeping the last good table: %s", watched.error)
        log.info("tables re-read")

    async def close(self) -> None:
        if self._relay_task is not None:
            self._relay_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._relay_task
        if self._ticker is not None:
            self._ticker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._ticker
        self.app.flush_pending(force=True)
        if self.server is not None:
            self.server.close()
            for task in list(self._tasks):
                task.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)
            await self.server.wait_closed()
        self.pool.shutdown(wait=False, cancel_futures=True)


def _phrase(status: int) -> str:
    try:
        return http.HTTPStatus(status).phrase
    except ValueError:
        return "Error"


async def _run(settings: AgentSettings) -> int:
    server = AgentServer(settings)
    await server.start()
    if settings.metrics_port:
        metrics.serve_on(
            settings.metrics_listen, settings.metrics_port, "agent", server.metric_families
        )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    loop.add_signal_handler(signal.SIGHUP, server.reload)
    await stop.wait()
    await server.close()
    log.info("personal agent stopped")
    return 0


def serve(settings: AgentSettings) -> int:
    """Serve until SIGTERM or SIGINT (on uvloop: a relayed stream crosses the event loop
    twice, through the relay link and the agent's own TLS listener)."""
    return uvloop.run(_run(settings))
