"""HTTP on the relay: transparent port 80 and the explicit proxy port (with CONNECT).

Requests are parsed with h11 (sans-IO), one h11 connection per request cycle,
so the client side gets real parsing (framing, pipelining, keep-alive) while
responses, whose framing the upstream owns, flow back as raw bytes through the
same flow-controlled `Pump` as every other service.  The head is rewritten on
the way: absolute-form toward the site's web proxy (origin-form when going
direct), `Proxy-Connection` and any client-sent identity header dropped, and
the identity header added only when the admin configured one.  Targets in a
hidden network are refused: a guest never reaches the segment through us.
"""

from __future__ import annotations

import asyncio
import logging
from typing import cast

import h11

from appliance.core.config import STAND_IN_TEXT as STAND_IN
from appliance.proxy.gate import (
    HIDDEN,
    NO_SUCH_HOST,
    Admission,
    Listener,
    Refusal,
    Upstream,
    no_upstream,
    over_limit,
)
from appliance.proxy.http_framing import BadMessage, check_framing
from appliance.proxy.http_target import (
    BadTarget,
    connect_target,
    explicit_target,
    transparent_target,
)
from appliance.proxy.refusals import http_refusal
from appliance.proxy.tracked import (
    HIGH_WATER,
    LOW_WATER,
    Pump,
    Relay,
    Tracked,
    failure,
    original_dst,
)

log = logging.getLogger("appliance.proxy.http")


TUNNEL_HOLD = 65536  # guest bytes held, and proxy answer read, while a tunnel is pending
# never forwarded: Host is rebuilt from the checked target; Proxy-Connection is hop-by-hop
_DROPPED = frozenset({b"host", b"proxy-connection"})


def _ports(ports: frozenset[int]) -> str:
    return ", ".join(str(p) for p in sorted(ports))


