"""The portal role: the Flask app under waitress on the guest address only, plus the follower.

The follower thread ends sessions whose lease was released or expired (lease
events), whose lease no longer binds their (IP, MAC), or whose time is over; it
runs every two seconds, so the firewall entry goes within seconds of the lease.

HTTPS: waitress speaks plain HTTP only, so with `portal.https_port` and a
certificate the same app is also served by cheroot (a threaded WSGI server with
TLS) on that port; port 80 then only sends browsers there.  See README "For
visitors" for the trade-off without a certificate.
"""

from __future__ import annotations

import logging
import resource
import signal
import socket
import struct
import threading
import time
from collections import Counter
from collections.abc import Iterator
from typing import Any

from prometheus_client.core import Metric
from waitress import create_server
from waitress.channel import HTTPChannel
from waitress.task import WSGITask

from appliance.core import metrics
from appliance.core.config import PORTAL_THREADS, Config
from appliance.net.firewall import revoker
from appliance.portal import gates
from appliance.portal.app import CLOSE_HEADER, CONNECTION_OPENED, ORIGINAL_DST, create_app
from appliance.state import sessions, store
from appliance.state.sessions import SessionStore

log = logging.getLogger("appliance.portal")
FOLLOW_INTERVAL = 2.0
CONNECTION_LIMIT = 1000
"""waitress's limit on open connections in all; nftables caps each guest address far below
it (portal.connections_per_guest), so one guest cannot take them all."""


def follow(config: Config, stop: threading.Event, interval: float = FOLLOW_INTERVAL) -> None:
    """End sessions as leases go and clocks run out, until `stop` is set.

    Lease events are looked at every `interval` (the net role already takes an ended
    lease's pair out of nftables within 50 ms); a session whose time runs out sooner
    is ended when it does, not up to `interval` later."""
    st = SessionStore.from_config(config, store.open_store(config.state), revoke=revoker(config))
    while not stop.is_set():
        wait = interval
        try:
            n = st.maintain()
            if n:
                log.info("ended %d session(s)", n)
            due = st.next_expiry()
            if due is not None:
                wait = min(interval, max(0.005, due - time.time()))
        except Exception:
            log.exception("session follower round failed; trying again")
        stop.wait(wait)


def start_https(config: Config, app: object) -> Any | None:
    """Serve the app over TLS on portal.https_port (cheroot) when a certificate is set."""
    p = config.portal
    if not (p.https_port and p.tls_certificate and p.tls_key):
        return None
    from cheroot import wsgi
    from cheroot.ssl.builtin import BuiltinSSLAdapter

    server = wsgi.Server(
        (str(config.interfaces.guest_ip), p.https_port),
        app,
        numthreads=PORTAL_THREADS,
        server_name=p.hostname,
        timeout=30,
    )
    server.ssl_adapter = BuiltinSSLAdapter(str(p.tls_certificate), str(p.tls_key))
    server.prepare()  # binds now: a bad certificate or a used port fails the role at start
    threading.Thread(target=server.serve, daemon=True, name="https").start()
    log.info("portal listening on https://%s:%d", config.interfaces.guest_ip, p.https_port)
    return server


class ClosingTask(WSGITask):  # type: ignore[misc]
    """Closes the connection after a response the app marked with CLOSE_HEADER.

    Captive answers go out on a connection nftables redirected to us; the redirect
    lasts as long as the connection, so a browser that kept it alive would send the
    page it opens after login here again instead of to the web.  PEP 3333 forbids the
    app the Connection header, so the app asks and the server does it."""

    def build_response_header(self) -> bytes:
        headers = [(k, v) for k, v in self.response_headers if k.lower() != CLOSE_HEADER.lower()]
        if len(headers) != len(self.response_headers):
            self.response_headers[:] = headers
            self.set_close_on_finish()
        out: bytes = super().build_response_header()
        return out

    def get_environment(self) -> dict[str, Any]:
        env: dict[str, Any] = super().get_environment()
        if ORIGINAL_DST not in env:
            env[ORIGINAL_DST] = original_dst(self.channel.socket)
            env[CONNECTION_OPENED] = self.channel.creation_time
        return env


