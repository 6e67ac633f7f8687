"""Where an HTTP request from a guest goes: one strict grammar, sans-IO.

A request names its destination up to three times: the address the guest
connected to (the transparent port's original destination), the request target
(origin-form `/path`, absolute-form `http://host/path`, authority-form for
CONNECT) and the Host header.  The site's web proxy follows the request target,
the origin server follows Host, and we check what we parse: so every form is
parsed here, by one grammar, and the head we send on is rebuilt from the parsed
result, never passed through.  The grammar is narrower than RFC 3986's on
purpose: a host is a DNS name or a dotted-decimal IPv4 address.  No userinfo
(`x@host`), no IP literals in brackets (`[::ffff:198.51.100.3]`), no zone ids,
no numeric forms a resolver would read as an address (`3325256707`,
`0xc6.0x33.0x64.3`, `198.51.25603`, `010.0.0.1`).  A browser never needs more.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass

__all__ = [
    "BadTarget",
    "HostPort",
    "RequestTarget",
    "connect_target",
    "explicit_target",
    "parse_host",
    "transparent_target",
]

MAX_NAME = 253
_LABEL = re.compile(r"[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?")
_OCTET = re.compile(r"0|[1-9][0-9]{0,2}")
_PORT = re.compile(r"[0-9]{1,5}")
# a path is visible ASCII after its "/"; it cannot change where the request goes once
# the head is rebuilt, so real clients' unescaped "|" or "{" pass as squid passes them
_PATH = re.compile(r"/[\x21-\x7e]*")


class BadTarget(ValueError):
    """The request names its destination in a form we do not relay (answered 400)."""


@dataclass(frozen=True, slots=True)
class HostPort:
    """A checked destination: `host` is a lower-case DNS name or a dotted IPv4 address."""

    host: str
    port: int
    numeric: bool

    def authority(self, default_port: int) -> str:
        """host, or host:port when the port is not the scheme's default."""
        return self.host if self.port == default_port else f"{self.host}:{self.port}"


@dataclass(frozen=True, slots=True)
class RequestTarget:
    """Where a request goes and what to ask for there."""

    dest: HostPort
    path: str  # origin-form path and query; "" for CONNECT

    def absolute(self) -> str:
        """The absolute-form target a web proxy is given."""
        return f"http://{self.dest.authority(80)}{self.path}"


def _ipv4(text: str) -> bool:
    parts = text.split(".")
    return len(parts) == 4 and all(_OCTET.fullmatch(p) and int(p) < 256 for p in parts)


def _host(text: str) -> tuple[str, bool]:
    """(host, numeric) or BadTarget: a DNS name or a dotted-decimal IPv4 address."""
    host = text.lower()
    if host.endswith("."):
        host = host[:-1]
    if not host or len(host) > MAX_NAME or not host.isascii():
        raise BadTarget("give the host as a name or a dotted IPv4 address")
    labels = host.split(".")
    last = labels[-1]
    if last.isdigit() or last.startswith("0x"):
        # a resolver reads anything ending in a number as an address, in its own way
        if _ipv4(host):
            return host, True
        raise BadTarget("give the host as a name or a dotted IPv4 address")
    if not all(_LABEL.fullmatch(label) for label in labels):
        raise BadTarget("give the host as a name or a dotted IPv4 address")
    return host, False


@functools.lru_cache(maxsize=4096)
def parse_host(text: str, default_port: int) -> HostPort:
    """A Host header or an authority: `host` or `host:port`, strictly (cached: a page
    names the same few hosts many times; a refusal is not cached, it raises)."""
    host, sep, port = text.rpartition(":")
    if not sep:
        host, port = text, ""
    elif not _PORT.fullmatch(port) or not 0 < int(port) < 65536:
        raise BadTarget("the port must be a number from 1 to 65535")
    name, numeric = _host(host)
    return HostPort(name, int(port) if port else default_port, numeric)


def _absolute(target: str) -> RequestTarget:
    scheme, sep, rest = target.partition("://")
    if not sep or scheme.lower() != "http":
        raise BadTarget("an absolute request target must be an http:// URL")
    cut = len(rest)
    for mark in "/?#":
        at = rest.find(mark)
        if at != -1:
            cut = min(cut, at)
    authority, path = rest[:cut], rest[cut:]
    if path.startswith("?"):
        path = "/" + path
    return RequestTarget(parse_host(authority, 80), _path(path or "/"))


def _path(path: str) -> str:
    path = path.partition("#")[0] or "/"  # a fragment is the client's own
    if not _PATH.fullmatch(path):
        raise BadTarget("the request path must be visible ASCII, percent-encoded")
    return path


def _one_host(hosts: list[str]) -> str | None:
    if len(hosts) > 1:
        raise BadTarget("more than one Host header")
    return hosts[0] if hosts else None


def transparent_target(target: str, hosts: list[str], orig: tuple[str, int]) -> RequestTarget:
    """A request on the transparent port, to `orig` (the address the guest dialled).

    The destination is the Host header's name (or the absolute-form target's,
    which must then agree with Host); without either, the dialled address.  The
    port is always the dialled one: Host cannot steer the web proxy elsewhere.
    """
    orig_host, orig_port = orig
    host = _one_host(hosts)
    if target.startswith("/"):
        path = _path(target)
        dest = HostPort(orig_host, orig_port, True) if host is None else parse_host(host, orig_port)
    elif "://" in target:
        parsed = _absolute(target)
        dest, path = parsed.dest, parsed.path
        if host is not None and parse_host(host, 80) != dest:
            raise BadTarget("the Host header does not match the request target")
    else:
        raise BadTarget("the request target must be a path or an http:// URL")
    if dest.port != orig_port:
        raise BadTarget(f"only port {orig_port} is reached through this port")
    return RequestTarget(dest, path)


# Where a plain web request may go when the appliance relays it itself (no site web
# proxy): squid's default Safe_ports.  Other low ports are mail, DNS, SSH...: an
# HTTP request sent there is cross-protocol abuse (a form posted to an SMTP port).
WEB_PORTS = frozenset({80, 21, 443, 70, 210, 280, 488, 591, 777})


def web_port(port: int) -> bool:
    """May a guest's plain web request be relayed to this port?"""
    return port in WEB_PORTS or port >= 1025


def explicit_target(target: str) -> RequestTarget:
    """A request to the explicit proxy port: an absolute http:// URL.  Its Host header,
    whatever it says, is replaced by the URL's authority (RFC 9112 section 3.2.2)."""
    if "://" not in target:
        raise BadTarget("an explicit proxy request needs an http:// absolute URL")
    return _absolute(target)


def connect_target(target: str) -> RequestTarget:
    """CONNECT's authority-form `host:port` (the port is required)."""
    if ":" not in target:
        raise BadTarget("CONNECT needs host:port")
    dest = parse_host(target, 0)
    return RequestTarget(dest, "")