class HttpClient(Tracked, asyncio.Protocol):
    """One guest HTTP connection: parse requests, decide, rewrite, relay."""

    __slots__ = (
        "admission",
        "busy",
        "checked_name",
        "chunked",
        "dest",
        "eofs",
        "limited",
        "orig",
        "parser",
        "pump",
        "raw",
        "tunnel_head",
        "tunnel_wait",
    )

    def __init__(self, relay: Relay, listener: Listener) -> None:
        super().__init__(relay, listener)
        self.parser: h11.Connection | None = h11.Connection(h11.SERVER)
        self.pump: Pump | None = None
        self.admission: Admission | None = None
        self.checked_name = ""  # the host name checked when this connection was made
        self.orig: tuple[str, int] | None = None
        self.dest: tuple[str, int] | None = None
        self.chunked = False
        self.raw = False
        self.busy = False
        self.eofs = 0
        self.limited: Admission | None = None  # over the limit when it connected
        # a CONNECT through the site's proxy: the guest's bytes wait here, and the proxy's
        # answer gathers in tunnel_head, until the proxy says 2xx (anything else: closed)
        self.tunnel_wait: bytearray | None = None
        self.tunnel_head = b""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        self.client = transport
        transport.set_write_buffer_limits(HIGH_WATER, LOW_WATER)
        peer = transport.get_extra_info("peername")
        self.src = peer[0] if peer else "-"
        if not self.listener.explicit:
            self.orig = original_dst(transport.get_extra_info("socket"))
        self.relay.opened(self)
        # a logged-in guest's connection counts from its first byte, not its first request:
        # idle sockets are how one guest would hold them all
        verdict = self.relay.gate.admit(self.src, self.listener.service)
        if isinstance(verdict, Admission):
            if self.admitted(verdict):
                self.admission = verdict
                self.right = self.listener.service
            else:
                self.limited = verdict

    # -- client bytes ----------------------------------------------------------
    def connecting(self) -> bool:
        """Counted at connect, no upstream yet: a table change must still reach it."""
        return self.admission is not None and self.pump is None

    def data_received(self, data: bytes) -> None:
        if self.raw and self.pump is not None:
            self._send(data)
            self.bytes_up += len(data)
            return
        if self.parser is None:
            return
        self.parser.receive_data(data)
        self._drain()

    def _drain(self) -> None:
        while not self.busy and self.parser is not None and not self.closed:
            try:
                ev = self.parser.next_event()
            except h11.RemoteProtocolError as exc:
                self._fail(400, f"bad request: {exc}")
                return
            if ev is h11.NEED_DATA or ev is h11.PAUSED:
                if ev is h11.PAUSED:
                    self._next_cycle()
                    continue
                return
            if isinstance(ev, h11.Request):
                self._request(ev)
            elif isinstance(ev, h11.Data):
                self._body(ev.data)
            elif isinstance(ev, h11.EndOfMessage):
                if self.chunked:
                    self._send(b"0\r\n\r\n")
                self._next_cycle()
            elif isinstance(ev, h11.ConnectionClosed):
                self.parser = None
                self._client_eof()
                return

    def _next_cycle(self) -> None:
        """A fresh h11 connection for the next request, fed what is already buffered."""
        assert self.parser is not None
        data, closed = self.parser.trailing_data
        if self.raw:
            self.parser = None
            if data:
                self.bytes_up += len(data)
                self._send(data)
            return
        self.parser = h11.Connection(h11.SERVER)
        if data:
            self.parser.receive_data(data)
        if closed:
            self.parser.receive_data(b"")

    def _body(self, data: bytes) -> None:
        self.bytes_up += len(data)
        if self.chunked:
            self._send(b"%x\r\n%s\r\n" % (len(data), data))
        else:
            self._send(data)

    def _send(self, data: bytes) -> None:
        if self.tunnel_wait is not None:
            self.tunnel_wait += data  # not a byte to the proxy before it accepts the tunnel
            if len(self.tunnel_wait) > TUNNEL_HOLD and self.client is not None:
                self.client.pause_reading()
            return
        if self.pump is not None and self.pump.transport is not None:
            self.pump.transport.write(data)

    def _wait_for_tunnel(self) -> None:
        """After sending CONNECT to the site's proxy: hold the guest's bytes until it says 2xx
        (a proxy that refuses and keeps the connection must not get them as HTTP)."""
        self.tunnel_wait = bytearray()
        self.tunnel_head = b""

    def from_upstream(self, data: bytes) -> None:
        if self.tunnel_wait is None:
            super().from_upstream(data)
            return
        self.tunnel_head += data
        end = self.tunnel_head.find(b"\r\n\r\n")
        if end < 0:
            if len(self.tunnel_head) > TUNNEL_HOLD:
                self.abort("bad-proxy-answer")
            return
        head, rest = self.tunnel_head[: end + 4], self.tunnel_head[end + 4 :]
        super().from_upstream(head)
        if not head.startswith((b"HTTP/1.1 2", b"HTTP/1.0 2")):
            log.info("the site's proxy refused a tunnel for %s", self.src)
            self.result = "proxy-refused"
            self.parser = None
            if self.client is not None:
                self.client.close()  # after the proxy's answer, which the guest reads
            if self.pump is not None and self.pump.transport is not None:
                self.pump.transport.close()
            return
        held, self.tunnel_wait, self.tunnel_head = self.tunnel_wait, None, b""
        if rest:
            super().from_upstream(rest)
        if held:
            self._send(bytes(held))
        if self.client is not None and not self.closed:
            self.client.resume_reading()

    # -- a request head ----------------------------------------------------------
    def _request(self, ev: h11.Request) -> None:
        method = ev.method.decode("latin-1")
        target = ev.target.decode("latin-1")
        raw_headers = list(ev.headers.raw_items())
        lower = {k.lower(): v for k, v in raw_headers}
        wants_html = b"text/html" in lower.get(b"accept", b"")
        connect = method == "CONNECT"
        service = "connect" if connect else self.listener.service
        if self.limited is not None:
            self._refuse(over_limit(self.limited), wants_html)
            return
        if self.pump is None or connect:
            # the verdict now, not the one at connect: the tables may have changed since
            verdict = self.relay.gate.admit(self.src, service)
            if isinstance(verdict, Refusal):
                self._refuse(verdict, wants_html)
                return
            if not self.admitted(verdict):  # counts once per connection
                self._refuse(over_limit(verdict), wants_html)
                return
            self.admission = verdict
            self.right = service  # a tunnel holds the `connect` right, not `http`
        adm = self.admission
        assert adm is not None  # admitted above, or when its upstream was connected
        proxies = adm.upstreams
        try:
            check_framing(raw_headers, ev.http_version)
            if connect:
                req = connect_target(target)
            elif self.listener.explicit:
                req = explicit_target(target)
            elif self.orig is None:
                raise BadTarget("no original destination")
            else:
                hosts = [v.decode("latin-1") for k, v in raw_headers if k.lower() == b"host"]
                req = transparent_target(target, hosts, self.orig)
        except (BadTarget, BadMessage) as exc:
            self._fail(400, str(exc))
            return
        checked = req.dest
        if connect and checked.port not in self.relay.connect_ports:
            # a tunnel to any port would be a way around every other service's rule
            reason = f"CONNECT is allowed to port {_ports(self.relay.connect_ports)} only"
            self._refuse(Refusal("denied", reason, "", adm.user, adm.rule), wants_html)
            return
        if (checked.numeric and (checked.host == STAND_IN or self.relay.hidden(checked.host))) or (
            # the DNS stand-in a guest may still have cached from before its login is no
            # destination: the checked Host is
            self.orig is not None and self.orig[0] != STAND_IN and self.relay.hidden(self.orig[0])
        ):
            self._refuse(Refusal("denied", HIDDEN, "", adm.user, adm.rule), wants_html)
            return
        host, port = checked.host, checked.port
        name = "" if checked.numeric else host
        candidates = proxies or (Upstream("direct", host, port),)
        dest = (candidates[0].host, candidates[0].port)
        if connect:
            authority = f"{host}:{port}"
            head = f"CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\n\r\n".encode()
        else:
            out_target = req.absolute() if proxies else req.path
            head = self._head(
                method, out_target, checked.authority(80), ev.http_version, raw_headers
            )
        if self.pump is not None:
            if host != self.checked_name:
                # a name is checked when its connection is made; another name, another one
                self._fail_quiet("another host on a kept-alive connection")
                return
            if self.dest != dest:
                # a keep-alive connection may only talk to one place (direct explicit mode)
                self._fail_quiet("destination changed on a kept-alive connection")
                return
            if connect:
                self.raw = True  # what follows the CONNECT is the tunnel's, not HTTP
                if not proxies:
                    assert self.client is not None
                    self.client.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
                    return
                self._send(head)
                self._wait_for_tunnel()
                return
            self._send(head)
            return
        self.busy = True
        assert self.client is not None
        self.client.pause_reading()
        self.checked_name = host
        self.dest = dest  # where this connection goes, as its next request will compare
        self.relay.loop.create_task(
            self._connect(candidates, head, connect and bool(proxies), name, port, adm)
        )
        if connect:
            self.raw = True

    def _head(
        self,
        method: str,
        target: str,
        host: str,
        version: bytes,
        headers: list[tuple[bytes, bytes]],
    ) -> bytes:
        """The head we send on: request line and Host from the checked target, never the
        guest's own; hop-by-hop proxy headers and any guest-sent identity header dropped."""
        ident = self.relay.identity_header
        ident_l = ident.lower().encode() if ident else b""
        self.chunked = False
        lines = [f"{method} {target} HTTP/{version.decode()}".encode(), b"Host: " + host.encode()]
        for name, value in headers:
            low = name.lower()
            if low in _DROPPED or (ident and low == ident_l):
                continue
            if low == b"transfer-encoding" and b"chunked" in value.lower():
                self.chunked = True
            lines.append(name + b": " + value)
        if ident and self.admission is not None and self.admission.identity:
            lines.append(f"{ident}: {self.admission.identity}".encode())
        return b"\r\n".join(lines) + b"\r\n\r\n"

    async def _check_name(self, name: str, port: int) -> tuple[str | None, str]:
        """Resolve a target name ourselves: a name of a hidden host is refused even when the
        site's web proxy would fetch it, and so is a name we cannot resolve (fail closed:
        the proxy's answer could differ from ours).  Returns (reason or None, an address)."""
        try:
            async with asyncio.timeout(self.relay.connect_timeout):
                addresses = await self.relay.resolve(name, port)
        except (TimeoutError, OSError):
            return "cannot resolve", ""
        if not addresses:
            return "cannot resolve", ""
        if any(self.relay.hidden(a) for a in addresses):
            return "hidden", ""
        ipv4 = [a for a in addresses if ":" not in a]  # direct connections go over IPv4
        if not ipv4:
            return "cannot resolve", ""
        return None, ipv4[0]

    async def _connect(
        self,
        candidates: tuple[Upstream, ...],
        head: bytes,
        connect_via_proxy: bool,
        name: str = "",
        port: int = 80,
        adm: Admission | None = None,
    ) -> None:
        direct = candidates[0].name == "direct"
        why, address = await self._check_name(name, port) if name else (None, "")
        if why is not None:
            self.busy = False
            user, rule = (adm.user, adm.rule) if adm else (self.user, self.rule)
            refusal = (
                Refusal("denied", HIDDEN, "", user, rule)
                if why == "hidden"
                else Refusal("unavailable", NO_SUCH_HOST, "", user, rule)
            )
            self._refuse(refusal, False)
            return
        if direct and address:
            # connect to the address we checked, not to a second lookup's answer
            candidates = (Upstream("direct", address, candidates[0].port),)
        for up in candidates:
            try:
                async with asyncio.timeout(self.relay.connect_timeout):
                    _t, pump = await self.relay.loop.create_connection(
                        lambda: Pump(self), up.host, up.port
                    )
            except (TimeoutError, OSError) as exc:
                log.warning("http upstream %s failed: %s", up.name, failure(exc))
                continue
            if self.closed or self.client is None or self.client.is_closing():
                if pump.transport is not None:
                    pump.transport.close()
                return
            self.pump = pump
            self.upstream_name = up.name
            if self.raw and not connect_via_proxy:
                self.client.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
            else:
                self._send(head)
                if connect_via_proxy:
                    self._wait_for_tunnel()
            self.busy = False
            if self.raw and self.parser is not None:
                self._next_cycle()
            else:
                self._drain()
            if not self.closed and not self.client.is_closing() and self.tunnel_wait is None:
                self.client.resume_reading()
            return
        self.busy = False
        self._refuse(no_upstream(self.user, self.rule), False)

    # -- endings -----------------------------------------------------------------
    def _refuse(self, r: Refusal, wants_html: bool) -> None:
        self.refused(r)
        _status, response = http_refusal(r, wants_html)
        self.parser = None
        if self.client is not None:
            self.client.write(response)
            self.client.close()
        if self.pump is not None and self.pump.transport is not None:
            self.pump.transport.close()

    def _fail(self, status: int, why: str) -> None:
        self.result = f"bad-request-{status}"
        body = f"{why}\n".encode()
        self.parser = None
        if self.client is not None:
            self.client.write(
                f"HTTP/1.1 {status} Bad Request\r\nContent-Type: text/plain\r\n"
                f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode()
                + body
            )
            self.client.close()

    def _fail_quiet(self, why: str) -> None:
        log.info("closing %s: %s", self.src, why)
        self.parser = None
        if self.client is not None:
            self.client.close()

    def _client_eof(self) -> None:
        self.eofs += 1
        if self.pump is None or self.pump.transport is None:
            if self.client is not None:
                self.client.close()
            return
        if self.pump.transport.can_write_eof():
            self.pump.transport.write_eof()
        if self.eofs >= 2:
            self.pump.transport.close()

    def eof_received(self) -> bool:
        if self.raw:
            self._client_eof()
            return self.eofs < 2 and self.pump is not None
        if self.parser is not None:
            self.parser.receive_data(b"")
            self._drain()
        return self.eofs < 2 and self.pump is not None

    def upstream_eof(self) -> bool:
        self.eofs += 1
        if self.client is not None and not self.client.is_closing():
            self.client.write_eof()
        if self.eofs >= 2 and self.client is not None:
            self.client.close()
            return False
        return True

    def upstream_lost(self) -> None:
        if self.client is not None:
            self.client.close()

    def pause_writing(self) -> None:
        if self.pump is not None and self.pump.transport is not None:
            self.pump.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.pump is not None and self.pump.transport is not None and not self.closed:
            self.pump.transport.resume_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.pump is not None and self.pump.transport is not None:
            self.pump.transport.close()
        if exc is not None and self.result == "ok":
            self.result = "reset"
        self.finish()

    def abort(self, result: str) -> None:
        if self.result == "ok":
            self.result = result
        if self.pump is not None and self.pump.transport is not None:
            self.pump.transport.abort()
        if self.client is not None:
            self.client.abort()