SO_ORIGINAL_DST = 80


def original_dst(sock: socket.socket | None) -> str:
    """The "ip:port" this connection was meant for before a NAT redirect; "" if unknown."""
    if sock is None:
        return ""
    try:
        raw = sock.getsockopt(socket.SOL_IP, SO_ORIGINAL_DST, 16)
    except OSError:
        return ""
    port, packed = struct.unpack_from("!2xH4s", raw)
    return f"{socket.inet_ntoa(packed)}:{port}"


class ClosingChannel(HTTPChannel):  # type: ignore[misc]
    task_class = ClosingTask


def make_server(app: Any, host: str, port: int) -> Any:
    """Waitress on host:port with the portal's limits and ClosingChannel."""
    server = create_server(
        app,
        host=host,
        port=port,
        threads=PORTAL_THREADS,
        connection_limit=CONNECTION_LIMIT,
        # poll(), not select(): select() fails outright once a descriptor passes 1023,
        # and 1000 connections plus the process's own files come close to that
        asyncore_use_poll=True,
        channel_timeout=30,
        ident="appliance-portal",
        clear_untrusted_proxy_headers=True,
        # Without lookahead waitress stops reading a kept-alive connection while one of
        # its requests is in a worker, and with many such connections the server nearly
        # stalls: 164-907 req/s and p99 0.4-0.6 s for the RFC 8908 API under wrk -c32,
        # against 2,700-3,100 req/s and p99 19-35 ms with it (loopback, same run).
        channel_request_lookahead=5,
    )
    server.channel_class = ClosingChannel
    return server


def room_for_connections(n: int = CONNECTION_LIMIT + 200) -> None:
    """Raise the soft limit on open files to `n` (within the hard one) when it is lower.

    systemd starts services with a soft limit of 1024: the connection limit plus the
    HTTPS server, the database and the log would otherwise meet EMFILE on accept()."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = n if hard == resource.RLIM_INFINITY else min(n, hard)
    if soft != resource.RLIM_INFINITY and soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))


def metric_families(config: Config, portal: Any) -> Iterator[Metric]:
    """Logins by source and result (counted in app.py), active sessions from the store
    (its own connection per scrape: the scrape runs in the metrics server's thread)."""
    yield metrics.counter(
        "portal_logins",
        "Login attempts by source (site account or personal agent) and result.",
        ("source", "result"),
        portal.deps.logins.snapshot(),
    )
    conn = store.open_store(config.state, readonly=True)
    try:
        sources = sessions.active_sources(conn)
    finally:
        conn.close()
    by_source: Counter[tuple[str, ...]] = Counter({("site",): 0, ("agent",): 0})
    for source in sources:
        by_source[("site" if source == "site" else "agent",)] += 1
    yield metrics.gauge(
        "portal_sessions", "Sessions active now, by source.", ("source",), by_source
    )


def main(config: Config) -> int:
    room_for_connections()
    host = str(config.interfaces.guest_ip)
    port = config.portal.http_port
    app = create_app(config)
    st = SessionStore.from_config(config, store.open_store(config.state), revoke=revoker(config))
    st.maintain()  # catch up on what happened while we were down
    tls = start_https(config, app)
    server = make_server(app, host, port)
    metrics.serve(config, "portal", lambda: metric_families(config, app.extensions["portal"]))
    # waitress warns on every queued request once all threads are busy: one line per
    # request under load, which slows the server further; saturation shows in wrk/latency.
    logging.getLogger("waitress.queue").setLevel(logging.ERROR)
    stop = threading.Event()
    follower = threading.Thread(target=follow, args=(config, stop), daemon=True, name="follower")
    follower.start()

    def on_term(signum: int, _frame: object) -> None:
        raise SystemExit(0)

    def on_hup(signum: int, _frame: object) -> None:
        gates.reload_policy()

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGHUP, on_hup)
    log.info("portal listening on http://%s:%d", host, port)
    started = time.monotonic()
    try:
        server.run()
    finally:
        if tls is not None:
            tls.stop()
        stop.set()
        follower.join(5)
        log.info("portal stopped after %.0f s", time.monotonic() - started)
    return 0
