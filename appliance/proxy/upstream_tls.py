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
        return _context(self.cafile, bool(self.pin))

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


@functools.lru_cache(maxsize=32)
def _context(cafile: str, pinned: bool) -> ssl.SSLContext:
    """One context per kind of check (making one costs milliseconds)."""
    ctx = ssl.create_default_context(cafile=cafile or None)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    if pinned:  # the pin is the whole check: any chain, any name
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    return ctx
