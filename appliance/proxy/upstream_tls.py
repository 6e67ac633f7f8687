"""TLS from the relay to an upstream that asks for it (`tls = true` in servers.toml).

The guest speaks plain POP3, SMTP or IMAP to the appliance; the appliance speaks
TLS to the server, so the hop across the networks in between is encrypted.  The
server is verified by the system's CAs (or the site's CA file) and its name, or
by a pinned certificate fingerprint: a server that fails the check is a failed
upstream, never one spoken to in the clear or unverified.
"""

from __future__ import annotations

import functools
import hashlib
import ssl
from dataclasses import dataclass

from appliance.core import agent_protocol as wire


@dataclass(frozen=True)
class UpstreamTls:
    name: str  # what the certificate must name (and the SNI); "" with a pin
    cafile: str = ""  # "" : the system's CAs
    pin: str = ""  # hex SHA-256 of the certificate's DER; set: only the pin is checked

    @classmethod
    def pinned(cls, fingerprint: str) -> UpstreamTls:
        """A household's server named by its agent as host:port#sha256:... ."""
        return cls("", "", wire.unb64(wire.parse_fingerprint(fingerprint)[7:]).hex())

    def context(self) -> ssl.SSLContext:
        """A context with no session memory (a stream through an agent: its own check)."""
        return _context(self.cafile, bool(self.pin))

    def resuming(self, host: str, port: int) -> Resuming:
        """The context for connections to this server, as this check: each offers the
        session the last one got from it (TLS resumption: no certificate sent, a cheaper
        handshake).  One context per server and check, so a session is only ever offered
        to the server, the name and the pin it was verified for."""
        return _resuming(self.cafile, self.name, self.pin, host, port)

    def server_hostname(self) -> str | None:
        return self.name or None

    def problem(self, ssl_object: ssl.SSLObject | None) -> str | None:
        """Why the handshake just made is not with the right server (None: it is)."""
        if not self.pin:
            return None  # the context verified chain and name during the handshake
        der = ssl_object.getpeercert(binary_form=True) if ssl_object is not None else None
        if not der or hashlib.sha256(der).hexdigest() != self.pin:
            return "certificate does not match its pin"
        return None


class Resuming(ssl.SSLContext):
    """An SSLContext that offers its last session to each new connection.  asyncio's
    TLS transport takes no session, but it makes each connection's SSLObject with
    `wrap_bio`, which does: so the session goes in here."""

    session: ssl.SSLSession | None = None

    def wrap_bio(
        self,
        incoming: ssl.MemoryBIO,
        outgoing: ssl.MemoryBIO,
        server_side: bool = False,
        server_hostname: str | bytes | None = None,
        session: ssl.SSLSession | None = None,
    ) -> ssl.SSLObject:
        return super().wrap_bio(
            incoming, outgoing, server_side, server_hostname, session or self.session
        )

    def remember(self, ssl_object: ssl.SSLObject | None) -> None:
        """Keep a full handshake's session for the next connections.  Called once the
        server's first bytes are read: a TLS 1.3 server's tickets come after the handshake,
        before those.  A resumed connection keeps the session it resumed: reading
        `SSLObject.session` costs about as much as resumption saves (CPython copies it
        through DER), so only a full handshake (the first, or one after the server let
        the old session expire) pays for it."""
        if ssl_object is None or ssl_object.session_reused:
            return
        session = ssl_object.session
        if session is not None and (session.has_ticket or session.id):
            self.session = session


@functools.lru_cache(maxsize=32)
def _context(cafile: str, pinned: bool) -> ssl.SSLContext:
    """One context per kind of check (making one costs milliseconds)."""
    ctx = ssl.create_default_context(cafile=cafile or None)
    _check(ctx, pinned)
    return ctx


@functools.lru_cache(maxsize=256)
def _resuming(cafile: str, name: str, pin: str, host: str, port: int) -> Resuming:
    """One per server and check (more servers than this: the oldest context goes, and
    its server's next connection makes a full handshake).  The same checks as
    `_context`: a client context verifies chain and name by default.  OpenSSL does not
    check the name again on a resumed connection: that a session is only offered under
    the check it was made with rests on this key."""
    ctx = Resuming(ssl.PROTOCOL_TLS_CLIENT)
    if pin:  # no CAs to load (some 19 ms for the system's): a household's many servers
        _check(ctx, True)
        return ctx
    if cafile:
        ctx.load_verify_locations(cafile)
    else:
        ctx.load_default_certs(ssl.Purpose.SERVER_AUTH)
    _check(ctx, False)
    return ctx


def _check(ctx: ssl.SSLContext, pinned: bool) -> None:
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    if pinned:  # the pin is the whole check: any chain, any name
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
